"""Scale-out through Ray (``edgec compile --executor ray``): a local Ray instance with 2 CPUs and a
custom target resource. Same seed → same Pareto front as in-process; no candidate evaluated twice;
a worker killed mid-task is retried."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.slow

ARGS = ["--dataset", "digits", "--train-epochs", "1", "--target", "cpu-macs", "--population-size", "4",
        "--budget-evals", "8", "--seed", "0"]


def compile_(*args):
    return subprocess.run([sys.executable, "-m", "edgec.cli", "compile", *ARGS, *args], capture_output=True,
                          text=True, timeout=900)


def stored(out):
    return [json.loads(line) for line in (out / "study" / "evaluations.jsonl").read_text().splitlines()]


def test_ray_compile_matches_in_process_and_evaluates_each_candidate_once(tmp_path):
    local = compile_("--out", str(tmp_path / "local"))
    assert local.returncode == 0, local.stderr[-2000:]
    through_ray = compile_("--out", str(tmp_path / "ray"), "--executor", "ray")
    assert through_ray.returncode == 0, through_ray.stderr[-2000:]
    a, b = stored(tmp_path / "local"), stored(tmp_path / "ray")
    ids = [r["candidate_id"] for r in b]
    assert len(ids) == len(set(ids)) == 9  # 8 + the reference, none twice
    assert ids == [r["candidate_id"] for r in a]
    for x, y in zip(a, b):
        assert (x["val_accuracy"], x["latency"]["p50_ms"], x["size_bytes"]) == \
               (y["val_accuracy"], y["latency"]["p50_ms"], y["size_bytes"])
    ra = json.loads((tmp_path / "local" / "report.json").read_text())
    rb = json.loads((tmp_path / "ray" / "report.json").read_text())
    assert ra["pareto_front"] == rb["pareto_front"] and ra["chosen"]["candidate_id"] == rb["chosen"]["candidate_id"]
    assert rb["search"]["executor"]["executor"] == "ray" and ra["search"]["executor"] == {"executor": "in-process"}
    # builds, latency, re-measurement and profiles all ran as tasks: at least 2 per evaluated candidate
    assert sum(rb["search"]["executor"]["tasks_per_node"].values()) >= 2 * len(ids)


@pytest.fixture
def local_ray():
    ray.init(num_cpus=2, resources={"target:cpu-macs": 1}, log_to_driver=False, include_dashboard=False)
    yield
    ray.shutdown()


def test_a_worker_killed_mid_build_is_retried(local_ray, tmp_path):
    """SIGKILL the worker process running the first build task; the evaluation still comes back."""
    import torch

    from edgec.config import CompileConfig
    from edgec.data import load_dataset
    from edgec.executor import RayExecutor
    from edgec.pipeline import Evaluator
    from edgec.search.space import QuantPolicy, fbnet_space
    from edgec.search.strategy import make_candidate
    from edgec.search.supernet import Supernet
    from edgec.targets import get_target

    ds = load_dataset("digits")
    spec = fbnet_space(1, 8, 10)
    torch.manual_seed(0)
    cfg = CompileConfig(target="cpu-macs", executor="ray")
    executor = RayExecutor(None, ["cpu-macs"], 2, {"supernet": Supernet(spec).eval(), "dataset": ds, "config": cfg})
    killed = []

    def kill_first_build():
        for _ in range(600):
            pids = subprocess.run(["pgrep", "-f", "ray::build_task"], capture_output=True, text=True).stdout.split()
            if pids:
                os.kill(int(pids[0]), signal.SIGKILL)
                killed.append(int(pids[0]))
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_first_build)
    killer.start()
    evaluator = Evaluator(None, ds, get_target("cpu-macs"), tmp_path / "models", cfg)
    (result,) = executor.evaluate_many(evaluator, [make_candidate(spec, spec.largest(), QuantPolicy())])
    killer.join()
    assert killed, "no build task was seen running"
    assert result.latency.kind == "predicted" and 0 < result.val_accuracy <= 1
    assert (tmp_path / "models" / result.candidate_id / "cpu-macs.onnx").is_file()  # written by the driver


def test_ray_needs_a_node_with_the_target(local_ray):
    from edgec.errors import ConfigError
    from edgec.executor import RayExecutor

    address = ray.get_runtime_context().gcs_address
    with pytest.raises(ConfigError, match=r"no Ray node advertises target:npu-qnn-htp.*ray start --address"):
        RayExecutor(address, ["npu-qnn-htp"], 2)


def test_an_address_nothing_answers_on_is_refused_quickly():
    from edgec.errors import ConfigError
    from edgec.executor import check_reachable

    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match="cannot reach Ray at 127.0.0.1:1"):
        check_reachable("127.0.0.1:1", timeout_s=2)
    assert time.perf_counter() - t0 < 10
    with pytest.raises(ConfigError, match="bad --ray-address"):
        check_reachable("host:port")
