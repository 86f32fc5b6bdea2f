"""``cpu-macs``: no device at all — a *predicted* latency from the graph's multiply-accumulates.

For dry runs, CI and scale-out tests, where a search must run without timing anything and give
the same result every time: the model is built exactly as for ``cpu-ort`` (same recipe, accuracy
with ONNX Runtime's CPU kernels), but its latency is a count, not a measurement::

    p50_ms = fp32_macs / FP32_MACS_PER_MS + int8_macs / INT8_MACS_PER_MS + nodes × NODE_OVERHEAD_MS

MACs are those of ``Conv``, ``ConvTranspose``, ``Gemm`` and ``MatMul`` nodes at batch 1 (shapes from
ONNX shape inference); a node counts as INT8 when its weight comes through a ``DequantizeLinear``
(the QDQ form of a quantized layer). The throughputs are *assumed* (a 2-core x86 CPU's order of
magnitude, INT8 at 2× FP32), recorded in ``extra``; the kind is ``predicted`` and the number is
never mixed with measured ones. Deterministic: the same graph always gives the same value.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgec.errors import ModelError
from edgec.targets.base import LatencyStats, Target, register

if TYPE_CHECKING:  # onnx is imported where it is used: it takes ~1.5 s, which every CLI start would pay
    import onnx

FP32_MACS_PER_MS = 4.0e6     # assumed: 4 GMAC/s in FP32
INT8_MACS_PER_MS = 8.0e6     # assumed: INT8 kernels at twice the FP32 rate
NODE_OVERHEAD_MS = 0.0005    # assumed: 0.5 µs per executed node (dispatch)
FREE_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "Identity", "Reshape", "Flatten", "Squeeze",
                      "Unsqueeze", "Constant", "Shape"})


def _dims(vi: onnx.ValueInfoProto) -> list[int] | None:
    """The static shape, the first (batch) dimension taken as 1 when symbolic; None when any other
    dimension is unknown (then the MACs cannot be counted, and are not guessed)."""
    tt = vi.type.tensor_type
    if not tt.HasField("shape"):
        return None
    dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tt.shape.dim]
    if dims and dims[0] is None:
        dims[0] = 1
    return None if not dims or any(d is None for d in dims) else dims


def count_macs(model: onnx.ModelProto) -> dict[str, int]:
    """{"fp32_macs", "int8_macs", "nodes"} of ``model`` at batch 1 (see the module docstring).

    Raises :class:`ModelError` when shape inference cannot give a compute node's shapes."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    shapes = {vi.name: _dims(vi) for vi in [*g.input, *g.value_info, *g.output]}
    shapes.update({t.name: list(t.dims) for t in g.initializer})
    produced_by = {o: n for n in g.node for o in n.output}
    fp32 = int8 = nodes = 0
    for n in g.node:
        if n.op_type not in FREE_OPS:
            nodes += 1
        if n.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
            continue
        w_name = n.input[1]
        w_src = produced_by.get(w_name)
        quantized = w_src is not None and w_src.op_type == "DequantizeLinear"
        w = shapes.get(w_src.input[0] if quantized else w_name) or shapes.get(w_name)
        out = shapes.get(n.output[0])
        if not w or not out:
            raise ModelError(f"cannot count the MACs of node {n.name!r} ({n.op_type})",
                             "ONNX shape inference gave no shape for its weight or output",
                             "export the model with static shapes")
        if n.op_type in ("Conv", "ConvTranspose"):
            macs = int(np.prod(out, dtype=np.int64)) * int(np.prod(w[1:], dtype=np.int64))
            if n.op_type == "ConvTranspose":
                macs = int(np.prod(shapes.get(n.input[0]) or out, dtype=np.int64)) * int(np.prod(w[1:], dtype=np.int64))
        else:  # Gemm / MatMul: every output element is a dot product over the weight's first dim (K)
            transposed = n.op_type == "Gemm" and any(a.name == "transB" and a.i for a in n.attribute)
            k = w[-1] if transposed else (w[-2] if len(w) >= 2 else w[0])
            macs = int(np.prod(out, dtype=np.int64)) * int(k)
        if quantized:
            int8 += macs
        else:
            fp32 += macs
    return {"fp32_macs": fp32, "int8_macs": int8, "nodes": nodes}


@register("cpu-macs")
class CpuMacs(Target):
    latency_kind = "predicted"
    recipe = "ort-qdq-u8s8"  # built as for cpu-ort, so its models and accuracies are cpu-ort's

    def __init__(self, threads: int = 2, warmup_runs: int = 0, runs: int = 1, timeout_s: float = 120.0) -> None:
        self._set_run_options(threads, warmup_runs, runs, timeout_s)

    def availability(self) -> tuple[bool, str]:
        try:
            import onnxruntime  # noqa: F401  (accuracy is computed with ONNX Runtime's CPU kernels)
        except ImportError as e:
            return False, f"onnxruntime is not installed ({e})"
        return True, ""

    def describe(self) -> dict[str, Any]:
        return {"runtime": "none (MAC count)", "device": "none: predicted from the graph, no device timed",
                "recipe": self.recipe, "latency_kind": self.latency_kind, "accuracy_backend": self.accuracy_backend,
                "assumed": {"fp32_macs_per_ms": FP32_MACS_PER_MS, "int8_macs_per_ms": INT8_MACS_PER_MS,
                            "node_overhead_ms": NODE_OVERHEAD_MS}}

    def measure_latency(self, model_path: Path, input_shape: tuple[int, ...], *, batch: int = 1) -> LatencyStats:
        """Predicted p50 (all percentiles equal: a count has no spread) at ``batch`` × the batch-1 MACs.
        Raises :class:`ModelError` when the file is not a readable ONNX model."""
        from edgec.compile.source import load_untrusted

        counts = count_macs(load_untrusted(Path(model_path)))
        ms = batch * (counts["fp32_macs"] / FP32_MACS_PER_MS + counts["int8_macs"] / INT8_MACS_PER_MS) \
            + counts["nodes"] * NODE_OVERHEAD_MS
        return LatencyStats(ms, ms, ms, ms, ms, runs=1, warmup_runs=0, threads=self.threads, batch=batch,
                            kind=self.latency_kind, runtime="none (MAC count)", device="none",
                            extra={**counts, "assumed_fp32_macs_per_ms": FP32_MACS_PER_MS,
                                   "assumed_int8_macs_per_ms": INT8_MACS_PER_MS,
                                   "assumed_node_overhead_ms": NODE_OVERHEAD_MS})
