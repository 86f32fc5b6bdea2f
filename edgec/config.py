"""``edgec compile`` settings: one dataclass, read from a TOML file and/or flags.

Flags override the file. Unknown keys are refused with a did-you-mean; types and
ranges are checked here so the pipeline never sees a bad value.
"""

from __future__ import annotations

import difflib
import math
import tomllib
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Mapping

from edgec.errors import ConfigError

MODELS = ("fbnet-supernet",)
TRANSFORMERS = ("minilm", "smollm2")  # built-in pretrained transformers (edgec.compile.hf_source)
DATASETS = ("digits", "fashion-mnist")


@dataclass(frozen=True)
class CompileConfig:
    model: str = "fbnet-supernet"          # built-in supernet trained on `dataset`, or a path to an .onnx model
    dataset: str = "digits"                # digits | fashion-mnist
    data_dir: str | None = None            # Fashion-MNIST IDX folder (default /usr/share/datasets/fashion-mnist)
    target: str = "cpu-ort"                # primary target: the search measures candidates here
    also_targets: tuple[str, ...] = ()     # further targets the published candidates are built and profiled for
    objective: str = "primary"             # search latency: the primary target's p50 | max-latency over all targets
    npu_cpu_fallback: bool = False         # npu-qnn-htp: let nodes the HTP cannot take run on the CPU (default: refuse)
    budget_evals: int = 100                # candidates the search compiles and measures (the reference is extra)
    max_accuracy_drop: float = 1.0         # percentage points of validation accuracy below the reference
    latency_budget_ms: float | None = None  # p50 at batch 1 on `target`; None = no budget
    size_budget_kb: float | None = None    # ONNX file size in KiB (1024 bytes); None = no budget
    out: str = "runs/edgec"                # run directory
    seed: int = 0                          # seeds the search and the supernet training
    resume: bool = False                   # continue the run in `out` without repeating evaluations
    force: bool = False                    # replace edgec's outputs in a non-empty `out`
    strategy: str = "nsga2"                # nsga2 | random | linas (predictor-guided; built-in supernet only)
    population_size: int = 16              # NSGA-II generation size
    threads: int = 2                       # ONNX Runtime intra-op threads and torch threads
    train_epochs: int | None = None        # supernet epochs; None = the dataset's default
    calibration_images: int = 512          # training images for static quantization (≥ 256)
    calib_data: str | None = None          # .onnx model input: .npz of ≥ 256 calibration inputs (required)
    eval_data: str | None = None           # .onnx model input: .npz of inputs to measure fidelity on
    input_shape: tuple[int, ...] | None = None  # .onnx model input: full input shape where dims are dynamic
    prune_flops_target: float | None = None  # after the search: PAGCP-prune the chosen subnet by this FLOPs share
    prune_round_to: int | None = None      # its kept widths are multiples of this (None: 8, as edgec prune)
    finetune_epochs: int = 0               # after the search: fine-tune alone for this many epochs (0 = off) the
    finetune_top: int = 4                  # reference and at most this many Pareto architectures (a bisection)
    finetune_child_epochs: int | None = None  # epochs for the architectures other than the reference (None = as above)
    max_fidelity_drop: float = 0.02        # transformers (feature extraction): mean cosine to FP32 ≥ 1 - this
    recovery_steps: int = 0                # transformers: distillation steps after least squares (0 = none)
    recovery_candidates: int = 2           # transformers: how many of the fastest pruned sub-networks to recover (0 = none)
    sequence_length: int = 128             # transformers: tokens per input when measuring latency (batch 1)
    max_ppl_increase: float = 0.10         # causal LMs (text generation): perplexity ≤ FP32's × (1 + this)
    executor: str = "in-process"           # where evaluations and device profiles run: in-process | ray
    storage: str | None = None             # NSGA-II state in an Optuna RDB (sqlite:///f.db, postgresql://…), shared
    study_name: str | None = None          # with --storage: the study searches share (default: from the settings)
    ray_address: str | None = None         # --executor ray: a running cluster's address (default: start a local one)

    def __post_init__(self) -> None:
        def bad(name: str, why: str, fix: str) -> None:
            raise ConfigError(f"bad value for {name}: {getattr(self, name)!r}", why, fix)

        if self.model not in MODELS and not self.model.endswith(".onnx") and not self.is_transformer:
            bad("model", f"known models: {', '.join(MODELS + TRANSFORMERS)}, a Hugging Face directory, a .gguf "
                "file, or a path to an .onnx file", "use --model fbnet-supernet, --model minilm or pass MODEL.onnx")
        if self.is_transformer:
            unused = {"dataset": self.dataset != "digits", "data_dir": bool(self.data_dir),
                      "train_epochs": bool(self.train_epochs), "prune_flops_target": self.prune_flops_target is not None,
                      "prune_round_to": self.prune_round_to is not None,
                      "finetune_epochs": self.finetune_epochs != 0, "finetune_top": self.finetune_top != 4,
                      "finetune_child_epochs": self.finetune_child_epochs is not None,
                      "latency_budget_ms": self.latency_budget_ms is not None,
                      "size_budget_kb": self.size_budget_kb is not None, "strategy": self.strategy != "nsga2",
                      "max_accuracy_drop": self.max_accuracy_drop != 1.0, "npu_cpu_fallback": self.npu_cpu_fallback,
                      "calibration_images": self.calibration_images != 512, "objective": self.objective != "primary"}
            for name, given in unused.items():
                if given:
                    bound = "--max-ppl-increase" if self.is_decoder else "--max-fidelity-drop"
                    bad(name, "pretrained transformers are calibrated and evaluated on text (pydoc_data.topics), "
                        f"searched by NSGA-II on cpu-ort with {bound} as the quality bound; this "
                        "setting does not apply to them", "drop it")
            if self.target != "cpu-ort" or self.also_targets:
                raise ConfigError(f"bad target for --model {self.model}: "
                                  f"{', '.join(t for t in (self.target, *self.also_targets) if t != 'cpu-ort')}",
                                  "pretrained transformers are searched and measured on cpu-ort only so far",
                                  "drop --target or pass --target cpu-ort")
        encoder_only = {"recovery_steps": self.recovery_steps != 0, "recovery_candidates": self.recovery_candidates != 2,
                        "max_fidelity_drop": self.max_fidelity_drop != 0.02, "sequence_length": self.sequence_length != 128}
        if not self.is_transformer or self.is_decoder:
            for name, given in encoder_only.items():
                if given:
                    bad(name, "this setting applies to pretrained encoders (--model minilm)",
                        "drop it" + ("; causal LMs take --max-ppl-increase" if self.is_decoder else ", or pass --model minilm"))
        if self.max_ppl_increase != 0.10 and not self.is_decoder:
            bad("max_ppl_increase", "this setting applies to causal LMs (--model smollm2)", "drop it, or pass --model smollm2")
        if not 0 < self.max_ppl_increase <= 10:
            bad("max_ppl_increase", "it is a relative perplexity increase over FP32, e.g. 0.10 or 10%",
                "e.g. --max-ppl-increase 10%")
        if not 0 < self.max_fidelity_drop < 1:
            bad("max_fidelity_drop", "it is a drop in mean cosine similarity, between 0 and 1", "e.g. 0.02")
        if not 0 <= self.recovery_candidates <= 100:
            bad("recovery_candidates", "between 0 (no recovery) and 100 sub-networks", "e.g. --recovery-candidates 2")
        if not 0 <= self.recovery_steps <= 100_000:
            bad("recovery_steps", "steps must be between 0 and 100000", "e.g. --recovery-steps 200")
        if not 8 <= self.sequence_length <= 4096:
            bad("sequence_length", "tokens must be between 8 and 4096", "e.g. --sequence-length 128")
        if self.is_onnx_input and not self.calib_data:
            bad("calib_data", "an ONNX model is quantized with calibration inputs",
                "pass --calib-data calib.npz (≥ 256 inputs, array 'x')")
        if self.is_onnx_input and (self.dataset != "digits" or self.data_dir or self.train_epochs):
            bad("dataset" if self.dataset != "digits" else "data_dir" if self.data_dir else "train_epochs",
                "datasets and supernet training apply to the built-in supernet, not to an ONNX model",
                "drop it; an ONNX model is calibrated and evaluated on --calib-data / --eval-data")
        if not self.is_onnx_input and (self.calib_data or self.eval_data or self.input_shape):
            bad("calib_data" if self.calib_data else "eval_data" if self.eval_data else "input_shape",
                "calibration/evaluation data and input shapes apply to ONNX models given as input",
                "drop it, or pass MODEL.onnx")
        if self.input_shape is not None and (not self.input_shape or any(d < 1 for d in self.input_shape)):
            bad("input_shape", "sizes must be positive integers", "e.g. --input-shape 1,3,224,224")
        if self.dataset not in DATASETS:
            bad("dataset", f"known datasets: {', '.join(DATASETS)}", "use --dataset digits or fashion-mnist")
        if self.budget_evals < 1:
            bad("budget_evals", "the search needs at least one evaluation", "pass --budget-evals 1 or more")
        if not 0 <= self.max_accuracy_drop <= 100:  # also refuses NaN
            bad("max_accuracy_drop", "it is in percentage points, 0..100", "e.g. --max-accuracy-drop 1.0")
        if self.latency_budget_ms is not None and not 0 < self.latency_budget_ms < math.inf:
            bad("latency_budget_ms", "a latency budget must be a positive finite number", "e.g. --latency-budget-ms 0.5")
        if self.size_budget_kb is not None and not 0 < self.size_budget_kb < math.inf:
            bad("size_budget_kb", "a size budget must be a positive finite number", "e.g. --size-budget-kb 200")
        if not 0 <= self.seed < 2**32:
            bad("seed", "seeds are integers in 0 .. 2**32 - 1", "e.g. --seed 0")
        if self.data_dir is not None and (self.dataset != "fashion-mnist" or not self.data_dir.strip()):
            bad("data_dir", "a data directory applies only to --dataset fashion-mnist and must not be empty",
                "drop --data-dir or pass --dataset fashion-mnist --data-dir DIR")
        if self.resume and self.force:
            bad("force", "--resume continues a run and --force replaces it", "pass only one of them")
        if self.strategy not in ("nsga2", "random", "linas"):
            bad("strategy", "known strategies: nsga2, random, linas", "use --strategy nsga2")
        if self.strategy == "linas" and self.model != "fbnet-supernet":
            bad("strategy", f"LINAS searches the built-in supernet's space, not {self.model!r}",
                "use --strategy nsga2, or --model fbnet-supernet")
        if self.strategy == "linas" and self.population_size < 4:
            bad("population_size", "LINAS fits its predictors on at least 4 initial evaluations",
                "e.g. --population-size 10")
        if self.population_size < 2:
            bad("population_size", "NSGA-II needs a population of at least 2", "e.g. population_size = 16")
        if self.strategy == "linas" and self.population_size >= self.budget_evals:
            bad("population_size", f"LINAS evaluates {self.population_size} initial candidates before its "
                f"predictors choose any, and the budget is {self.budget_evals}: it would be a random search",
                "raise --budget-evals above --population-size (e.g. --budget-evals 60 --population-size 10)")
        if not 1 <= self.threads <= 256:
            bad("threads", "threads must be between 1 and 256", "e.g. --threads 2")
        if self.train_epochs is not None and self.train_epochs < 1:
            bad("train_epochs", "training needs at least one epoch", "e.g. --train-epochs 15")
        if self.target in self.also_targets or len(set(self.also_targets)) != len(self.also_targets):
            bad("also_targets", f"a target is named twice (primary {self.target!r})", "name each target once")
        if self.objective not in ("primary", "max-latency"):
            bad("objective", "known objectives: primary, max-latency", "use --objective primary")
        if self.objective == "max-latency" and not self.also_targets:
            bad("objective", "max-latency compares several targets", "pass two or more --target")
        if self.prune_flops_target is not None and not 0 < self.prune_flops_target < 1:
            bad("prune_flops_target", "it is the fraction of FLOPs to remove, between 0 and 1",
                "e.g. --prune-flops-target 0.3")
        if self.prune_round_to is not None and self.prune_flops_target is None:
            raise ConfigError("prune_round_to (--prune-round-to) without prune_flops_target (--prune-flops-target)",
                              "it sets the width multiple of that pruning pass", "add --prune-flops-target F or drop it")
        if self.prune_round_to is not None and not 1 <= self.prune_round_to <= 256:
            bad("prune_round_to", "kept channel counts are multiples of it, 1 to 256", "e.g. --prune-round-to 8")
        if self.prune_flops_target is not None and self.is_onnx_input:
            bad("prune_flops_target", "pruning applies to the built-in supernet's chosen subnet",
                "drop it; prune a PyTorch model with 'edgec prune'")
        if not 0 <= self.finetune_epochs <= 100:
            bad("finetune_epochs", "between 0 (no fine-tuning) and 100 epochs", "e.g. --finetune-epochs 6")
        if not 1 <= self.finetune_top <= 50:
            bad("finetune_top", "between 1 and 50 architectures", "e.g. --finetune-top 4")
        given = [n for n, on in (("finetune_epochs", self.finetune_epochs), ("finetune_top", self.finetune_top != 4),
                                 ("finetune_child_epochs", self.finetune_child_epochs is not None)) if on]
        if given and self.is_onnx_input:
            bad(given[0],
                "fine-tuning applies to subnets of the built-in supernet", "drop it")
        if self.finetune_top != 4 and not self.finetune_epochs:
            bad("finetune_top", "it picks the architectures to fine-tune, and fine-tuning is off",
                "pass --finetune-epochs N too, or drop it")
        if self.finetune_child_epochs is not None and not 1 <= self.finetune_child_epochs <= 100:
            bad("finetune_child_epochs", "between 1 and 100 epochs", "e.g. --finetune-child-epochs 15")
        if self.finetune_child_epochs is not None and not self.finetune_epochs:
            bad("finetune_child_epochs", "it sets how long the architectures besides the reference are fine-tuned, "
                "and fine-tuning is off", "pass --finetune-epochs N too, or drop it")
        if self.executor not in ("in-process", "ray"):
            bad("executor", "known executors: in-process (default), ray", "use --executor ray or drop it")
        if self.ray_address is not None and (self.executor != "ray" or not self.ray_address.strip()):
            bad("ray_address", "an address applies only to --executor ray and must not be empty",
                "pass --executor ray --ray-address HOST:PORT, or drop it")
        if self.executor == "ray" and (self.model != "fbnet-supernet" or self.objective != "primary"):
            bad("executor", "Ray runs the built-in supernet's search with the primary target's latency as "
                "objective; ONNX-model inputs, transformers and --objective max-latency run in-process",
                "drop --executor ray")
        if self.storage is not None and (not self.storage.strip() or self.strategy != "nsga2"
                                         or self.model != "fbnet-supernet"):
            bad("storage", "shared search storage holds the NSGA-II study of the built-in supernet's search",
                "drop --storage, or use it with --strategy nsga2 on the built-in supernet")
        if self.study_name is not None and (self.storage is None or not self.study_name.strip()):
            bad("study_name", "a study name applies only with --storage and must not be empty",
                "pass --storage URL too, or drop it")
        if self.calibration_images < 256:
            bad("calibration_images", "static quantization calibrates on at least 256 images",
                "use calibration_images = 256 or more")

    @property
    def is_transformer(self) -> bool:
        """True when ``model`` is a pretrained transformer: a built-in name, a Hugging Face directory or GGUF."""
        from edgec.compile.hf_source import is_transformer_source

        return is_transformer_source(self.model)

    @property
    def is_decoder(self) -> bool:
        """``--model`` is a causal LM (text generation: a built-in like smollm2, a GGUF file, a *CausalLM folder)."""
        from edgec.compile.hf_source import task_of

        return self.is_transformer and task_of(self.model) == "text-generation"

    @property
    def is_onnx_input(self) -> bool:
        """True when ``model`` is a user's ONNX file (policy search only, fidelity as quality)."""
        return self.model.endswith(".onnx")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_sources(cls, toml_path: str | Path | None, overrides: Mapping[str, Any]) -> "CompileConfig":
        """Merge the TOML file (if any) with ``overrides`` (flags; None means not given)."""
        values: dict[str, Any] = {}
        if toml_path is not None:
            values.update(read_toml(Path(toml_path)))
        values.update({k: v for k, v in overrides.items() if v is not None})
        target = values.get("target")
        if isinstance(target, (list, tuple)):  # target = ["cpu-ort", "npu-qnn-htp"]: the first is primary
            if not target:
                raise ConfigError("bad value for target: []", "at least one target is needed", 'e.g. target = "cpu-ort"')
            values["target"] = target[0]
            if len(target) > 1:  # flags name every target; they replace the file's also_targets
                values["also_targets"] = tuple(target[1:])
        return from_dict(cls, values)


def read_toml(path: Path) -> dict[str, Any]:
    """Read a config file; keys may use '-' or '_'. A ``[compile]`` table is accepted too."""
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found", "", "check the path given to --config") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {path}", str(e), "check the path given to --config") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML", str(e), "fix the syntax") from None
    if isinstance(data.get("compile"), dict) and len(data) == 1:
        data = data["compile"]
    return {k.replace("-", "_"): v for k, v in data.items()}


def from_dict(cls, values: Mapping[str, Any]):
    """Build ``cls`` from ``values``, refusing unknown keys (with a did-you-mean) and wrong types."""
    known = {f.name: f for f in fields(cls)}
    for key in values:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(known)}"
            raise ConfigError(f"unknown config key {key!r}", "edgec does not know this setting", hint)
    typed = {}
    for key, value in values.items():
        typed[key] = _coerce(key, known[key].type, value)
    return cls(**typed)


def _coerce(key: str, type_text: str, value: Any) -> Any:
    wants = str(type_text)
    optional = "None" in wants
    if value is None and optional:
        return None
    if wants.startswith("tuple[int"):
        if isinstance(value, str):  # "1,3,224,224" from a flag
            try:
                value = tuple(int(v) for v in value.replace("x", ",").split(",") if v.strip())
            except ValueError:
                pass
        ok = isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        value = tuple(value) if ok else value
    elif wants.startswith("tuple"):
        ok = isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
        value = tuple(value) if ok else value
    elif wants.startswith("bool"):
        ok = isinstance(value, bool)
    elif wants.startswith("int"):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif wants.startswith("float"):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    else:  # str
        ok = isinstance(value, str)
    if not ok:
        kind = ("a list of integers, e.g. 1,3,224,224" if wants.startswith("tuple[int") else
                "a list of names" if wants.startswith("tuple") else "true or false" if wants.startswith("bool")
                else "an integer" if wants.startswith("int") else "a number" if wants.startswith("float")
                else "a string")
        raise ConfigError(f"bad type for {key}: {value!r}", f"expected {kind}", f"set {key} to {kind}")
    return value
