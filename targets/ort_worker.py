"""Latency measurement body run inside a separate worker process.

Imports only numpy and onnxruntime (no torch), so the spawned worker starts fast;
a model that crashes the runtime takes down only this process.
"""

from __future__ import annotations

import os
import time

import numpy as np


def _session_options(threads: int):
    """The cpu-ort configuration, shared by timing and profiling: all graph optimizations, ``threads``
    intra-op threads, one inter-op thread, sequential execution, warnings off."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    return so


def measure_ort(model_path: str, input_shape: tuple[int, ...], batch: int, threads: int, warmup_runs: int,
                runs: int, providers: list[str], seed: int = 0) -> dict:
    """Time ``runs`` single-batch inferences after ``warmup_runs``; returns samples in ms and versions."""
    import onnxruntime as ort

    so = _session_options(threads)
    t0 = time.perf_counter()
    sess = ort.InferenceSession(model_path, so, providers=providers)
    session_ms = (time.perf_counter() - t0) * 1e3
    feed = make_feed(sess, input_shape, batch, seed)
    t0 = time.perf_counter()
    sess.run(None, feed)
    first_ms = (time.perf_counter() - t0) * 1e3
    for _ in range(warmup_runs):
        sess.run(None, feed)
    samples = np.empty(runs)
    for i in range(runs):
        t0 = time.perf_counter_ns()
        sess.run(None, feed)
        samples[i] = (time.perf_counter_ns() - t0) / 1e6
    return {"samples_ms": samples.tolist(), "session_ms": session_ms, "first_inference_ms": first_ms,
            "ort_version": ort.__version__, "peak_rss_bytes": peak_rss_bytes()}


TOKEN_ID_HIGH = 1000  # random token ids below this: valid in any vocabulary edgec loads


def make_feed(sess, input_shape, batch: int, seed: int = 0) -> dict:
    """Inputs for one run. A float input gets uniform [0, 1) of shape ``(batch, *input_shape)``. A model
    with integer inputs is a text model and ``input_shape`` is ``(sequence_length,)``: ``*mask`` inputs
    get ones (every token real), ``token_type_ids`` zeros, ``position_ids`` 0..T-1, other integer
    inputs (``input_ids``) random token ids."""
    rng = np.random.default_rng(seed)
    feed = {}
    for inp in sess.get_inputs():
        if inp.type == "tensor(float)":
            feed[inp.name] = rng.random((batch, *input_shape), dtype=np.float32)
            continue
        dtype = np.int32 if inp.type == "tensor(int32)" else np.int64
        shape = (batch, *input_shape)
        if "mask" in inp.name:
            feed[inp.name] = np.ones(shape, dtype)
        elif "token_type" in inp.name:
            feed[inp.name] = np.zeros(shape, dtype)
        elif "position" in inp.name:
            feed[inp.name] = np.broadcast_to(np.arange(shape[-1], dtype=dtype), shape).copy()
        else:
            feed[inp.name] = rng.integers(0, TOKEN_ID_HIGH, shape).astype(dtype)
    return feed


def peak_rss_bytes() -> int:
    """This process's peak resident set size (VmHWM), bytes; 0 where /proc is missing."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def check_not_cut_short(path: str) -> None:
    """Raise the :class:`OSError` a native writer swallowed when ``path`` (a file it wrote) is unreadable
    because the disk filled up or the file reached the process's file-size limit."""
    import errno
    import resource
    import shutil

    size = os.path.getsize(path)
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    if soft != resource.RLIM_INFINITY and size >= soft:
        raise OSError(errno.EFBIG, os.strerror(errno.EFBIG), path)
    if shutil.disk_usage(os.path.dirname(path)).free < 1 << 20:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)


def profile_ort(model_path: str, input_shape: tuple[int, ...], batch: int, threads: int, runs: int,
                providers: list[str]) -> dict:
    """Per-node kernel times from ONNX Runtime's profiler over ``runs`` runs (after one warm-up):
    ``{"nodes": [{node, op, provider, mean_us}], "peak_rss_bytes"}``."""
    import json
    import os
    import tempfile

    import onnxruntime as ort

    so = _session_options(threads)
    with tempfile.TemporaryDirectory(prefix="edgec-ort-prof-") as tmp:
        so.enable_profiling = True
        so.profile_file_prefix = os.path.join(tmp, "ort")
        sess = ort.InferenceSession(model_path, so, providers=providers)
        feed = make_feed(sess, input_shape, batch)
        for _ in range(runs + 1):
            sess.run(None, feed)
        path = sess.end_profiling()
        try:
            with open(path) as f:
                events = json.load(f)
        except ValueError:
            check_not_cut_short(path)
            raise
    total: dict[str, list] = {}
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            args = e.get("args", {})
            node = e["name"].removesuffix("_kernel_time")
            entry = total.setdefault(node, [args.get("op_name", ""), args.get("provider", ""), 0.0])
            entry[2] += float(e.get("dur", 0))
    nodes = [{"node": n, "op": op, "provider": prov, "mean_us": dur / (runs + 1)}
             for n, (op, prov, dur) in total.items()]
    return {"nodes": nodes, "peak_rss_bytes": peak_rss_bytes()}


def serve(functions: dict) -> None:
    """Serve JSON-line requests on stdin: ``{"fn": NAME, "kwargs": {...}}`` → one JSON line
    ``{"ok": result}`` or ``{"error": "one line"}``, until stdin closes.

    Replies go to a private copy of the original stdout; file descriptor 1 is pointed at stderr,
    so whatever native libraries print (the QNN backend does) cannot corrupt the protocol."""
    import json
    import os
    import sys

    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    for line in sys.stdin:
        request = json.loads(line)
        try:
            reply = {"ok": functions[request["fn"]](**request["kwargs"])}
        except Exception as e:  # reported to the parent, which raises TargetError (OSError for a full disk)
            reply = {"error": f"{type(e).__name__}: {' '.join(str(e).split())[:400]}"}  # one line, bounded
            if isinstance(e, OSError) and e.errno is not None:
                reply.update(errno=e.errno, filename=e.filename)
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


def main() -> None:
    serve({"measure_ort": measure_ort, "profile_ort": profile_ort})


if __name__ == "__main__":
    main()
