"""``edgec prune``: PAGCP channel pruning of a multi-task CNN, fine-tuning, export, measurement, publishing.

The job (issue "PAGCP for multi-task CNNs"): load or train the built-in multi-task
model (:mod:`edgec.search.multitask`, cached as safetensors) — or load the user's
model from ``package.module:factory`` and a checkpoint (:mod:`edgec.user_model`) —
prune it with :func:`edgec.search.pagcp.pagcp` under every task's validation loss,
fine-tune the pruned model, export both to ONNX (parity-checked against PyTorch),
measure both on ``cpu-ort`` side by side, and publish the pruned artifact with a report.

Oracle: each trial model gets its batch-norm statistics re-estimated on training
images before its validation losses are read ("adaptive BN", Li et al., "EagleEye",
ECCV 2020, §3.2) — without it a freshly cut layer's stale statistics dominate the
loss and the oracle stops far too early. With ``--trial-steps N`` every trial (and a
control copy of the reference) is also fine-tuned for N minibatches before it is read
(NetAdapt's short-term fine-tuning; see :mod:`edgec.search.pagcp`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

import edgec
from edgec.data import Dataset, load_dataset
from edgec.errors import ConfigError, ModelError, NoQualifyingCandidate

if TYPE_CHECKING:  # torch: imported where it is used, after the options are checked
    from edgec.search.multitask import Task

# Training of the built-in multi-task model, per dataset (part of the cache key).
DEFAULT_MT_TRAINING = {
    "digits": {"epochs": 30, "batch_size": 64, "lr": 3e-3, "seed": 0},
    "fashion-mnist": {"epochs": 6, "batch_size": 128, "lr": 3e-3, "seed": 0},
}
DEFAULT_FINETUNE_EPOCHS = {"digits": 10, "fashion-mnist": 3}
FINETUNE_LR = 1e-3
ORACLE_VAL_IMAGES = 1000   # validation images the pruning oracle reads per trial
BN_RECAL_IMAGES = 512      # training images each trial's BN statistics are re-estimated on
TAYLOR_IMAGES = 1024       # --importance taylor: training images (after the BN ones) whose gradients rank channels
TAYLOR_BATCH = 64          # ... in minibatches of this many (Molchanov et al. 2019 accumulate per minibatch)
TRIAL_SEED_OFFSET = 1      # --trial-steps: the short fine-tuning's images are drawn with seed + this


def get_multitask_model(ds: Dataset, progress, epochs: int | None = None):
    """The trained built-in multi-task model for ``ds``: cached, or trained now and cached.

    Returns (model, info) where info says where it is cached and how it was trained.
    """
    import torch

    from edgec.pipeline import cache_root
    from edgec.search.multitask import (BUILTIN_TASKS, MultiTaskNet, builtin_targets, cache_key, load_multitask,
                                        save_multitask, train_multitask)

    settings = dict(DEFAULT_MT_TRAINING[ds.name])
    if epochs is not None:
        settings["epochs"] = epochs
    key = cache_key(settings, ds.train_x, ds.train_y)
    folder = cache_root() / "multitask" / f"{ds.name}-{key}"
    info = {"cache_dir": str(folder), "cache_key": key, "train": settings}
    if (folder / "model.json").is_file():
        try:
            model, meta = load_multitask(folder)
            progress.log(f"multi-task model: cached ({folder})")
            return model, {**info, "cached": True, "train_s": meta.get("train_s")}
        except ModelError as e:  # our own cache, damaged: train again
            progress.log(f"multi-task model cache unusable ({e.why}); retraining")
    torch.manual_seed(settings["seed"])
    model = MultiTaskNet(ds.num_classes)
    progress.stage(f"training the multi-task model on {ds.name} ({settings['epochs']} epochs)")
    start = time.perf_counter()
    train_multitask(model, ds.train_x, builtin_targets(ds.train_x, ds.train_y), BUILTIN_TASKS,
                    settings["epochs"], lr=settings["lr"], batch_size=settings["batch_size"], seed=settings["seed"],
                    on_step=lambda s, t, loss: progress.advance(s, t, f"loss {loss:.3f}"))
    train_s = time.perf_counter() - start
    save_multitask(model, folder, {"train": settings, "train_s": train_s, "dataset": ds.name})
    return model, {**info, "cached": False, "train_s": train_s}



@dataclass(frozen=True)
class PruneConfig:
    """What ``edgec prune`` does; validated on construction (:class:`ConfigError`)."""

    out: Path
    dataset: str = "digits"
    data_dir: str | None = None
    model: str = "multitask"                   # "multitask" or a user model "package.module:factory"
    checkpoint: str | None = None              # user model: .safetensors, or a torch file (weights_only=True)
    tasks: tuple[str, ...] = ()                # user model: "NAME=KIND:OUTPUT" per task
    train_data: str | None = None              # user model: .npz with x and one array per task
    eval_data: str | None = None               # user model: .npz with x and one array per task
    flops_target: float | None = None          # fraction of FLOPs to remove, e.g. 0.6
    loss_budget: float = 0.3                   # PAGCP global loss budget (relative rise per task per pass)
    max_task_drop: dict = field(default_factory=dict)  # {task: points or dB} after fine-tuning
    watch: tuple[str, ...] = ()                # tasks the oracle checks (default: all)
    importance: str = "l1"
    step: float = 0.05
    round_to: int = 8                          # kept widths are multiples of this (see search/pagcp.py)
    trial_steps: int = 0                       # short fine-tuning (minibatches) of every trial before the oracle reads it
    finetune_epochs: int | None = None
    recovery_epochs: int = 1                   # fine-tuning between PAGCP passes (with --flops-target)
    kd_weight: float = 0.0                     # final fine-tuning: distill the classification tasks from the unpruned model
    task_weights: dict = field(default_factory=dict)  # {task: weight of its loss in the fine-tuning after pruning}
    max_passes: int = 30                       # with --flops-target: at most this many passes over all layers
    train_epochs: int | None = None
    threads: int = 2
    runs: int = 300
    seed: int = 0
    force: bool = False

    @property
    def is_user_model(self) -> bool:
        return self.model != "multitask" and not self.is_subnet

    @property
    def is_subnet(self) -> bool:
        """The chosen subnet of ``edgec compile --prune-flops-target`` (``subnet:<candidate id>``)."""
        return self.model.startswith("subnet:")

    def __post_init__(self) -> None:
        from edgec.data import DATASETS

        if self.is_user_model:
            from edgec.user_model import check_factory_spec

            check_factory_spec(self.model)
            for flag, value in (("--checkpoint", self.checkpoint), ("--eval-data", self.eval_data),
                                ("--task", self.tasks)):
                if not value:
                    raise ConfigError(f"a user model needs {flag}", "edgec prunes it under its own tasks and data",
                                      "see 'edgec prune --help' (--checkpoint, --task, --eval-data, --train-data)")
        elif not self.is_subnet:
            for flag, value in (("--checkpoint", self.checkpoint), ("--task", self.tasks),
                                ("--train-data", self.train_data), ("--eval-data", self.eval_data)):
                if value:
                    raise ConfigError(f"{flag} applies to a user model", "the built-in multitask model brings "
                                      "its own tasks and data", f"drop {flag} or pass --model package.module:factory")
            if self.dataset not in DATASETS:
                raise ConfigError(f"unknown dataset {self.dataset!r}", f"known datasets: {', '.join(DATASETS)}",
                                  "pass --dataset digits or --dataset fashion-mnist")
        if self.dataset == "digits" and self.data_dir:
            raise ConfigError("--data-dir applies to --dataset fashion-mnist", "digits ships with scikit-learn",
                              "drop --data-dir")
        if self.is_user_model and (self.dataset != "digits" or self.data_dir or self.train_epochs):
            flag = "--dataset" if self.dataset != "digits" else "--data-dir" if self.data_dir else "--train-epochs"
            raise ConfigError(f"{flag} applies to the built-in multitask model", "a user model is pruned on "
                              "--eval-data / --train-data with its own weights", f"drop {flag}")
        if not (math.isfinite(self.loss_budget) and 0 < self.loss_budget <= 100):
            raise ConfigError(f"bad value for --loss-budget: {self.loss_budget}", "it is a relative loss rise, "
                              "> 0 and ≤ 100", "e.g. --loss-budget 0.3")
        if not (math.isfinite(self.kd_weight) and 0 <= self.kd_weight <= 1):
            raise ConfigError(f"bad value for --kd-weight: {self.kd_weight}", "it mixes cross-entropy and "
                              "distillation, between 0 and 1", "e.g. --kd-weight 0.5")
        if self.kd_weight and self.finetune_epochs == 0:
            raise ConfigError("--kd-weight with --finetune-epochs 0", "distillation happens in the fine-tuning",
                              "drop --kd-weight or give --finetune-epochs 1 or more")
        if self.task_weights and self.finetune_epochs == 0:
            raise ConfigError("--task-weight with --finetune-epochs 0", "the weights apply to the fine-tuning",
                              "drop --task-weight or give --finetune-epochs 1 or more")
        if not (math.isfinite(self.step) and 0.01 <= self.step <= 0.5):
            raise ConfigError(f"bad value for --step: {self.step}", "the pruning-ratio step is between 0.01 and 0.5",
                              "e.g. --step 0.05")
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"bad value for --seed: {self.seed}", "seeds are integers in 0 .. 2**32 - 1",
                              "e.g. --seed 0")
        for name, value, low, high in (("finetune-epochs", self.finetune_epochs, 0, 1000),
                                       ("round-to", self.round_to, 1, 256),
                                       ("train-epochs", self.train_epochs, 1, 1000),
                                       ("recovery-epochs", self.recovery_epochs, 0, 100),
                                       ("trial-steps", self.trial_steps, 0, 10_000),
                                       ("max-passes", self.max_passes, 1, 1000),
                                       ("threads", self.threads, 1, 256), ("runs", self.runs, 10, 100_000)):
            if value is not None and not low <= value <= high:
                raise ConfigError(f"bad value for --{name}: {value}", f"it must be between {low} and {high}",
                                  f"pass --{name} {low} … {high}")
        try:
            self.pagcp_settings()  # validates flops_target, importance
        except ConfigError as e:  # "bad pruning setting NAME=VALUE": name the flag instead
            name, _, value = e.what.removeprefix("bad pruning setting ").partition("=")
            flag = "--" + name.replace("_", "-")
            raise ConfigError(f"bad value for {flag}: {value}", e.why, f"fix {flag}") from None
        for key, value in self.task_weights.items():
            if not (isinstance(value, (int, float)) and math.isfinite(value) and 0 < value <= 1e6):
                raise ConfigError(f"bad --task-weight {key}={value!r}", "a task's loss weight is a number > 0 "
                                  "and ≤ 1e6", "e.g. --task-weight reconstruction=40")
        for key, value in self.max_task_drop.items():
            if not (isinstance(value, (int, float)) and 0 <= value < 1000):
                raise ConfigError(f"bad --max-task-drop {key}={value!r}", "the drop must be a number in 0 .. 1000 "
                                  "(accuracy points or dB)",
                                  "e.g. --max-task-drop classification=1.0 --max-task-drop reconstruction=0.5")

    def check_task_names(self, names: list[str]) -> None:
        """--watch, --max-task-drop and --task-weight must name the model's tasks."""
        for flag, given in (("--watch", self.watch), ("--max-task-drop", tuple(self.max_task_drop)),
                            ("--task-weight", tuple(self.task_weights))):
            unknown = [n for n in given if n not in names]
            if unknown:
                raise ConfigError(f"unknown task {unknown[0]!r} in {flag}", f"the model's tasks are {', '.join(names)}",
                                  f"name one of them in {flag}")

    def pagcp_settings(self):
        from edgec.search.pagcp import PagcpSettings

        return PagcpSettings(step=self.step, loss_budget=self.loss_budget, flops_target=self.flops_target,
                             importance=self.importance, max_passes=self.max_passes if self.flops_target else 1,
                             round_to=self.round_to)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["out"] = str(self.out)
        if not self.model == "multitask":  # the data is the user's or the compile run's, not a --dataset
            for key in ("dataset", "data_dir", "train_epochs"):
                d.pop(key)
        return d


@dataclass
class PruneResult:
    out: Path
    report: dict


@dataclass(frozen=True)
class TaskData:
    """The splits a multi-task model is pruned, fine-tuned and scored on.

    ``*_x``: (N, C, H, W) float32; ``*_t``: {task name: (N,) int64 labels or (N, ...) float32
    targets}. ``train_x`` is None when the user gave no training data (then no BN
    recalibration and no fine-tuning). ``output_names``: the ONNX output names, in order.
    """

    name: str
    tasks: tuple[Task, ...]
    output_names: tuple[str, ...]
    train_x: np.ndarray | None
    train_t: dict | None
    val_x: np.ndarray
    val_t: dict
    test_x: np.ndarray
    test_t: dict
    provenance: dict
    batch_size: int = 128

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.val_x.shape[1:])

    @classmethod
    def from_dataset(cls, ds: Dataset) -> "TaskData":
        from edgec.search.multitask import BUILTIN_TASKS, MultiTaskNet, builtin_targets

        return cls(ds.name, BUILTIN_TASKS, MultiTaskNet.OUTPUT_NAMES, ds.train_x, builtin_targets(ds.train_x, ds.train_y),
                   ds.val_x, builtin_targets(ds.val_x, ds.val_y), ds.test_x, builtin_targets(ds.test_x, ds.test_y),
                   ds.provenance, DEFAULT_MT_TRAINING[ds.name]["batch_size"])


class TaskOracle:
    """PAGCP's performance oracle: {task: validation loss} of a model, after adaptive-BN recalibration
    on training images when there are any."""

    def __init__(self, data: TaskData, watch: tuple[str, ...], trial_steps: int = 0, seed: int = 0) -> None:
        self.seed = seed
        self.adapt_s = 0.0  # seconds spent in the trials' short fine-tuning
        # --trial-steps: the same training images (drawn once) for every trial, at most one pass over them
        self.trial_data, self.trial_steps_run = None, 0
        if trial_steps and data.train_x is not None:
            n = min(len(data.train_x), trial_steps * data.batch_size)
            idx = np.sort(np.random.default_rng(seed + TRIAL_SEED_OFFSET).permutation(len(data.train_x))[:n])
            self.trial_data = dataclasses.replace(data, train_x=data.train_x[idx],
                                                  train_t={k: v[idx] for k, v in data.train_t.items()})
            self.trial_steps_run = max(1, n // data.batch_size)  # the minibatches one epoch over them makes
        self.x = data.val_x[:ORACLE_VAL_IMAGES]
        self.targets = {k: v[:ORACLE_VAL_IMAGES] for k, v in data.val_t.items()}
        self.tasks = tuple(t for t in data.tasks if not watch or t.name in watch)
        self.recal_x = None if data.train_x is None else data.train_x[:BN_RECAL_IMAGES]
        if data.train_x is None:  # no training data: the gradients come from the validation images
            self.grad_x, self.grad_t = self.x, self.targets
        else:
            n = len(data.train_x)  # the images after the BN ones; the last ones when there are too few
            window = (slice(BN_RECAL_IMAGES, BN_RECAL_IMAGES + TAYLOR_IMAGES) if n >= BN_RECAL_IMAGES + TAYLOR_IMAGES
                      else slice(-TAYLOR_IMAGES, None))
            self.grad_x, self.grad_t = data.train_x[window], {k: v[window] for k, v in data.train_t.items()}
        self.calls = 0
        self.backward_passes = 0  # (minibatch, task) losses back-propagated for --importance taylor

    def backward(self, model):
        """:data:`edgec.search.pagcp.TaskBackward` for ``--importance taylor``: each watched task's mean
        loss back-propagated on each minibatch of :data:`TAYLOR_BATCH` images (one forward pass per
        minibatch), model in eval mode. A model that cannot back-propagate (frozen weights, a detached
        output) raises :class:`ModelError`."""
        import torch

        from edgec.search.multitask import as_outputs, task_loss

        model.eval()
        for i in range(0, len(self.grad_x), TAYLOR_BATCH):
            try:
                outs = as_outputs(model(torch.from_numpy(self.grad_x[i:i + TAYLOR_BATCH])))
                losses = [task_loss(t, outs[t.output], torch.from_numpy(self.grad_t[t.name][i:i + TAYLOR_BATCH]))
                          .mean() for t in self.tasks]
            except (RuntimeError, ValueError, IndexError) as e:
                raise _gradient_error(e) from None
            for k, (task, loss) in enumerate(zip(self.tasks, losses)):
                model.zero_grad(set_to_none=True)
                try:
                    loss.backward(retain_graph=k < len(losses) - 1)
                except RuntimeError as e:
                    raise _gradient_error(e) from None
                self.backward_passes += 1
                yield task.name

    def adapt(self, model) -> None:
        """``--trial-steps``: fine-tune ``model`` in place on :attr:`trial_steps_run` minibatches of training images,
        all tasks, at the fine-tuning's learning rate — the same images (drawn once with ``seed``) for every trial,
        so trials and their control differ only in their channels."""
        started = time.perf_counter()
        finetune(model, self.trial_data, 1, self.seed, _Quiet())
        self.adapt_s += time.perf_counter() - started

    def __call__(self, model) -> dict[str, float]:
        from edgec.search.multitask import evaluate_tasks
        from edgec.search.train import recalibrate_bn

        self.calls += 1
        if self.recal_x is not None:
            recalibrate_bn(model, self.recal_x, max_images=BN_RECAL_IMAGES)
        return {k: v["loss"] for k, v in evaluate_tasks(model, self.x, self.targets, self.tasks).items()}


class _Quiet:
    """A progress sink that shows nothing (the trials' short fine-tunings are too many to show)."""

    def stage(self, *args) -> None:
        pass

    def advance(self, *args) -> None:
        pass


def _gradient_error(e: Exception) -> ModelError:
    return ModelError("--importance taylor cannot back-propagate the tasks' losses through the model",
                      f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}",
                      "make its weights trainable and its outputs differentiable, or use --importance l1")


def teacher_logits(model, data: TaskData) -> dict:
    """{classification task: (N, classes) float32 logits of ``model`` on the training images}, for
    distillation from the unpruned model (empty without training data)."""
    import torch

    from edgec.search.multitask import as_outputs

    if data.train_x is None:
        return {}
    tasks = [t for t in data.tasks if t.kind == "classification"]
    outs: dict[str, list] = {t.name: [] for t in tasks}
    model.eval()
    with torch.no_grad():
        for i in range(0, len(data.train_x), 1000):
            o = as_outputs(model(torch.from_numpy(data.train_x[i:i + 1000])))
            for t in tasks:
                outs[t.name].append(o[t.output].float().numpy())
    return {k: np.concatenate(v) for k, v in outs.items()}


def finetune(model, data: TaskData, epochs: int, seed: int, progress, teacher: dict | None = None,
             kd_weight: float = 0.0, label: str = "fine-tuning the pruned model",
             task_weights: dict | None = None) -> None:
    """Fine-tune a pruned multi-task model on the training split (all tasks), in place; with ``teacher``
    (:func:`teacher_logits`) and ``kd_weight`` > 0 its classification tasks are distilled too.
    ``task_weights[task]`` scales a task's loss (default 1, and ``RECON_WEIGHT`` for a dense task). ``label``
    names the stage on the progress display."""
    from edgec.search.multitask import train_multitask

    if epochs and data.train_x is not None:
        progress.stage(f"{label} ({epochs} epoch{'s' if epochs != 1 else ''}" +
                       (f", distilled {kd_weight:g}" if teacher and kd_weight else "") + ")")
        try:
            train_multitask(model, data.train_x, data.train_t, data.tasks, epochs, lr=FINETUNE_LR,
                            batch_size=data.batch_size, seed=seed,
                            on_step=lambda s, t, loss: progress.advance(s, t, f"loss {loss:.3f}"),
                            teacher_logits=teacher, kd_weight=kd_weight, weights=task_weights)
        except (RuntimeError, ValueError, IndexError) as e:  # a user model that cannot train on its data
            raise ModelError("fine-tuning the pruned model failed", f"{type(e).__name__}: "
                             f"{(str(e).splitlines() or [''])[0][:200]}", "check the model and --train-data") from None


def task_metrics(model, data: TaskData) -> dict:
    """{"val": {task: {loss, metric}}, "test": …} on the full validation and test splits."""
    from edgec.search.multitask import evaluate_tasks

    return {"val": evaluate_tasks(model, data.val_x, data.val_t, data.tasks),
            "test": evaluate_tasks(model, data.test_x, data.test_t, data.tasks)}


def _drops(tasks, before: dict, after: dict, split: str) -> dict:
    """{task: drop in its metric (accuracy points or PSNR dB; positive = worse)} between two :func:`task_metrics`."""
    return {t.name: before[split][t.name][t.metric] - after[split][t.name][t.metric] for t in tasks}


def conv_widths(model) -> dict[str, int]:
    """{module name: output channels} of every conv layer."""
    import torch.nn as nn

    return {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


def model_id(widths: dict, role: str) -> str:
    """Artifact id: 12 hex digits of SHA-256 over the role and the conv widths (the role keeps the two artifacts
    apart when nothing was pruned)."""
    return hashlib.sha256(json.dumps([role, widths], sort_keys=True).encode()).hexdigest()[:12]


def run_prune(cfg: PruneConfig, progress) -> PruneResult:
    """Run ``edgec prune``; see the module docstring. Raises :class:`EdgecError` subclasses; a missed
    ``--max-task-drop`` is not raised here but by the caller, with :func:`gate_error`, after showing the results."""
    if cfg.is_user_model:
        from edgec.user_model import load_user_job

        model, data, ignored, model_info = load_user_job(cfg)
    else:
        ds = load_dataset(cfg.dataset, cfg.data_dir)
        data, ignored, model_info = TaskData.from_dataset(ds), (lambda m: m.output_layers()), None

        def model():  # trained (or read from the cache) only once the run directory is ours
            return get_multitask_model(ds, progress, cfg.train_epochs)
    return prune_job(cfg, model, data, ignored, model_info, progress)


def gate_error(cfg: PruneConfig, result: PruneResult) -> NoQualifyingCandidate | None:
    """The error (exit 3) to raise when the fine-tuned model misses ``--max-task-drop``, else None. The report and
    manifest are written either way (the manifest then marks the unpruned model chosen)."""
    gate = result.report["max_task_drop"]
    if not gate or gate["met"]:
        return None
    return NoQualifyingCandidate("the pruned model misses --max-task-drop",
                                 "; ".join(f"{k} dropped {gate['val_drops'][k]:.2f} on the validation split "
                                           f"(allowed {cfg.max_task_drop[k]})" for k in gate["failed"]),
                                 f"lower --flops-target or --loss-budget; the report is in {cfg.out} (the "
                                 "manifest marks the unpruned model chosen)")


def prune_job(cfg: PruneConfig, model, data: TaskData, ignored, model_info: dict | None, progress) -> PruneResult:
    """Prune ``model`` on ``data`` into ``cfg.out``.

    ``model``: an ``nn.Module``, or a zero-argument callable returning ``(module, model_info)`` that is
    called inside the locked run directory (the built-in model: trained or cached). ``ignored(m)``: the
    layers of ``m`` whose output width must stay. Used by ``edgec prune`` and by
    ``edgec compile --prune-flops-target`` (the chosen subnet, one classification task). A missed
    ``max_task_drop`` is recorded (``report["max_task_drop"]``, the unpruned model marked chosen), not raised.
    """
    import torch.nn as nn

    import torch

    from edgec.rundir import RunDir
    from edgec.search.pagcp import count_macs, pagcp
    from edgec.targets import open_target

    torch.set_num_threads(cfg.threads)
    target = open_target("cpu-ort", cfg.threads, cfg.runs)
    target.require_available()
    cfg.check_task_names([t.name for t in data.tasks])
    if data.train_x is None and (cfg.finetune_epochs or cfg.task_weights):
        flag = "--task-weight" if cfg.task_weights else f"--finetune-epochs {cfg.finetune_epochs}"
        raise ConfigError(f"{flag} needs training data", "the fine-tuning after pruning trains on it",
                          f"pass --train-data or drop {flag.split()[0]}")
    if cfg.trial_steps and data.train_x is None:
        raise ConfigError("--trial-steps needs training data", "each trial is fine-tuned on training images",
                          "pass --train-data or drop --trial-steps")
    if cfg.kd_weight and (data.train_x is None or not any(t.kind == "classification" for t in data.tasks)):
        raise ConfigError("--kd-weight has nothing to distill", "it distills classification tasks in the "
                          "fine-tuning, which needs training data" if data.train_x is None else
                          "the model has no classification task", "drop --kd-weight"
                          + (" or pass --train-data" if data.train_x is None else ""))
    if isinstance(model, nn.Module):
        from edgec.search.pagcp import prunable_groups

        if not prunable_groups(model, torch.zeros(1, *data.input_shape), ignored(model)):
            raise ConfigError("nothing to prune", "the model has no conv layer whose output width may shrink "
                              "(output layers keep theirs)", "pass a model with conv layers inside it")
    with RunDir(cfg.out, force=cfg.force, resumable=False) as run:
        if not isinstance(model, nn.Module):
            model, model_info = model()
        example = torch.zeros(1, *data.input_shape)
        before = task_metrics(model, data)
        oracle = TaskOracle(data, cfg.watch, cfg.trial_steps, cfg.seed)
        settings = cfg.pagcp_settings()
        progress.stage("PAGCP: pruning layer by layer under each task's validation loss")
        started = time.perf_counter()

        macs0 = count_macs(model, example)[0]

        def recover(m) -> None:  # plain: distillation is for the final fine-tuning
            removed = 1 - count_macs(m, example)[0] / macs0
            finetune(m, data, cfg.recovery_epochs, cfg.seed, progress,
                     label=f"PAGCP: {removed * 100:.1f}% of the FLOPs removed; recovery fine-tuning")
            progress.stage("PAGCP: next pass")

        result = pagcp(model, example, oracle, ignored, settings,
                       on_trial=lambda layer, ratio, losses: progress.advance(
                           oracle.calls, None, f"{layer} −{ratio * 100:.0f}%"),
                       recover=recover if cfg.recovery_epochs and data.train_x is not None else None,
                       backward=oracle.backward, adapt=oracle.adapt if cfg.trial_steps else None)
        prune_s = time.perf_counter() - started
        pruned = result.model
        if cfg.model == "multitask":  # the pruned weights before fine-tuning, to fine-tune them again another way
            from edgec.search.multitask import save_multitask

            save_multitask(pruned, run.study / "models" / "pruned-before-finetune", {"dataset": data.name})
        after_prune = task_metrics(pruned, data)
        epochs = cfg.finetune_epochs if cfg.finetune_epochs is not None else DEFAULT_FINETUNE_EPOCHS.get(data.name, 3)
        epochs = epochs if data.train_x is not None else 0
        teacher = teacher_logits(model, data) if cfg.kd_weight and epochs else {}
        finetune(pruned, data, epochs, cfg.seed, progress, teacher, cfg.kd_weight, task_weights=cfg.task_weights)
        after = task_metrics(pruned, data)
        progress.stage("exporting and measuring on cpu-ort")
        models_dir = run.study / "models"
        paths = {role: export_multitask(net, data, models_dir / f"{role}.onnx")
                 for role, net in (("reference", model), ("pruned", pruned))}
        latency = measure_side_by_side(target, paths, data.input_shape, rounds=3)
        latency["speedup_p50"] = latency["reference"]["p50_ms"] / latency["pruned"]["p50_ms"]
        target.close()
        report = _report(cfg, data, model_info, result, settings, model, before, after_prune, after, latency,
                         prune_s, oracle, epochs, target)
        report["finetune"]["distilled_tasks"] = sorted(teacher)
        gate = _gate(cfg, report)
        report["max_task_drop"] = gate
        nothing_pruned = result.macs_after == result.macs_before  # only fine-tuned: no reason to pick it
        _publish(run.path, report, paths, model, pruned, data, save_torch=cfg.model == "multitask",
                 chosen_role="reference" if (gate and not gate["met"]) or nothing_pruned else "pruned")
        from edgec.compile.package import write_atomic
        from edgec.report import write_prune_html

        write_atomic(run.path / "report.json", json.dumps(report, indent=2))
        write_atomic(run.path / "report.html", write_prune_html(report))
    return PruneResult(cfg.out, report)


def export_multitask(net, data: TaskData, path: Path) -> Path:
    """ONNX export of a (pruned) multi-task model with one named output per model output; parity-checked."""
    import copy

    import torch

    from edgec.compile.export import check_parity, export_onnx

    net = copy.deepcopy(net).eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        export_onnx(net, data.input_shape, path, output_names=data.output_names)
    check_parity(net, path, data.val_x[:64])
    return path


def measure_side_by_side(target, paths: dict[str, Path], input_shape, rounds: int) -> dict:
    """{role: the median-p50 round's stats as a dict + ``p50_ms_rounds``}, rounds interleaved on one target
    (:func:`edgec.targets.base.measure_interleaved`)."""
    from edgec.targets.base import measure_interleaved

    return {role: {**s.to_dict(), "p50_ms_rounds": s.extra["round_p50_ms"]}
            for role, s in measure_interleaved(target, paths, input_shape, rounds).items()}


def _report(cfg, data: TaskData, model_info, result, settings, reference, before, after_prune, after, latency,
            prune_s, oracle: TaskOracle, epochs, target) -> dict:
    from edgec.search import multitask

    return {
        "schema_version": 1, "job": "prune", "edgec_version": edgec.__version__,
        "config": cfg.to_dict(),
        "dataset": {"name": data.name, **data.provenance},
        "model": {"name": cfg.model, **model_info},
        "tasks": [{"name": t.name, "kind": t.kind, "output": t.output, "metric": t.metric,
                   "loss": "cross-entropy" if t.kind == "classification" else "MSE"} for t in data.tasks],
        "algorithm": {"name": "PAGCP", "source": "Ye et al., TPAMI 2023, §3", "settings": settings.to_dict(),
                      "oracle": {"watched_tasks": list(cfg.watch) or [t.name for t in data.tasks],
                                 "val_images": min(ORACLE_VAL_IMAGES, len(data.val_x)),
                                 "bn_recalibration_images": 0 if oracle.recal_x is None else len(oracle.recal_x),
                                 "evaluations": oracle.calls,
                                 **({"trial_finetune_steps": oracle.trial_steps_run,
                                     "trial_finetune_steps_requested": cfg.trial_steps,
                                     "trial_finetune_s": oracle.adapt_s,
                                     "trial_finetune_source": "NetAdapt, Yang et al., ECCV 2018, §3.2 (short-term "
                                                              "fine-tune), against a fine-tuned control"}
                                    if cfg.trial_steps else {}),
                                 **({"taylor_images": len(oracle.grad_x),
                                     "taylor_split": "train" if data.train_x is not None else "val",
                                     "taylor_backward_passes": oracle.backward_passes,
                                     "taylor_batch": TAYLOR_BATCH,
                                     "taylor_source": "Molchanov et al., CVPR 2019, §3 (per task, normalized, max)"}
                                    if cfg.importance == "taylor" else {})},
                      "passes": result.passes, "stopped_by": result.stopped_by, "recoveries": result.recoveries,
                      "recovery_epochs": cfg.recovery_epochs, "prune_s": prune_s,
                      "reference_losses": result.reference_losses},
        "steps": [s.to_dict() for s in result.steps],
        "channels": {"before": conv_widths(reference), "after": conv_widths(result.model)},
        "macs_before": result.macs_before, "macs_after": result.macs_after,
        "params_before": result.params_before, "params_after": result.params_after,
        "flops_reduction": result.flops_reduction,
        "flops_target_met": None if cfg.flops_target is None else result.flops_reduction >= cfg.flops_target,
        "finetune": {"epochs": epochs, "lr": FINETUNE_LR, "kd_weight": cfg.kd_weight,
                     "task_weights": multitask.loss_weights(data.tasks, cfg.task_weights),
                     **({"kd_source": "Hinton et al. 2015, §2 (temperature 1), from the unpruned model"}
                        if cfg.kd_weight else {})},
        "metrics": {"reference": before, "pruned_before_finetune": after_prune, "pruned": after},
        "drops": {"val": _drops(data.tasks, before, after, "val"), "test": _drops(data.tasks, before, after, "test")},
        "latency": latency, "target": {**target.describe(), "recipe": "fp32"},
    }


def _gate(cfg: PruneConfig, report: dict) -> dict | None:
    if not cfg.max_task_drop:
        return None
    drops = report["drops"]["val"]
    met = all(drops[k] <= v for k, v in cfg.max_task_drop.items())
    return {"limits": dict(cfg.max_task_drop), "val_drops": drops, "met": met, "split": "val",
            "failed": [k for k, v in cfg.max_task_drop.items() if drops[k] > v]}


def _publish(out: Path, report: dict, paths: dict, reference, pruned, data: TaskData, save_torch: bool,
             chosen_role: str = "pruned") -> None:
    """Reference and pruned ONNX under artifacts/cpu-ort/<id>/ (+ safetensors to rebuild the built-in model in
    PyTorch), and a manifest."""
    import onnxruntime as ort

    from edgec.compile.package import publish_model, sha256_file, write_atomic
    from edgec.search.multitask import save_multitask

    artifacts = []
    for role, net in (("reference", reference), ("pruned", pruned)):
        widths = conv_widths(net)
        mid = model_id(widths, role)
        dest = out / "artifacts" / "cpu-ort" / mid
        meta = {"edgec_role": role, "edgec_conv_widths": widths, "edgec_outputs": list(data.output_names)}
        add = (lambda folder, n=net: save_multitask(n, folder, {"dataset": data.name})) if save_torch else None
        model_path = publish_model(paths[role], dest, meta, add_files=add)
        sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
        lat = report["latency"][role]
        metrics = report["metrics"][role]["test"]
        artifacts.append({"id": mid, "role": role, "chosen": role == chosen_role, "target": "cpu-ort",
                          "recipe": "fp32",
                          "path": str(model_path.relative_to(out)), "sha256": sha256_file(model_path),
                          "size_bytes": model_path.stat().st_size,
                          "input": {"name": "input", "shape": ["batch", *data.input_shape], "dtype": "float32",
                                    "preprocessing": data.provenance.get("preprocessing", "")},
                          "outputs": [{"name": o.name, "shape": o.shape, "dtype": "float32"}
                                      for o in sess.get_outputs()],
                          "macs": report["macs_before" if role == "reference" else "macs_after"],
                          "test_metrics": {t.name: {t.metric: metrics[t.name][t.metric]} for t in data.tasks},
                          "latency": {"p50_ms": lat["p50_ms"], "kind": lat["kind"], "target": "cpu-ort",
                                      "batch": 1, "threads": lat["threads"]}})
    report["artifacts"] = artifacts
    write_atomic(out / "manifest.json", json.dumps({"schema_version": 1, "job": "prune",
                                                    "artifacts": artifacts}, indent=2))
