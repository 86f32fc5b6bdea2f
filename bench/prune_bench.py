"""Benchmark of ``edgec prune`` at equal FLOPs: PAGCP vs classification-only PAGCP vs uniform L1 magnitude.

On the built-in multi-task model (cached, trained on first use) this process:

1. prunes it with PAGCP watching both tasks to ``--flops-target`` (with ``edgec prune``'s
   settings, including the recovery fine-tuning between passes);
2. prunes it with the same algorithm watching only the classification loss, same target
   (the recovery fine-tuning still trains both tasks, as the final fine-tuning does);
3. prunes it uniformly (every group the same ratio) by L1 filter magnitude with
   Torch-Pruning's ``MagnitudePruner`` (``MagnitudeImportance(p=1)``, widths rounded to
   multiples of ``--round-to`` like PAGCP's), the ratio bisected until its MACs are closest to PAGCP's;
4. fine-tunes each with the same epochs, seed and learning rate (and ``--kd-weight``);
5. exports all four models (unpruned + three pruned) to ONNX and measures them on
   ``cpu-ort`` interleaved over ``--rounds`` rounds (median of each round's p50, batch 1);

and prints one table: MACs, FLOPs removed, test accuracy and PSNR (with drops from the
unpruned model, before and after fine-tuning), p50 and the ratio to the unpruned model.
Not a test: numbers depend on the machine.

    python bench/prune_bench.py --dataset digits
    python bench/prune_bench.py --dataset fashion-mnist --flops-target 0.6 --json runs/prune-bench.json
    python bench/prune_bench.py --dataset digits --importance taylor --round-to 16 --trial-steps 50 --kd-weight 0.5

With ``--pagcp-run DIR`` step 1 and its fine-tuning are taken from an ``edgec prune`` run of the same
settings (checked against its report.json; the unpruned model must be the same cached one), which saves
the most expensive pruning and one fine-tuning on fashion-mnist (≈ 45 min on 2 cores).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def uniform_l1(model, example, target_macs: float, ignored, round_to: int = 8):
    """Uniform-ratio L1 magnitude pruning (Torch-Pruning), the ratio bisected to the MACs closest to ``target_macs``;
    returns (model, ratio)."""
    import torch_pruning as tp

    from edgec.search.pagcp import count_macs

    lo, hi, best = 0.0, 0.95, None
    for _ in range(14):
        ratio = (lo + hi) / 2
        m = copy.deepcopy(model)
        pruner = tp.pruner.MagnitudePruner(m, example, importance=tp.importance.MagnitudeImportance(p=1),
                                           pruning_ratio=ratio, global_pruning=False, ignored_layers=ignored(m),
                                           round_to=round_to)
        pruner.step()
        macs = count_macs(m, example)[0]
        if best is None or abs(macs - target_macs) < abs(best[2] - target_macs):
            best = (m, ratio, macs)
        lo, hi = (ratio, hi) if macs > target_macs else (lo, ratio)
    return best[0], best[1]


def read_pagcp_run(run_dir: Path, cfg, settings) -> dict:
    """PAGCP's pruned built-in model (before and after fine-tuning) and its figures from an ``edgec prune`` run
    directory; raises ConfigError when the run is missing, damaged, or ran with other settings than the bench's."""
    import dataclasses

    from edgec.errors import ConfigError, ModelError
    from edgec.prune import DEFAULT_FINETUNE_EPOCHS
    from edgec.search.multitask import load_multitask

    how = "run edgec prune with the bench's settings into it, or drop --pagcp-run"
    try:
        report = json.loads((run_dir / "report.json").read_text())
        if not isinstance(report, dict) or not isinstance(report.get("config"), dict):
            raise ValueError("report.json is not an edgec report")
        if report.get("job") != "prune" or report["config"].get("model") != "multitask":
            raise ConfigError(f"--pagcp-run {run_dir} is not an edgec prune run of the built-in multitask model",
                              f"its report says job {report.get('job')!r}, model {report['config'].get('model')!r}",
                              how)
        ran, want = {"task_weights": {}, **report["config"]}, json.loads(json.dumps(dataclasses.asdict(cfg), default=str))
        keys = ("dataset", "flops_target", "loss_budget", "importance", "step", "round_to", "trial_steps",
                "recovery_epochs", "kd_weight", "max_passes", "task_weights", "seed", "watch")
        differ = [f"{k} {ran.get(k)!r} (bench {want[k]!r})" for k in keys if ran.get(k) != want[k]]
        growth = report["algorithm"]["settings"].get("max_budget_growth")
        if growth != settings.max_budget_growth:
            differ.append(f"max_budget_growth {growth!r} (bench {settings.max_budget_growth!r})")
        epochs = cfg.finetune_epochs if cfg.finetune_epochs is not None else DEFAULT_FINETUNE_EPOCHS[cfg.dataset]
        if report["finetune"].get("epochs") != epochs:
            differ.append(f"finetune_epochs {report['finetune'].get('epochs')!r} (bench {epochs!r})")
        if differ:
            raise ConfigError(f"--pagcp-run {run_dir} ran with other settings than the bench", "; ".join(differ), how)
        pruned = [a for a in report["artifacts"] if a.get("role") == "pruned"]
        if len(pruned) != 1:
            raise ConfigError(f"--pagcp-run {run_dir} has no pruned artifact", "its report lists none", how)
        before, _ = load_multitask(run_dir / "study" / "models" / "pruned-before-finetune")
        after, _ = load_multitask((run_dir / pruned[0]["path"]).parent)
        return {"model": before, "finetuned_model": after, "macs": report["macs_after"],
                "prune_s": report["algorithm"]["prune_s"], "oracle_calls": report["algorithm"]["oracle"]["evaluations"],
                "passes": report["algorithm"]["passes"], "model_cache_key": report["model"].get("cache_key")}
    except (OSError, ValueError, KeyError, TypeError, AttributeError, ModelError) as e:
        raise ConfigError(f"cannot read --pagcp-run {run_dir}", f"{type(e).__name__}: {e}", how) from None


def fail(error) -> int:
    """One line on stderr, exit 2, as edgec's own commands (argparse's error() would print the usage first)."""
    print(f"prune_bench: error: {error}", file=sys.stderr)
    return 2


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--flops-target", type=float, default=0.6)
    ap.add_argument("--loss-budget", type=float, default=0.3)
    ap.add_argument("--finetune-epochs", type=int, help="default per dataset (as edgec prune)")
    ap.add_argument("--recovery-epochs", type=int, default=1, help="fine-tuning between PAGCP passes (as edgec prune)")
    ap.add_argument("--max-passes", type=int, default=30, help="PAGCP passes at most (as edgec prune)")
    ap.add_argument("--max-budget-growth", type=float, default=32.0,
                    help="how far PAGCP may double its loss budget (as edgec prune: 32)")
    ap.add_argument("--importance", default="l1", help="PAGCP's channel ranking: l1 | l2 | taylor (as edgec prune)")
    ap.add_argument("--round-to", type=int, default=8, help="kept widths are multiples of this, PAGCP and uniform L1")
    ap.add_argument("--trial-steps", type=int, default=0,
                    help="PAGCP: fine-tune each trial for this many minibatches against a control (as edgec prune)")
    ap.add_argument("--kd-weight", type=float, default=0.0,
                    help="final fine-tuning of every pruned model: distill the classifier from the unpruned model")
    ap.add_argument("--task-weight", action="append", metavar="TASK=W",
                    help="final fine-tuning of every pruned model: weigh TASK's loss by W (as edgec prune)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved latency rounds")
    ap.add_argument("--runs", type=int, default=300, help="timed runs per round")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pagcp-run", metavar="DIR",
                    help="take PAGCP's (both tasks) pruned model, before and after fine-tuning, from this edgec prune "
                         "run directory instead of pruning and fine-tuning again; its settings must equal these")
    ap.add_argument("--json", help="write the figures to this file")
    args = ap.parse_args()
    import dataclasses

    from edgec.cli import _task_numbers
    from edgec.errors import ConfigError
    from edgec.prune import PruneConfig
    from edgec.search.multitask import BUILTIN_TASKS

    try:  # edgec prune's own checks and PAGCP settings, so the bench runs what the command would
        weights = _task_numbers(args.task_weight, "--task-weight", "e.g. --task-weight reconstruction=40")
        cfg = PruneConfig(out=Path("."), dataset=args.dataset, flops_target=args.flops_target,
                          loss_budget=args.loss_budget, importance=args.importance, round_to=args.round_to,
                          trial_steps=args.trial_steps, finetune_epochs=args.finetune_epochs,
                          recovery_epochs=args.recovery_epochs, kd_weight=args.kd_weight, max_passes=args.max_passes,
                          task_weights=weights, seed=args.seed)
        cfg.check_task_names([t.name for t in BUILTIN_TASKS])
        settings = dataclasses.replace(cfg.pagcp_settings(), max_budget_growth=args.max_budget_growth)
        for name in ("rounds", "runs"):
            if not 1 <= getattr(args, name) <= 100_000:
                raise ConfigError(f"bad value for --{name}: {getattr(args, name)}", "it must be between 1 and 100000",
                                  f"e.g. --{name} 5")
        if args.json and not Path(args.json).parent.is_dir() and Path(args.json).parent.exists():
            raise ConfigError(f"cannot write --json {args.json}", "its folder is a file", "pass another path")
        run = read_pagcp_run(Path(args.pagcp_run), cfg, settings) if args.pagcp_run else None
    except ConfigError as e:  # one line, exit 2, as edgec's own commands
        return fail(e)

    import torch
    from rich.table import Table

    from edgec.cli import _RichProgress, _stdout_console
    from edgec.data import load_dataset
    from edgec.prune import (DEFAULT_FINETUNE_EPOCHS, TaskData, TaskOracle, export_multitask, finetune,
                             get_multitask_model, measure_side_by_side, task_metrics, teacher_logits)
    from edgec.search.pagcp import count_macs, pagcp
    from edgec.targets import open_target

    torch.set_num_threads(2)
    console = _stdout_console()
    ds = load_dataset(args.dataset)
    data = TaskData.from_dataset(ds)
    epochs = args.finetune_epochs if args.finetune_epochs is not None else DEFAULT_FINETUNE_EPOCHS[ds.name]
    example = torch.zeros(1, *ds.input_shape)
    ignored = lambda m: m.output_layers()  # noqa: E731
    results: dict[str, dict] = {}
    with _RichProgress(console) as progress:
        model, info = get_multitask_model(ds, progress)
        macs0 = count_macs(model, example)[0]
        results["unpruned"] = {"model": model, "macs": macs0, "before_ft": task_metrics(model, data),
                               "prune_s": 0.0}
        if run is not None:
            if run["model_cache_key"] != info.get("cache_key"):
                return fail(ConfigError(f"--pagcp-run {args.pagcp_run} pruned another unpruned model",
                                        f"cache key {run['model_cache_key']}, this one {info.get('cache_key')}",
                                        "run edgec prune again"))
            results["PAGCP (both tasks)"] = {k: run[k] for k in ("model", "finetuned_model", "macs", "prune_s",
                                                                   "oracle_calls", "passes")}
        for name, watch in (("PAGCP (both tasks)", ()), ("PAGCP, classification loss only", ("classification",))):
            if name in results:
                continue
            progress.stage(f"{name}: pruning")
            oracle = TaskOracle(data, watch, args.trial_steps, args.seed)
            start = time.perf_counter()
            r = pagcp(model, example, oracle, ignored, settings,
                      recover=(lambda m: finetune(m, data, args.recovery_epochs, args.seed, progress))
                      if args.recovery_epochs else None, backward=oracle.backward,
                      adapt=oracle.adapt if args.trial_steps else None)
            results[name] = {"model": r.model, "macs": r.macs_after, "prune_s": time.perf_counter() - start,
                             "oracle_calls": oracle.calls, "passes": r.passes}
        target_macs = results["PAGCP (both tasks)"]["macs"]
        start = time.perf_counter()
        m, ratio = uniform_l1(model, example, target_macs, ignored, args.round_to)
        results["uniform L1 magnitude"] = {"model": m, "macs": count_macs(m, example)[0], "ratio": ratio,
                                           "prune_s": time.perf_counter() - start}
        teacher = teacher_logits(model, data) if args.kd_weight else {}
        for name, r in results.items():
            if name == "unpruned":
                continue
            r["before_ft"] = task_metrics(r["model"], data)
            if "finetuned_model" in r:  # fine-tuned by the edgec prune run (--pagcp-run)
                r["model"] = r.pop("finetuned_model")
                continue
            finetune(r["model"], data, epochs, args.seed, progress, teacher, args.kd_weight, task_weights=cfg.task_weights)
        for r in results.values():
            r["after_ft"] = task_metrics(r["model"], data)
        progress.stage("exporting and measuring on cpu-ort")
        target = open_target("cpu-ort", 2, args.runs)
        with tempfile.TemporaryDirectory(prefix="edgec-prune-bench-") as tmp:
            paths = {name: export_multitask(r["model"], data, Path(tmp) / f"m{i}.onnx")
                     for i, (name, r) in enumerate(results.items())}
            latency = measure_side_by_side(target, paths, ds.input_shape, rounds=args.rounds)
        target.close()

    base = results["unpruned"]
    base_acc = base["after_ft"]["test"]["classification"]["accuracy_pct"]
    base_psnr = base["after_ft"]["test"]["reconstruction"]["psnr_db"]
    table = Table(title=f"edgec prune bench — multitask on {ds.name}, FLOPs target {args.flops_target:.0%}, "
                        f"{args.importance}, widths ×{args.round_to}, trial steps {args.trial_steps}, "
                        f"recovery {args.recovery_epochs} epoch(s) between passes, fine-tune {epochs} epochs"
                        f"{f' (distilled {args.kd_weight:g})' if args.kd_weight else ''}, "
                        f"cpu-ort p50 median of {args.rounds} interleaved rounds")
    for col in ("method", "MMACs", "FLOPs removed", "test acc %", "Δ acc pts", "(before FT)", "test PSNR dB",
                "Δ PSNR dB", "(before FT)", "p50 µs", "speed-up", "prune s"):
        table.add_column(col, justify="left" if col == "method" else "right")
    rows = []
    for name, r in results.items():
        acc = r["after_ft"]["test"]["classification"]["accuracy_pct"]
        psnr = r["after_ft"]["test"]["reconstruction"]["psnr_db"]
        acc0 = r["before_ft"]["test"]["classification"]["accuracy_pct"]
        psnr0 = r["before_ft"]["test"]["reconstruction"]["psnr_db"]
        p50 = latency[name]["p50_ms"]
        row = {"method": name, "macs": r["macs"], "flops_reduction": 1 - r["macs"] / macs0,
               "test_accuracy_pct": acc, "accuracy_drop_pts": base_acc - acc,
               "accuracy_drop_before_finetune_pts": base_acc - acc0, "test_psnr_db": psnr,
               "psnr_drop_db": base_psnr - psnr, "psnr_drop_before_finetune_db": base_psnr - psnr0,
               "p50_ms": p50, "p50_ms_rounds": latency[name]["p50_ms_rounds"], "latency_kind": latency[name]["kind"],
               "speedup_p50": latency["unpruned"]["p50_ms"] / p50, "prune_s": r["prune_s"],
               "channels": r["model"].channels,
               **{k: r[k] for k in ("oracle_calls", "passes", "ratio") if k in r}}
        rows.append(row)
        table.add_row(name, f"{r['macs'] / 1e6:.2f}", f"{row['flops_reduction'] * 100:.1f}%", f"{acc:.2f}",
                      f"{row['accuracy_drop_pts']:+.2f}", f"{row['accuracy_drop_before_finetune_pts']:+.2f}",
                      f"{psnr:.2f}", f"{row['psnr_drop_db']:+.2f}", f"{row['psnr_drop_before_finetune_db']:+.2f}",
                      f"{p50 * 1e3:.1f}", f"{row['speedup_p50']:.2f}×", f"{r['prune_s']:.0f}")
    console.print(table)
    console.print("Δ = unpruned minus pruned (positive = worse). Latency kind: measured "
                  f"({latency['unpruned']['runtime']}, {latency['unpruned']['device']}, 2 threads, batch 1).")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"dataset": ds.name, "settings": vars(args), "finetune_epochs": epochs,
                                               "model": info, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
