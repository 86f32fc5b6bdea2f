"""Benchmark of the main job: reference vs fully-INT8 reference vs chosen candidate, per target.

Runs ``edgec compile`` (or reads a finished run with ``--run DIR``), then in this one
process builds with each target's recipe and measures, side by side and interleaved
over several rounds so machine noise hits all three alike:

- the reference (largest subnet, every layer "FP32": float on CPUs, 16-bit activations on the HTP),
- the same subnet fully INT8 (every conv/linear quantized; 8-bit activations on the HTP),
- the chosen candidate,

(each built from the run's fine-tuned weights where it fine-tuned its architecture, ``--finetune-epochs``)

and prints test accuracy (and the candidate's own FP32 model's), p50 latency (median
over rounds of each round's p50, batch 1, with its kind: ``measured`` or the HTP
simulator's ``simulated`` cycles), ONNX size and NPU coverage, with ratios within
each target. Not a test: numbers depend on the machine.

    python bench/compile_bench.py --dataset digits
    python bench/compile_bench.py --dataset fashion-mnist --budget-evals 60
    python bench/compile_bench.py --run runs/demo --target cpu-ort --target cpu-openvino --target npu-qnn-htp
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
    ap.add_argument("--runs", type=int, default=300, help="timed runs per round (the HTP simulator: 5)")
    ap.add_argument("--target", action="append", help="target to bench on (repeatable; default: the run's)")
    ap.add_argument("--finetune-epochs", type=int, default=0, help="a new compile's --finetune-epochs (default 0)")
    ap.add_argument("--finetune-top", type=int, default=4, help="a new compile's --finetune-top (default 4)")
    ap.add_argument("--finetune-child-epochs", type=int, help="a new compile's --finetune-child-epochs")
    args = ap.parse_args()

    from rich.console import Console
    from rich.table import Table

    from edgec.cli import _RichProgress, _stdout_console
    from edgec.compile.accuracy import onnx_top1
    from edgec.config import CompileConfig
    from edgec.data import load_dataset
    from edgec.pipeline import Evaluator, FinetunedWeights, Progress, get_supernet, run_compile
    from edgec.search.space import Candidate, QuantPolicy
    from edgec.search.strategy import make_candidate
    from edgec.targets import get_target

    console = _stdout_console()  # off a terminal: wide enough that the table's columns stay whole
    if args.run:
        out = Path(args.run)
    else:
        out = Path(args.out or f"runs/bench-{args.dataset}")
        cfg = CompileConfig(dataset=args.dataset, budget_evals=args.budget_evals, seed=args.seed, out=str(out),
                            force=out.exists(), finetune_epochs=args.finetune_epochs,
                            finetune_top=args.finetune_top, finetune_child_epochs=args.finetune_child_epochs)
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
    import numpy as np

    rows = [("reference", reference), ("reference, fully INT8", int8_ref)]
    if chosen:
        rows.append(("chosen", chosen))
    finetuned = FinetunedWeights.of_run(out, report)  # the run's fine-tuned weights, if it fine-tuned
    fp32_eval = Evaluator(supernet, ds, get_target("cpu-ort"), out / "study" / "models", cfg)
    fp32_eval.finetuned = finetuned
    fp32_acc = {}
    for label, cand in rows:  # each candidate's own FP32 model: what quantization is judged against
        fp32 = fp32_eval.folder(cand) / "fp32.onnx"
        if not fp32.is_file():
            fp32_eval.compile(cand)
        fp32_acc[label] = onnx_top1(fp32, ds.test_x, ds.test_y)
    result = {}
    for name in args.target or [cfg.target]:
        target = get_target(name, threads=cfg.threads, runs=5 if name == "npu-qnn-htp" else args.runs)
        target.require_available()
        evaluator = Evaluator(supernet, ds, target, out / "study" / "models", cfg)
        evaluator.finetuned = finetuned
        paths = {}
        for label, cand in rows:
            if not evaluator.model_path(cand).is_file():
                evaluator.compile(cand)
            paths[label] = evaluator.model_path(cand)
        stats = {label: [] for label, _ in rows}
        try:
            for _ in range(args.rounds):
                for label, _ in rows:
                    stats[label].append(target.measure_latency(paths[label], ds.input_shape))
            coverage = {label: target.profile_model(paths[label], ds.input_shape)["npu_coverage"] for label, _ in rows}
        finally:
            target.close()
        for label, cand in rows:
            p50s = [st.p50_ms for st in stats[label]]
            result[f"{name}: {label}"] = {
                "target": name, "model": label, "candidate_id": cand.id, "kind": stats[label][0].kind,
                "test_accuracy": evaluator.accuracy(cand, ds.test_x, ds.test_y), "fp32_test_accuracy": fp32_acc[label],
                "p50_ms": float(np.median(p50s)), "p50_ms_rounds": p50s,
                "cycles_p50": float(np.median([st.extra["cycles_p50"] for st in stats[label]]))
                if "cycles_p50" in stats[label][0].extra else None,
                "size_bytes": paths[label].stat().st_size, "npu_coverage": coverage[label],
                "int8_layers": len(cand.policy.int8_layers()), "layers": len(cand.policy.layers)}
    table = Table(title=f"edgec bench — {cfg.dataset}, batch 1, {cfg.threads} threads, median of {args.rounds} "
                        f"interleaved rounds (cpu: × {args.runs} runs; HTP simulator: × 5 runs)")
    for col in ("target", "model", "id", "test acc %", "Δ vs ref (pp)", "Δ vs own FP32 (pp)", "p50 µs", "kind",
                "× vs ref", "× vs INT8 ref", "size KiB", "NPU nodes", "INT8 layers"):
        table.add_column(col, justify="left" if col in ("target", "model", "id", "kind") else "right")
    for key, r in result.items():
        ref, ref8 = result[f"{r['target']}: reference"], result[f"{r['target']}: reference, fully INT8"]
        cov = r["npu_coverage"]
        table.add_row(r["target"], r["model"], r["candidate_id"], f"{r['test_accuracy'] * 100:.2f}",
                      f"{(r['test_accuracy'] - ref['fp32_test_accuracy']) * 100:+.2f}",
                      f"{(r['test_accuracy'] - r['fp32_test_accuracy']) * 100:+.2f}", f"{r['p50_ms'] * 1e3:.1f}",
                      r["kind"], f"{ref['p50_ms'] / r['p50_ms']:.2f}", f"{ref8['p50_ms'] / r['p50_ms']:.2f}",
                      f"{r['size_bytes'] / 1024:.1f}", "" if cov is None else f"{cov['npu_node_share'] * 100:.0f}%",
                      f"{r['int8_layers']}/{r['layers']}")
    console.print(table)
    console.print(f"search: {len(report['evaluations'])} evaluations, Pareto front {len(report['pareto_front'])}, "
                  f"chosen by validation accuracy ≥ {report['selection']['min_val_accuracy'] * 100:.2f}%; "
                  f"run directory {out}")
    (out / "bench.json").write_text(json.dumps(result, indent=2))
    return 0 if chosen else 1


if __name__ == "__main__":
    sys.exit(main())
