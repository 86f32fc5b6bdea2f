"""PAGCP pruning: physical channel removal through the dependency graph, the per-task oracle, the CLI."""

import copy
import json
import math
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn

from edgec.compile.export import check_parity, export_onnx
from edgec.errors import ConfigError
from edgec.prune import conv_widths
from edgec.search.multitask import (BUILTIN_TASKS, MultiTaskNet, builtin_targets, evaluate_tasks, load_multitask,
                                    save_multitask)
from edgec.search.pagcp import PagcpSettings, count_macs, layer_thresholds, pagcp, prunable_groups, prune_group

EXAMPLE = torch.zeros(1, 1, 8, 8)


def _net() -> MultiTaskNet:
    torch.manual_seed(0)
    net = MultiTaskNet()
    for m in net.modules():  # non-trivial BN statistics so folding and pruning are exercised
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return net.eval()


def test_groups_follow_the_couplings():
    net = _net()
    groups = prunable_groups(net, EXAMPLE, net.output_layers())
    # 7 coupled groups; the residual partners and the depthwise conv are not groups of their own
    assert len(groups) == 7
    assert "encoder.mbconv.depthwise.0" in groups or "encoder.mbconv.expand.0" in groups
    assert not {"classifier", "decoder.out"} & set(groups)


def test_residual_group_pruned_consistently():
    net = _net()
    prune_group(net, "encoder.res.conv2.0", 10, EXAMPLE)
    ch = net.channels
    # down1's output, res.conv2's output and down2's input are one coupled group (the residual add)
    assert ch["down1"] == 54
    assert net.encoder.res.conv2[0].out_channels == 54
    assert net.encoder.res.conv1[0].in_channels == 54
    assert net.encoder.down2[0].in_channels == 54
    assert net.encoder.res.conv2[1].num_features == 54
    logits, recon = net(torch.rand(2, 1, 8, 8))
    assert logits.shape == (2, 10) and recon.shape == (2, 1, 8, 8)


def test_depthwise_group_pruned_consistently():
    net = _net()
    root = next(n for n in prunable_groups(net, EXAMPLE, net.output_layers()) if "mbconv.e" in n or "mbconv.d" in n)
    prune_group(net, root, 50, EXAMPLE)
    mb = net.encoder.mbconv
    assert mb.expand[0].out_channels == mb.depthwise[0].in_channels == mb.depthwise[0].out_channels == 206
    assert mb.depthwise[0].groups == 206 and mb.project[0].in_channels == 206
    assert net(torch.rand(1, 1, 8, 8))[1].shape == (1, 1, 8, 8)


def test_pruning_removes_the_smallest_l1_filters():
    net = _net()
    weak = [3, 7, 11, 19]
    with torch.no_grad():  # make 4 channels of the dec2 group the weakest in every coupled layer
        net.decoder.dec2[0].weight[weak] *= 1e-3
        net.decoder.dec2[1].weight[weak] *= 1e-3
        net.decoder.dec2[1].bias[weak] *= 1e-3
        net.decoder.out.weight[:, weak] *= 1e-3
    keep = [i for i in range(32) if i not in weak]
    expected = net.decoder.dec2[0].weight.detach()[keep].clone()
    prune_group(net, "decoder.dec2.0", 4, EXAMPLE)
    assert torch.equal(net.decoder.dec2[0].weight.detach(), expected)
    assert net.decoder.out.in_channels == 28


def test_pruned_model_exports_to_valid_onnx(tmp_path, images8):
    net = _net()
    for layer, n in (("encoder.res.conv2.0", 12), ("decoder.dec1.0", 20), ("encoder.stem.0", 5)):
        prune_group(net, layer, n, EXAMPLE)
    path = export_onnx(net, (1, 8, 8), tmp_path / "pruned.onnx", output_names=MultiTaskNet.OUTPUT_NAMES)
    onnx.checker.check_model(str(path))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.name for o in sess.get_outputs()] == ["logits", "reconstruction"]
    logits, recon = sess.run(None, {"input": images8[:3]})
    assert logits.shape == (3, 10) and recon.shape == (3, 1, 8, 8)
    assert check_parity(net, path, images8[:16]) < 1e-4
    assert count_macs(net, EXAMPLE)[0] < count_macs(_net(), EXAMPLE)[0]


def test_checkpoint_roundtrip_of_a_pruned_model(tmp_path):
    net = _net()
    prune_group(net, "encoder.res.conv1.0", 7, EXAMPLE)
    save_multitask(net, tmp_path / "ck", {})
    back, meta = load_multitask(tmp_path / "ck")
    assert back.channels == net.channels and meta["channels"]["res.conv1"] == 57
    x = torch.rand(2, 1, 8, 8)
    assert torch.equal(back(x)[0], net(x)[0])


def test_thresholds_multiply_to_the_global_budget():
    taus = layer_thresholds(7, 0.3, 0.8)
    assert math.isclose(math.prod(1 + t for t in taus), 1.3, rel_tol=1e-9)
    assert all(a > b for a, b in zip(taus, taus[1:]))  # tightening geometrically
    assert math.isclose(taus[1] / taus[0], 0.8)


class _OneConv(nn.Module):
    """A single prunable conv (20 channels) feeding a fixed 1×1 output conv."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 20, 3, padding=1)
        self.out = nn.Conv2d(20, 2, 1)

    def forward(self, x):
        return self.out(self.conv(x))


def _constructed_oracle(model):
    """Task 'dense' loss jumps once more than 30% of the channels are gone; 'cls' barely moves."""
    removed = 1 - model.conv.out_channels / 20
    return {"cls": 1.0 + 0.01 * removed, "dense": 1.0 + (5.0 if removed > 0.30 + 1e-9 else 0.1 * removed)}


def test_oracle_stops_at_the_ratio_where_one_task_rises_first():
    settings = PagcpSettings(step=0.05, loss_budget=0.2, round_to=1)
    result = pagcp(_OneConv(), torch.zeros(1, 1, 4, 4), _constructed_oracle, lambda m: [m.out], settings)
    (step,) = result.steps
    assert step.channels_after == 14          # 30% removed: the last ratio every task passed
    assert step.stopped_by == "dense"         # the task whose loss crossed its threshold
    assert result.model.conv.out_channels == 14


def test_oracle_watching_one_task_prunes_past_the_other():
    cls_only = lambda m: {"cls": _constructed_oracle(m)["cls"]}  # noqa: E731
    result = pagcp(_OneConv(), torch.zeros(1, 1, 4, 4), cls_only, lambda m: [m.out],
                   PagcpSettings(step=0.05, loss_budget=0.2, max_ratio=0.9, round_to=1))
    assert result.steps[0].channels_after == 2 and result.steps[0].stopped_by == "max_ratio"


def test_flops_target_stops_pruning_once_met():
    result = pagcp(_OneConv(), torch.zeros(1, 1, 4, 4), lambda m: {"cls": 1.0}, lambda m: [m.out],
                   PagcpSettings(step=0.05, flops_target=0.2, max_passes=3, round_to=1))
    assert result.flops_reduction >= 0.2
    assert result.steps[-1].stopped_by == "flops_target"
    assert result.flops_reduction < 0.3  # stopped at the first step past the target, not at max_ratio
    assert result.stopped_by == "flops_target"


def test_passes_say_why_they_ended_short_of_the_target():
    x, out = torch.zeros(1, 1, 4, 4), (lambda m: [m.out])
    capped = pagcp(_OneConv(), x, lambda m: {"cls": 1.0}, out,
                   PagcpSettings(step=0.05, flops_target=0.95, max_passes=1, round_to=1))
    assert capped.flops_reduction < 0.95 and capped.passes == 1 and capped.stopped_by == "max_passes"
    steep = lambda m: {"cls": 1.0 + 100 * (1 - m.conv.out_channels / 20)}  # noqa: E731  any step breaks it
    starved = pagcp(_OneConv(), x, steep, out, PagcpSettings(step=0.05, flops_target=0.5, max_passes=10,
                                                             round_to=1, max_budget_growth=2.0))
    assert starved.flops_reduction == 0 and starved.passes == 2 and starved.stopped_by == "loss_budget"
    one = pagcp(_OneConv(), x, lambda m: {"cls": 1.0}, out, PagcpSettings(step=0.05, round_to=1))
    assert one.stopped_by == "one_pass"


def _drifting_oracle(model):
    """'dense' breaks past 10% removed when read raw, past 50% once fine-tuned; any fine-tuning (a pruned
    trial or the control alike) adds 0.5 to 'cls' — the drift the control must cancel."""
    removed, adapted = 1 - model.conv.out_channels / 20, getattr(model, "adapted", False)
    return {"cls": 1.0 + (0.5 if adapted else 0.0) + 0.01 * removed,
            "dense": 1.0 + (5.0 if removed > (0.5 if adapted else 0.1) + 1e-9 else 0.1 * removed)}


def test_short_fine_tuning_of_trials_is_held_against_a_fine_tuned_control():
    settings = PagcpSettings(step=0.05, loss_budget=0.2, round_to=1)
    x, out = torch.zeros(1, 1, 4, 4), (lambda m: [m.out])
    raw = pagcp(_OneConv(), x, _drifting_oracle, out, settings)
    assert raw.model.conv.out_channels == 18  # read right after the cut: 10% is all 'dense' allows

    adapted = []

    def adapt(m):
        adapted.append(m.conv.out_channels)
        m.adapted = True

    tuned = pagcp(_OneConv(), x, _drifting_oracle, out, settings, adapt=adapt)
    (step,) = tuned.steps
    assert tuned.model.conv.out_channels == 10 and step.stopped_by == "dense"  # 50%: the fine-tuned limit
    assert adapted[0] == 20 and adapted[1:] == [19, 18, 17, 16, 15, 14, 13, 12, 11, 10, 9]  # control, then trials
    assert step.reference["cls"] == 1.5  # held against the control; against the raw 1.0 'cls' fails at once
    assert getattr(tuned.model, "adapted", False)  # the committed step keeps its fine-tuned weights


def test_kept_widths_are_multiples_of_round_to():
    result = pagcp(_OneConv(), torch.zeros(1, 1, 4, 4), _constructed_oracle, lambda m: [m.out],
                   PagcpSettings(step=0.05, loss_budget=0.2, round_to=8))
    # 30% of 20 would keep 14; aligned to 8 the only widths are 16 and 8, and 8 (−60%) breaks 'dense'
    assert result.model.conv.out_channels == 16 and result.steps[0].stopped_by == "dense"


def test_round_to_reaches_the_algorithm():
    from pathlib import Path

    from edgec.prune import PruneConfig

    assert PruneConfig(out=Path("x")).pagcp_settings().round_to == 8
    assert PruneConfig(out=Path("x"), round_to=16).pagcp_settings().round_to == 16
    with pytest.raises(ConfigError, match="--round-to"):
        PruneConfig(out=Path("x"), round_to=0)


@pytest.mark.parametrize("field,value", [("flops_target", 1.5), ("step", 0.0), ("importance", "l3"),
                                         ("loss_budget", -1.0)])
def test_bad_settings_are_config_errors(field, value):
    with pytest.raises(ConfigError):
        PagcpSettings(**{field: value})


def test_max_passes_reaches_pagcp_and_is_checked(tmp_path):
    from edgec.prune import PruneConfig

    assert PruneConfig(out=tmp_path, flops_target=0.5, max_passes=7).pagcp_settings().max_passes == 7
    assert PruneConfig(out=tmp_path, max_passes=7).pagcp_settings().max_passes == 1  # no target: one pass
    with pytest.raises(ConfigError, match="--max-passes"):
        PruneConfig(out=tmp_path, flops_target=0.5, max_passes=0)


def test_task_metrics_are_accuracy_and_psnr(images8):
    net = _net()
    y = np.zeros(len(images8[:32]), dtype=np.int64)
    m = evaluate_tasks(net, images8[:32], builtin_targets(images8[:32], y), BUILTIN_TASKS)
    assert 0 <= m["classification"]["accuracy_pct"] <= 100
    mse = m["reconstruction"]["loss"]
    assert math.isclose(m["reconstruction"]["psnr_db"], 10 * math.log10(1 / mse), rel_tol=1e-9)


@pytest.mark.slow
def test_prune_cli_on_digits(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "edgec.cli", "prune", "--dataset", "digits", "--flops-target", "0.5",
                           "--train-epochs", "4", "--finetune-epochs", "1", "--runs", "50", "--trial-steps", "2",
                           "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    stdout = proc.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["flops_reduction"] >= 0.5 and report["flops_target_met"] is True
    assert report["macs_after"] < report["macs_before"]
    assert report["latency"]["pruned"]["kind"] == "measured"
    oracle = report["algorithm"]["oracle"]  # every trial fine-tuned for 2 minibatches, against a control
    assert oracle["trial_finetune_steps"] == oracle["trial_finetune_steps_requested"] == 2
    assert oracle["trial_finetune_s"] > 0
    assert all(s["reference"] for s in report["steps"])
    manifest = json.loads((out / "manifest.json").read_text())
    chosen = [a for a in manifest["artifacts"] if a["chosen"]]
    assert len(chosen) == 1 and chosen[0]["role"] == "pruned"
    onnx.checker.check_model(str(out / chosen[0]["path"]))
    back, _ = load_multitask(str((out / chosen[0]["path"]).parent))  # a string path too
    assert conv_widths(back) == report["channels"]["after"]
    html = (out / "report.html").read_text()
    assert "kept channels" in html and f"Kept widths: multiples of\n{report['algorithm']['settings']['round_to']}" in html
    assert "FLOPs removed" in stdout and f"in {report['algorithm']['passes']} pass(es)" in stdout


USER_MODULE = '''
import torch
import torch.nn as nn


class TwoHead(nn.Module):
    """A user's multi-task CNN: 16 conv channels shared, 4-class logits and a 2-channel dense map."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.cls = nn.Linear(16, 4)
        self.dense = nn.Conv2d(16, 2, 1)

    def forward(self, x):
        f = self.body(x)
        return self.cls(f.mean((2, 3))), self.dense(f)


def build():
    return TwoHead()
'''


def _user_project(tmp_path):
    """A user module, its safetensors weights and .npz train/eval data in ``tmp_path``."""
    from safetensors.torch import save_file

    (tmp_path / "usermodels.py").write_text(USER_MODULE)
    sys.path.insert(0, str(tmp_path))
    try:
        import usermodels
        torch.manual_seed(0)
        save_file(usermodels.build().state_dict(), str(tmp_path / "w.safetensors"))
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("usermodels", None)
    rng = np.random.default_rng(0)
    for name, n in (("train", 256), ("eval", 128)):
        x = rng.random((n, 1, 8, 8), dtype=np.float32)
        np.savez(tmp_path / f"{name}.npz", x=x, labels=rng.integers(0, 4, n), depth=np.concatenate([x, 1 - x], 1))
    return ["--model", "usermodels:build", "--checkpoint", "w.safetensors", "--task", "labels=classification:0",
            "--task", "depth=dense:1", "--eval-data", "eval.npz", "--round-to", "8"]


def _prune_cli(args, cwd):
    return subprocess.run([sys.executable, "-m", "edgec.cli", "prune", *args], capture_output=True, text=True,
                          timeout=600, cwd=cwd)


@pytest.mark.slow
def test_prune_cli_on_a_user_model(tmp_path):
    args = _user_project(tmp_path)
    proc = _prune_cli([*args, "--train-data", "train.npz", "--flops-target", "0.3", "--finetune-epochs", "1",
                       "--importance", "taylor", "--kd-weight", "0.5", "--task-weight", "depth=20", "--runs", "30",
                       "--out", "run"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["flops_reduction"] >= 0.3
    # Taylor ranked on the gradients of the user's training images: one backward pass per minibatch and task
    # for each group visit that tried a step; the classifier was distilled
    oracle = report["algorithm"]["oracle"]
    visits = sum(1 for s in report["steps"] if s["trials"])
    assert oracle["taylor_split"] == "train" and oracle["taylor_images"] > 0
    assert oracle["taylor_backward_passes"] == visits * 2 * math.ceil(oracle["taylor_images"] / 64) > 0
    assert report["finetune"]["distilled_tasks"] == ["labels"]
    assert report["finetune"]["task_weights"] == {"labels": 1.0, "depth": 20.0}
    assert [t["name"] for t in report["tasks"]] == ["labels", "depth"]
    # the conv feeding the 1-channel dense output and the classifier keep their widths
    assert report["channels"]["after"]["dense"] == 2
    assert report["model"]["output_layers"] == ["dense"]  # found by the probe; body.3's group is prunable
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    pruned = next(a for a in manifest["artifacts"] if a["chosen"])
    assert [o["name"] for o in pruned["outputs"]] == ["labels", "depth"]
    sess = ort.InferenceSession(str(tmp_path / "run" / pruned["path"]), providers=["CPUExecutionProvider"])
    logits, depth = sess.run(None, {"input": np.zeros((2, 1, 8, 8), np.float32)})
    assert logits.shape == (2, 4) and depth.shape == (2, 2, 8, 8)


@pytest.mark.parametrize("change, fragment", [
    (lambda d: (d / "w.safetensors").write_bytes(b"garbage"), "cannot read checkpoint"),
    (lambda d: (d / "w.safetensors").write_bytes(b""), "is empty"),
    (lambda d: (d / "eval.npz").write_text("x,labels\n1,2\n"), "not an .npz archive"),
    (lambda d: np.savez(d / "eval.npz", x=np.zeros((4, 1, 8, 8), np.float32), labels=np.arange(4)), "lacks array 'depth'"),
    (lambda d: np.savez(d / "eval.npz", x=np.zeros((4, 1, 8, 8), np.float32), labels=np.arange(4) + 10,
                        depth=np.zeros((4, 2, 8, 8), np.float32)), "out of range"),
    (lambda d: np.savez(d / "eval.npz", x=np.zeros((4, 1, 8, 8), np.float32), labels=np.arange(4),
                        depth=np.zeros((4, 1, 4, 4), np.float32)), "does not match output 1"),
    (lambda d: (d / "usermodels.py").write_text("raise RuntimeError('boom')"), "cannot import"),
    (lambda d: (d / "usermodels.py").write_text("import sys\ndef build():\n    sys.exit(0)"), "build() failed"),
    (lambda d: np.savez(d / "eval.npz", x=np.zeros((4, 1, 8, 8), np.float32), labels=np.int64(1),
                        depth=np.zeros((4, 2, 8, 8), np.float32)), "has 0 rows"),
    (lambda d: np.savez(d / "train.npz", x=np.zeros((32, 1, 8, 8), np.float32), labels=np.full(32, 9),
                        depth=np.zeros((32, 2, 8, 8), np.float32)), "labels of labels in --train-data"),
    (lambda d: np.savez(d / "eval.npz", x=np.array([None] * 4, dtype=object), labels=np.arange(4),
                        depth=np.zeros((4, 2, 8, 8), np.float32)), "never loads"),
    (lambda d: (d / "usermodels.py").write_text(USER_MODULE.replace("return self.cls(f.mean((2, 3))), self.dense(f)",
                                                                    "return {'a': f}")), "outputs are unusable"),
])
def test_user_model_bad_inputs_are_one_line(tmp_path, change, fragment):
    args = _user_project(tmp_path)
    change(tmp_path)
    proc = _prune_cli([*args, "--train-data", "train.npz", "--out", "run"], tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0] and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flags, fragment", [(["--trial-steps", "5"], "--trial-steps needs training data"),
                                             (["--finetune-epochs", "2"], "--finetune-epochs 2 needs training data"),
                                             (["--task-weight", "depth=3"], "--task-weight needs training data")])
def test_training_flags_without_training_data_are_one_line(tmp_path, flags, fragment):
    args = _user_project(tmp_path)
    proc = _prune_cli([*args, *flags, "--out", "run"], tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and fragment in proc.stderr
    assert not (tmp_path / "run").exists()


def test_a_pickled_checkpoint_is_never_executed(tmp_path):
    import pickle

    args = _user_project(tmp_path)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (tmp_path / "w.pt").write_bytes(pickle.dumps({"state_dict": Evil()}))
    args[args.index("w.safetensors")] = "w.pt"
    proc = _prune_cli([*args, "--out", "run"], tmp_path)
    assert proc.returncode == 2 and "cannot read checkpoint" in proc.stderr, proc.stderr
    assert not marker.exists()


@pytest.mark.slow
def test_compile_prunes_the_chosen_subnet(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "edgec.cli", "compile", "--dataset", "digits", "--budget-evals", "4",
                           "--train-epochs", "2", "--max-accuracy-drop", "100", "--prune-flops-target", "0.3",
                           "--prune-round-to", "8",
                           "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "report.json").read_text())["pruning"]
    pruned = json.loads((out / "pruned" / "report.json").read_text())
    assert summary["candidate_id"] == pruned["model"]["candidate_id"]
    assert pruned["flops_reduction"] >= 0.3 and summary["flops_reduction"] == pruned["flops_reduction"]
    assert pruned["model"]["output_layers"] == [] or all("head" in n or "classifier" in n
                                                         for n in pruned["model"]["output_layers"])
    art = next(a for a in json.loads((out / "pruned" / "manifest.json").read_text())["artifacts"] if a["chosen"])
    onnx.checker.check_model(str(out / "pruned" / art["path"]))
    assert "Pruned the chosen subnet" in proc.stdout
    assert "pruned/report.html" in (out / "report.html").read_text()


@pytest.mark.slow
def test_max_task_drop_gate_marks_what_an_app_may_pick(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "edgec.cli", "prune", "--dataset", "digits", "--flops-target", "0.5",
                           "--train-epochs", "4", "--finetune-epochs", "0", "--recovery-epochs", "0", "--runs", "30",
                           "--max-task-drop", "reconstruction=0", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    report = json.loads((out / "report.json").read_text())
    gate = report["max_task_drop"]
    chosen = [a["role"] for a in json.loads((out / "manifest.json").read_text())["artifacts"] if a["chosen"]]
    drop = report["drops"]["val"]["reconstruction"]
    assert gate["met"] == (drop <= 0)
    if gate["met"]:
        assert proc.returncode == 0 and chosen == ["pruned"]
    else:  # exit 3, one line naming the failed task, and the unpruned model stays the one to pick
        assert proc.returncode == 3 and chosen == ["reference"], proc.stderr
        errors = [line for line in proc.stderr.splitlines() if line.startswith("edgec: error:")]
        assert len(errors) == 1 and "reconstruction dropped" in errors[0] and "Traceback" not in proc.stderr
        assert "pruned + fine-tuned" in proc.stdout  # the results are shown before the error


@pytest.mark.slow
def test_a_run_that_prunes_nothing_keeps_both_artifacts(tmp_path):
    from edgec.compile.package import sha256_file

    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "edgec.cli", "prune", "--dataset", "digits", "--loss-budget", "0.0001",
                           "--train-epochs", "4", "--finetune-epochs", "1", "--runs", "30", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    artifacts = json.loads((out / "manifest.json").read_text())["artifacts"]
    assert sorted(a["role"] for a in artifacts) == ["pruned", "reference"]
    assert len({a["id"] for a in artifacts}) == len({a["path"] for a in artifacts}) == 2
    for a in artifacts:  # neither file overwrote the other
        assert sha256_file(out / a["path"]) == a["sha256"]
    assert report["macs_after"] == report["macs_before"] and "No channels were removed" in proc.stdout
    assert len({a["sha256"] for a in artifacts}) == 2  # same widths, the unpruned and the fine-tuned weights
    assert [a["role"] for a in artifacts if a["chosen"]] == ["reference"]  # fine-tuning alone is no reason to pick it


def test_each_classification_task_has_its_own_accuracy(images8):
    from edgec.search.multitask import Task

    net = _net()
    x = images8[:40]
    predicted = net(torch.from_numpy(x))[0].argmax(1).numpy()
    tasks = (Task("a", "classification", 0), Task("b", "classification", 0))
    m = evaluate_tasks(net, x, {"a": predicted, "b": (predicted + 1) % 10}, tasks)
    assert m["a"]["accuracy_pct"] == 100.0 and m["b"]["accuracy_pct"] == 0.0


class _TwoTasks(nn.Module):
    """conv 1→8; output 0 reads channels 0–3 only, output 1 reads channels 4–7 only."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 1, bias=False)
        self.out = nn.Conv2d(8, 2, 1, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([1.0, 0.1, 0.1, 0.1, 1.0, 0.1, 0.1, 0.1]).view(8, 1, 1, 1))
            self.out.weight.zero_()
            self.out.weight[0, :4] = 1.0
            self.out.weight[1, 4:] = 1.0

    def forward(self, x):
        y = self.out(self.conv(x))
        return y[:, :1], y[:, 1:]


def _two_task_backward(scales, summed=False):
    """TaskBackward: task t's loss is scales[t] · mean(output_t²) on 4 minibatches of random images
    (``summed``: one loss, the sum of both, as a single-objective criterion would see it)."""
    def backward(model):
        gen = torch.Generator().manual_seed(0)
        for _ in range(4):
            x = torch.randn(16, 1, 4, 4, generator=gen)
            losses = {name: scales[name] * out.pow(2).mean() for name, out in zip(("a", "b"), model(x))}
            for name, loss in ({"sum": sum(losses.values())} if summed else losses).items():
                model.zero_grad(set_to_none=True)
                loss.backward(retain_graph=True)
                yield name
    return backward


def test_taylor_importance_keeps_the_channel_each_task_needs():
    """Task a's loss is 10⁶× task b's: ranked on the summed gradient, b's one strong channel would go
    before a's weak ones; per task, normalized, each task's strong channel is kept."""
    from edgec.search.pagcp import channel_importance

    net = _TwoTasks()
    example = torch.zeros(1, 1, 4, 4)
    backward = _two_task_backward({"a": 1e6, "b": 1.0})
    scores = channel_importance(net, "conv", example, "taylor", backward)
    assert scores.shape == (8,) and all(p.grad is None for p in net.parameters())  # gradients cleared
    order = torch.argsort(scores).tolist()
    assert set(order[-2:]) == {0, 4}  # each task's strong channel ranks above every weak one
    pruned = prune_group(copy.deepcopy(net), "conv", 6, example, order=order)
    kept = pruned.conv.weight.detach().flatten().tolist()
    assert kept == [1.0, 1.0]
    summed = _two_task_backward({"a": 1e6, "b": 1.0}, summed=True)  # for contrast: there b's channel is lost
    assert 4 not in torch.argsort(channel_importance(net, "conv", example, "taylor", summed)).tolist()[-2:]


def test_taylor_importance_without_gradients_is_refused():
    with pytest.raises(ConfigError, match="taylor importance needs gradients"):
        pagcp(_OneConv(), torch.zeros(1, 1, 4, 4), _constructed_oracle, lambda m: [m.out],
              PagcpSettings(importance="taylor", round_to=1))


def test_multitask_finetuning_distills_the_classification_task():
    """kd_weight 1 and a teacher that knows a permuted labelling: the classification head follows the
    teacher, not the labels; the reconstruction task still trains on its targets."""
    from sklearn.datasets import load_digits
    from edgec.search.multitask import train_multitask

    digits = load_digits()
    x = (digits.images[:600] / 16.0).astype(np.float32)[:, None]
    y = digits.target[:600].astype(np.int64)
    perm = np.roll(np.arange(10), 1)
    teacher = {"classification": np.eye(10, dtype=np.float32)[perm[y]] * 10}
    torch.manual_seed(0)
    net = MultiTaskNet(10)
    train_multitask(net, x, builtin_targets(x, y), BUILTIN_TASKS, 15, lr=3e-3, batch_size=64,
                    teacher_logits=teacher, kd_weight=1.0)
    with torch.no_grad():
        pred = net(torch.from_numpy(x))[0].argmax(1).numpy()
    assert np.mean(pred == perm[y]) > 0.8 and np.mean(pred == y) < 0.2
    assert evaluate_tasks(net, x, builtin_targets(x, y), BUILTIN_TASKS)["reconstruction"]["psnr_db"] > 14


def test_taylor_on_a_model_that_cannot_back_propagate_is_one_model_error():
    from edgec.errors import ModelError
    from edgec.prune import TaskData, TaskOracle
    from edgec.search.multitask import Task

    class Detached(_TwoTasks):
        def forward(self, x):
            a, b = super().forward(x)
            return a, b.detach()  # the user's second output is computed outside autograd

    x = np.random.default_rng(0).random((32, 1, 4, 4), dtype=np.float32)
    targets = {"a": np.zeros((32, 1, 4, 4), np.float32), "b": np.zeros((32, 1, 4, 4), np.float32)}
    tasks = (Task("a", "dense", 0), Task("b", "dense", 1))
    data = TaskData("mine", tasks, ("a", "b"), x, targets, x, targets, x, targets, {})
    oracle = TaskOracle(data, ())
    assert [name for name in oracle.backward(_TwoTasks())] == ["a", "b"]  # one minibatch, both tasks
    with pytest.raises(ModelError, match="cannot back-propagate"):
        list(oracle.backward(Detached()))


@pytest.mark.parametrize("extra, fragment", [
    (["--kd-weight", "0.5", "--finetune-epochs", "0"], "--kd-weight with --finetune-epochs 0"),
    (["--kd-weight", "0.5", "--task", "depth=dense:1"], "nothing to distill"),
])
def test_distillation_that_could_not_happen_is_refused(tmp_path, extra, fragment):
    args = _user_project(tmp_path)
    if "--task" in extra:  # one dense task only: no classification task to distill
        args = [a for a in args if a not in ("--task", "labels=classification:0", "depth=dense:1")]
    proc = _prune_cli([*args, "--train-data", "train.npz", *extra, "--out", "run"], tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert fragment in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "run").exists()


def test_trial_steps_beyond_one_pass_are_recorded_as_run():
    from edgec.data import load_dataset
    from edgec.prune import TaskData, TaskOracle

    data = TaskData.from_dataset(load_dataset("digits"))
    one_pass = len(data.train_x) // data.batch_size
    assert TaskOracle(data, (), trial_steps=10_000).trial_steps_run == one_pass
    assert TaskOracle(data, (), trial_steps=3).trial_steps_run == 3
    assert TaskOracle(data, ()).trial_steps_run == 0


def test_task_weights_set_the_balance_of_the_fine_tuning():
    """Two dense tasks pull one output toward 0 and toward 1: the fine-tuned output settles at their
    weighted mean, 0.5 with the default weights (10 each) and 0.75 with --task-weight b=30."""
    from edgec.prune import TaskData, _Quiet, finetune
    from edgec.search.multitask import Task

    x = np.random.default_rng(0).random((1024, 1, 4, 4), dtype=np.float32)
    targets = {"a": np.zeros((1024, 1, 4, 4), np.float32), "b": np.ones((1024, 1, 4, 4), np.float32)}
    tasks = (Task("a", "dense", 0), Task("b", "dense", 0))
    data = TaskData("mine", tasks, ("y",), x, targets, x, targets, x, targets, {}, batch_size=32)
    means = {}
    for label, weights in (("default", None), ("b=30", {"b": 30.0})):
        torch.manual_seed(0)
        net = nn.Conv2d(1, 1, 1)
        finetune(net, data, 20, 0, _Quiet(), task_weights=weights)
        with torch.no_grad():
            means[label] = float(net(torch.from_numpy(x)).mean())
    assert means["default"] == pytest.approx(0.5, abs=0.05)
    assert means["b=30"] == pytest.approx(0.75, abs=0.05)
