import pytest

from edgec.config import CompileConfig
from edgec.errors import ConfigError


def test_toml_and_flags_merge(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('dataset = "digits"\nbudget-evals = 7\nmax_accuracy_drop = 0.5\n')
    cfg = CompileConfig.from_sources(f, {"budget_evals": 9, "seed": None})
    assert cfg.budget_evals == 9 and cfg.max_accuracy_drop == 0.5 and cfg.seed == 0


def test_compile_table_is_accepted(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('[compile]\nseed = 3\n')
    assert CompileConfig.from_sources(f, {}).seed == 3


@pytest.mark.parametrize("values, match", [
    ({"budget_eval": 3}, "did you mean 'budget_evals'"),
    ({"budget_evals": "many"}, "bad type for budget_evals"),
    ({"budget_evals": 0}, "bad value for budget_evals"),
    ({"resume": True, "force": True}, "pass only one"),
    ({"dataset": "cifar"}, "known datasets"),
    ({"latency_budget_ms": -1.0}, "positive finite"),
    ({"latency_budget_ms": float("nan")}, "positive finite"),
    ({"size_budget_kb": float("inf")}, "positive finite"),
    ({"seed": -1}, "seeds are integers"),
    ({"seed": 2**32}, "seeds are integers"),
    ({"data_dir": "/x"}, "applies only to --dataset fashion-mnist"),
    ({"calibration_images": 10}, "at least 256"),
    ({"target": ["cpu-ort", "cpu-ort"]}, "named twice"),
    ({"target": []}, "at least one target"),
    ({"objective": "fastest"}, "known objectives"),
    ({"strategy": "bayes"}, "known strategies: nsga2, random, linas"),
    ({"strategy": "linas", "population_size": 3}, "at least 4 initial"),
    ({"strategy": "linas", "population_size": 1}, "at least 4 initial"),
    ({"strategy": "linas", "population_size": 16, "budget_evals": 10}, "it would be a random search"),
    ({"strategy": "linas", "model": "net.onnx", "calib_data": "c.npz"}, "LINAS searches the built-in supernet"),
    ({"objective": "max-latency"}, "two or more --target"),
    ({"model": "net.onnx"}, "--calib-data"),
    ({"calib_data": "c.npz"}, "apply to ONNX models"),
    ({"model": "net.onnx", "calib_data": "c.npz", "input_shape": "1,a"}, "bad type for input_shape"),
    ({"model": "net.onnx", "calib_data": "c.npz", "input_shape": [1, 0]}, "positive integers"),
])
def test_bad_values_are_refused(values, match):
    with pytest.raises(ConfigError, match=match):
        CompileConfig.from_sources(None, values)


def test_bad_toml_is_one_line(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("dataset = \n")
    with pytest.raises(ConfigError) as e:
        CompileConfig.from_sources(f, {})
    assert "\n" not in e.value.line() and "not valid TOML" in e.value.line()


def test_the_shipped_example_config_loads():
    from pathlib import Path

    cfg = CompileConfig.from_sources(Path(__file__).parents[1] / "examples" / "digits.toml", {})
    assert cfg.dataset == "digits" and cfg.budget_evals == 100 and cfg.calibration_images == 512


def test_targets_from_flags_and_toml(tmp_path):
    cfg = CompileConfig.from_sources(None, {"target": ["npu-qnn-htp", "cpu-ort"], "objective": "max-latency"})
    assert cfg.target == "npu-qnn-htp" and cfg.also_targets == ("cpu-ort",)
    f = tmp_path / "c.toml"
    f.write_text('target = ["cpu-ort", "cpu-openvino"]\n')
    assert CompileConfig.from_sources(f, {}).also_targets == ("cpu-openvino",)
    cfg = CompileConfig.from_sources(None, {"model": "m.onnx", "calib_data": "c.npz", "input_shape": "1,3,8,8"})
    assert cfg.is_onnx_input and cfg.input_shape == (1, 3, 8, 8)


def test_max_latency_objective_is_the_worst_ratio_to_each_targets_reference():
    from dataclasses import replace

    from edgec.pipeline import MaxLatencyEvaluator
    from edgec.records import Evaluation
    from edgec.search.space import Candidate, QuantPolicy, SubnetConfig
    from edgec.targets import LatencyStats

    def stats(ms, kind):
        return LatencyStats(ms, ms, ms, ms, ms, 1, 0, 2, 1, kind)

    class Fake:
        def __init__(self, name, kind, p50):
            self.target, self.models_dir, self.kind, self.p50 = type("T", (), {"name": name})(), None, kind, p50

        def evaluate(self, candidate, role="search"):
            ms = self.p50[role]
            return Evaluation(candidate, self.target.name, 0.9, stats(ms, self.kind), 100, 0.0, 0.0, "x", role)

    cpu = Fake("cpu-ort", "measured", {"reference": 0.2, "search": 0.1})            # 2× faster
    npu = Fake("npu-qnn-htp", "simulated", {"reference": 40.0, "search": 30.0})     # 1.33× faster
    ev = MaxLatencyEvaluator([cpu, npu])
    c = Candidate(SubnetConfig((), ()), QuantPolicy())
    ref = ev.evaluate(c, "reference")
    assert ref.objectives()[1] == pytest.approx(1.0)
    got = ev.evaluate(c, "search")
    assert got.objectives()[1] == pytest.approx(0.75)    # max(0.1 / 0.2, 30 / 40): the NPU gains least
    assert got.latency.p50_ms == 0.1 and got.latency_by_target["npu-qnn-htp"]["kind"] == "simulated"
    resumed = MaxLatencyEvaluator([cpu, npu])
    resumed.use_reference(Evaluation.from_dict(ref.to_dict()))
    assert resumed.evaluate(c).objectives()[1] == pytest.approx(0.75)
    assert replace(got, latency_objective=None).objectives()[1] == 0.1
