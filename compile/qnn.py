"""The quantization recipe for Qualcomm's HTP (``npu-qnn-htp``): static-shape QDQ with quantized I/O.

Steps, as ONNX Runtime's QNN documentation prescribes
(onnxruntime.ai/docs/execution-providers/QNN-ExecutionProvider.html, "Running a model with QNN EP's HTP backend"):

1. fix the batch dimension (HTP compiles static shapes only);
2. ``qnn_preprocess_model`` (fuses patterns HTP wants as one op);
3. ``get_qnn_qdq_config`` + ``quantize``: uint8 activations, int8 symmetric
   per-channel weights, MinMax calibration on ≥ 256 training images. (Per-tensor
   uint8 weights, the function's default, cost 6.3 points on the largest fashion-mnist
   subnet: 85.6 % vs 91.9 % FP32 on 2,000 test images; per-channel: 91.85 %.) The per-layer policy picks the
   *activation* precision: a layer the :class:`~edgec.search.space.QuantPolicy`
   marks ``int8`` gets uint8 activations, one it marks ``fp32`` gets uint16
   activations (HTP has no FP32 path worth measuring, so "keep this layer
   precise" means 16-bit activations here);
4. quantized I/O: the boundary ``QuantizeLinear`` on the input and
   ``DequantizeLinear`` on the output are removed, so the graph takes and returns
   uint8 tensors and the HTP computes only the network (as Qualcomm AI Hub's
   ``--quantize_io`` does). With float I/O, ONNX Runtime places those two nodes on
   the CPU when CPU fallback is allowed; with it disabled (edgec's default) the QNN
   EP takes them, and the HTP spends cycles quantizing the input (measured here:
   ~8 % of a small digits net's cycles). The scales and zero points the app needs
   to (de)quantize are returned and published.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from edgec.compile.quantize import load_for_policy, quantizer_errors
from edgec.errors import ExportError

RECIPE = "qnn-qdq-u8s8-a16"  # int8 per-channel weights; uint8 activations, uint16 where the policy keeps a layer precise


@dataclass(frozen=True)
class QuantizedIO:
    """How an app converts to/from the quantized-I/O model: ``q = clip(round(x / scale) + zero_point)``
    and ``x = (q - zero_point) * scale``; dtypes are numpy names (``uint8``/``uint16``)."""

    input_name: str
    input_scale: float
    input_zero_point: int
    input_dtype: str
    output_name: str
    output_scale: float
    output_zero_point: int
    output_dtype: str

    def to_dict(self) -> dict:
        return asdict(self)

    def quantize_input(self, x: np.ndarray) -> np.ndarray:
        """(N, ...) float32 → the model's quantized input dtype."""
        info = np.iinfo(self.input_dtype)
        q = np.round(x / self.input_scale) + self.input_zero_point
        return np.clip(q, info.min, info.max).astype(self.input_dtype)

    def dequantize_output(self, q: np.ndarray) -> np.ndarray:
        return (q.astype(np.float32) - self.output_zero_point) * np.float32(self.output_scale)


class _PerImage:
    """CalibrationDataReader feeding ``x`` one image at a time (the graph's batch is fixed to 1)."""

    def __init__(self, name: str, x: np.ndarray) -> None:
        self._it = iter([{name: x[i:i + 1]} for i in range(len(x))])

    def get_next(self):
        return next(self._it, None)


def fix_batch(model: onnx.ModelProto, batch: int = 1) -> onnx.ModelProto:
    """Set the first dimension of every graph input and output to ``batch`` (in place)."""
    for value in list(model.graph.input) + list(model.graph.output):
        dims = value.type.tensor_type.shape.dim
        if dims:
            dims[0].Clear()
            dims[0].dim_value = batch
    for value in model.graph.value_info:  # stale intermediate shapes would contradict the new batch
        dims = value.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].Clear()
            dims[0].dim_value = batch
    return model


def quantize_qnn(fp32_path: Path, out_path: Path, int8_layers: tuple[str, ...], calib_x: np.ndarray,
                 quantized_io: bool = True) -> QuantizedIO | None:
    """Write the HTP QDQ model of ``fp32_path`` (batch fixed to 1) to ``out_path``.

    ``int8_layers``: layers with uint8 output activations; every other conv/linear layer
    (those a policy keeps "FP32") gets uint16 activations. Weights are int8 per channel throughout.
    ``calib_x``: (N ≥ 256, C, H, W) float32. Returns the I/O quantization parameters when
    ``quantized_io`` (the model then takes and returns uint8/uint16), else ``None``.
    Raises :class:`DataError` (too few images) or :class:`ExportError`.
    """
    from onnxruntime.quantization import QuantType, quantize
    from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config, qnn_preprocess_model

    model, layers, data_input = load_for_policy(fp32_path, int8_layers, calib_x)
    overrides = {node.output[0]: [{"quant_type": QuantType.QUInt16}]
                 for name, node in layers.items() if name not in set(int8_layers)}
    with tempfile.TemporaryDirectory(prefix="edgec-qnn-") as tmp:
        fixed, pre = Path(tmp) / "fixed.onnx", Path(tmp) / "pre.onnx"
        del model.metadata_props[:]  # qnn_preprocess_model fails on models that carry metadata (ORT 1.32)
        onnx.save(fix_batch(model), str(fixed))
        with quantizer_errors("QNN quantization", "report this with the model"):
            src = pre if qnn_preprocess_model(str(fixed), str(pre)) else fixed
            config = get_qnn_qdq_config(str(src), _PerImage(data_input.name, calib_x),
                                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                                        per_channel=True, weight_symmetric=True, init_overrides=overrides or None)
            quantize(str(src), str(Path(tmp) / "qdq.onnx"), config)
        if not quantized_io:
            shutil.copyfile(Path(tmp) / "qdq.onnx", out_path)
            return None
        qdq = onnx.load(str(Path(tmp) / "qdq.onnx"))
    io_params = strip_io_qdq(qdq)
    onnx.save(qdq, str(out_path))
    return io_params


def strip_io_qdq(model: onnx.ModelProto) -> QuantizedIO:
    """Remove the QuantizeLinear after the (single) graph input and the DequantizeLinear before the
    (single) graph output, in place; the graph then has quantized I/O. Raises :class:`ExportError`
    when the graph does not have that shape."""
    g = model.graph
    if len(g.input) != 1 or len(g.output) != 1:
        raise ExportError("quantized I/O needs one graph input and one output",
                          f"the model has {len(g.input)} inputs and {len(g.output)} outputs",
                          "export a single-input single-output model")
    inp, out = g.input[0].name, g.output[0].name
    q = [n for n in g.node if n.op_type == "QuantizeLinear" and n.input[0] == inp]
    dq = [n for n in g.node if n.op_type == "DequantizeLinear" and n.output[0] == out]
    users = [n for n in g.node if inp in n.input]
    if len(q) != 1 or len(dq) != 1 or len(users) != 1:
        raise ExportError("cannot make the model's I/O quantized",
                          "its input does not feed exactly one QuantizeLinear or its output does not come "
                          "from a DequantizeLinear", "report this with the model")
    inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}

    def params(node: onnx.NodeProto) -> tuple[float, int, str]:
        scale, zp = inits[node.input[1]], inits[node.input[2]]
        return float(scale), int(zp), zp.dtype.name

    in_scale, in_zp, in_dtype = params(q[0])
    out_scale, out_zp, out_dtype = params(dq[0])
    q_out, dq_in = q[0].output[0], dq[0].input[0]
    g.node.remove(q[0])
    g.node.remove(dq[0])
    for node in g.node:
        for i, name in enumerate(node.input):
            if name == q_out:
                node.input[i] = inp
        for i, name in enumerate(node.output):
            if name == dq_in:
                node.output[i] = out
    elem = onnx.helper.np_dtype_to_tensor_dtype
    g.input[0].type.tensor_type.elem_type = elem(np.dtype(in_dtype))
    g.output[0].type.tensor_type.elem_type = elem(np.dtype(out_dtype))
    onnx.checker.check_model(model)
    return QuantizedIO(inp, in_scale, in_zp, in_dtype, out, out_scale, out_zp, out_dtype)
