"""``cpu-ort``: ONNX Runtime's CPU execution provider.

Graph optimizations on (``ORT_ENABLE_ALL``), intra-op threads fixed (default 2)
and recorded, one inter-op thread. Latency is wall clock (``kind = measured``),
timed in a separate worker process (:mod:`edgec.targets.worker`) so that a model that crashes the
runtime cannot take the pipeline down: warm-up runs first, then timed runs of one
batch each, summarized as p50/p90/p99/mean/min in ms.
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

import numpy as np

from edgec.targets.base import LatencyStats, Target, register
from edgec.targets.worker import Worker, call_for_target


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else ``platform.processor()``."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@register("cpu-ort")
class CpuOrt(Target):
    latency_kind = "measured"
    recipe = "ort-qdq-u8s8"  # static QDQ, uint8 activations, int8 per-channel weights

    def __init__(self, threads: int = 2, warmup_runs: int = 30, runs: int = 300, timeout_s: float = 120.0) -> None:
        self._set_run_options(threads, warmup_runs, runs, timeout_s)
        self._worker = Worker("edgec.targets.ort_worker")

    def availability(self) -> tuple[bool, str]:
        try:
            import onnxruntime as ort
        except ImportError as e:
            return False, f"onnxruntime is not installed ({e})"
        if "CPUExecutionProvider" not in ort.get_available_providers():
            return False, "ONNX Runtime has no CPUExecutionProvider"
        return True, ""

    def describe(self) -> dict[str, Any]:
        import onnxruntime as ort

        return {"runtime": f"onnxruntime {ort.__version__}", "device": cpu_model(), "provider": "CPUExecutionProvider",
                "threads": self.threads, "recipe": self.recipe, "latency_kind": self.latency_kind,
                "accuracy_backend": self.accuracy_backend}

    def measure_latency(self, model_path: Path, input_shape: tuple[int, ...], *, batch: int = 1) -> LatencyStats:
        """Raises :class:`TargetError` when the model fails, crashes or hangs the worker."""
        result = call_for_target(self._worker, self.name, Path(model_path).name, "measure_ort", self.timeout_s,
                                 model_path=str(model_path), input_shape=list(input_shape), batch=batch,
                                 threads=self.threads, warmup_runs=self.warmup_runs, runs=self.runs,
                                 providers=["CPUExecutionProvider"])
        return LatencyStats.from_samples(
            np.asarray(result["samples_ms"]), warmup_runs=self.warmup_runs, threads=self.threads, batch=batch,
            kind=self.latency_kind, runtime=f"onnxruntime {result['ort_version']}", device=cpu_model(),
            extra={"session_ms": result["session_ms"], "first_inference_ms": result["first_inference_ms"],
                   "peak_rss_bytes": result.get("peak_rss_bytes")})

    def profile_model(self, model_path: Path, input_shape: tuple[int, ...], *, batch: int = 1) -> dict[str, Any]:
        """Latency plus the top operators by mean kernel time (ONNX Runtime's profiler, its own pass)."""
        self.close()  # a fresh worker: its peak RSS is this model's (plus the runtime's baseline)
        stats = self.measure_latency(model_path, input_shape, batch=batch)
        prof = call_for_target(self._worker, self.name, Path(model_path).name, "profile_ort", self.timeout_s,
                               model_path=str(model_path), input_shape=list(input_shape), batch=batch,
                               threads=self.threads, runs=min(self.runs, 100), providers=["CPUExecutionProvider"])
        total = sum(n["mean_us"] for n in prof["nodes"]) or 1.0
        top = sorted(prof["nodes"], key=lambda n: -n["mean_us"])[:10]
        top_ops = [{**n, "share": n["mean_us"] / total} for n in top]
        return self._report(model_path, stats, batch, top_ops=top_ops, coverage=None)

    def close(self) -> None:
        self._worker.close()
