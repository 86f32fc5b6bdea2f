"""``edgec compile`` end to end on the real digits data with a tiny budget."""

import csv
import hashlib
import json
import subprocess
import sys

import onnx
import pytest
from conftest import needs_target

pytestmark = pytest.mark.slow

ARGS = ["--dataset", "digits", "--train-epochs", "1", "--population-size", "4", "--seed", "0"]


def compile_(*args):
    return subprocess.run([sys.executable, "-m", "edgec.cli", "compile", *ARGS, *args], capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    proc = compile_("--budget-evals", "4", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out, proc


def test_outputs_follow_the_run_directory_layout(run):
    out, proc = run
    for name in ("report.json", "report.html", "candidates.csv", "manifest.json", "study/evaluations.jsonl"):
        assert (out / name).is_file(), name
    assert "published artifacts" in proc.stdout and "report.html" in proc.stdout


def test_report_and_manifest(run):
    out, _ = run
    report = json.loads((out / "report.json").read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    assert report["schema_version"] == 1 and report["dataset"]["name"] == "digits"
    assert "random_state=0" in report["dataset"]["test_split"]
    assert len(report["evaluations"]) == 5  # the reference + 4 searched
    assert report["reference"]["role"] == "reference" and report["reference"]["candidate"]["policy"]
    assert all(e["latency"]["kind"] == "measured" for e in report["evaluations"])
    arts = manifest["artifacts"]
    roles = [a["role"] for a in arts]
    assert roles.count("reference") == 1 and set(roles) <= {"reference", "pareto"}
    assert {a["id"] for a in arts if a["role"] == "pareto"} <= set(report["pareto_front"])
    chosen = [a for a in arts if a["chosen"]]
    assert len(chosen) == 1 and chosen[0]["id"] == manifest["chosen"] == report["chosen"]["candidate_id"]
    ref_val = report["reference"]["val_accuracy"]
    assert chosen[0]["val_accuracy"] >= ref_val - 0.01 - 1e-9
    for a in arts:
        path = out / a["path"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == a["sha256"]
        assert a["input"]["shape"] == ["batch", 1, 8, 8] and a["input"]["dtype"] == "float32"
        assert 0 <= a["test_accuracy"] <= 1 and a["p50_ms"] > 0
        props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
        assert props["candidate_id"] == a["id"] and json.loads(props["policy"]) == a["policy"]
        assert props["dataset"] == "digits" and "test_accuracy" in json.loads(props["metrics"])
        # what ONNX Runtime really runs as INT8, next to what the policy asked for
        rp = a["quality"]["runtime_precision"]
        assert set(rp["int8_layers"]) <= set(a["policy"]) and set(rp["policy_fp32_run_as_int8"]) <= set(rp["int8_layers"])
        assert all(a["policy"][n] == "int8" for n in rp["policy_int8_run_as_float"])
        if all(v == "fp32" for v in a["policy"].values()):
            assert rp["int8_layers"] == []
    rows = list(csv.DictReader((out / "candidates.csv").open()))
    assert len(rows) == 5 and rows[0]["role"] == "reference"
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and chosen[0]["id"] in html


def test_resume_continues_without_repeating(run):
    out, _ = run
    before = (out / "study" / "evaluations.jsonl").read_text().splitlines()
    proc = compile_("--budget-evals", "6", "--out", str(out), "--resume")
    assert proc.returncode == 0, proc.stderr[-2000:]
    after = (out / "study" / "evaluations.jsonl").read_text().splitlines()
    assert after[:len(before)] == before
    ids = [json.loads(line)["candidate_id"] for line in after]
    assert len(ids) == len(set(ids)) == 7
    assert "cached" in proc.stderr  # the supernet was not retrained


def test_second_run_into_same_out_is_refused(run):
    out, _ = run
    proc = compile_("--budget-evals", "1", "--out", str(out))
    assert proc.returncode == 2 and "not empty" in proc.stderr and "Traceback" not in proc.stderr


def test_impossible_budget_says_so_and_exits_non_zero(run, tmp_path):
    proc = compile_("--budget-evals", "2", "--out", str(tmp_path / "o"), "--latency-budget-ms", "0.000001")
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "no candidate meets" in proc.stderr and "Traceback" not in proc.stderr
    assert (tmp_path / "o" / "report.json").is_file()


def test_resume_skips_damaged_records_and_refuses_damaged_state(run, tmp_path):
    import shutil

    out, _ = run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    with open(copy / "study" / "evaluations.jsonl", "a") as f:
        f.write('{"foo": 1}\n{"candidate_id": "x", "candidate": 5}\n')
    proc = compile_("--budget-evals", "6", "--out", str(copy), "--resume")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "2 damaged line(s)" in proc.stderr
    (copy / "study" / "config.json").write_text("[1]")
    proc = compile_("--budget-evals", "6", "--out", str(copy), "--resume")
    assert proc.returncode == 2 and "is damaged" in proc.stderr and "Traceback" not in proc.stderr
    proc = compile_("--budget-evals", "6", "--out", str(copy), "--resume", "--seed", "1")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


def test_a_damaged_work_model_fails_the_publication_gate_and_is_not_published(run, tmp_path):
    """The reference's work file is swapped for a wrong model (weights negated) after the search: the
    resumed run's gate finds its accuracy off by many points, publishes it nowhere and says by how much."""
    import shutil

    import numpy as np
    from onnx import numpy_helper

    out, _ = run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    ref_id = json.loads((out / "report.json").read_text())["reference"]["candidate_id"]
    work = copy / "study" / "models" / ref_id / "cpu-ort.onnx"
    model = onnx.load(str(work))
    for init in model.graph.initializer:
        w = numpy_helper.to_array(init)
        if w.dtype == np.float32 and w.ndim >= 2:
            init.CopyFrom(numpy_helper.from_array(-w, init.name))
    onnx.save(model, str(work))
    proc = compile_("--budget-evals", "6", "--out", str(copy), "--resume")
    assert proc.returncode in (0, 3), proc.stderr[-2000:]
    assert f"NOT published: cpu-ort artifact {ref_id} (reference) failed its gate" in proc.stderr
    report = json.loads((copy / "report.json").read_text())
    blocked = report["publication_gate"]["blocked"]
    assert [b["id"] for b in blocked] == [ref_id] and blocked[0]["gap_pp"] > 10
    assert ref_id not in {a["id"] for a in report["artifacts"]}
    assert not (copy / "artifacts" / "cpu-ort" / ref_id).exists()
    manifest = json.loads((copy / "manifest.json").read_text())
    assert ref_id not in {a["id"] for a in manifest["artifacts"]}
    assert "NOT published" in (copy / "report.html").read_text()
    # the untouched run passed every gate
    assert json.loads((out / "report.json").read_text())["publication_gate"]["blocked"] == []


def test_finalists_are_remeasured_side_by_side(run):
    out, _ = run
    report = json.loads((out / "report.json").read_text())
    published = {a["id"] for a in report["artifacts"]}
    by_id = {e["candidate_id"]: e for e in report["evaluations"]}
    for cid in published:
        extra = by_id[cid]["latency"]["extra"]
        assert len(extra["round_p50_ms"]) == extra["rounds"] == 3
        assert by_id[cid]["latency"]["p50_ms"] == sorted(extra["round_p50_ms"])[1]


def test_resume_cannot_shrink_the_budget(run):
    out, _ = run
    proc = compile_("--budget-evals", "1", "--out", str(out), "--resume")
    assert proc.returncode == 2 and "already stored" in proc.stderr and "Traceback" not in proc.stderr


@needs_target("npu-qnn-htp", "cpu-openvino")
def test_compile_for_three_targets_with_the_max_latency_objective(tmp_path):
    out = tmp_path / "devices"
    proc = compile_("--budget-evals", "3", "--out", str(out), "--target", "cpu-ort", "--target", "npu-qnn-htp",
                    "--target", "cpu-openvino", "--objective", "max-latency", "--max-accuracy-drop", "100")
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(report["targets"]) == {"cpu-ort", "npu-qnn-htp", "cpu-openvino"}
    # the search measured every candidate on every target; its objective is the worst ratio to the reference
    for e in report["evaluations"]:
        ratios = [e["latency_by_target"][t]["p50_ms"] / report["reference"]["latency_by_target"][t]["p50_ms"]
                  for t in report["targets"]]
        assert e["latency_objective"] == pytest.approx(max(ratios))
    assert report["reference"]["latency_objective"] == pytest.approx(1.0)
    by_target = {}
    for a in manifest["artifacts"]:
        by_target.setdefault(a["target"], []).append(a)
        assert (out / a["path"]).is_file()
    assert set(by_target) == set(report["targets"])
    assert {a["id"] for a in by_target["cpu-ort"]} == {a["id"] for a in by_target["npu-qnn-htp"]}
    for a in by_target["npu-qnn-htp"]:
        assert a["latency_kind"] == "simulated" and a["recipe"] == "qnn-qdq-u8s8-a16"
        assert a["input"]["shape"] == [1, 1, 8, 8] and a["input"]["quantized_io"]["input_dtype"] == "uint8"
        assert a["input"]["dtype"] == "uint8" and a["input"]["preprocessing"].endswith("quantized to uint8 as quantized_io says")
        assert "model_ctx.onnx" in a["files"] and any(f.endswith(".bin") for f in a["files"])
        assert a["quality"]["device_check"]["samples"] == 16  # the simulator's own outputs were checked
        assert all((out / a["path"]).parent.joinpath(f).is_file() for f in a["files"])
    assert all(a["latency_kind"] == "measured" for t in ("cpu-ort", "cpu-openvino") for a in by_target[t])
    assert not any("device_check" in a["quality"] for t in ("cpu-ort", "cpu-openvino") for a in by_target[t])
    assert all(a["quality"]["fidelity"]["metric"] == "top1_agreement" for a in manifest["artifacts"])
    chosen = manifest["chosen"]
    assert sum(a["chosen"] for a in manifest["artifacts"]) == 3  # the chosen candidate, once per target
    npu_report = report["device_reports"]["npu-qnn-htp"][chosen]
    assert npu_report["npu_coverage"]["npu_node_share"] == 1.0 and npu_report["top_ops"]
    assert report["device_reports"]["cpu-openvino"][chosen]["top_ops"]
    rows = [r for r in report["devices"] if r["role"] == "reference"]
    assert len(rows) == 3 and all(r["speedup_vs_reference"] == pytest.approx(1.0) for r in rows)
    html = (out / "report.html").read_text()
    assert html.count("<h3>") == 3 and "simulated" in html


def test_linas_strategy_reports_predictions_and_resumes_by_replay(tmp_path):
    out = tmp_path / "linas"
    proc = compile_("--strategy", "linas", "--budget-evals", "6", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    search = report["search"]
    assert search["strategy"] == "linas" and search["real_evaluations"] == 6
    assert set(search["objectives_per_candidate"].values()) == {"measured"}
    evaluated = {e["candidate_id"] for e in report["evaluations"]}
    predicted = search["predicted_before_evaluation"]
    # population 4: 3 initial + 1 random evaluated, then one LINAS iteration proposes the rest
    assert len(predicted) == 2 and set(predicted) <= evaluated
    assert all(p["val_accuracy"] > 0 and p["p50_ms"] > 0 and p["size_bytes"] > 0 for p in predicted.values())
    assert len(search["iterations"]) == 1 and "LINAS iterations" in (out / "report.html").read_text()
    assert search["latency_prior"].startswith("none (no latency model")  # the tests' cache has none
    assert "Latency prior: none" in (out / "report.html").read_text()
    before = (out / "study" / "evaluations.jsonl").read_text().splitlines()
    proc = compile_("--strategy", "linas", "--budget-evals", "8", "--out", str(out), "--resume")
    assert proc.returncode == 0, proc.stderr[-2000:]
    after = (out / "study" / "evaluations.jsonl").read_text().splitlines()
    assert after[:len(before)] == before and len(after) == len(before) + 2
    resumed = json.loads((out / "report.json").read_text())["search"]["predicted_before_evaluation"]
    assert {k: v for k, v in resumed.items() if k in predicted} == predicted  # the replay predicted the same
