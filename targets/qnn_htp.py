"""``npu-qnn-htp``: Qualcomm's Hexagon Tensor Processor through ONNX Runtime's QNN execution provider.

Runtime: PyPI ``onnxruntime-qnn``, a plugin EP registered at run time
(``onnxruntime.register_execution_provider_library``), HTP backend
(``onnxruntime_qnn.get_qnn_htp_path()``). On x86-64 that backend is Qualcomm's HTP
*simulator*: outputs are what the NPU computes, timings are not device latency, so
this target's latency kind is ``simulated`` there (``measured`` on an Arm device).

Cost: the simulator's detailed profile (``profiling_level = detailed``) reports
"Accelerator (execute) time (cycles)" per run and cycles per node. The target runs
a model ``warmup_runs + runs`` times and summarizes the cycles of the timed runs.
:class:`LatencyStats` keeps milliseconds, so ``p50_ms`` is ``p50 cycles /
assumed_clock_mhz`` — a conversion at an *assumed* clock (default 1000 MHz), labelled
as such in ``extra``; compare models by cycles, side by side. Measured here: the
simulator's cycle counts move with host load (cycles per host-µs stay near 150), so a
busy host inflates them; medians over several runs and the reported spread matter.

Placement: ONNX Runtime's own profiler names the provider of every node it ran; nodes
the QNN EP did not take run on the CPU (fallback). ``require_full_npu`` sets
``session.disable_cpu_ep_fallback = 1`` so such a model is refused.

Models the HTP cannot take are refused up front, naming the nodes: dynamic shapes,
``DynamicQuantizeLinear`` (dynamic quantization), control flow (``Loop``/``If``/``Scan``).
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgec.errors import ModelError, TargetError
from edgec.targets.base import LatencyStats, Target, register
from edgec.targets.worker import Worker, call_for_target

if TYPE_CHECKING:  # onnx is imported where it is used: it takes ~1.5 s, which every CLI start would pay
    import onnx

UNSUPPORTED_OPS = ("DynamicQuantizeLinear", "Loop", "If", "Scan")
DEFAULT_CLOCK_MHZ = 1000.0


def htp_unsupported(model: onnx.ModelProto, batch_fixable: bool = False) -> list[str]:
    """Reasons the HTP cannot take ``model``: ``"input 'x' dim 0 is dynamic"``, ``"node 'n' (If)"``…
    With ``batch_fixable`` (a float model edgec's recipe will build) a dynamic batch is fine."""
    problems = []
    for value in list(model.graph.input):
        if value.name in {i.name for i in model.graph.initializer}:
            continue
        for d, dim in enumerate(value.type.tensor_type.shape.dim):
            if d == 0 and batch_fixable:
                continue
            if not dim.HasField("dim_value") or dim.dim_value <= 0:
                problems.append(f"input {value.name!r} dim {d} is dynamic ({dim.dim_param or '?'})")
    for node in model.graph.node:
        if node.op_type in UNSUPPORTED_OPS:
            problems.append(f"node {node.name or node.output[0]!r} ({node.op_type})")
    return problems


def macs_by_node(model: onnx.ModelProto) -> dict[str, int]:
    """Multiply-accumulates per Conv/Gemm/MatMul node at the model's static shapes (others 0).

    Used to weigh NPU coverage by compute; needs static shapes (batch fixed)."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {}
    for v in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        shapes[v.name] = [d.dim_value for d in v.type.tensor_type.shape.dim]
    for init in inferred.graph.initializer:
        shapes[init.name] = list(init.dims)
    macs = {}
    for node in inferred.graph.node:
        name = node.name or node.output[0]
        out = shapes.get(node.output[0], [])
        w = shapes.get(node.input[1], []) if len(node.input) > 1 else []
        if node.op_type == "Conv" and len(w) == 4 and out:
            macs[name] = int(np.prod(out)) * int(np.prod(w[1:]))      # out elements × (Cin/groups · kh · kw)
        elif node.op_type in ("Gemm", "MatMul") and len(w) >= 2 and out:
            macs[name] = int(np.prod(out)) * int(w[-2] if node.op_type == "MatMul" else min(w))
        else:
            macs[name] = 0
    return macs


@register("npu-qnn-htp")
class NpuQnnHtp(Target):
    recipe = "qnn-qdq-u8s8-a16"  # see edgec.compile.qnn
    static_batch = True
    accuracy_backend = "onnxruntime-cpu emulation of the QDQ graph (HTP outputs checked on a sample)"

    def __init__(self, threads: int = 2, warmup_runs: int = 1, runs: int = 5, timeout_s: float = 600.0,
                 clock_mhz: float = DEFAULT_CLOCK_MHZ, require_full_npu: bool = True,
                 htp_options: dict | None = None) -> None:
        self._set_run_options(threads, warmup_runs, runs, timeout_s)  # threads: recorded only (the simulator's own)
        if not clock_mhz > 0:
            raise TargetError("bad npu-qnn-htp options", f"clock_mhz={clock_mhz} (> 0)", "fix the value")
        self.clock_mhz = clock_mhz
        self.require_full_npu = require_full_npu
        self.htp_options = dict(htp_options or {})
        self.simulated = platform.machine().lower() in ("x86_64", "amd64")
        self.latency_kind = "simulated" if self.simulated else "measured"
        self._worker = Worker("edgec.targets.qnn_worker")

    def availability(self) -> tuple[bool, str]:
        try:
            import onnxruntime as ort
            import onnxruntime_qnn
        except ImportError as e:
            return False, f"onnxruntime-qnn is not installed ({e}); pip install onnxruntime-qnn"
        if not hasattr(ort, "register_execution_provider_library"):
            return False, f"onnxruntime {ort.__version__} cannot load plugin execution providers (needs ≥ 1.22)"
        if not Path(onnxruntime_qnn.get_qnn_htp_path()).is_file():
            return False, "onnxruntime-qnn ships no HTP backend library for this platform"
        return True, ""

    def describe(self) -> dict[str, Any]:
        import onnxruntime as ort
        from importlib.metadata import version

        device = "Qualcomm HTP simulator on x86-64" if self.simulated else "Qualcomm HTP"
        return {"runtime": f"onnxruntime {ort.__version__} + onnxruntime-qnn {version('onnxruntime-qnn')}",
                "device": device, "provider": "QNNExecutionProvider (HTP backend)", "recipe": self.recipe,
                "latency_kind": self.latency_kind, "assumed_clock_mhz": self.clock_mhz,
                "full_npu_required": self.require_full_npu, "accuracy_backend": self.accuracy_backend}

    def check_source(self, model_path: Path, shown_as: str | None = None) -> None:
        """Before building: raise :class:`ModelError` naming what in the user's float model the HTP
        cannot run (control flow, dynamic quantization, dynamic dimensions besides the batch)."""
        self.check_model(model_path, batch_fixable=True, shown_as=shown_as)

    def check_model(self, model_path: Path, batch_fixable: bool = False, shown_as: str | None = None) -> None:
        """Raise :class:`ModelError` naming what the HTP cannot run in ``model_path``."""
        import onnx

        problems = htp_unsupported(onnx.load(str(model_path), load_external_data=False), batch_fixable)
        if problems:
            more = f" (+{len(problems) - 4} more)" if len(problems) > 4 else ""
            raise ModelError(f"{shown_as or Path(model_path).name} cannot run on npu-qnn-htp",
                             "; ".join(problems[:4]) + more,
                             "export it with static shapes (edgec fixes the batch), static quantization and no "
                             "control flow")

    def profile_model(self, model_path: Path, input_shape: tuple[int, ...], *, batch: int = 1) -> dict[str, Any]:
        """Cost from the simulator's cycles, the top nodes by cycles and NPU coverage (one profiled session)."""
        prof = self.profile(model_path)
        stats = self.stats_from_profile(prof, batch)
        stats = LatencyStats.from_dict({**stats.to_dict(), "extra": {**stats.extra, "peak_rss_bytes":
                                                                     prof["peak_rss_bytes"]}})
        return self._report(model_path, stats, batch, top_ops=self.top_ops(prof),
                            coverage=self.placement(model_path, prof))

    def package(self, model_path: Path, folder: Path) -> dict[str, Any]:
        """The EPContext model ``model_ctx.onnx`` + its ``.bin`` (checked to load and match)."""
        return {"epcontext": self.export_context(model_path, folder / "model_ctx.onnx")}

    def profile(self, model_path: Path, placement: bool = True) -> dict:
        """Raw profile: cycles per run, per-node cycles, session/first-inference ms and (``placement``)
        which provider ran each node."""
        self.require_available()
        self.check_model(model_path)
        return call_for_target(self._worker, self.name, Path(model_path).name, "profile_qnn", self.timeout_s,
                               model_path=str(model_path), runs=self.runs, warmup_runs=self.warmup_runs,
                               provider_options=self.htp_options, require_full_npu=self.require_full_npu,
                               placement=placement)

    def stats_from_profile(self, prof: dict, batch: int = 1) -> LatencyStats:
        cycles = np.asarray(prof["cycles"], dtype=np.float64)
        if cycles.size == 0:
            raise TargetError("the HTP profile has no accelerator cycle counts",
                              "onnxruntime-qnn wrote no 'Accelerator (execute) time (cycles)' rows",
                              "check the onnxruntime-qnn version")
        per_ms = self.clock_mhz * 1e3
        p50 = float(np.median(cycles))
        extra = {"cycles_p50": p50, "cycles_min": float(cycles.min()), "cycles_max": float(cycles.max()),
                 "cycles_runs": cycles.tolist(), "cycles_spread_pct": float(100 * (cycles.max() - cycles.min()) / p50),
                 "assumed_clock_mhz": self.clock_mhz, "ms_is": "cycles / assumed clock",
                 "session_ms": prof["session_ms"], "first_inference_ms": prof["first_inference_ms"],
                 "host_wall_ms_p50": float(np.median(prof["wall_ms"]))}
        if self.latency_kind == "measured":  # a real HTP: wall clock is the latency
            wall = np.asarray(prof["wall_ms"])
            return LatencyStats.from_samples(wall, warmup_runs=self.warmup_runs, threads=self.threads, batch=batch,
                                             kind="measured", runtime=f"onnxruntime {prof['ort_version']} + "
                                             f"onnxruntime-qnn {prof['qnn_version']}", device="Qualcomm HTP",
                                             extra=extra)
        return LatencyStats.from_samples(cycles / per_ms, warmup_runs=self.warmup_runs, threads=self.threads,
                                         batch=batch, kind="simulated",
                                         runtime=f"onnxruntime {prof['ort_version']} + onnxruntime-qnn "
                                                 f"{prof['qnn_version']}",
                                         device="Qualcomm HTP simulator (x86-64)", extra=extra)

    def measure_latency(self, model_path: Path, input_shape: tuple[int, ...], *, batch: int = 1) -> LatencyStats:
        """Cost of ``model_path`` as compiled (its own static input shape; ``input_shape`` is not used)."""
        return self.stats_from_profile(self.profile(model_path, placement=False), batch)

    def placement(self, model_path: Path, prof: dict) -> dict:
        """NPU coverage from a :meth:`profile`: shares of nodes and of MACs on the NPU, fallen-back nodes."""
        import onnx

        model = onnx.load(str(model_path), load_external_data=False)
        macs = macs_by_node(model)
        ops = {(n.name or n.output[0]): n.op_type for n in model.graph.node}
        cpu = sorted(name for name, p in prof["placement"].items() if p["provider"] != "QNNExecutionProvider")
        cpu_known = [n for n in cpu if n in ops]
        total_macs = sum(macs.values())
        cpu_macs = sum(macs.get(n, 0) for n in cpu_known)
        return {"nodes": len(ops), "npu_nodes": len(ops) - len(cpu_known),
                "npu_node_share": (len(ops) - len(cpu_known)) / max(1, len(ops)),
                "npu_mac_share": 1.0 - cpu_macs / total_macs if total_macs else 1.0,
                "fallback": [{"node": n, "op": ops.get(n, prof["placement"][n]["op"])} for n in cpu]}

    def top_ops(self, prof: dict, k: int = 10) -> list[dict]:
        """The ``k`` nodes with the most cycles in the last profiled run."""
        items = sorted(prof["node_cycles"].items(), key=lambda kv: -kv[1])[:k]
        total = sum(prof["node_cycles"].values()) or 1
        return [{"node": n, "cycles": c, "share": c / total} for n, c in items]

    def run(self, model_path: Path, inputs: np.ndarray, work_dir: Path) -> np.ndarray:
        """Outputs of ``model_path`` on the HTP for ``inputs`` (N, ...) of the model's input dtype,
        one sample per run (N × the simulator's time: keep N small on x86-64)."""
        import onnx

        work_dir.mkdir(parents=True, exist_ok=True)
        model = onnx.load(str(model_path), load_external_data=False)
        npz = work_dir / "htp_inputs.npz"
        np.savez(npz, **{model.graph.input[0].name: inputs})
        result = call_for_target(self._worker, self.name, Path(model_path).name, "run_qnn",
                                 self.timeout_s + 2.0 * len(inputs), model_path=str(model_path),
                                 inputs_npz=str(npz), provider_options=self.htp_options)
        out = np.load(result["outputs"], allow_pickle=False)
        npz.unlink(missing_ok=True)
        Path(result["outputs"]).unlink(missing_ok=True)
        return out

    def export_context(self, model_path: Path, context_path: Path) -> dict:
        """Write the precompiled EPContext model (``context_path`` + its ``.bin``) an app loads without
        compiling on device; checks it loads and matches ``model_path``'s outputs (max |diff| returned)."""
        context_path.parent.mkdir(parents=True, exist_ok=True)
        result = call_for_target(self._worker, self.name, Path(model_path).name, "export_context", self.timeout_s,
                                 model_path=str(model_path), context_path=str(context_path),
                                 provider_options=self.htp_options)
        if result["max_abs_diff"] != 0.0:
            raise TargetError(f"the EPContext model of {Path(model_path).name} does not match it",
                              f"max |output difference| {result['max_abs_diff']}", "report this with the model")
        return result

    def close(self) -> None:
        self._worker.close()
