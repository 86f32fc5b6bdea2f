"""Search state in a shared Optuna RDB (``edgec compile --storage sqlite:///…``): several searches
share one NSGA-II study, take each other's evaluations instead of repeating them, and a killed one
resumes without repeating its own."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from edgec.config import CompileConfig
from edgec.errors import ConfigError

ARGS = ["--dataset", "digits", "--train-epochs", "1", "--target", "cpu-macs", "--population-size", "4"]


def compile_cmd(out, storage, *args):
    return [sys.executable, "-m", "edgec.cli", "compile", *ARGS, "--storage", storage, "--out", str(out), *args]


def records(out):
    return [json.loads(line) for line in (out / "study" / "evaluations.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_searches_share_one_study_and_take_each_others_evaluations(tmp_path):
    storage = f"sqlite:///{tmp_path / 'search.db'}"
    first = subprocess.Popen(compile_cmd(tmp_path / "a", storage, "--budget-evals", "10"), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    time.sleep(3)
    second = subprocess.run(compile_cmd(tmp_path / "b", storage, "--budget-evals", "10"), capture_output=True,
                            text=True, timeout=900)
    _, err = first.communicate(timeout=900)
    assert first.returncode == 0, err[-1500:]
    assert second.returncode == 0, second.stderr[-1500:]
    a, b = records(tmp_path / "a"), records(tmp_path / "b")
    ref = json.loads((tmp_path / "a" / "report.json").read_text())["reference"]["candidate_id"]
    evaluated = [{r["candidate_id"] for r in recs if not r.get("shared_from_run")} - {ref} for recs in (a, b)]
    assert not evaluated[0] & evaluated[1], "a candidate was evaluated by both searches"
    assert all(len(e) <= 10 for e in evaluated)
    # the search that finished last reports and chooses from everything the study holds
    last = max("ab", key=lambda r: (tmp_path / r / "study" / "evaluations.jsonl").stat().st_mtime)
    assert {r["candidate_id"] for r in records(tmp_path / last)} == evaluated[0] | evaluated[1] | {ref}
    report = json.loads((tmp_path / last / "report.json").read_text())
    assert len(report["evaluations"]) == len(records(tmp_path / last))
    info = [json.loads((tmp_path / r / "report.json").read_text())["search"]["shared_storage"] for r in "ab"]
    assert info[0]["study_name"] == info[1]["study_name"] and info[0]["run_id"] != info[1]["run_id"]
    import optuna

    study = optuna.load_study(study_name=info[0]["study_name"], storage=storage)
    told = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert {t.user_attrs["run_id"] for t in told} == {info[0]["run_id"], info[1]["run_id"]}
    # what one search took from the other is that search's record, and its model is rebuilt on publish
    by_id = {r["candidate_id"]: r for r in a + b if not r.get("shared_from_run")}
    for r in a + b:
        if r.get("shared_from_run"):
            assert r["val_accuracy"] == by_id[r["candidate_id"]]["val_accuracy"]


@pytest.mark.slow
def test_a_killed_shared_search_resumes_without_repeating(tmp_path):
    storage = f"sqlite:///{tmp_path / 'search.db'}"
    out = tmp_path / "run"
    proc = subprocess.Popen(compile_cmd(out, storage, "--budget-evals", "12"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline and (not (out / "study" / "evaluations.jsonl").is_file()
                                      or len(records(out)) < 5):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = subprocess.run(compile_cmd(out, storage, "--budget-evals", "12", "--resume"), capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-1500:]
    ids = [r["candidate_id"] for r in records(out)]
    assert len(ids) == len(set(ids)) == 13


def test_storage_settings_are_checked():
    with pytest.raises(ConfigError, match="storage"):
        CompileConfig(storage="sqlite:///x.db", strategy="random")
    with pytest.raises(ConfigError, match="study_name"):
        CompileConfig(study_name="s")


def test_an_unusable_storage_url_is_one_line(tmp_path):
    from edgec.search.space import fbnet_space
    from edgec.search.strategy import NSGA2Search

    with pytest.raises(ConfigError, match="cannot open the search storage"):
        NSGA2Search(fbnet_space(1, 8, 10), storage="nosuchdb://x/y", study_name="s")


def test_shared_records_round_trip_between_two_strategies(tmp_path):
    """One strategy's told record is what another finds; its own records it never takes back."""
    from edgec.search.space import fbnet_space
    from edgec.search.strategy import NSGA2Search

    spec = fbnet_space(1, 8, 10)
    storage = f"sqlite:///{tmp_path / 's.db'}"
    a = NSGA2Search(spec, 0, 4, storage=storage, study_name="s", run_id="A")
    c = a.ask()
    a.share(c, {"candidate_id": c.id, "val_accuracy": 0.5})
    a.tell(c, (0.5, 1.0, 10.0))
    b = NSGA2Search(spec, 1, 4, storage=storage, study_name="s", run_id="B")
    assert b.shared_record(c.id) == {"candidate_id": c.id, "val_accuracy": 0.5, "shared_from_run": "A"}
    assert a.shared_record(c.id) is None and b.shared_record("nope") is None


def test_a_password_in_the_storage_url_is_never_shown():
    from edgec.search.strategy import shown_url

    assert "secret" not in shown_url("postgresql://edgec:secret@db.example/search")
    with pytest.raises(ConfigError) as e:
        from edgec.search.strategy import open_shared_study

        open_shared_study("postgresql://edgec:secret@localhost:1/search", "s", ["maximize", "minimize", "minimize"])
    assert "secret" not in e.value.line()


def test_an_in_memory_storage_is_refused():
    from edgec.search.strategy import open_shared_study

    with pytest.raises(ConfigError, match="in memory"):
        open_shared_study("sqlite://", "s", ["maximize", "minimize", "minimize"])


def test_damaged_shared_records_are_skipped_not_trusted(tmp_path):
    import sqlite3

    from edgec.search.space import fbnet_space
    from edgec.search.strategy import NSGA2Search

    spec = fbnet_space(1, 8, 10)
    storage = f"sqlite:///{tmp_path / 's.db'}"
    a = NSGA2Search(spec, 0, 4, storage=storage, study_name="s", run_id="A")
    for _ in range(4):
        c = a.ask()
        a.share(c, {"candidate_id": c.id})
        a.tell(c, (0.5, 1.0, 10.0))
    db = sqlite3.connect(tmp_path / "s.db")
    rows = db.execute("select trial_user_attribute_id from trial_user_attributes where key='record'").fetchall()
    for (i,), bad in zip(rows, ["{}", "[]", "garbage{"]):
        db.execute("update trial_user_attributes set value_json=? where trial_user_attribute_id=?",
                   (json.dumps(bad), i))
    db.commit()
    b = NSGA2Search(spec, 1, 4, storage=storage, study_name="s", run_id="B")
    assert len(b.shared_records()) == 1  # only the intact one


def test_a_damaged_run_id_is_made_anew(tmp_path):
    from edgec.pipeline import _run_id

    (tmp_path / "run_id").write_text("not-hex!")
    new = _run_id(tmp_path)
    assert len(new) == 32 and _run_id(tmp_path) == new
