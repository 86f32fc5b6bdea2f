"""Crash safety: ``edgec compile`` killed with SIGKILL at random moments resumes without losing or
repeating an evaluation and ends with the uninterrupted run's Pareto front (scripts/kill_resume_trials.py)."""

import importlib.util
import json
from pathlib import Path

import pytest

from edgec.rundir import LOCK, RunDir

ROOT = Path(__file__).resolve().parent.parent


def load_script():
    spec = importlib.util.spec_from_file_location("kill_resume_trials", ROOT / "scripts" / "kill_resume_trials.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_ten_kills_lose_and_repeat_nothing(tmp_path, capsys):
    trials = load_script()
    code = trials.main(["--trials", "10", "--work", str(tmp_path), "--json", str(tmp_path / "trials.json"),
                        "--", "--train-epochs", "1", "--budget-evals", "8"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    results = json.loads((tmp_path / "trials.json").read_text())["trials"]
    assert len(results) == 10
    assert sum(r["killed"] for r in results) >= 8, printed  # the kills landed mid-run, not after it
    assert all(r["repeated"] == 0 and r["lost"] == 0 and r["same_front"] for r in results)


def test_a_folder_killed_before_its_settings_were_stored_is_not_refused(tmp_path):
    out = tmp_path / "run"
    with RunDir(out):  # what a run killed right after opening its folder leaves
        pass
    assert (out / "study" / "models").is_dir() and not (out / "study" / "config.json").exists()
    with RunDir(out, resume=True):  # --resume starts it from the beginning
        pass
    with RunDir(out):  # and so does a plain new run
        pass
    leftover = out / "study" / ".tmp-config.json-k1ll3d"  # killed while writing its settings
    leftover.write_text('{"job": "comp')
    with RunDir(out, resume=True):
        assert not leftover.exists()  # swept once the lock is held
    (out / "study" / "notes.txt").write_text("the user's")
    with pytest.raises(Exception, match="nothing to resume"):
        RunDir(out, resume=True)
    only_lock = tmp_path / "killed-earlier"  # killed after taking the lock, before making study/
    only_lock.mkdir()
    (only_lock / LOCK).touch()
    with RunDir(only_lock, resume=True):
        pass
    (only_lock / "study" / "models" / "x").mkdir()  # a stored model: that is no longer an empty folder
    with pytest.raises(Exception, match="not empty"):
        RunDir(only_lock)


def test_the_trial_script_catches_a_repeated_evaluation(tmp_path):
    """The checks can fail: a store with one candidate twice is reported as a repeat."""
    trials = load_script()
    study = tmp_path / "study"
    study.mkdir()
    rec = {"candidate_id": "abc", "val_accuracy": 0.9, "latency": {"p50_ms": 1.0}, "size_bytes": 10}
    (study / "evaluations.jsonl").write_text(json.dumps(rec) + "\n" + json.dumps(rec) + "\n{torn")
    ids = [r["candidate_id"] for r in trials.complete_records(tmp_path)]
    assert ids == ["abc", "abc"]


def _limited(size_bytes):
    """preexec_fn: files may grow to ``size_bytes`` at most (a full disk, simulated: writes past it fail
    with EFBIG instead of a SIGXFSZ kill)."""
    import resource
    import signal

    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size_bytes, size_bytes))
    return apply


@pytest.mark.parametrize("limit_bytes", [30_000, 60_000])
def test_a_full_disk_is_one_line_leaves_nothing_half_written_and_resumes(tmp_path, limit_bytes):
    import subprocess
    import sys

    import numpy as np
    from onnx import numpy_helper

    from test_corpus import _mlp

    weight = numpy_helper.from_array(np.ones((4096, 3), np.float32), "w")  # a 48 KB model
    model = _mlp(tmp_path / "m.onnx", batch=1, features=4096, weight=weight)
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(0).random((300, 4096), dtype=np.float32))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "edgec.cli", "compile", str(model), "--calib-data", str(tmp_path / "calib.npz"),
           "--budget-evals", "3", "--out", str(out)]
    full = subprocess.run(cmd, capture_output=True, text=True, timeout=600, preexec_fn=_limited(limit_bytes))
    assert full.returncode == 2, full.stderr[-1500:]
    last = full.stderr.strip().splitlines()[-1]
    assert last.startswith("edgec: error: the disk is full") and "Traceback" not in full.stderr
    assert not [p for p in out.rglob("*") if p.name.startswith((".tmp-", ".old-"))] if out.exists() else True
    if not (out / "study" / "config.json").is_file():  # failed before storing anything: nothing left at all
        assert not out.exists()
        return
    resumed = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-1500:]
    ids = [json.loads(line)["candidate_id"] for line in (out / "study" / "evaluations.jsonl").read_text().splitlines()]
    assert len(ids) == len(set(ids))
    trials = load_script()
    assert trials.artifacts_intact(out) == []


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, RuntimeError])
def test_force_without_resume_puts_the_old_run_back_when_the_new_one_fails(tmp_path, interrupt):
    out = tmp_path / "run"
    (out / "artifacts").mkdir(parents=True)
    (out / "report.json").write_text("old")
    (out / "artifacts" / "model.onnx").write_text("old model")
    with pytest.raises(interrupt):
        with RunDir(out, force=True, resumable=False):  # edgec prune --force, then Ctrl-C or a crash
            assert not (out / "report.json").exists()  # the old outputs are aside while it runs
            (out / "report.json").write_text("half")
            raise interrupt()
    assert (out / "report.json").read_text() == "old" and (out / "artifacts" / "model.onnx").read_text() == "old model"
    assert sorted(c.name for c in out.iterdir()) == [LOCK, "artifacts", "report.json"]


def test_force_without_resume_replaces_the_old_run_when_the_new_one_succeeds(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "report.json").write_text("old")
    (out / "candidates.csv").write_text("old")
    with RunDir(out, force=True, resumable=False):
        (out / "report.json").write_text("new")
    assert (out / "report.json").read_text() == "new"
    assert sorted(c.name for c in out.iterdir()) == [LOCK, "report.json", "study"]


def test_force_on_a_new_folder_that_fails_leaves_nothing_behind(tmp_path):
    out = tmp_path / "new"
    with pytest.raises(RuntimeError):
        with RunDir(out, force=True, resumable=False):
            (out / "report.json").write_text("half")
            raise RuntimeError()
    assert not out.exists()
