"""Quantization recipes by name: what each target wants its models built with.

A :class:`~edgec.targets.base.Target` names its recipe (``Target.recipe``); the
pipeline builds a candidate's deployable model with :func:`build`. The per-layer
policy (INT8 / FP32 per conv or linear layer, SimQ-NAS §3) means per recipe:

- ``ort-qdq-u8s8`` (ONNX Runtime CPU): INT8 layers get QDQ (uint8 activations, int8
  per-channel weights), FP32 layers stay float (:mod:`edgec.compile.quantize`);
- ``qnn-qdq-u8s8-a16`` (Qualcomm HTP): every layer is quantized (int8 per-channel weights);
  INT8 layers get uint8 activations, FP32 layers uint16 activations; batch fixed to 1; quantized I/O
  (:mod:`edgec.compile.qnn`);
- ``nncf-ptq-int8`` (OpenVINO): NNCF post-training quantization with the FP32 layers as
  the ignored scope (:mod:`edgec.compile.nncf_ptq`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgec.errors import ConfigError

RECIPES = ("ort-qdq-u8s8", "qnn-qdq-u8s8-a16", "nncf-ptq-int8")


def build(recipe: str, fp32_path: Path, out_path: Path, int8_layers: tuple[str, ...],
          calib_x: np.ndarray) -> dict | None:
    """Write the deployable model of ``fp32_path`` for ``recipe`` to ``out_path``.

    ``int8_layers``: the layers the policy quantizes to INT8 (every other layer is "FP32").
    ``calib_x``: (N ≥ 256, C, H, W) float32 calibration images. Returns the quantized-I/O
    parameters (:class:`~edgec.compile.qnn.QuantizedIO` as a dict) when the model's I/O is
    quantized, else ``None``. Raises :class:`ConfigError` for an unknown recipe and the
    recipe's :class:`~edgec.errors.ExportError` / :class:`~edgec.errors.DataError`.
    """
    if recipe == "ort-qdq-u8s8":
        from edgec.compile.quantize import quantize_qdq

        quantize_qdq(fp32_path, out_path, int8_layers, calib_x)
        return None
    if recipe == "qnn-qdq-u8s8-a16":
        from edgec.compile.qnn import quantize_qnn

        io = quantize_qnn(fp32_path, out_path, int8_layers, calib_x)
        return io.to_dict() if io else None
    if recipe == "nncf-ptq-int8":
        from edgec.compile.nncf_ptq import quantize_nncf

        quantize_nncf(fp32_path, out_path, int8_layers, calib_x)
        return None
    raise ConfigError(f"unknown quantization recipe {recipe!r}", f"known recipes: {', '.join(RECIPES)}",
                      "pick a target that names one of them")
