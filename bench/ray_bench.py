"""Benchmark of scale-out: N device profiles through Ray vs in-process, on this machine.

Builds N distinct random candidates of the digits supernet for the target (in this process, once),
then profiles every model (:meth:`Target.profile_model`: latency plus the runtime's per-op
profile) three ways, in this order: in-process, through a local Ray instance (each profile a task
needing the resource ``target:<name>``; all submitted at once), in-process again. It prints wall
time and throughput of each, and checks that every result is of its own candidate: each Ray task
returns the sha256 of the bytes it measured (checked against the model sent), and its
``size_bytes`` must equal the model file's. The p50 of the two ways is compared as the median of
per-model ratios (Ray / the in-process mean). Not a test: numbers depend on the machine.

    python bench/ray_bench.py --profiles 50
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profiles", type=int, default=50, help="distinct candidates to profile (default 50)")
    ap.add_argument("--target", default="cpu-ort", help="target to profile on (default cpu-ort)")
    ap.add_argument("--threads", type=int, default=2, help="runtime threads (default 2)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random candidates (default 0)")
    args = ap.parse_args()

    import numpy as np
    from rich.table import Table

    from edgec.cli import _stdout_console
    from edgec.config import CompileConfig
    from edgec.data import load_dataset
    from edgec.executor import InProcessExecutor, RayExecutor
    from edgec.pipeline import Evaluator, Progress, get_supernet
    from edgec.search.space import PRECISIONS, QuantPolicy
    from edgec.search.strategy import make_candidate
    from edgec.targets import open_target

    console = _stdout_console()
    cfg = CompileConfig(dataset="digits", target=args.target, threads=args.threads)
    ds = load_dataset("digits")
    supernet, _ = get_supernet(ds, cfg, Progress())
    spec = supernet.spec
    rng = np.random.default_rng(args.seed)
    target = open_target(args.target, threads=args.threads)
    work = Path(tempfile.mkdtemp(prefix="edgec-ray-bench-"))
    evaluator = Evaluator(supernet, ds, target, work, cfg)
    candidates = {}
    while len(candidates) < args.profiles:
        subnet = spec.sample(rng)
        policy = QuantPolicy(tuple((n, PRECISIONS[rng.integers(2)]) for n in spec.layers_of(subnet)))
        c = make_candidate(spec, subnet, policy)
        candidates[c.id] = c
    console.print(f"building {len(candidates)} candidates for {args.target} …")
    paths = [evaluator.compile(c)[0] for c in candidates.values()]

    def run(executor) -> tuple[float, list[dict]]:
        t0 = time.perf_counter()
        reports = executor.profile_many(evaluator, paths)
        return time.perf_counter() - t0, reports

    in_s, in_reports = run(InProcessExecutor())
    t0 = time.perf_counter()
    ray_exec = RayExecutor(None, [args.target], args.threads, {"supernet": supernet, "dataset": ds, "config": cfg})
    start_s = time.perf_counter() - t0
    try:
        ray_s, ray_reports = run(ray_exec)
    finally:
        ray_exec.close()
    in2_s, in2_reports = run(InProcessExecutor())
    target.close()

    mismatched = sum(r["size_bytes"] != p.stat().st_size for r, p in zip(ray_reports, paths))
    ratios = [r["latency"]["p50_ms"] / ((a["latency"]["p50_ms"] + b["latency"]["p50_ms"]) / 2)
              for r, a, b in zip(ray_reports, in_reports, in2_reports)]
    table = Table(title=f"{len(paths)} device profiles on {args.target} ({target.latency_kind}), {os.cpu_count()} CPUs")
    for col in ("executor", "wall s", "profiles/s", "results of the wrong model"):
        table.add_column(col, justify="left" if col == "executor" else "right")
    table.add_row("in-process", f"{in_s:.1f}", f"{len(paths) / in_s:.2f}", "-")
    table.add_row(f"ray (local, started in {start_s:.1f} s)", f"{ray_s:.1f}", f"{len(paths) / ray_s:.2f}",
                  f"{mismatched} (sha256 checked per task)")
    table.add_row("in-process again", f"{in2_s:.1f}", f"{len(paths) / in2_s:.2f}", "-")
    console.print(table)
    console.print(f"p50 through Ray / p50 in-process (mean of the two in-process passes), median over models: "
                  f"{statistics.median(ratios):.3f} (min {min(ratios):.3f}, max {max(ratios):.3f})")
    return 1 if mismatched else 0


if __name__ == "__main__":
    sys.exit(main())
