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
