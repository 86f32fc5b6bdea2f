"""Accuracy of an ONNX classifier under ONNX Runtime's CPU execution provider."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def onnx_logits(model_path: Path, x: np.ndarray, batch_size: int = 500, threads: int = 2,
                io: dict | None = None) -> np.ndarray:
    """Float logits (N, classes) of ``model_path`` on ``x`` (N, C, H, W) float32 under ORT CPU.

    A model with a fixed batch dimension runs in chunks of that size. ``io`` (the
    :class:`~edgec.compile.qnn.QuantizedIO` dict of a quantized-I/O model) quantizes the
    inputs and dequantizes the outputs as an app would, and the QDQ graph runs as its reference ops
    (ORT's graph optimizations off: DequantizeLinear → float op → QuantizeLinear), which emulates the
    device's quantized arithmetic. ORT's fused integer kernels would not: on an AVX2-only CPU (no VNNI)
    they were up to 56 output steps (0.080 at scale 0.0014) from the HTP simulator on the QDQ test model,
    the reference ops within the test's 3. Without ``io`` the model runs as ORT CPU runs it (optimized).
    """
    import onnxruntime as ort

    from edgec.compile.qnn import QuantizedIO

    qio = QuantizedIO(**io) if io is not None else None
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    if qio is not None:  # another device's model: its QDQ semantics, not ORT CPU's fused kernels
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")  # don't steal cores from timing
    from edgec.errors import ModelError

    try:
        sess = ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own types for unknown ops, bad graphs, …
        raise ModelError(f"ONNX Runtime cannot load {Path(model_path).name}",
                         " ".join(str(e).split())[:240] or type(e).__name__,
                         "use standard ONNX ops (or ONNX Runtime's contrib ops) and check the export") from None
    inp = sess.get_inputs()[0]
    if isinstance(inp.shape[0], int) and inp.shape[0] > 0:
        batch_size = inp.shape[0]
    outs = []
    for i in range(0, len(x), batch_size):
        chunk = x[i:i + batch_size]
        n = len(chunk)
        if n < batch_size and isinstance(inp.shape[0], int):  # pad the last chunk of a fixed-batch model
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - n, axis=0)])
        if qio is not None:
            chunk = qio.quantize_input(chunk)
        try:
            out = sess.run(None, {inp.name: chunk})[0][:n]
        except Exception as e:
            raise ModelError(f"ONNX Runtime failed running {Path(model_path).name}",
                             " ".join(str(e).split())[:240] or type(e).__name__, "check the model and its inputs") from None
        outs.append(qio.dequantize_output(out) if qio is not None else out)
    return np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)


def onnx_top1(model_path: Path, x: np.ndarray, y: np.ndarray, batch_size: int = 500, threads: int = 2,
              io: dict | None = None) -> float:
    """Top-1 accuracy in [0, 1] of ``model_path`` on ``x`` (N, C, H, W) float32 with labels ``y`` (N,) int64
    (see :func:`onnx_logits` for fixed-batch and quantized-I/O models)."""
    if len(x) == 0:
        return 0.0
    logits = onnx_logits(model_path, x, batch_size, threads, io)
    return float(np.mean(np.argmax(logits, axis=1) == y))
