"""Accuracy of an ONNX classifier under ONNX Runtime's CPU execution provider."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def onnx_top1(model_path: Path, x: np.ndarray, y: np.ndarray, batch_size: int = 500, threads: int = 2) -> float:
    """Top-1 accuracy in [0, 1] of ``model_path`` on ``x`` (N, C, H, W) float32 with labels ``y`` (N,) int64.

    Runs the graph's first input/output in batches of ``batch_size`` (the batch dimension must be dynamic).
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")  # don't steal cores from timing
    sess = ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    correct = 0
    for i in range(0, len(x), batch_size):
        logits = sess.run(None, {name: x[i:i + batch_size]})[0]
        correct += int(np.sum(np.argmax(logits, axis=1) == y[i:i + batch_size]))
    return correct / max(1, len(x))
