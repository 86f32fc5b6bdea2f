"""Latency measurement body run inside a separate worker process.

Imports only numpy and onnxruntime (no torch), so the spawned worker starts fast;
a model that crashes the runtime takes down only this process.
"""

from __future__ import annotations

import time

import numpy as np


def measure_ort(model_path: str, input_shape: tuple[int, ...], batch: int, threads: int, warmup_runs: int,
                runs: int, providers: list[str], seed: int = 0) -> dict:
    """Time ``runs`` single-batch inferences after ``warmup_runs``; returns samples in ms and versions."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    t0 = time.perf_counter()
    sess = ort.InferenceSession(model_path, so, providers=providers)
    session_ms = (time.perf_counter() - t0) * 1e3
    name = sess.get_inputs()[0].name
    x = np.random.default_rng(seed).random((batch, *input_shape), dtype=np.float32)
    t0 = time.perf_counter()
    sess.run(None, {name: x})
    first_ms = (time.perf_counter() - t0) * 1e3
    for _ in range(warmup_runs):
        sess.run(None, {name: x})
    samples = np.empty(runs)
    for i in range(runs):
        t0 = time.perf_counter_ns()
        sess.run(None, {name: x})
        samples[i] = (time.perf_counter_ns() - t0) / 1e6
    return {"samples_ms": samples.tolist(), "session_ms": session_ms, "first_inference_ms": first_ms,
            "ort_version": ort.__version__}


def main() -> None:
    """Serve JSON-line requests on stdin: ``{"fn": "measure_ort", "kwargs": {...}}`` → one JSON line."""
    import json
    import sys

    functions = {"measure_ort": measure_ort}
    for line in sys.stdin:
        request = json.loads(line)
        try:
            reply = {"ok": functions[request["fn"]](**request["kwargs"])}
        except Exception as e:  # reported to the parent, which raises TargetError
            reply = {"error": f"{type(e).__name__}: {' '.join(str(e).split())[:400]}"}  # one line, bounded
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
