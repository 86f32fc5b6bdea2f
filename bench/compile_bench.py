"""Benchmark of the main job: reference vs fully-INT8 reference vs chosen candidate.

Runs ``edgec compile`` (or reads a finished run with ``--run DIR``), then in this one
process measures, side by side and interleaved over several rounds so machine noise
hits all three alike:

- the reference (largest subnet, FP32),
- the same subnet fully INT8 (static QDQ on every conv/linear),
- the chosen candidate,

and prints test accuracy, p50 latency (median over rounds of each round's p50,
batch 1, cpu-ort) and ONNX size, with ratios. Not a test: numbers depend on the machine.

    python bench/compile_bench.py --dataset digits
    python bench/compile_bench.py --dataset fashion-mnist --budget-evals 60
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--run", help="a finished run directory to benchmark instead of compiling anew")
    ap.add_argument("--out", help="run directory for a new compile (default runs/bench-<dataset>)")
    ap.add_argument("--budget-evals", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=7, help="interleaved measurement rounds")
    ap.add_argument("--runs", type=int, default=300, help="timed runs per round")
    args = ap.parse_args()

    from rich.console import Console
    from rich.table import Table

    from edgec.cli import _RichProgress, _stdout_console
    from edgec.compile.accuracy import onnx_top1
    from edgec.config import CompileConfig
    from edgec.data import load_dataset
    from edgec.pipeline import Evaluator, Progress, get_supernet, run_compile
    from edgec.search.space import Candidate, QuantPolicy
    from edgec.search.strategy import make_candidate
    from edgec.targets import get_target

    console = _stdout_console()  # off a terminal: wide enough that the table's columns stay whole
    if args.run:
        out = Path(args.run)
    else:
        out = Path(args.out or f"runs/bench-{args.dataset}")
        cfg = CompileConfig(dataset=args.dataset, budget_evals=args.budget_evals, seed=args.seed, out=str(out),
                            force=out.exists())
        with _RichProgress(Console(stderr=True)) as progress:
            run_compile(cfg, progress)
    report = json.loads((out / "report.json").read_text())
    cfg = CompileConfig(**{**report["config"], "resume": False, "force": False})
    ds = load_dataset(cfg.dataset, cfg.data_dir)
    reference = Candidate.from_dict(report["reference"]["candidate"])
    chosen = Candidate.from_dict(report["chosen"]["candidate"]) if report["chosen"] else None
    supernet, _ = get_supernet(ds, cfg, Progress())
    spec = supernet.spec
    int8_ref = make_candidate(spec, reference.subnet, QuantPolicy.uniform(spec.quantizable_layers(), "int8"))
    target = get_target(cfg.target, threads=cfg.threads, runs=args.runs)
    evaluator = Evaluator(supernet, ds, target, out / "study" / "models", cfg)

    rows = [("reference (largest, FP32)", reference), ("reference, fully INT8", int8_ref)]
    if chosen:
        rows.append(("chosen", chosen))
    paths = {}
    for label, cand in rows:
        path = evaluator.model_path(cand)
        if not path.is_file():
            evaluator.compile(cand)
        paths[label] = path
    p50s = {label: [] for label, _ in rows}
    try:
        for _ in range(args.rounds):
            for label, _ in rows:
                p50s[label].append(target.measure_latency(paths[label], ds.input_shape).p50_ms)
    finally:
        target.close()
    import numpy as np

    result = {}
    for label, cand in rows:
        result[label] = {"candidate_id": cand.id, "test_accuracy": onnx_top1(paths[label], ds.test_x, ds.test_y),
                         "p50_ms": float(np.median(p50s[label])), "p50_ms_rounds": p50s[label],
                         "size_bytes": paths[label].stat().st_size,
                         "int8_layers": len(cand.policy.int8_layers()), "layers": len(cand.policy.layers)}
    ref, ref8 = result[rows[0][0]], result[rows[1][0]]
    table = Table(title=f"edgec bench — {cfg.dataset}, {cfg.target}, batch 1, {cfg.threads} threads, "
                        f"median of {args.rounds} interleaved rounds × {args.runs} runs (measured)")
    for col in ("model", "id", "test acc %", "Δ vs ref (pp)", "p50 µs", "× vs ref", "× vs INT8 ref", "size KiB",
                "INT8 layers"):
        table.add_column(col, justify="left" if col in ("model", "id") else "right")
    for label, r in result.items():
        table.add_row(label, r["candidate_id"], f"{r['test_accuracy'] * 100:.2f}",
                      f"{(r['test_accuracy'] - ref['test_accuracy']) * 100:+.2f}", f"{r['p50_ms'] * 1e3:.1f}",
                      f"{ref['p50_ms'] / r['p50_ms']:.2f}", f"{ref8['p50_ms'] / r['p50_ms']:.2f}",
                      f"{r['size_bytes'] / 1024:.1f}", f"{r['int8_layers']}/{r['layers']}")
    console.print(table)
    console.print(f"search: {len(report['evaluations'])} evaluations, Pareto front {len(report['pareto_front'])}, "
                  f"chosen by validation accuracy ≥ {report['selection']['min_val_accuracy'] * 100:.2f}%; "
                  f"run directory {out}")
    (out / "bench.json").write_text(json.dumps(result, indent=2))
    return 0 if chosen else 1


if __name__ == "__main__":
    sys.exit(main())
