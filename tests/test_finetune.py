"""Fine-tuning extracted subnets alone (search/train.py) and ``edgec compile --finetune-epochs``."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from edgec.errors import ConfigError, ModelError
from edgec.search.supernet import extract_subnet
from edgec.search.train import FinetuneSettings, finetune_subnet, load_weights, predict_logits, save_weights


def _digits():
    from edgec.data import load_dataset

    return load_dataset("digits")


def _top1(net, x, y):
    return float(np.mean(predict_logits(net, x).argmax(1) == y))


def test_finetuning_an_untrained_subnet_learns_from_labels_and_from_a_teacher(randomized_supernet, spec8):
    ds = _digits()
    settings = FinetuneSettings(epochs=15, batch_size=64, lr=1e-2)
    net = extract_subnet(randomized_supernet, spec8.smallest())
    before = _top1(net, ds.val_x, ds.val_y)
    finetune_subnet(net, ds.train_x, ds.train_y, settings)
    assert before < 0.3 and _top1(net, ds.val_x, ds.val_y) > 0.7
    # distillation alone (kd_weight 1) from a "teacher" that knows a permuted labelling: the subnet follows it
    perm = np.roll(np.arange(10), 1)
    teacher = np.eye(10, dtype=np.float32)[perm[ds.train_y]] * 10
    student = extract_subnet(randomized_supernet, spec8.smallest())
    finetune_subnet(student, ds.train_x, ds.train_y, FinetuneSettings(epochs=15, batch_size=64, lr=1e-2, kd_weight=1.0),
                    teacher_logits=teacher)
    assert _top1(student, ds.val_x, perm[ds.val_y]) > 0.7 and _top1(student, ds.val_x, ds.val_y) < 0.2


def test_weights_round_trip_and_are_refused_for_other_settings_or_shapes(randomized_supernet, spec8, tmp_path):
    net = extract_subnet(randomized_supernet, spec8.smallest())
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    path = save_weights(net, tmp_path / "w.safetensors", {"epochs": 2})
    fresh = extract_subnet(randomized_supernet, spec8.smallest())
    assert not load_weights(fresh, path, {"epochs": 3})  # other settings: not loaded
    assert load_weights(fresh, path, {"epochs": 2})
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), net.state_dict().values()))
    other = extract_subnet(randomized_supernet, spec8.largest())
    untouched = {k: v.clone() for k, v in other.state_dict().items()}
    assert not load_weights(other, path, {"epochs": 2})  # another architecture: nothing copied
    assert all(torch.equal(untouched[k], v) for k, v in other.state_dict().items())
    (tmp_path / "torn.safetensors").write_bytes(path.read_bytes()[:100])
    assert not load_weights(other, tmp_path / "torn.safetensors", {"epochs": 2})
    assert not load_weights(other, tmp_path / "missing.safetensors", {"epochs": 2})
    with torch.no_grad():  # same shapes and settings but NaN weights: trained again, never loaded
        next(net.parameters()).fill_(float("nan"))
    save_weights(net, tmp_path / "nan.safetensors", {"epochs": 2})
    assert not load_weights(fresh, tmp_path / "nan.safetensors", {"epochs": 2})


def test_weights_are_never_half_written_and_odd_files_are_not_opened(randomized_supernet, spec8, tmp_path, monkeypatch):
    import os

    from safetensors import SafetensorError

    import edgec.search.train as train

    net = extract_subnet(randomized_supernet, spec8.smallest())
    real_save = train.save_file

    def failing(error):
        def save(tensors, filename, metadata=None):
            real_save(tensors, filename, metadata=metadata)  # the temporary file exists when it fails
            raise error
        return save

    for error, expected in ((SafetensorError("I/O error: Operation not permitted"), ModelError),
                            (KeyboardInterrupt(), KeyboardInterrupt)):
        monkeypatch.setattr(train, "save_file", failing(error))
        with pytest.raises(expected) as caught:
            save_weights(net, tmp_path / "w.safetensors", {"epochs": 2})
        if expected is not KeyboardInterrupt:
            assert "cannot write the fine-tuned weights" in str(caught.value)
        assert list(tmp_path.iterdir()) == []  # nothing left behind, nothing published
        with pytest.raises(expected) as caught:  # the supernet's checkpoint likewise
            train.save_checkpoint(randomized_supernet, train.TrainSettings(), tmp_path / "ckpt")
        if expected is not KeyboardInterrupt:
            assert "cannot write the supernet checkpoint" in str(caught.value)
        assert not (tmp_path / "ckpt").exists()  # made by the failed call, so removed with it
        opt = torch.optim.AdamW(randomized_supernet.parameters())  # the per-epoch training state likewise
        with pytest.raises(expected):
            train._save_train_state(tmp_path / "partial", 1, randomized_supernet, opt, np.random.default_rng(0))
        assert not (tmp_path / "partial").exists()
    os.mkfifo(tmp_path / "fifo.safetensors")  # opening a FIFO would block for ever
    assert not load_weights(net, tmp_path / "fifo.safetensors", {"epochs": 2})
    (tmp_path / "dir.safetensors").mkdir()
    assert not load_weights(net, tmp_path / "dir.safetensors", {"epochs": 2})


def test_finetuned_weights_are_used_only_for_the_architectures_of_this_run(randomized_supernet, spec8, tmp_path):
    from edgec.pipeline import FinetunedWeights

    rng = np.random.default_rng(1)
    a, b = spec8.sample(rng), spec8.sample(rng)
    weights = FinetunedWeights(tmp_path, {"epochs": 1})
    for arch in (a, b):  # b: left by an earlier attempt whose bisection went elsewhere
        weights.save(extract_subnet(randomized_supernet, arch), arch)
    used = weights.restricted([a])
    assert used.has(a) and not used.has(b) and weights.has(b)
    assert used.apply(extract_subnet(randomized_supernet, a), a)
    assert not used.apply(extract_subnet(randomized_supernet, b), b)
    report = {"finetune": {"weights_meta": {"epochs": 1}, "architectures": [{"arch": weights.key(a)}]}}
    again = FinetunedWeights.of_run(tmp_path.parent, report)
    assert again.only == used.only


def test_the_reference_keeps_its_own_settings_when_children_train_longer(randomized_supernet, spec8, tmp_path):
    from edgec.pipeline import FinetunedWeights

    largest, child = spec8.largest(), spec8.smallest()
    first = FinetunedWeights(tmp_path, {"epochs": 6})
    for arch in (largest, child):
        first.save(extract_subnet(randomized_supernet, arch), arch)
    longer = FinetunedWeights(tmp_path, {"epochs": 15}, metas={FinetunedWeights.key(largest): {"epochs": 6}})
    assert longer.meta_of(largest) == {"epochs": 6} and longer.meta_of(child) == {"epochs": 15}
    assert longer.apply(extract_subnet(randomized_supernet, largest), largest)  # reused
    assert not longer.apply(extract_subnet(randomized_supernet, child), child)  # other settings: trained again
    assert longer.record_of(largest) == {} and longer.record_of(child) == {}  # saved without a record
    longer.save(extract_subnet(randomized_supernet, child), child, {"kept": False})
    assert longer.record_of(child) == {"kept": False}
    assert longer.restricted([largest, child]).metas == longer.metas
    report = {"finetune": {"weights_meta": longer.meta, "weights_meta_by_arch": longer.metas,
                           "architectures": [{"arch": longer.key(largest)}]}}
    assert FinetunedWeights.of_run(tmp_path.parent, report).meta_of(largest) == {"epochs": 6}


def test_finetune_settings_are_checked():
    from edgec.config import CompileConfig

    for kwargs, fragment in (({"finetune_epochs": -1}, "finetune_epochs"), ({"finetune_epochs": 101}, "finetune_epochs"),
                             ({"finetune_epochs": 2, "finetune_top": 0}, "finetune_top"),
                             ({"finetune_top": 2}, "fine-tuning is off"),
                             ({"model": "m.onnx", "calib_data": "c.npz", "finetune_epochs": 2}, "built-in supernet"),
                             ({"model": "minilm", "finetune_epochs": 2}, "does not apply"),
                             ({"finetune_child_epochs": 4}, "fine-tuning is off"),
                             ({"model": "m.onnx", "calib_data": "c.npz", "finetune_child_epochs": 4}, "built-in supernet"),
                             ({"finetune_epochs": 2, "finetune_child_epochs": 0}, "finetune_child_epochs"),
                             ({"finetune_epochs": 2, "finetune_child_epochs": 101}, "finetune_child_epochs")):
        with pytest.raises(ConfigError, match=fragment):
            CompileConfig(**kwargs)
    assert CompileConfig(finetune_epochs=2, finetune_top=1).finetune_top == 1
    assert CompileConfig(finetune_epochs=2, finetune_child_epochs=5).finetune_child_epochs == 5


@pytest.mark.slow
def test_compile_finetunes_the_reference_and_a_bisection_of_the_front_and_resumes_without_training(tmp_path):
    out = tmp_path / "out"
    args = [sys.executable, "-m", "edgec.cli", "compile", "--dataset", "digits", "--train-epochs", "1",
            "--population-size", "4", "--budget-evals", "6", "--finetune-epochs", "1", "--finetune-top", "2",
            "--max-accuracy-drop", "50", "--out", str(out)]
    p = subprocess.run(args, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    ft = report["finetune"]
    archs = ft["architectures"]
    largest = report["reference"]["candidate"]["subnet"]
    assert archs[0]["subnet"] == largest and archs[0]["teacher"] == "labels" and 2 <= len(archs) <= 3
    assert all(not a["cached"] and a["train_s"] > 0 for a in archs)
    assert all(isinstance(a["qualifies"], bool) for a in archs[1:]) and "qualifies" not in archs[0]
    # fine-tuning is kept only when it helped: the bar never falls below the supernet's, nor any architecture
    for a in archs:
        assert a["kept"] == (a["val_accuracy_fp32_tuned"] > a["val_accuracy_fp32_before"])
        assert a["val_accuracy_fp32"] == max(a["val_accuracy_fp32_before"], a["val_accuracy_fp32_tuned"])
    assert all((a["val_accuracy_fp32"] >= ft["bar_val_accuracy_fp32"]) == a["qualifies"] for a in archs[1:])
    assert len(list((out / "study" / "finetuned").glob("*.safetensors"))) == len(archs)
    by_id = {e["candidate_id"]: e for e in report["evaluations"]}
    tried = {json.dumps(a["subnet"], sort_keys=True) for a in archs}
    tuned = {json.dumps(a["subnet"], sort_keys=True) for a in archs if a["kept"]}  # the others keep the supernet's
    for c in ft["candidates"]:
        e = by_id[c["candidate_id"]]
        subnet = json.dumps(e["candidate"]["subnet"], sort_keys=True)
        assert e["val_accuracy"] == c["val_accuracy_after"] and subnet in tried
        assert e["role"] == "reference" or e["role"] == ("finetuned" if subnet in tuned else "search")
    # every evaluation of the reference's architecture (its INT8 form too) was measured with the new weights
    assert all(e["role"] in ("reference", "finetuned") for e in report["evaluations"]
               if e["candidate"]["subnet"] == largest)
    # each fine-tuned architecture is also measured in all-FP32 and all-INT8, tried by the search or not
    for a in archs[1:]:
        policies = [by_id[c["candidate_id"]]["candidate"]["policy"] for c in ft["candidates"]
                    if by_id[c["candidate_id"]]["candidate"]["subnet"] == a["subnet"]]
        assert {"fp32"} in [set(p.values()) for p in policies] and {"int8"} in [set(p.values()) for p in policies]
    # the digits supernet trained 1 epoch is far from converged: fine-tuning its reference must help
    ref = next(c for c in ft["candidates"] if c["candidate_id"] == report["reference"]["candidate_id"])
    assert ref["val_accuracy_after"] > ref["val_accuracy_before"]
    manifest = json.loads((out / "manifest.json").read_text())
    ref_art = next(a for a in manifest["artifacts"] if a["role"] == "reference" and a["target"] == "cpu-ort")
    assert ref_art["val_accuracy"] == ref["val_accuracy_after"]
    assert all(a["finetuned"] == (json.dumps(a["config"], sort_keys=True) in tuned) for a in manifest["artifacts"])
    html = (out / "report.html").read_text()
    assert all(a["arch"] in html for a in archs) and "qualifies" in html
    # resumed: the weights are reused, not trained again, and give the same models
    p = subprocess.run(args[:-2] + ["--out", str(out), "--resume"], capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-2000:]
    again = json.loads((out / "report.json").read_text())["finetune"]
    assert all(a["cached"] for a in again["architectures"])
    assert [a["kept"] for a in again["architectures"]] == [a["kept"] for a in archs]  # remembered with the weights
    assert "stored weights are used (not trained again)" in p.stdout + p.stderr
    assert [c["val_accuracy_after"] for c in again["candidates"]] == [c["val_accuracy_after"] for c in ft["candidates"]]
    # children trained longer: the reference's weights (its settings unchanged) are reused, the children's are not
    p = subprocess.run(args[:-2] + ["--finetune-child-epochs", "2", "--out", str(out), "--resume"],
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-2000:]
    longer = json.loads((out / "report.json").read_text())["finetune"]
    assert (longer["epochs"], longer["child_epochs"]) == (1, 2)
    assert longer["architectures"][0]["cached"] and not any(a["cached"] for a in longer["architectures"][1:])
    # resumed without fine-tuning: the models published are the supernet's again, with their own figures
    i = args.index("--finetune-epochs")
    plain = args[:i] + args[i + 4:-2]  # without "--finetune-epochs 1 --finetune-top 2" and "--out OUT"
    p = subprocess.run(plain + ["--out", str(out), "--resume"], capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "finetune" not in json.loads((out / "report.json").read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    ref_art = next(a for a in manifest["artifacts"] if a["role"] == "reference" and a["target"] == "cpu-ort")
    assert ref_art["val_accuracy"] == ref["val_accuracy_before"]


@pytest.mark.parametrize("n, first_ok", [(1, 0), (7, 0), (7, 3), (7, 6), (7, 7), (16, 5), (16, 16)])
def test_bisection_finds_the_fastest_qualifying_architecture(n, first_ok):
    from edgec.pipeline import bisect_fastest

    calls = []

    def qualifies(i):
        calls.append(i)
        return i >= first_ok

    tried = bisect_fastest(n, n, qualifies)
    assert [i for i, _ in tried] == calls and len(set(calls)) == len(calls)
    assert len(tried) <= int(np.ceil(np.log2(n + 1)))  # a bisection, not a scan
    found = [i for i, ok in tried if ok]
    assert (min(found) if found else n) == first_ok  # first_ok == n: nothing qualifies
    assert all(ok == (i >= first_ok) for i, ok in tried)
    assert len(bisect_fastest(n, 1, qualifies)) == 1 and bisect_fastest(0, 4, qualifies) == []


def test_finetune_pool_is_the_architectures_front_fastest_first_without_the_largest(spec8):
    from types import SimpleNamespace

    from edgec.pipeline import finetune_pool

    rng = np.random.default_rng(0)
    a, b, c, d = [spec8.sample(rng) for _ in range(4)]
    assert len({a, b, c, d, spec8.largest()}) == 5

    def ev(arch, acc, p50):
        return SimpleNamespace(candidate=SimpleNamespace(subnet=arch), val_accuracy=acc,
                               objectives=lambda: (acc, p50, 1000))

    evals = [ev(spec8.largest(), 0.99, 9.0), ev(a, 0.90, 2.0), ev(a, 0.91, 3.0),  # a: best of both policies
             ev(b, 0.80, 1.0), ev(c, 0.85, 2.5), ev(d, 0.95, 4.0)]                 # c: dominated by a
    assert finetune_pool(spec8, evals) == [b, a, d]


@pytest.mark.parametrize("total", [1, 3, 4, 10, 11, 20, 200])
def test_one_cycle_schedule_runs_any_number_of_steps(total):
    from edgec.search.train import one_cycle

    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.1)
    sched = one_cycle(opt, 0.1, total)  # OneCycleLR itself divides by zero at exactly 10 steps
    lrs = []
    for _ in range(total):
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert all(0 < lr <= 0.1 + 1e-12 for lr in lrs)
    assert total < 10 or lrs[-1] < 0.01  # annealed by the end
