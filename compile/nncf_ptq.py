"""OpenVINO's recipe: NNCF post-training quantization of the ONNX model, layers kept FP32 ignored.

``nncf.quantize`` (NNCF, "Post-training Quantization" in its docs) inserts
QuantizeLinear/DequantizeLinear pairs calibrated on ≥ 256 images, with the
``OpenVINO``-friendly defaults (symmetric int8 weights per channel, uint8/int8
activations, the MIXED preset off). Layers the policy keeps FP32 form the
``IgnoredScope``. OpenVINO reads the QDQ ONNX model and runs the quantized parts
with its int8 kernels.
"""

from __future__ import annotations

import io
import logging
import shutil
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import onnx

from edgec.compile.export import layer_nodes
from edgec.compile.quantize import MIN_CALIBRATION_IMAGES
from edgec.errors import DataError, ExportError


def quantize_nncf(fp32_path: Path, out_path: Path, int8_layers: tuple[str, ...], calib_x: np.ndarray) -> Path:
    """Write the NNCF-quantized model of ``fp32_path`` to ``out_path`` (only ``int8_layers`` quantized).

    ``calib_x``: (N ≥ 256, C, H, W) float32. With no INT8 layer the FP32 model is copied.
    Raises :class:`DataError` (too few images) or :class:`ExportError`.
    """
    if not int8_layers:
        shutil.copyfile(fp32_path, out_path)
        return out_path
    if len(calib_x) < MIN_CALIBRATION_IMAGES:
        raise DataError("too few calibration images", f"got {len(calib_x)}, need ≥ {MIN_CALIBRATION_IMAGES}",
                        "pass more training data")
    model = onnx.load(str(fp32_path))
    layers = layer_nodes(model)
    unknown = sorted(set(int8_layers) - set(layers))
    if unknown:
        raise ExportError(f"policy names layers the model lacks: {', '.join(unknown[:3])}",
                          f"model layers are {', '.join(sorted(layers)[:5])}…", "fix the policy")
    ignored = sorted(set(layers) - set(int8_layers))
    name = model.graph.input[0].name
    logging.getLogger("nncf").setLevel(logging.ERROR)
    try:
        with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
            import nncf

            dataset = nncf.Dataset([calib_x[i:i + 1] for i in range(len(calib_x))], lambda x: {name: x})
            quantized = nncf.quantize(model, dataset, subset_size=len(calib_x),
                                      ignored_scope=nncf.IgnoredScope(names=ignored) if ignored else None)
    except Exception as e:  # NNCF raises assorted types
        raise ExportError("NNCF quantization failed", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                          "report this with the candidate config") from None
    onnx.save(quantized, str(out_path))
    return out_path
