#!/usr/bin/env python3
"""Kill ``edgec compile`` with SIGKILL at random moments, resume it, and check nothing was lost or repeated.

One uninterrupted run first (the baseline); then, per trial, the same command into a new folder,
killed (SIGKILL to its whole process group) after a random delay drawn uniformly from the
baseline's wall time (narrowed to a trial's when one finishes before its kill: a shared host's
speed changes), then run again with ``--resume`` until it completes. Each trial checks:

- the resumed run exits 0 (a run killed before it made its folder is refused by ``--resume`` with the
  one-line "nothing to resume", exit 2, nothing written; the plain command, as that line says, then runs);
- no completed evaluation was repeated: no candidate id appears twice among the complete records
  of ``study/evaluations.jsonl`` (a record torn by the kill is not a completed evaluation);
- nothing was lost: the evaluated candidates, their objective values and the Pareto front are the
  baseline's (the search is seeded; ``--target cpu-macs`` makes latency a deterministic count, so
  the comparison is exact — a measured target's timings differ run to run);
- every artifact in ``manifest.json`` exists with the sha256 the manifest gives (atomic publication).

Usage: ``python scripts/kill_resume_trials.py --trials 10 [--work DIR] [-- extra compile flags]``.
Prints a table; exits 1 when any trial fails a check.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BASE_ARGS = ["--dataset", "digits", "--target", "cpu-macs", "--budget-evals", "12", "--population-size", "4",
             "--seed", "0"]


def compile_cmd(out: Path, extra: list[str], resume: bool = False) -> list[str]:
    return [sys.executable, "-m", "edgec.cli", "compile", *BASE_ARGS, *extra, "--out", str(out),
            *(["--resume"] if resume else [])]


def complete_records(out: Path) -> list[dict]:
    """The complete (parsable) lines of the run's evaluation store, in order."""
    path = out / "study" / "evaluations.jsonl"
    records = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and "candidate_id" in rec:
                records.append(rec)
    return records


def outcome(out: Path) -> dict:
    """What a finished run computed: {candidate id: objective values}, and its Pareto front."""
    report = json.loads((out / "report.json").read_text())
    values = {r["candidate_id"]: (r.get("val_accuracy"), r.get("latency", {}).get("p50_ms"), r.get("size_bytes"),
                                  r.get("failed"))
              for r in complete_records(out)}
    return {"values": values, "front": sorted(report["pareto_front"])}


def artifacts_intact(out: Path) -> list[str]:
    """Problems with the published artifacts: missing files or a sha256 other than the manifest's."""
    problems = []
    manifest = json.loads((out / "manifest.json").read_text())
    for entry in manifest.get("artifacts", []):
        path = out / entry["path"]
        if not path.is_file():
            problems.append(f"missing {entry['path']}")
        elif hashlib.sha256(path.read_bytes()).hexdigest() != entry.get("sha256"):
            problems.append(f"sha256 differs: {entry['path']}")
    return problems


def run_to_completion(cmd: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)


def trial(i: int, work: Path, extra: list[str], delay_s: float, baseline: dict, env: dict) -> dict:
    out = work / f"trial-{i:02d}"
    proc = subprocess.Popen(compile_cmd(out, extra), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=env, start_new_session=True)
    started = time.perf_counter()
    try:
        proc.wait(timeout=delay_s)
        finished_before_kill = True
    except subprocess.TimeoutExpired:
        finished_before_kill = False
    run_s = time.perf_counter() - started
    if not finished_before_kill:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    stored_at_kill = len(complete_records(out))
    folder_at_kill = out.exists()
    resumed = run_to_completion(compile_cmd(out, extra, resume=True), env)
    result = {"trial": i, "kill_at_s": round(delay_s, 2), "killed": not finished_before_kill,
              "stored_at_kill": stored_at_kill, "folder_at_kill": folder_at_kill, "resume_rc": resumed.returncode,
              "problems": [], **({"finished_after_s": round(run_s, 2), "finished_rc": proc.returncode}
                                 if finished_before_kill else {})}
    if not folder_at_kill:  # killed before it made its folder: --resume says so, and the plain command starts it
        if resumed.returncode != 2 or "nothing to resume" not in resumed.stderr or out.exists():
            result["problems"].append(f"--resume of a run killed before it made its folder exited "
                                      f"{resumed.returncode} (expected the one-line 'nothing to resume', exit 2, "
                                      f"nothing written): {resumed.stderr.strip()[-300:]}")
            return result
        resumed = run_to_completion(compile_cmd(out, extra), env)
        result["resume_rc"] = resumed.returncode
    if resumed.returncode != 0:
        result["problems"].append(f"resume exited {resumed.returncode}: {resumed.stderr.strip()[-300:]}")
        return result
    ids = [r["candidate_id"] for r in complete_records(out)]
    result["repeated"] = len(ids) - len(set(ids))
    if result["repeated"]:
        result["problems"].append(f"{result['repeated']} completed evaluation(s) repeated")
    got = outcome(out)
    lost = set(baseline["values"]) - set(got["values"])
    extra_ids = set(got["values"]) - set(baseline["values"])
    result["lost"] = len(lost)
    if lost or extra_ids:
        result["problems"].append(f"evaluated set differs: {len(lost)} lost, {len(extra_ids)} not in the baseline")
    differing = [c for c in set(got["values"]) & set(baseline["values"]) if got["values"][c] != baseline["values"][c]]
    if differing:
        result["problems"].append(f"{len(differing)} evaluation(s) differ from the baseline's values")
    result["same_front"] = got["front"] == baseline["front"]
    if not result["same_front"]:
        result["problems"].append(f"Pareto front {got['front']} != baseline {baseline['front']}")
    result["problems"] += artifacts_intact(out)
    return result


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=10)
    p.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    p.add_argument("--work", help="folder for the runs (default: a new temporary folder)")
    p.add_argument("--json", help="write the per-trial results here")
    args = p.parse_args(own)
    work = Path(args.work or tempfile.mkdtemp(prefix="edgec-kill-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    t0 = time.perf_counter()
    base = run_to_completion(compile_cmd(work / "baseline", extra), env)
    baseline_s = time.perf_counter() - t0
    if base.returncode != 0:
        print(f"baseline run failed ({base.returncode}): {base.stderr.strip()[-500:]}", file=sys.stderr)
        return 1
    baseline = outcome(work / "baseline")
    print(f"baseline: {len(baseline['values'])} evaluations, front {baseline['front']}, {baseline_s:.1f} s")
    # again, now that the supernet is cached: the kill window is the time a run takes from here on
    t0 = time.perf_counter()
    again = run_to_completion(compile_cmd(work / "baseline-2", extra), env)
    window_s = time.perf_counter() - t0
    if again.returncode != 0 or outcome(work / "baseline-2") != baseline:
        print("two uninterrupted runs with the same seed differ: the comparison would mean nothing", file=sys.stderr)
        return 1

    rng = random.Random(args.seed)
    results = []
    for i in range(args.trials):
        results.append(trial(i, work, extra, rng.uniform(0.0, window_s), baseline, env))
        if results[-1].get("finished_rc") == 0:  # the host got faster than when the window was timed: narrow it
            window_s = min(window_s, results[-1]["finished_after_s"])
    print(f"{'trial':>5} {'kill at s':>9} {'killed':>6} {'stored':>6} {'repeated':>8} {'lost':>4} {'front':>6}  problems")
    for r in results:
        print(f"{r['trial']:>5} {r['kill_at_s']:>9} {str(r['killed']):>6} "
              f"{r['stored_at_kill'] if r['folder_at_kill'] else 'no dir':>6} "
              f"{r.get('repeated', '-'):>8} {r.get('lost', '-'):>4} {'same' if r.get('same_front') else 'DIFF':>6}  "
              f"{'; '.join(r['problems']) or '-'}")
    killed = sum(r["killed"] for r in results)
    failed = [r for r in results if r["problems"]]
    print(f"{len(results)} trials ({killed} killed mid-run, window {window_s:.1f} s): "
          f"{sum(r.get('repeated', 0) for r in results)} repeated and {sum(r.get('lost', 0) for r in results)} lost "
          f"evaluations, {len(failed)} trial(s) with problems")
    if args.json:
        Path(args.json).write_text(json.dumps({"window_s": window_s, "trials": results}, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
