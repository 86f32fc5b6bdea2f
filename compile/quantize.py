"""Static post-training quantization in QDQ format, honouring a per-layer policy.

The recipe for ONNX Runtime's CPU execution provider: ``onnxruntime.quantization
.quantize_static`` with QDQ format, uint8 activations, int8 per-channel weights,
MinMax calibration on training images (≥ 256). Layers the
:class:`~edgec.search.space.QuantPolicy` keeps FP32 are passed as
``nodes_to_exclude``, so no QuantizeLinear/DequantizeLinear pair sits on their
weights; INT8 layers get one (SimQ-NAS, Sridhar et al. 2023, §3: mixed
INT8/FP32 per layer).
"""

from __future__ import annotations

import io
import logging
import shutil
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import onnx

from edgec.compile.export import INPUT_NAME, layer_nodes
from edgec.errors import DataError, ExportError
from edgec.targets.worker import DISK_FULL_ERRNOS

MIN_CALIBRATION_IMAGES = 256


class _Batches:
    """ONNX Runtime CalibrationDataReader over ``x`` (N, ...) float32 in batches, fed to the model's
    input ``name``; a model with a fixed batch size gets batches of exactly that size."""

    def __init__(self, x: np.ndarray, name: str = INPUT_NAME, batch_size: int = 64, fixed: bool = False) -> None:
        stop = len(x) - len(x) % batch_size if fixed else len(x)
        self._it = iter([{name: x[i:i + batch_size]} for i in range(0, stop, batch_size)])

    def get_next(self):
        return next(self._it, None)


def load_for_policy(fp32_path: Path, int8_layers: tuple[str, ...], calib_x: np.ndarray
                    ) -> tuple[onnx.ModelProto, dict[str, onnx.NodeProto], onnx.ValueInfoProto]:
    """What every policy-driven recipe checks first: ≥ 256 calibration samples and a policy that names
    only layers the model has. Returns (model, {layer: node}, the graph's data input).
    Raises :class:`DataError` / :class:`ExportError`."""
    if len(calib_x) < MIN_CALIBRATION_IMAGES:
        raise DataError("too few calibration images", f"got {len(calib_x)}, need ≥ {MIN_CALIBRATION_IMAGES}",
                        "pass more training data")
    model = onnx.load(str(fp32_path))
    layers = layer_nodes(model)
    unknown = sorted(set(int8_layers) - set(layers))
    if unknown:
        raise ExportError(f"policy names layers the model lacks: {', '.join(unknown[:3])}",
                          f"model layers are {', '.join(sorted(layers)[:5])}…", "fix the policy")
    inits = {t.name for t in model.graph.initializer}
    return model, layers, next(i for i in model.graph.input if i.name not in inits)


@contextmanager
def quantizer_errors(what: str, fix: str = "report this with the candidate config"):
    """Silence a quantization library's prints and turn whatever it raises into one :class:`ExportError`."""
    for name in ("onnxruntime", "nncf"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
            yield
    except Exception as e:  # the libraries raise assorted types
        if isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS:
            raise  # the machine's problem, not the candidate's: the CLI says so in one line
        raise ExportError(f"{what} failed", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                          fix) from None


def quantize_qdq(fp32_path: Path, out_path: Path, int8_layers: tuple[str, ...], calib_x: np.ndarray) -> Path:
    """Write the QDQ model of ``fp32_path`` to ``out_path`` with only ``int8_layers`` quantized.

    ``calib_x``: (N ≥ 256, C, H, W) float32 calibration images. With no INT8 layer the
    FP32 model is copied unchanged. Raises :class:`DataError` for too few calibration
    images and :class:`ExportError` when quantization fails or names an unknown layer.
    """
    if not int8_layers:
        shutil.copyfile(fp32_path, out_path)
        return out_path
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    _, layers, data_input = load_for_policy(fp32_path, int8_layers, calib_x)
    dim0 = data_input.type.tensor_type.shape.dim[0]
    fixed_batch = dim0.dim_value if dim0.HasField("dim_value") and dim0.dim_value > 0 else None
    exclude = sorted(set(layers) - set(int8_layers))
    with quantizer_errors("quantization"):
        reader = _Batches(calib_x, data_input.name, fixed_batch or 64, fixed=fixed_batch is not None)
        quantize_static(str(fp32_path), str(out_path), reader, quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                        calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=exclude)
    return out_path


def weight_precisions(model: onnx.ModelProto) -> dict[str, str]:
    """{layer: "int8" | "fp32"}: INT8 when the layer's weight input comes from a DequantizeLinear."""
    producers = {o: n for n in model.graph.node for o in n.output}
    result = {}
    for name, node in layer_nodes(model).items():
        src = producers.get(node.input[1])
        result[name] = "int8" if src is not None and src.op_type == "DequantizeLinear" else "fp32"
    return result
