"""Targets: devices + runtimes edgec compiles for and profiles on (see :mod:`edgec.targets.base`)."""

from edgec.targets.base import LatencyStats, Target, get_target, register, target_names
from edgec.targets import cpu_ort, macs_proxy, openvino, qnn_htp  # noqa: F401  (register the built-in targets)

__all__ = ["LatencyStats", "Target", "get_target", "open_target", "register", "target_names"]


def open_target(name: str, threads: int = 2, runs: int | None = None, npu_cpu_fallback: bool = False,
                htp_fp16: bool = False) -> Target:
    """:func:`get_target` with the user-facing options mapped onto the target that takes them:
    ``npu_cpu_fallback`` and ``htp_fp16`` (fp16 on the HTP; the QNN EP then needs a SoC id, and 57
    is one its simulator accepts) apply to ``npu-qnn-htp`` only."""
    options: dict = {"threads": threads, **({"runs": runs} if runs is not None else {})}
    if name == "npu-qnn-htp":
        options["require_full_npu"] = not npu_cpu_fallback
        if htp_fp16:
            options["htp_options"] = {"enable_htp_fp16_precision": "1", "soc_model": "57"}
    return get_target(name, **options)
