"""``cpu-openvino`` and ``npu-openvino``: the OpenVINO runtime (PyPI ``openvino``) reading ONNX models.

Recipe ``nncf-ptq-int8`` (:mod:`edgec.compile.nncf_ptq`). Latency: synchronous
inference with ``PERFORMANCE_HINT = LATENCY`` in a separate worker process, warm-up
runs then timed runs (``kind = measured``); per-op times from the runtime's
profiling info (``PERF_COUNT``). On the CPU, ``INFERENCE_PRECISION_HINT = f32``
keeps FP32 layers FP32 (OpenVINO would otherwise run them in bf16 where the CPU
has it) and the thread count is fixed and recorded. ``npu-openvino`` is available
only where ``openvino.Core().available_devices`` lists an NPU.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from edgec.targets.base import LatencyStats, Target, register
from edgec.targets.cpu_ort import cpu_model
from edgec.targets.worker import Worker, call_for_target


class _OpenVino(Target):
    latency_kind = "measured"
    recipe = "nncf-ptq-int8"
    device = "CPU"
    accuracy_backend = "openvino"

    def __init__(self, threads: int = 2, warmup_runs: int = 30, runs: int = 300, timeout_s: float = 120.0) -> None:
        self._set_run_options(threads, warmup_runs, runs, timeout_s)
        self._worker = Worker("edgec.targets.ov_worker")

    def availability(self) -> tuple[bool, str]:
        try:
            import openvino as ov
        except ImportError as e:
            return False, f"openvino is not installed ({e}); pip install openvino"
        devices = ov.Core().available_devices
        if self.device not in devices:
            return False, f"OpenVINO sees no {self.device} here (available: {', '.join(devices) or 'none'})"
        return True, ""

    def describe(self) -> dict[str, Any]:
        try:
            import openvino as ov

            runtime = f"openvino {ov.get_version().split('-')[0]}"
        except ImportError:
            runtime = "openvino (not installed)"
        device = cpu_model() if self.device == "CPU" else f"OpenVINO {self.device}"
        return {"runtime": runtime, "device": device, "provider": f"OpenVINO {self.device} plugin",
                "threads": self.threads, "recipe": self.recipe, "latency_kind": self.latency_kind,
                "performance_hint": "LATENCY", "accuracy_backend": f"openvino {self.device}"}

    def _measure(self, model_path: Path, input_shape: tuple[int, ...], batch: int) -> tuple[LatencyStats, dict]:
        result = call_for_target(self._worker, self.name, Path(model_path).name, "measure_ov", self.timeout_s,
                                 model_path=str(model_path), input_shape=list(input_shape), batch=batch,
                                 device=self.device, threads=self.threads, warmup_runs=self.warmup_runs,
                                 runs=self.runs)
        stats = LatencyStats.from_samples(
            np.asarray(result["samples_ms"]), warmup_runs=self.warmup_runs, threads=self.threads, batch=batch,
            kind=self.latency_kind, runtime=f"openvino {result['ov_version'].split('-')[0]}",
            device=self.describe()["device"],
            extra={"session_ms": result["session_ms"], "first_inference_ms": result["first_inference_ms"],
                   "peak_rss_bytes": result["peak_rss_bytes"]})
        return stats, result

    def measure_latency(self, model_path: Path, input_shape: tuple[int, ...], *, batch: int = 1) -> LatencyStats:
        """Raises :class:`TargetError` when the model fails, crashes or hangs the worker."""
        return self._measure(model_path, input_shape, batch)[0]

    def profile_model(self, model_path: Path, input_shape: tuple[int, ...], *, batch: int = 1) -> dict[str, Any]:
        self.close()  # a fresh worker: its peak RSS is this model's (plus the runtime's baseline)
        stats, result = self._measure(model_path, input_shape, batch)
        return self._report(model_path, stats, batch, top_ops=result["top_ops"], coverage=None)

    def predict(self, model_path: Path, x: np.ndarray) -> np.ndarray:
        """The model's first output on ``x`` (N, ...) float32 under this OpenVINO device, one batch."""
        with tempfile.TemporaryDirectory(prefix="edgec-ov-") as tmp:
            path = Path(tmp) / "inputs.npy"
            np.save(path, np.ascontiguousarray(x, dtype=np.float32), allow_pickle=False)
            result = call_for_target(self._worker, self.name, Path(model_path).name, "predict_ov",
                                     self.timeout_s, model_path=str(model_path), inputs_npy=str(path),
                                     device=self.device, threads=self.threads)
            return np.load(result["outputs"], allow_pickle=False)

    def close(self) -> None:
        self._worker.close()


@register("cpu-openvino")
class CpuOpenVino(_OpenVino):
    device = "CPU"


@register("npu-openvino")
class NpuOpenVino(_OpenVino):
    device = "NPU"
