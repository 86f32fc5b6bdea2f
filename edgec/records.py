"""Records the pipeline writes: :class:`Evaluation` (one per compiled + measured
candidate) and :class:`Artifact` (one per published model, listed in manifest.json)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

from edgec.search.space import Candidate
from edgec.targets.base import LatencyStats


@dataclass(frozen=True)
class Evaluation:
    """One candidate compiled for and measured on one target.

    ``val_accuracy`` is top-1 in [0, 1] of the compiled (quantized) ONNX model on
    the validation split; ``latency`` is at batch 1; ``size_bytes`` is the ONNX file.
    """

    candidate: Candidate
    target: str
    val_accuracy: float
    latency: LatencyStats
    size_bytes: int
    parity_max_abs: float     # max |logit diff| PyTorch vs FP32 ONNX
    compile_s: float          # wall time to extract, export, quantize and evaluate
    edgec_version: str
    role: str = "search"      # "reference" for the largest FP32 subnet
    quality: dict = field(default_factory=dict)  # ONNX-model input: fidelity to the FP32 model (see compile.source)
    # --objective max-latency: p50 on every target (LatencyStats dicts) and the search's latency objective,
    # max over targets of p50 / the reference's p50 there (dimensionless: kinds are never mixed)
    latency_by_target: dict = field(default_factory=dict)
    latency_objective: float | None = None

    @property
    def candidate_id(self) -> str:
        return self.candidate.id

    def objectives(self) -> tuple[float, float, float]:
        """(validation accuracy ↑, latency ↓, size bytes ↓) — the search's objectives. Latency is the
        primary target's p50 ms, or under ``--objective max-latency`` :attr:`latency_objective`."""
        latency = self.latency.p50_ms if self.latency_objective is None else self.latency_objective
        return (self.val_accuracy, latency, float(self.size_bytes))

    def to_dict(self) -> dict[str, Any]:
        return {"candidate_id": self.candidate_id, "candidate": self.candidate.to_dict(), "target": self.target,
                "role": self.role, "val_accuracy": self.val_accuracy, "latency": self.latency.to_dict(),
                "size_bytes": self.size_bytes, "parity_max_abs": self.parity_max_abs, "compile_s": self.compile_s,
                "edgec_version": self.edgec_version, **({"quality": self.quality} if self.quality else {}),
                **({"latency_by_target": self.latency_by_target, "latency_objective": self.latency_objective}
                   if self.latency_objective is not None else {})}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Evaluation":
        return cls(Candidate.from_dict(d["candidate"]), d["target"], float(d["val_accuracy"]),
                   LatencyStats.from_dict(d["latency"]), int(d["size_bytes"]), float(d["parity_max_abs"]),
                   float(d["compile_s"]), d["edgec_version"], d.get("role", "search"), dict(d.get("quality", {})),
                   dict(d.get("latency_by_target", {})),
                   None if d.get("latency_objective") is None else float(d["latency_objective"]))


@dataclass(frozen=True)
class Artifact:
    """A published model: what an app reads from ``manifest.json`` to pick one by budget."""

    id: str
    path: str                 # relative to the run directory
    sha256: str
    target: str
    role: str                 # "reference" | "pareto"
    chosen: bool
    test_accuracy: float
    val_accuracy: float
    p50_ms: float
    p90_ms: float
    latency_kind: str
    size_bytes: int
    config: dict
    policy: dict
    input: dict = field(default_factory=dict)   # name, shape, dtype, preprocessing (+ quantized_io)
    recipe: str = ""                            # the target's quantization recipe
    files: list = field(default_factory=list)   # further files next to the model (e.g. an EPContext binary)
    quality: dict = field(default_factory=dict)  # ONNX-model input: fidelity on the evaluation data
    finetuned: bool = False                     # built from --finetune-epochs weights, not the supernet's

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
