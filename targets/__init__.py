"""Targets: devices + runtimes edgec compiles for and profiles on (see :mod:`edgec.targets.base`)."""

from edgec.targets.base import LatencyStats, Target, get_target, register, target_names
from edgec.targets import cpu_ort  # noqa: F401  (registers cpu-ort)

__all__ = ["LatencyStats", "Target", "get_target", "register", "target_names"]
