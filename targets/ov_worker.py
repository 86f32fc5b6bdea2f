"""OpenVINO work run inside a separate worker process (see :mod:`edgec.targets.worker`).

Imports only numpy and openvino, so a model that crashes the runtime takes down only this process.
"""

from __future__ import annotations

import time

import numpy as np

from edgec.targets.ort_worker import peak_rss_bytes


def compile_ov(model_path: str, device: str, threads: int, shape: list[int] | None, perf_count: bool):
    """``(openvino module, CompiledModel)`` of ``model_path`` on ``device`` as the targets run it: the
    LATENCY hint, and on the CPU a fixed thread count and FP32 kept FP32; ``shape`` reshapes the first input."""
    import openvino as ov

    core = ov.Core()
    model = core.read_model(model_path)
    if shape is not None:
        model.reshape({model.inputs[0]: shape})
    config = {"PERFORMANCE_HINT": "LATENCY", "PERF_COUNT": perf_count}
    if device == "CPU":
        # FP32 layers stay FP32: without the hint OpenVINO runs them in bf16 on CPUs that have it.
        config.update({"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32"})
    return ov, core.compile_model(model, device, config)


def measure_ov(model_path: str, input_shape: list[int], batch: int, device: str, threads: int, warmup_runs: int,
               runs: int, top_k: int = 10) -> dict:
    """Time ``runs`` synchronous inferences (LATENCY hint) after ``warmup_runs``; per-op times from the
    runtime's profiling info of the last run; session = read + compile."""
    t0 = time.perf_counter()
    ov, compiled = compile_ov(model_path, device, threads, [batch, *input_shape], perf_count=True)
    session_ms = (time.perf_counter() - t0) * 1e3
    req = compiled.create_infer_request()
    x = np.random.default_rng(0).random((batch, *input_shape), dtype=np.float32)
    t0 = time.perf_counter()
    req.infer({0: x})
    first_ms = (time.perf_counter() - t0) * 1e3
    for _ in range(warmup_runs):
        req.infer({0: x})
    samples = np.empty(runs)
    for i in range(runs):
        t0 = time.perf_counter_ns()
        req.infer({0: x})
        samples[i] = (time.perf_counter_ns() - t0) / 1e6
    ops = [{"node": p.node_name, "op": p.node_type, "exec_type": p.exec_type,
            "us": p.real_time.total_seconds() * 1e6} for p in req.get_profiling_info()]
    total = sum(o["us"] for o in ops) or 1.0
    top = [{**o, "share": o["us"] / total} for o in sorted(ops, key=lambda o: -o["us"])[:top_k]]
    return {"samples_ms": samples.tolist(), "session_ms": session_ms, "first_inference_ms": first_ms,
            "top_ops": top, "ov_version": ov.get_version(), "peak_rss_bytes": peak_rss_bytes()}


def predict_ov(model_path: str, inputs_npy: str, device: str, threads: int) -> dict:
    """Outputs of the model's first output for every sample of ``inputs_npy`` (N, ...), in one batch;
    written next to it as ``.out.npy``."""
    x = np.load(inputs_npy, allow_pickle=False)
    _, compiled = compile_ov(model_path, device, threads, list(x.shape), perf_count=False)
    out = compiled({0: x})[compiled.outputs[0]]
    out_path = inputs_npy.removesuffix(".npy") + ".out.npy"
    np.save(out_path, np.asarray(out), allow_pickle=False)
    return {"outputs": out_path}


def main() -> None:
    from edgec.targets.ort_worker import serve

    serve({"measure_ov": measure_ov, "predict_ov": predict_ov})


if __name__ == "__main__":
    main()
