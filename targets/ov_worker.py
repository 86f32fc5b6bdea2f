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


def runtime_graph(model_path: str, device: str, threads: int) -> dict:
    """The nodes of the runtime graph OpenVINO compiles ``model_path`` into at batch 1 (a symbolic batch
    dimension set to 1, compiled once), in execution order: ``{"nodes": [{"name", "layer" (layerType),
    "precision" (runtimePrecision), "original" (originalLayersNames), "inputs" (names of the producing
    nodes), "input_shapes", "output_shape"}]}`` (shapes [] where not static). Raises ``ValueError`` for a
    model with no input or a dynamic dimension other than the first input's batch."""
    import openvino as ov

    model = ov.Core().read_model(model_path)
    if not model.inputs:
        raise ValueError("the model has no inputs")
    first = model.inputs[0].get_partial_shape()
    if first.rank.is_dynamic or any(d.is_dynamic for d in list(first)[1:]):
        raise ValueError(f"its input has the shape {first}: only the batch dimension may be dynamic")
    shape = [1, *[d.get_length() for d in list(first)[1:]]] if first.rank.get_length() and first[0].is_dynamic \
        else None
    del model
    _, compiled = compile_ov(model_path, device, threads, shape, perf_count=False)

    def info(op, key: str) -> str:
        rt = op.get_rt_info()
        return rt[key].astype(str) if key in rt else ""

    def dims(ps) -> list[int]:
        return [d.get_length() for d in ps] if ps.is_static else []

    nodes = [{"name": op.get_friendly_name(), "layer": info(op, "layerType"), "precision": info(op, "runtimePrecision"),
              "original": info(op, "originalLayersNames"),
              "inputs": [op.input_value(i).get_node().get_friendly_name() for i in range(op.get_input_size())],
              "input_shapes": [dims(op.get_input_partial_shape(i)) for i in range(op.get_input_size())],
              "output_shape": dims(op.get_output_partial_shape(0)) if op.get_output_size() else []}
             for op in compiled.get_runtime_model().get_ordered_ops()]
    return {"nodes": nodes}


def main() -> None:
    from edgec.targets.ort_worker import serve

    serve({"measure_ov": measure_ov, "predict_ov": predict_ov, "runtime_graph": runtime_graph})


if __name__ == "__main__":
    main()
