"""Targets: devices + runtimes edgec compiles for and profiles on (see :mod:`edgec.targets.base`)."""

from edgec.targets.base import LatencyStats, Target, get_target, register, target_names
from edgec.targets import cpu_ort, openvino, qnn_htp  # noqa: F401  (register the built-in targets)

__all__ = ["LatencyStats", "Target", "get_target", "register", "target_names"]
