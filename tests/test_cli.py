"""The CLI as a user meets it: one-line errors with exit code 2, the targets table, profile."""

import json
import subprocess
import sys

import pytest
import torch


def edgec(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "edgec.cli", *args], capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(proc, fragment):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("edgec: error:") and fragment in lines[0], lines[0]


@pytest.mark.parametrize("args, fragment", [
    (["compile", "--dataset", "cifar"], "known datasets"),
    (["compile", "--target", "gpu-magic"], "unknown target 'gpu-magic'"),
    (["compile", "--budget-evals", "0"], "budget_evals"),
    (["compile", "--resume", "--force"], "pass only one"),
    (["compile", "--config", "/nonexistent.toml"], "not found"),
    (["compile", "--budget-evals", "lots"], "invalid int value"),
    (["compile", "--dataset", "fashion-mnist", "--data-dir", "/nonexistent"], "apt-get install"),
    (["profile", "/nonexistent.onnx"], "not found"),
    (["profile", "/nonexistent.onnx", "--target", "cpu-ort", "--target", "cpu-ort"], "named twice"),
    (["profile", "/nonexistent.onnx", "--htp-fp16"], "needs --target npu-qnn-htp"),
    (["profile", "/nonexistent.onnx", "--npu-cpu-fallback"], "applies to npu-qnn-htp"),
    (["compile", "m.onnx", "--calib-data", "c.npz", "--dataset", "fashion-mnist"], "not to an ONNX model"),
    (["compile", "m.onnx", "--calib-data", "c.npz", "--input-shape", "1,a"], "a list of integers"),
    (["compile", "--objective", "max-latency"], "two or more --target"),
    (["frobnicate"], "invalid choice"),
    (["prune", "--flops-target", "1.5"], "--flops-target"),
    (["prune", "--step", "1e-9"], "--step"),
    (["prune", "--seed", "-1"], "--seed"),
    (["prune", "--round-to", "0"], "--round-to"),
    (["compile", "--prune-round-to", "8"], "without prune_flops_target (--prune-flops-target)"),
    (["compile", "--prune-flops-target", "0.3", "--prune-round-to", "0"], "prune_round_to"),
    (["prune", "--loss-budget", "inf"], "--loss-budget"),
    (["prune", "--model", "resnet"], "unknown model"),
    (["prune", "--model", "os.path:join"], "needs --checkpoint"),
    (["prune", "--checkpoint", "w.safetensors"], "applies to a user model"),
    (["prune", "--max-task-drop", "accuracy"], "TASK=NUMBER"),
    (["prune", "--max-task-drop", "bleu=1"], "unknown task 'bleu'"),
    (["prune", "--watch", "depth"], "unknown task"),
    (["prune", "--task-weight", "reconstruction"], "TASK=NUMBER"),
    (["prune", "--task-weight", "reconstruction=0"], "bad --task-weight"),
    (["prune", "--task-weight", "reconstruction=nan"], "bad --task-weight"),
    (["prune", "--task-weight", "depth=2"], "unknown task 'depth'"),
    (["prune", "--task-weight", "reconstruction=2", "--finetune-epochs", "0"], "--task-weight with --finetune-epochs 0"),
    (["prune", "--task-weight", "reconstruction=2", "--task-weight", " reconstruction=3"], "names task 'reconstruction' twice"),
    (["prune", "--max-task-drop", "classification=1", "--max-task-drop", "classification=2"], "twice"),
    (["prune", "--model", "subnet:abc"], "edgec compile names its chosen subnet"),
    (["prune", "--dataset", "digits", "--data-dir", "/nonexistent"], "--data-dir applies to --dataset fashion-mnist"),
    (["prune", "--out", ""], "--out is empty"),
    (["prune", "--importance", "fisher"], "importance"),
    (["prune", "--finetune-epochs", "-1"], "finetune-epochs"),
    (["prune", "--dataset", "fashion-mnist", "--data-dir", "/nonexistent"], "apt-get install"),
])
def test_bad_input_is_one_line_exit_2(args, fragment):
    assert_one_line_error(edgec(*args), fragment)


def test_non_empty_out_is_refused_and_untouched(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    proc = edgec("compile", "--out", str(tmp_path))
    assert_one_line_error(proc, "not empty")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


def test_resume_without_a_run_is_refused(tmp_path):
    assert_one_line_error(edgec("compile", "--resume", "--out", str(tmp_path / "new")), "it does not exist")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "mine.txt").write_text("x")
    assert_one_line_error(edgec("compile", "--resume", "--out", str(tmp_path / "other")), "holds no edgec study")


def test_targets_lists_cpu_ort():
    proc = edgec("targets", "--json")
    rows = {r["name"]: r for r in json.loads(proc.stdout)}
    assert rows["cpu-ort"]["available"] and rows["cpu-ort"]["latency_kind"] == "measured"
    assert "onnxruntime" in rows["cpu-ort"]["runtime"]
    assert "cpu-ort" in edgec("targets").stdout


def test_profile_an_onnx_file(tmp_path):
    path = tmp_path / "m.onnx"
    torch.onnx.export(torch.nn.Conv2d(1, 4, 3).eval(), (torch.zeros(1, 1, 8, 8),), str(path),
                      input_names=["input"], dynamo=False)
    proc = edgec("profile", str(path), "--target", "cpu-ort", "--runs", "20", "--json")
    assert proc.returncode == 0, proc.stderr
    row = json.loads(proc.stdout)[0]
    assert row["latency"]["kind"] == "measured" and row["latency"]["runs"] == 20 and row["size_bytes"] > 0


@pytest.mark.parametrize("flag, value", [("--batch", "0"), ("--threads", "100000"), ("--runs", "0")])
def test_profile_refuses_absurd_numbers(tmp_path, flag, value):
    path = tmp_path / "m.onnx"
    torch.onnx.export(torch.nn.Conv2d(1, 4, 3).eval(), (torch.zeros(1, 1, 8, 8),), str(path),
                      input_names=["input"], dynamo=False)
    assert_one_line_error(edgec("profile", str(path), flag, value), f"bad value for {flag}")


def test_a_failed_fresh_run_leaves_nothing_behind(tmp_path):
    out = tmp_path / "new"
    proc = edgec("compile", "--dataset", "fashion-mnist", "--data-dir", str(tmp_path / "nowhere"), "--out", str(out))
    assert_one_line_error(proc, "apt-get install")
    assert not out.exists()


def test_force_removes_a_symlinked_output_without_following_it(tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "data.txt").write_text("keep")
    out = tmp_path / "out"
    out.mkdir()
    (out / "artifacts").symlink_to(precious)
    proc = edgec("compile", "--dataset", "fashion-mnist", "--data-dir", str(tmp_path / "nowhere"), "--out", str(out),
                 "--force")
    assert_one_line_error(proc, "apt-get install")
    assert (out / "artifacts").is_symlink()  # bad input is refused before --force touches the folder
    from edgec.rundir import RunDir

    with RunDir(out, force=True):
        pass
    assert (precious / "data.txt").read_text() == "keep" and not (out / "artifacts").exists()


def test_profile_on_the_mac_count_target_shows_what_it_has(tmp_path):
    """cpu-macs times nothing: the table shows '-' for session time and memory instead of crashing."""
    import numpy as np
    from onnx import numpy_helper

    from test_corpus import _mlp

    model = _mlp(tmp_path / "m.onnx", batch=1, weight=numpy_helper.from_array(np.ones((64, 3), np.float32), "w"))
    proc = edgec("profile", str(model), "--target", "cpu-macs")
    assert proc.returncode == 0, proc.stderr
    assert "predicted" in proc.stdout and "Traceback" not in proc.stderr
    from edgec.targets.macs_proxy import count_macs
    import onnx

    assert count_macs(onnx.load(str(model))) == {"fp32_macs": 192, "int8_macs": 0, "nodes": 1}


def test_progress_in_a_log_reports_stages_of_unknown_length():
    import io

    from rich.console import Console

    from edgec.cli import UNBOUNDED_LOG_EVERY, _RichProgress

    buf = io.StringIO()
    with _RichProgress(Console(file=buf, force_terminal=False, width=200)) as progress:
        progress.stage("PAGCP")
        for call in range(1, 3 * UNBOUNDED_LOG_EVERY + 1):
            progress.advance(call, None, f"layer −{call}%")
        progress.stage("fine-tuning")
        for step in range(1, 101):
            progress.advance(step, 100)
    lines = buf.getvalue().splitlines()
    assert [ln for ln in lines if ln.startswith("  PAGCP")] == [
        f"  PAGCP: {k * UNBOUNDED_LOG_EVERY} layer −{k * UNBOUNDED_LOG_EVERY}%" for k in (1, 2, 3)]
    assert sum(ln.startswith("  fine-tuning: ") for ln in lines) == 11  # the first step, then one per 10 %
