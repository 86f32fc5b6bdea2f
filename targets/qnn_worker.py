"""QNN HTP work run inside a separate worker process (see :mod:`edgec.targets.worker`).

Imports only numpy, onnxruntime and the ``onnxruntime-qnn`` plugin: a model that
crashes the QNN backend or the HTP simulator takes down only this process.
"""

from __future__ import annotations

import csv
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from edgec.targets.ort_worker import peak_rss_bytes

_REGISTERED = False
ACCELERATOR_CYCLES = "Accelerator (execute) time (cycles)"


def _register():
    global _REGISTERED
    import onnxruntime as ort
    import onnxruntime_qnn

    if not _REGISTERED:
        ort.register_execution_provider_library("QNNExecutionProvider", onnxruntime_qnn.get_library_path())
        _REGISTERED = True
    devices = [d for d in ort.get_ep_devices() if d.ep_name == "QNNExecutionProvider"]
    if not devices:
        raise RuntimeError("the QNN plugin registered but exposes no device")
    return ort, onnxruntime_qnn, devices


def _session(model_path: str, provider_options: dict, config: dict, ort_profile_prefix: str | None = None):
    ort, qnn, devices = _register()
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.add_provider_for_devices(devices, {"backend_path": qnn.get_qnn_htp_path(),
                                          **{k: str(v) for k, v in provider_options.items()}})
    for key, value in config.items():
        so.add_session_config_entry(key, str(value))
    if ort_profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = ort_profile_prefix
    return ort.InferenceSession(model_path, so)


def _random_input(sess, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    feeds = {}
    for i in sess.get_inputs():
        shape = [d if isinstance(d, int) else 1 for d in i.shape]
        if i.type == "tensor(float)":
            feeds[i.name] = rng.random(shape, dtype=np.float32)
        elif i.type in ("tensor(uint8)", "tensor(uint16)"):
            dt = np.uint8 if i.type == "tensor(uint8)" else np.uint16
            feeds[i.name] = rng.integers(0, np.iinfo(dt).max, shape, dtype=dt, endpoint=True)
        else:
            raise ValueError(f"input {i.name} has type {i.type}; edgec feeds float32, uint8 or uint16")
    return feeds


def parse_qnn_csv(path: str) -> tuple[list[int], dict[str, int]]:
    """(accelerator cycles per run, {node: cycles} of the last run) from a QNN detailed-profiling CSV."""
    runs: list[int] = []
    nodes: dict[str, int] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            event, message = row.get("Event Identifier", ""), row.get("Message", "")
            if event == ACCELERATOR_CYCLES:
                runs.append(int(row["Time"]))
                nodes = {}
            elif message == "NODE" and row.get("Unit of Measurement") == "CYCLES":
                name = event.removesuffix(" (cycles)")
                name = name.rsplit(":OpId_", 1)[0]
                nodes[name] = nodes.get(name, 0) + int(row["Time"])
    return runs, nodes


def profile_qnn(model_path: str, runs: int, warmup_runs: int, provider_options: dict,
                require_full_npu: bool, placement: bool = True) -> dict:
    """Run ``model_path`` on the HTP ``warmup_runs + runs`` times with detailed profiling.

    Returns accelerator cycles per timed run, per-node cycles of the last run, wall ms per
    timed run, session-creation and first-inference ms, peak RSS bytes, versions and — with
    ``placement`` (ONNX Runtime's profiler on too; the search's cost measurement skips it) —
    the node placement ({node: {op, provider}}).
    """
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="edgec-qnn-prof-") as tmp:
        csv_path = os.path.join(tmp, "qnn.csv")
        options = {**provider_options, "profiling_level": "detailed", "profiling_file_path": csv_path}
        config = {"session.disable_cpu_ep_fallback": "1"} if require_full_npu else {}
        t0 = time.perf_counter()
        sess = _session(model_path, options, config,
                        ort_profile_prefix=os.path.join(tmp, "ort") if placement else None)
        session_ms = (time.perf_counter() - t0) * 1e3
        feeds = _random_input(sess)
        t0 = time.perf_counter()
        sess.run(None, feeds)
        first_ms = (time.perf_counter() - t0) * 1e3
        for _ in range(warmup_runs):
            sess.run(None, feeds)
        wall = []
        for _ in range(runs):
            t0 = time.perf_counter()
            sess.run(None, feeds)
            wall.append((time.perf_counter() - t0) * 1e3)
        events = json.loads(Path(sess.end_profiling()).read_text()) if placement else []
        del sess  # flushes the QNN CSV
        cycles, node_cycles = parse_qnn_csv(csv_path)
    nodes = {}
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            args = e.get("args", {})
            nodes[e["name"].removesuffix("_kernel_time")] = {"op": args.get("op_name", ""),
                                                             "provider": args.get("provider", "")}
    return {"cycles": cycles[-runs:], "node_cycles": node_cycles, "wall_ms": wall, "session_ms": session_ms,
            "first_inference_ms": first_ms, "placement": nodes if placement else None, "peak_rss_bytes": peak_rss_bytes(),
            "ort_version": ort.__version__, "qnn_version": _qnn_version()}


def _qnn_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("onnxruntime-qnn")
    except PackageNotFoundError:
        return "unknown"


def run_qnn(model_path: str, inputs_npz: str, provider_options: dict) -> dict:
    """Run every array of ``inputs_npz`` (key = input name, leading axis = samples, one per run)
    through the HTP; writes the outputs of the first output next to it and returns its path."""
    sess = _session(model_path, provider_options, {})
    with np.load(inputs_npz, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    n = len(next(iter(arrays.values())))
    outs = [sess.run(None, {k: v[i:i + 1] for k, v in arrays.items()})[0] for i in range(n)]
    out_path = str(Path(inputs_npz).with_suffix(".out.npy"))
    np.save(out_path, np.concatenate(outs), allow_pickle=False)
    return {"outputs": out_path}


def export_context(model_path: str, context_path: str, provider_options: dict) -> dict:
    """Compile ``model_path`` for the HTP into an EPContext model at ``context_path`` (binary in a
    separate ``.bin``), load it back and compare its outputs with the source model's on one input."""
    config = {"session.disable_cpu_ep_fallback": "1", "ep.context_enable": "1",
              "ep.context_file_path": context_path, "ep.context_embed_mode": "0"}
    t0 = time.perf_counter()
    source = _session(model_path, provider_options, config)
    compile_ms = (time.perf_counter() - t0) * 1e3
    t0 = time.perf_counter()
    loaded = _session(context_path, provider_options, {})
    load_ms = (time.perf_counter() - t0) * 1e3
    feeds = _random_input(loaded)
    a = source.run(None, feeds)[0].astype(np.float64)
    b = loaded.run(None, feeds)[0].astype(np.float64)
    folder = Path(context_path).parent
    return {"files": sorted(p.name for p in folder.iterdir()), "compile_ms": compile_ms, "load_ms": load_ms,
            "max_abs_diff": float(np.max(np.abs(a - b)))}


def main() -> None:
    from edgec.targets.ort_worker import serve

    serve({"profile_qnn": profile_qnn, "run_qnn": run_qnn, "export_context": export_context})


if __name__ == "__main__":
    main()
