"""Benchmark of the search strategies (issue 6 §4): hypervolume of the measured Pareto front against
the number of real evaluations, for random search, NSGA-II and LINAS, over several seeds, on the
built-in FBNet supernet of a dataset (default fashion-mnist) on cpu-ort.

A *real evaluation* is what ``edgec compile`` does per candidate: extract the subnet, recalibrate
its batch norms, export, quantize with the target's recipe, top-1 on the validation split with
ONNX Runtime, and latency measured on the target. Latency is the candidate's p50 divided by the
p50 of an anchor (the largest subnet, all FP32) measured interleaved with it (median of
``--rounds`` rounds), so the shared machine's drift over the hour the bench takes does not move
the fronts; size is the ONNX file over the anchor's.

Hypervolume: objectives (top-1 error, latency ratio, size ratio), all minimized, reference point
**(0.20, 1.0, 1.0)** — 80 % validation top-1, the anchor's latency and size — divided by the
reference box's volume (0.2), so 1.0 would be a free, perfect model. Every strategy gets the same
seed stream and no hand-picked initial candidates; LINAS's initial population is random search's
first ``--linas-population`` candidates of the same seed (their evaluations are shared).

LINAS predicts latency with the latency model's measured candidates as a prior when ``edgec latency
build`` was run for this target, space and machine (:class:`edgec.search.linas.LINASSearch`,
``latency_prior``): 300 latency-only measurements made once per target, not evaluations of this
search. ``--strategies linas-no-prior`` runs the ablation without them.

Per seed: random search runs ``--random-evals`` (200) evaluations and its final hypervolume is the
bar; LINAS and NSGA-II run until they reach it or their cap (``--linas-evals``, ``--nsga2-evals``),
and the evaluations they needed are recorded (``None``: not within the cap). Evaluations are
cached by candidate id in ``OUT/evaluations.jsonl``, so an interrupted bench resumes (and a strategy
run again replays its candidates from the cache).

    python bench/search_bench.py                      # 5 seeds, fashion-mnist (≈ 80 min on 2 quiet cores)
    python bench/search_bench.py --strategies linas-no-prior      # the ablation, after it
    python bench/search_bench.py --dataset digits --seeds 1 --random-evals 40 --linas-evals 30 --nsga2-evals 40

Writes ``OUT/bench.json`` (curves, per-seed and median figures) and ``OUT/hypervolume.png``.
Not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REFERENCE_POINT = (0.20, 1.0, 1.0)  # (top-1 error, latency / anchor, size / anchor)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--out", help="default runs/search-bench-<dataset>")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--random-evals", type=int, default=200)
    ap.add_argument("--linas-evals", type=int, default=100, help="cap for LINAS")
    ap.add_argument("--nsga2-evals", type=int, default=200, help="cap for NSGA-II")
    ap.add_argument("--linas-population", type=int, default=10,
                    help="LINAS: initial random evaluations and real evaluations per iteration")
    ap.add_argument("--nsga2-population", type=int, default=16, help="NSGA-II generation size (compile's default)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved anchor/candidate latency rounds")
    ap.add_argument("--runs", type=int, default=100, help="timed runs per latency measurement")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--strategies", default="linas,nsga2",
                    help="which of linas, linas-no-prior (LINAS without the latency model's measured samples), "
                         "nsga2 to run; random always runs")
    args = ap.parse_args()
    args.strategies = set(args.strategies.split(","))
    if args.strategies - {"linas", "linas-no-prior", "nsga2"} or args.linas_population < 4 or args.seeds < 1 \
            or min(args.random_evals, args.linas_evals, args.nsga2_evals, args.rounds, args.runs) < 1:
        ap.error("--strategies takes linas, linas-no-prior, nsga2; --linas-population ≥ 4; counts ≥ 1")
    if args.dataset not in ("digits", "fashion-mnist"):
        ap.error("--dataset: digits or fashion-mnist")

    import numpy as np
    from rich.console import Console
    from rich.table import Table

    from edgec.cli import _stdout_console
    from edgec.config import CompileConfig
    from edgec.data import load_dataset
    from edgec.pipeline import Evaluator, Progress, get_supernet
    from edgec.search.linas import LINASSearch
    from edgec.search.pareto import hypervolume
    from edgec.search.space import QuantPolicy
    from edgec.search.strategy import NSGA2Search, RandomSearch, make_candidate
    from edgec.targets import get_target
    from edgec.targets.base import measure_interleaved

    import torch

    console = _stdout_console()
    err = Console(stderr=True)
    out = Path(args.out or f"runs/search-bench-{args.dataset}")
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    cfg = CompileConfig(dataset=args.dataset, out=str(out), threads=args.threads)
    ds = load_dataset(args.dataset, None)
    supernet, info = get_supernet(ds, cfg, Progress())
    spec = supernet.spec
    target = get_target("cpu-ort", threads=args.threads, runs=args.runs, warmup_runs=10)
    models = out / "models"
    evaluator = Evaluator(supernet, ds, target, models, cfg)
    anchor_c = make_candidate(spec, spec.largest(), QuantPolicy())
    anchor_path = models / "anchor.onnx"
    if not anchor_path.is_file():
        shutil.copy(evaluator.compile(anchor_c)[0], anchor_path)
    anchor_size = anchor_path.stat().st_size

    prior, prior_info = [], "not used"  # the latency model's measured candidates (ratios to the same anchor), if one was built here
    if "linas" in args.strategies:
        from edgec.latency_job import LatencySettings, measured_candidates, model_path

        lm = model_path(LatencySettings(dataset=args.dataset, threads=args.threads), spec, target)
        prior, why = measured_candidates(lm, spec)  # ratios to the same anchor: the bench's latency unit
        prior_info = f"{len(prior)} measured candidates from {lm}" if prior else f"none ({why})"
        err.print(f"latency prior: {prior_info}")

    cache_path = out / "evaluations.jsonl"
    cache = {}
    if cache_path.is_file():
        for line in cache_path.read_text().splitlines():
            try:
                r = json.loads(line)
                cache[r["id"]] = r
            except (json.JSONDecodeError, KeyError):
                pass  # a line torn by an interrupt: evaluated again

    def real_eval(c) -> tuple[float, float, float] | None:
        """(val top-1, latency / anchor, size / anchor), measured; cached by id."""
        if c.id in cache:
            r = cache[c.id]
        else:
            try:
                path, _ = evaluator.compile(c)
                acc = evaluator.accuracy(c, ds.val_x, ds.val_y)
                stats = measure_interleaved(target, {"anchor": anchor_path, "c": path}, ds.input_shape, args.rounds)
                ratios = [c_ms / a_ms for c_ms, a_ms in zip(stats["c"].extra["round_p50_ms"],
                                                            stats["anchor"].extra["round_p50_ms"])]
                r = {"id": c.id, "val_accuracy": acc, "latency_ratio": float(np.median(ratios)),
                     "p50_ms": stats["c"].p50_ms, "anchor_p50_ms": stats["anchor"].p50_ms,
                     "size_bytes": path.stat().st_size, "size_ratio": path.stat().st_size / anchor_size}
            except Exception as e:  # a candidate that fails is an evaluation spent, as in compile
                r = {"id": c.id, "error": f"{type(e).__name__}: {e}"[:300]}
            finally:
                shutil.rmtree(models / c.id, ignore_errors=True)
            cache[c.id] = r
            with cache_path.open("a") as f:
                f.write(json.dumps(r) + "\n")
        if "error" in r:
            return None
        return r["val_accuracy"], r["latency_ratio"], r["size_ratio"]

    def hv(points) -> float:
        pts = [(1 - a, lat, size) for a, lat, size in points]
        return hypervolume(pts, [False, False, False], REFERENCE_POINT) / REFERENCE_POINT[0]

    def run(strategy, cap: int, bar: float | None, label: str) -> dict:
        """Ask/tell until ``cap`` distinct real evaluations, or until the hypervolume reaches ``bar``."""
        seen, points, curve, asks = set(), [], [], 0
        while len(seen) < cap and asks < 50 * cap:
            asks += 1
            c = strategy.ask()
            values = real_eval(c)
            strategy.tell(c, values)
            if c.id in seen:
                continue
            seen.add(c.id)
            if values is not None:
                points.append(values)
            curve.append(hv(points))
            if len(seen) % 10 == 0:
                err.print(f"  {label}: {len(seen)} evaluations, hypervolume {curve[-1]:.4f}")
            if bar is not None and curve[-1] >= bar:
                break
        reached = next((i + 1 for i, h in enumerate(curve) if bar is not None and h >= bar), None)
        return {"curve": curve, "evaluations": len(curve), "reached_at": reached}

    results = json.loads((out / "bench.json").read_text()).get("seeds", {}) if (out / "bench.json").is_file() else {}
    keys = ("dataset", "random_evals", "linas_evals", "nsga2_evals", "linas_population", "nsga2_population", "rounds",
            "runs", "threads")  # what a stored seed's results depend on
    settings = {k: getattr(args, k) for k in keys}
    for seed in range(args.seeds):
        key = str(seed)
        if {k: results.get(key, {}).get("settings", {}).get(k) for k in keys} != settings:
            results[key] = {"settings": settings}
        done = results[key]
        if "random" not in done:  # the bar the others are measured against (cached evaluations replay fast)
            done["random"] = run(RandomSearch(spec, seed), args.random_evals, None, f"seed {seed} random")
            done["random_hv_at_budget"] = done["random"]["curve"][-1]
        bar = done["random_hv_at_budget"]
        if "linas" in args.strategies and "linas" not in done:
            linas = LINASSearch(spec, seed, args.linas_population, latency_prior=prior)
            done["linas"] = run(linas, args.linas_evals, bar, f"seed {seed} linas")
            done["linas"]["iterations"] = linas.iterations
        if "linas-no-prior" in args.strategies and "linas_no_prior" not in done:  # ablation: real evaluations only
            linas = LINASSearch(spec, seed, args.linas_population)
            done["linas_no_prior"] = run(linas, args.linas_evals, bar, f"seed {seed} linas (no prior)")
            done["linas_no_prior"]["iterations"] = linas.iterations
        if "nsga2" in args.strategies and "nsga2" not in done:
            done["nsga2"] = run(NSGA2Search(spec, seed, args.nsga2_population), args.nsga2_evals, bar,
                                f"seed {seed} nsga2")
        _write(out, results, args, info, target, anchor_c.id, prior_info)

    summary = _write(out, results, args, info, target, anchor_c.id, prior_info)
    table = Table(title=f"search strategies on {args.dataset} ({target.name}, {args.threads} threads): real evaluations "
                        f"to reach random search's hypervolume at {args.random_evals}")
    for col in ("seed", f"random HV@{args.random_evals}", "LINAS evals", "LINAS w/o prior", "NSGA-II evals",
                "LINAS HV@50", "NSGA-II HV@50", "random HV@50"):
        table.add_column(col, justify="right")
    for key, r in sorted(results.items(), key=lambda kv: int(kv[0])):
        if "random" not in r:
            continue
        table.add_row(key, f"{r['random_hv_at_budget']:.4f}",
                      _fmt(r["linas"]["reached_at"], args.linas_evals) if "linas" in r else "–",
                      _fmt(r["linas_no_prior"]["reached_at"], args.linas_evals) if "linas_no_prior" in r else "–",
                      _fmt(r["nsga2"]["reached_at"], args.nsga2_evals) if "nsga2" in r else "–",
                      _at(r["linas"], 50) if "linas" in r else "–", _at(r["nsga2"], 50) if "nsga2" in r else "–",
                      _at(r["random"], 50))
    med = summary["median_evals_to_reach"]
    table.add_row("median", "", *(_fmt(med[n], args.nsga2_evals if n == "nsga2" else args.linas_evals)
                                  if n in med else "–" for n in ("linas", "linas_no_prior", "nsga2")), "", "", "")
    console.print(table)
    console.print(f"reference point (error, latency/anchor, size/anchor) = {REFERENCE_POINT}; anchor p50 "
                  f"{summary['anchor_p50_ms_median']:.3f} ms (median over evaluations); {out / 'bench.json'}, "
                  f"{out / 'hypervolume.png'}")
    return 0


def _fmt(n, cap) -> str:
    return f"> {cap}" if n is None else str(n)


def _at(run: dict, n: int) -> str:
    c = run["curve"]
    return f"{c[min(n, len(c)) - 1]:.4f}" + ("" if len(c) >= n else f" (@{len(c)})")


def _write(out: Path, results: dict, args, info: dict, target, anchor_id: str, prior_info: str = "") -> dict:
    """bench.json and hypervolume.png from the seeds finished so far; returns the summary."""
    import numpy as np

    def median_reach(name: str):
        # a seed that did not reach the bar within the cap counts as cap + 1 (above every reached one)
        cap = args.nsga2_evals if name == "nsga2" else args.linas_evals
        vals = [r[name]["reached_at"] or cap + 1 for r in results.values() if name in r]
        m = float(np.median(vals)) if vals else None
        return None if m is None or m > cap else m

    anchors = []
    cache_path = out / "evaluations.jsonl"
    for line in cache_path.read_text().splitlines() if cache_path.is_file() else []:
        try:
            anchors.append(json.loads(line)["anchor_p50_ms"])
        except (json.JSONDecodeError, KeyError):
            pass
    names = ("linas", "linas_no_prior", "nsga2")
    summary = {"median_evals_to_reach": {n: median_reach(n) for n in names if any(n in r for r in results.values())},
               "seeds_done": {n: sum(n in r for r in results.values()) for n in ("random", *names)},
               "anchor_p50_ms_median": float(np.median(anchors)) if anchors else float("nan"),
               "anchor_p50_ms_range": [min(anchors), max(anchors)] if anchors else None}
    doc = {"what": "hypervolume of the measured Pareto front vs real evaluations (bench/search_bench.py)",
           "objectives": ["top-1 error (validation)", "p50 latency / anchor p50 (measured, interleaved)",
                          "ONNX size / anchor size"],
           "reference_point": list(REFERENCE_POINT), "normalized_by": REFERENCE_POINT[0],
           "anchor": {"candidate_id": anchor_id, "what": "largest subnet, all FP32"},
           "latency_prior": prior_info, "target": target.describe(), "supernet": {k: info[k] for k in ("cache_key", "train") if k in info},
           "summary": summary, "seeds": results}
    tmp = out / "bench.json.tmp"
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, out / "bench.json")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    colors = {"random": "#7f7f7f", "nsga2": "#1f77b4", "linas": "#d62728", "linas_no_prior": "#ff9896"}
    for name, color in colors.items():
        runs = [r[name] for r in results.values() if name in r]
        for i, r in enumerate(runs):
            c = r["curve"]
            ax.plot(range(1, len(c) + 1), c, color=color, alpha=0.35, lw=1,
                    label=f"{name} ({len(runs)} seeds)" if i == 0 else None)
    bars = [r["random_hv_at_budget"] for r in results.values() if "random_hv_at_budget" in r]
    if bars:
        ax.axhline(float(np.median(bars)), color="black", ls=":", lw=1,
                   label=f"random @ {args.random_evals}, median")
    ax.set_xlabel("real evaluations")
    ax.set_ylabel("hypervolume (normalized)")
    ax.set_title("measured Pareto front: (error, latency/anchor, size/anchor), ref (0.2, 1, 1)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "hypervolume.png")
    plt.close(fig)
    return summary


if __name__ == "__main__":
    sys.exit(main())
