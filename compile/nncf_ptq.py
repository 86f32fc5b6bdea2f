"""OpenVINO's recipe: NNCF post-training quantization of the ONNX model, layers kept FP32 ignored.

``nncf.quantize`` (NNCF, "Post-training Quantization" in its docs) inserts
QuantizeLinear/DequantizeLinear pairs calibrated on ≥ 256 images, with the
``OpenVINO``-friendly defaults (symmetric int8 weights per channel, uint8/int8
activations, the MIXED preset off). Layers the policy keeps FP32 form the
``IgnoredScope``. OpenVINO reads the QDQ ONNX model and runs the quantized parts
with its int8 kernels.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx

from edgec.compile.quantize import load_for_policy, quantizer_errors


def quantize_nncf(fp32_path: Path, out_path: Path, int8_layers: tuple[str, ...], calib_x: np.ndarray) -> Path:
    """Write the NNCF-quantized model of ``fp32_path`` to ``out_path`` (only ``int8_layers`` quantized).

    ``calib_x``: (N ≥ 256, C, H, W) float32. With no INT8 layer the FP32 model is copied.
    Raises :class:`DataError` (too few images) or :class:`ExportError`.
    """
    if not int8_layers:
        shutil.copyfile(fp32_path, out_path)
        return out_path
    model, layers, data_input = load_for_policy(fp32_path, int8_layers, calib_x)
    ignored = sorted(set(layers) - set(int8_layers))
    name = data_input.name
    with quantizer_errors("NNCF quantization"):
        import nncf

        dataset = nncf.Dataset([calib_x[i:i + 1] for i in range(len(calib_x))], lambda x: {name: x})
        quantized = nncf.quantize(model, dataset, subset_size=len(calib_x),
                                  ignored_scope=nncf.IgnoredScope(names=ignored) if ignored else None)
    onnx.save(quantized, str(out_path))
    return out_path
