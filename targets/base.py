"""The ``Target`` interface, its registry and :class:`LatencyStats`.

A target knows whether it is available here (and why not), how to quantize for
itself (its recipe name), how to measure latency and which *kind* that latency
is: ``measured`` (wall clock on the real device), ``simulated`` (a simulator's
cost) or ``predicted`` (a model's estimate). Kinds are never mixed in one number.
"""

from __future__ import annotations

import abc
import difflib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from edgec.errors import TargetError

LATENCY_KINDS = ("measured", "simulated", "predicted")


@dataclass(frozen=True)
class LatencyStats:
    """Latency of one model on one target at one batch size, in milliseconds."""

    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    min_ms: float
    runs: int
    warmup_runs: int
    threads: int
    batch: int
    kind: str
    runtime: str = ""           # e.g. "onnxruntime 1.32.0"
    device: str = ""            # e.g. the CPU model
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        assert self.kind in LATENCY_KINDS, self.kind

    @classmethod
    def from_samples(cls, samples_ms: np.ndarray, **fields: Any) -> "LatencyStats":
        """Summarize per-run latencies ``samples_ms`` (runs,) float in ms."""
        p50, p90, p99 = np.percentile(samples_ms, [50, 90, 99])
        return cls(float(p50), float(p90), float(p99), float(np.mean(samples_ms)), float(np.min(samples_ms)),
                   runs=len(samples_ms), **fields)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LatencyStats":
        return cls(**{**d, "extra": dict(d.get("extra", {}))})


class Target(abc.ABC):
    """A device + runtime edgec can compile for and profile on."""

    name: str = ""
    latency_kind: str = "measured"
    recipe: str = ""          # the quantization recipe this target wants, e.g. "ort-qdq-u8s8"

    @abc.abstractmethod
    def availability(self) -> tuple[bool, str]:
        """(available here?, reason when not)."""

    @abc.abstractmethod
    def describe(self) -> dict[str, Any]:
        """Runtime, version, device: what ``edgec targets`` shows."""

    @abc.abstractmethod
    def measure_latency(self, model_path: Path, input_shape: tuple[int, ...], *, batch: int = 1) -> LatencyStats:
        """Latency of ``model_path`` on random inputs of shape ``(batch, *input_shape)`` float32 (a text model:
        ``input_shape`` is ``(sequence_length,)`` and its integer inputs get token ids and masks)."""

    static_batch: bool = False  # True where the recipe fixes the batch (the model then has one batch size)

    def _set_run_options(self, threads: int, warmup_runs: int, runs: int, timeout_s: float) -> None:
        """Check and keep the measurement options every target takes; :class:`TargetError` if out of range."""
        if not 1 <= threads <= 256 or runs < 1 or warmup_runs < 0 or timeout_s <= 0:
            raise TargetError(f"bad {self.name} options", f"threads={threads} (1..256), runs={runs} (≥ 1), "
                              f"warmup_runs={warmup_runs} (≥ 0), timeout_s={timeout_s} (> 0)", "fix the values")
        self.threads, self.warmup_runs, self.runs, self.timeout_s = threads, warmup_runs, runs, timeout_s
    # Where accuracy of this target's models is computed: its own runtime when predict() works,
    # else ONNX Runtime's CPU kernels on the same graph (an emulation, labelled so in reports).
    accuracy_backend: str = "onnxruntime-cpu"

    def predict(self, model_path: Path, x: np.ndarray) -> np.ndarray | None:
        """The model's first output on ``x`` (N, ...) float32 computed by this target's runtime, or
        ``None`` when the target cannot run whole splits cheaply (accuracy then uses ORT's CPU kernels)."""
        return None

    def profile_model(self, model_path: Path, input_shape: tuple[int, ...], *, batch: int = 1) -> dict[str, Any]:
        """A device report for one model: ``latency`` (:class:`LatencyStats` dict), ``throughput_per_s``
        (samples/s at ``batch``, from p50), ``session_ms``, ``first_inference_ms``, ``peak_rss_bytes``
        (of the measuring process, runtime baseline included; None if unknown), ``size_bytes``,
        ``top_ops`` (list of {node, op, share, …} by time or cycles) and ``npu_coverage`` (None on CPUs).
        Targets override this to add what their runtime can tell."""
        stats = self.measure_latency(model_path, input_shape, batch=batch)
        return self._report(model_path, stats, batch, top_ops=[], coverage=None)

    def _report(self, model_path: Path, stats: LatencyStats, batch: int, top_ops: list, coverage: dict | None
                ) -> dict[str, Any]:
        return {"target": self.name, "latency": stats.to_dict(), "latency_kind": stats.kind,
                "throughput_per_s": batch * 1e3 / stats.p50_ms if stats.p50_ms > 0 else None,
                "session_ms": stats.extra.get("session_ms"), "first_inference_ms": stats.extra.get("first_inference_ms"),
                "peak_rss_bytes": stats.extra.get("peak_rss_bytes"), "size_bytes": Path(model_path).stat().st_size,
                "top_ops": top_ops, "npu_coverage": coverage}

    def run(self, model_path: Path, inputs: np.ndarray, work_dir: Path) -> np.ndarray | None:
        """Outputs of the model on the device itself for a few ``inputs`` (N, ...) in the model's input
        dtype, where :meth:`predict` is ``None`` (the accuracy was emulated); ``None`` elsewhere."""
        return None

    def check_source(self, model_path: Path, shown_as: str | None = None) -> None:
        """Refuse, before any work, a user's float model this target cannot run (a one-line
        :class:`~edgec.errors.ModelError` naming the nodes). Default: accept."""

    def package(self, model_path: Path, folder: Path) -> dict[str, Any]:
        """Write target-specific files next to a model being published (e.g. a precompiled context
        binary) into ``folder``; returns what was written. Default: nothing."""
        return {}

    def close(self) -> None:
        """Release workers or sessions; the target stays usable (it reopens on demand)."""

    def require_available(self) -> None:
        ok, why = self.availability()
        if not ok:
            raise TargetError(f"target {self.name!r} is not available here", why,
                              "run 'edgec targets' to see which targets are available")


_REGISTRY: dict[str, Callable[..., Target]] = {}


def measure_interleaved(target: Target, models: Mapping[Any, Path], input_shape: tuple[int, ...], rounds: int,
                        on_round: Callable[[int], None] | None = None) -> dict[Any, LatencyStats]:
    """Measure every model ``rounds`` times at batch 1, interleaved so machine noise hits all alike.

    ``models``: {key: model path}. Each key gets the stats of its median-p50 round, with every
    round's p50 (ms) in ``extra["round_p50_ms"]``. ``on_round(r)`` after each round.
    """
    samples: dict[Any, list[LatencyStats]] = {key: [] for key in models}
    for r in range(rounds):
        for key, path in models.items():
            samples[key].append(target.measure_latency(path, input_shape, batch=1))
        if on_round:
            on_round(r + 1)
    result = {}
    for key, stats in samples.items():
        median = sorted(stats, key=lambda s: s.p50_ms)[len(stats) // 2]
        result[key] = replace(median, extra={**median.extra, "round_p50_ms": [s.p50_ms for s in stats]})
    return result


def register(name: str):
    """Class decorator: make a target known under ``name``; duplicates are an error."""
    def deco(cls):
        if name in _REGISTRY:
            raise ValueError(f"target {name!r} is registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls
    return deco


def target_names() -> list[str]:
    return sorted(_REGISTRY)


def get_target(name: str, **options: Any) -> Target:
    """Instantiate the target registered as ``name``; raises :class:`TargetError` naming the known ones."""
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, _REGISTRY, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise TargetError(f"unknown target {name!r}", f"known targets: {', '.join(target_names())}",
                          f"{hint}run 'edgec targets' to list them")
    return _REGISTRY[name](**options)
