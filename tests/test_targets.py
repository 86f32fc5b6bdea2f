import pytest
import torch

from edgec.errors import TargetError
from edgec.targets import LatencyStats, get_target, target_names


def test_registry_refuses_unknown_with_suggestion():
    assert "cpu-ort" in target_names()
    with pytest.raises(TargetError, match="did you mean 'cpu-ort'"):
        get_target("cpu-rt")


def test_cpu_ort_measures(tmp_path):
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU()).eval()
    path = tmp_path / "m.onnx"
    torch.onnx.export(net, (torch.zeros(1, 1, 8, 8),), str(path), input_names=["input"], dynamo=False)
    target = get_target("cpu-ort", runs=50, warmup_runs=5)
    try:
        stats = target.measure_latency(path, (1, 8, 8))
    finally:
        target.close()
    assert stats.kind == "measured" and stats.runs == 50 and stats.threads == 2 and stats.batch == 1
    assert 0 < stats.min_ms <= stats.p50_ms <= stats.p90_ms <= stats.p99_ms
    assert stats.runtime.startswith("onnxruntime")
    assert LatencyStats.from_dict(stats.to_dict()) == stats


def test_a_broken_model_is_a_target_error_and_the_worker_recovers(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage" * 10)
    target = get_target("cpu-ort", runs=5, warmup_runs=1)
    try:
        with pytest.raises(TargetError, match="bad.onnx failed on cpu-ort"):
            target.measure_latency(bad, (1, 8, 8))
        net = torch.nn.Conv2d(1, 2, 1).eval()
        good = tmp_path / "good.onnx"
        torch.onnx.export(net, (torch.zeros(1, 1, 8, 8),), str(good), input_names=["input"], dynamo=False)
        assert target.measure_latency(good, (1, 8, 8)).runs == 5
    finally:
        target.close()


def test_a_crashing_worker_is_a_target_error(tmp_path, monkeypatch):
    target = get_target("cpu-ort", runs=5, warmup_runs=1)
    # a worker that dies at once stands in for a runtime that segfaults on a model
    monkeypatch.setattr(target._worker, "module", "edgec.no_such_module")
    with pytest.raises(TargetError, match="crashed the runtime of cpu-ort"):
        target.measure_latency(tmp_path / "x.onnx", (1, 8, 8))
    target.close()


def test_worker_reports_errors_raised_inside():
    from edgec.targets.worker import Worker, WorkerFailed

    w = Worker("edgec.targets.ort_worker")
    try:
        with pytest.raises(WorkerFailed, match="KeyError"):
            w.call("no_such_function", 30)
    finally:
        w.close()
