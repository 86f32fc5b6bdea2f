"""The main job: search → compile → measure → publish, as ``edgec compile`` runs it.

The loop "ask a candidate → compile it → measure it on the target → tell the
result" lives here, so the search (``edgec.search``) knows no runtime and the
targets (``edgec.targets``) know no search. The first ``--target`` is searched and
chosen on; after the search the Pareto front and the reference are built with every
target's recipe, measured there and published per target (:func:`_publish`).
:mod:`edgec.onnx_input` reuses the same search loop and publishing for a user's ONNX model.

Where the work runs is the executor's business (:mod:`edgec.executor`: in this process, or Ray tasks
on nodes that have the devices); the search asks :data:`EVAL_BATCH` candidates at a time either way
and stays the single writer of the study. Every artifact passes :func:`publication_gate` before it
is published.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable


import edgec
from edgec.config import CompileConfig
from edgec.data import Dataset, load_dataset
from edgec.errors import ConfigError, EdgecError, ModelError, NoQualifyingCandidate, OutputDirError
from edgec.executor import InProcessExecutor, open_executor
from edgec.records import Artifact, Evaluation
from edgec.rundir import EvaluationStore, RunDir
from edgec.search.pareto import pareto_front
from edgec.search.space import Candidate, QuantPolicy, SupernetSpec, fbnet_space
from edgec.search.strategy import NSGA2Search, RandomSearch, make_candidate, shown_url
from edgec.targets import Target, open_target

# Supernet training per dataset (seed comes from the config). Measured on 2 cores:
# digits ≈ 125 s (25 epochs); fashion-mnist ≈ 6.8 min per epoch on a quiet machine.
# lr 5e-3: on digits, over the same 200 random subnets, mean validation accuracy of the children
# rose from 96.6 % (lr 3e-3) to 97.8 % at the same cost (40 epochs at 3e-3: 98.3 %, but 2× the time).
# fashion-mnist: 6 epochs at 3e-3 left the children ≥ 1.7 points below the largest subnet.
DEFAULT_TRAINING = {
    "digits": {"epochs": 25, "batch_size": 32, "lr": 5e-3},
    "fashion-mnist": {"epochs": 8, "batch_size": 128, "lr": 5e-3},
}
# Settings that change what a resumed run would compute; the rest (budgets, drop) may change on --resume.
RESUME_KEYS = ("model", "dataset", "data_dir", "target", "objective", "seed", "strategy", "population_size", "threads",
               "train_epochs", "calibration_images", "input_shape", "dataset_fingerprint")
PARITY_IMAGES = 64
EVAL_BATCH = 4  # proposals asked, evaluated (in parallel under Ray) and told together; the same for every executor
REMEASURE_ROUNDS = 3  # interleaved latency rounds over the finalists before choosing
# Publication gate (every artifact, on the target it is built for, just before it is published):
GATE_MAX_QUALITY_GAP_PP = 0.5   # the file's validation quality, computed again, vs the search's figure
# top-1 agreement of the device's outputs with the emulation (where emulated). The two round differently,
# so near-ties flip (CI saw 14 of 16 on a 1-epoch digits supernet at 44 % accuracy); a device that
# computes something else agrees far less.
GATE_MIN_DEVICE_AGREEMENT = 0.75
DEVICE_CHECK_SAMPLES = 16  # test images run on a device whose accuracy was emulated (the HTP simulator: ~0.2 s each)


@dataclass
class RunResult:
    out: Path
    reference: Evaluation
    evaluations: list[Evaluation]
    front_ids: list[str]
    chosen: Evaluation | None
    artifacts: list[Artifact]
    report: dict


class Progress:
    """Callbacks the CLI turns into progress bars; the default does nothing."""

    def stage(self, name: str, total: int | None = None) -> None: ...
    def advance(self, done: int, total: int | None = None, note: str = "") -> None: ...
    def log(self, text: str) -> None: ...


def cache_root() -> Path:
    """Where trained supernets are cached: ``$EDGEC_CACHE_DIR`` or ``~/.cache/edgec``."""
    env = os.environ.get("EDGEC_CACHE_DIR")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edgec"


def supernet_spec(ds: Dataset) -> SupernetSpec:
    """The built-in supernet's space for ``ds``'s images and classes."""
    c, h, _ = ds.input_shape
    return fbnet_space(c, h, ds.num_classes)


def get_supernet(ds: Dataset, cfg: CompileConfig, progress: Progress):
    """The trained supernet for ``ds``: from the cache when its key matches, else trained and cached."""
    from edgec.search.train import TrainSettings, cache_key, load_checkpoint, save_checkpoint, train_supernet

    spec = supernet_spec(ds)
    defaults = DEFAULT_TRAINING[ds.name]
    settings = TrainSettings(epochs=cfg.train_epochs or defaults["epochs"], batch_size=defaults["batch_size"],
                             lr=defaults["lr"], seed=cfg.seed)
    key = cache_key(spec, settings, ds.train_x, ds.train_y)
    folder = cache_root() / "supernets" / f"{ds.name}-{key}"
    info = {"cache_dir": str(folder), "cache_key": key, "train": settings.to_dict(), "spec": spec.to_dict()}
    if (folder / "supernet.json").is_file():
        try:
            net, meta = load_checkpoint(folder)
        except ModelError as e:  # our own cache, damaged: train again and overwrite it
            progress.log(f"supernet cache unusable ({e.why}); retraining")
        else:
            progress.log(f"supernet: cached ({folder})")
            return net, {**info, "cached": True, "train_s": meta.get("train_s")}
    try:  # fail before a long training, not after it
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        raise ConfigError(f"cannot write the supernet cache {folder}", e.strerror or str(e),
                          "set EDGEC_CACHE_DIR to a writable folder") from None
    partial = folder / "partial"  # per-epoch training state: a killed training resumes, not restarts
    resuming = (partial / "state.json").is_file()
    progress.stage(f"{'resuming' if resuming else 'training'} supernet on {ds.name} ({settings.epochs} epochs)", None)
    t0 = time.perf_counter()
    net = train_supernet(spec, ds.train_x, ds.train_y, settings, state_dir=partial,
                         on_step=lambda step, total, loss: progress.advance(step, total, f"loss {loss:.3f}"))
    train_s = time.perf_counter() - t0
    save_checkpoint(net, settings, folder, extra={"train_s": train_s, "dataset": ds.name, "resumed": resuming})
    shutil.rmtree(partial, ignore_errors=True)
    return net, {**info, "cached": False, "train_s": train_s}


class TargetBuilder:
    """What every evaluator shares: where a candidate's model for the target lives, building it from
    an FP32 ONNX file with the target's recipe, and the manifest's input spec.

    Files: ``models_dir/<id>/<target>.onnx`` (+ ``<target>.io.json`` when the recipe quantizes the
    model's I/O).
    """

    target: Target
    models_dir: Path
    cfg: CompileConfig
    finetuned: "FinetunedWeights | None" = None  # set after the search when --finetune-epochs is on

    def is_finetuned(self, subnet) -> bool:
        """Whether models of ``subnet`` are built from this run's fine-tuned weights."""
        return self.finetuned is not None and self.finetuned.has(subnet)

    def folder(self, candidate: Candidate) -> Path:
        """Where the candidate's models are built: ``models_dir/<id>/``, or ``models_dir/<id>/finetuned/`` once
        its architecture has fine-tuned weights (so a resumed run without fine-tuning never ships them)."""
        if self.is_finetuned(candidate.subnet):
            return self.models_dir / candidate.id / "finetuned"
        return self.models_dir / candidate.id

    def model_path(self, candidate: Candidate) -> Path:
        return self.folder(candidate) / f"{self.target.name}.onnx"

    def io_params(self, candidate: Candidate) -> dict | None:
        """The quantized-I/O parameters of the candidate's model for this target, if its I/O is quantized."""
        path = self.model_path(candidate).with_suffix(".io.json")
        return json.loads(path.read_text()) if path.is_file() else None

    def _build(self, candidate: Candidate, fp32: Path, calib_x) -> Path:
        from edgec.compile.recipes import build

        path = self.model_path(candidate)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.onnx")
        io = build(self.target.recipe, fp32, tmp, candidate.policy.int8_layers(), calib_x[:self.cfg.calibration_images])
        io_path = path.with_suffix(".io.json")
        if io is not None:
            io_path.write_text(json.dumps(io))
        else:
            io_path.unlink(missing_ok=True)
        os.replace(tmp, path)
        return path

    def outputs(self, candidate: Candidate, x):
        """The compiled model's first output on ``x`` (N, ...) float32: from the target's runtime where
        it runs whole splits (``Target.predict``), else ONNX Runtime's CPU kernels on the same graph
        (for the HTP: an emulation of its QDQ arithmetic, inputs/outputs (de)quantized as an app would)."""
        from edgec.compile.accuracy import onnx_logits

        out = self.target.predict(self.model_path(candidate), x)
        if out is None:
            out = onnx_logits(self.model_path(candidate), x, threads=self.cfg.threads, io=self.io_params(candidate))
        return out

    def device_check(self, candidate: Candidate, x, emulated) -> dict | None:
        """For a target whose outputs were emulated on the CPU (the HTP), run ``x`` (a few samples)
        on the device itself and compare with ``emulated`` (their emulated outputs)."""
        import numpy as np

        from edgec.compile.qnn import QuantizedIO

        io = self.io_params(candidate)
        qio = QuantizedIO(**io) if io else None
        out = self.target.run(self.model_path(candidate), qio.quantize_input(x) if qio else x,
                              self.folder(candidate) / "device-check")
        if out is None:  # a target whose accuracy comes from its own runtime needs no check
            return None
        out = qio.dequantize_output(out) if qio else out
        diff = float(np.max(np.abs(out - emulated[:len(x)])))
        return {"samples": len(x), "top1_agreement": float(np.mean(np.argmax(out, 1) == np.argmax(emulated[:len(x)], 1))),
                "max_abs_diff": diff, "max_diff_output_steps": diff / io["output_scale"] if io else None,
                "against": "onnxruntime-cpu emulation of the same graph"}

    def _input_spec(self, io: dict | None, name: str, shape: tuple, preprocessing: str, output: dict) -> dict:
        batch = 1 if self.target.static_batch else "batch"
        if io:  # the float preprocessing comes first, then the quantization the graph expects at its input
            preprocessing = f"{preprocessing}, then quantized to {io['input_dtype']} as quantized_io says"
        spec = {"name": name, "shape": [batch, *shape], "dtype": io["input_dtype"] if io else "float32",
                "preprocessing": preprocessing,
                "output": {**output, "dtype": io["output_dtype"] if io else "float32"}}
        if io:
            spec["quantized_io"] = {**io, "how": "q = clip(round(x / scale) + zero_point); x = (q - zero_point) * scale"}
        return spec


def runtime_precision(model: Path, policy, threads: int) -> dict:
    """Which of ``policy``'s layers ONNX Runtime's CPU provider really runs as INT8 kernels in ``model``
    (read from the optimized graph it writes: :func:`edgec.targets.latency_model.runtime_view`).
    ONNX Runtime 1.32's WeightBiasQuantization also fuses a float-weight Conv that sits between
    DequantizeLinear and QuantizeLinear — the policy's FP32 layers next to INT8 ones — so the two can
    differ; accuracy and latency are always those of what runs."""
    from edgec.targets.latency_model import runtime_view

    view = runtime_view(model, threads)
    layers = policy.to_dict()
    ran = sorted(n for n in layers if n in view.int8_nodes)
    return {"int8_layers": ran,
            "policy_fp32_run_as_int8": sorted(n for n in ran if layers[n] == "fp32"),
            "policy_int8_run_as_float": sorted(n for n, p in layers.items() if p == "int8" and n not in view.int8_nodes),
            "source": "ONNX Runtime CPU provider's optimized graph"}


class Evaluator(TargetBuilder):
    """Compiles one candidate for one target (extract → BN recalibration → ONNX → parity → the
    target's quantization recipe) and measures it there. ``fp32.onnx`` is shared by all targets."""

    def __init__(self, supernet, ds: Dataset, target: Target, models_dir: Path, cfg: CompileConfig,
                 fp32_logits: dict | None = None) -> None:
        """``fp32_logits``: a dict the evaluators of one run share, so each candidate's FP32 test logits
        (what every target's artifact is compared with) are computed once."""
        self.supernet, self.ds, self.target, self.models_dir, self.cfg = supernet, ds, target, models_dir, cfg
        self.input_shape = ds.input_shape
        self._fp32_logits = {} if fp32_logits is None else fp32_logits

    def compile(self, candidate: Candidate) -> tuple[Path, float]:
        """Write the candidate's model for the target; returns (path, parity max |diff| of the FP32 export)."""

        from edgec.compile.export import check_parity, export_onnx
        from edgec.search.supernet import extract_subnet
        from edgec.search.train import recalibrate_bn

        ds = self.ds
        folder = self.folder(candidate)
        folder.mkdir(parents=True, exist_ok=True)
        static = extract_subnet(self.supernet, candidate.subnet)
        if self.finetuned is not None:
            self.finetuned.apply(static, candidate.subnet)  # the fine-tuned weights where there are some
        static = recalibrate_bn(static, ds.train_x)
        fp32 = export_onnx(static.fused(), ds.input_shape, folder / "fp32.onnx")
        parity = check_parity(static, fp32, ds.val_x[:PARITY_IMAGES])
        return self._build(candidate, fp32, ds.train_x), parity

    def accuracy(self, candidate: Candidate, x, y) -> float:
        """Top-1 in [0, 1] of the compiled model (see :meth:`outputs` for where it runs)."""
        import numpy as np

        return float(np.mean(np.argmax(self.outputs(candidate, x), axis=1) == y)) if len(x) else 0.0

    def search_quality(self, candidate: Candidate) -> float:
        """What :meth:`evaluate` records as ``val_accuracy``, computed again from the model file."""
        return self.accuracy(candidate, self.ds.val_x, self.ds.val_y)

    @property
    def data_name(self) -> str:
        return self.ds.name

    def test_quality(self, candidate: Candidate) -> tuple[float, dict]:
        """(test accuracy, {"fidelity": …, "device_check": …}) of the compiled model: reported for
        published models, never used to choose. Fidelity is against the candidate's own FP32 model
        on the test split (:func:`edgec.compile.source.fidelity`); the device check runs
        :data:`DEVICE_CHECK_SAMPLES` test images on a device whose outputs were emulated."""
        import numpy as np

        from edgec.compile.accuracy import onnx_logits
        from edgec.compile.source import fidelity

        ds = self.ds
        logits = self.outputs(candidate, ds.test_x)
        fp32 = self.folder(candidate) / "fp32.onnx"
        if not fp32.is_file():
            self.compile(candidate)
        if candidate.id not in self._fp32_logits:
            self._fp32_logits[candidate.id] = onnx_logits(fp32, ds.test_x, threads=self.cfg.threads)
        quality = {"fidelity": {**fidelity(self._fp32_logits[candidate.id], logits),
                                "against": "the candidate's FP32 model (onnxruntime-cpu)", "on": "test split",
                                "computed_with": self.target.accuracy_backend}}
        check = self.device_check(candidate, ds.test_x[:DEVICE_CHECK_SAMPLES], logits)
        if check:
            quality["device_check"] = check
        if self.target.name == "cpu-ort":
            quality["runtime_precision"] = runtime_precision(self.model_path(candidate), candidate.policy,
                                                             self.cfg.threads)
        return float(np.mean(np.argmax(logits, axis=1) == ds.test_y)), quality

    def input_spec(self, io: dict | None) -> dict:
        """The manifest's input/output description of this target's model (quantized I/O included)."""
        batch = 1 if self.target.static_batch else "batch"
        return self._input_spec(io, "input", self.ds.input_shape, self.ds.provenance["preprocessing"],
                                {"name": "logits", "shape": [batch, self.ds.num_classes]})

    def evaluate(self, candidate: Candidate, role: str = "search") -> Evaluation:
        t0 = time.perf_counter()
        path, parity = self.compile(candidate)
        val_acc = self.accuracy(candidate, self.ds.val_x, self.ds.val_y)
        compile_s = time.perf_counter() - t0
        latency = self.target.measure_latency(path, self.ds.input_shape, batch=1)
        return Evaluation(candidate, self.target.name, val_acc, latency, path.stat().st_size, parity, compile_s,
                          edgec.__version__, role)


def select_chosen(evals: list[Evaluation], front_ids: list[str], reference: Evaluation, cfg: CompileConfig,
                  published_size: dict[str, int] | None = None) -> tuple[Evaluation | None, dict]:
    """The lowest-p50 Pareto candidate within the accuracy drop and budgets (validation split only).

    ``published_size`` (candidate id → bytes of the published file, provenance included) is what the
    size budget is checked against when given; otherwise the compiled model's size.
    """
    sizes = published_size or {}
    min_acc = reference.val_accuracy - cfg.max_accuracy_drop / 100.0
    accurate = [e for e in evals if e.candidate_id in front_ids and e.val_accuracy >= min_acc - 1e-12]
    qualified = [e for e in accurate
                 if (cfg.latency_budget_ms is None or e.latency.p50_ms <= cfg.latency_budget_ms)
                 and (cfg.size_budget_kb is None or sizes.get(e.candidate_id, e.size_bytes) <= cfg.size_budget_kb * 1024)]
    chosen = min(qualified, key=lambda e: (e.objectives()[1], e.size_bytes)) if qualified else None
    lowest = ("lowest max over targets of p50 / the reference's p50 there (--objective max-latency; "
              "measured in the search)" if cfg.objective == "max-latency" else "lowest p50")
    rule = {"rule": f"{lowest} on the Pareto front with val_accuracy ≥ reference − max_accuracy_drop "
                    "and within the latency/size budgets; the finalists' latency is re-measured side by side "
                    f"({REMEASURE_ROUNDS} interleaved rounds, median) before choosing; the test split is never "
                    "used to choose; the size budget applies to the published file",
            "min_val_accuracy": min_acc, "max_accuracy_drop_pp": cfg.max_accuracy_drop,
            "latency_budget_ms": cfg.latency_budget_ms, "size_budget_kb": cfg.size_budget_kb,
            "within_accuracy": len(accurate), "qualified": len(qualified)}
    return chosen, rule


class FinetunedWeights:
    """The fine-tuned weights of a run's architectures: ``study/finetuned/<arch>.safetensors``, where
    ``<arch>`` is the first 12 hex digits of the SHA-256 of the subnet's JSON; each file's metadata is
    ``meta`` (the fine-tuning settings and the supernet's cache key), or ``metas[<arch>]`` for an architecture
    fine-tuned with other settings (the reference, under ``--finetune-child-epochs``), so weights from other
    settings or another supernet are never loaded. ``only``: the architecture keys this run fine-tuned; other
    files in the folder (left by an earlier attempt of a resumed run whose bisection went elsewhere) are ignored."""

    def __init__(self, folder: Path, meta: dict, only: frozenset[str] | None = None,
                 metas: dict[str, dict] | None = None) -> None:
        self.folder, self.meta, self.only, self.metas = folder, meta, only, dict(metas or {})

    def restricted(self, subnets) -> "FinetunedWeights":
        """The same weights, used only for ``subnets``."""
        return FinetunedWeights(self.folder, self.meta, frozenset(self.key(s) for s in subnets), self.metas)

    def meta_of(self, subnet) -> dict:
        """The metadata ``subnet``'s weights file must carry."""
        return self.metas.get(self.key(subnet), self.meta)

    @staticmethod
    def key(subnet) -> str:
        return hashlib.sha256(json.dumps(subnet.to_dict(), sort_keys=True).encode()).hexdigest()[:12]

    def path(self, subnet) -> Path:
        return self.folder / f"{self.key(subnet)}.safetensors"

    def has(self, subnet) -> bool:
        """Whether ``subnet`` has fine-tuned weights here (of these settings, checked when loaded)."""
        return (self.only is None or self.key(subnet) in self.only) and self.path(subnet).is_file()

    def apply(self, static, subnet) -> bool:
        """Load the fine-tuned weights of ``subnet`` into ``static`` (its extracted net); False if none."""
        from edgec.search.train import load_weights

        return self.has(subnet) and load_weights(static, self.path(subnet), self.meta_of(subnet))

    def save(self, static, subnet, record: dict | None = None) -> None:
        from edgec.search.train import save_weights

        save_weights(static, self.path(subnet), self.meta_of(subnet), record)

    def record_of(self, subnet) -> dict:
        """What :meth:`save` stored with ``subnet``'s weights: ``kept`` (whether they are fine-tuned, or the
        supernet's kept because fine-tuning did not raise the accuracy) and the accuracies before and after."""
        from edgec.search.train import weights_record

        return weights_record(self.path(subnet)) if self.has(subnet) else {}

    @classmethod
    def of_run(cls, out: Path, report: dict) -> "FinetunedWeights | None":
        """The weights a finished run in ``out`` published with (None when it fine-tuned nothing)."""
        info = report.get("finetune")
        if not info:
            return None
        return cls(out / "study" / "finetuned", info["weights_meta"],
                   frozenset(a["arch"] for a in info["architectures"] if a.get("kept", True)),
                   info.get("weights_meta_by_arch"))


def finetune_pool(spec: SupernetSpec, evals: list[Evaluation]) -> list:
    """The architectures :func:`finetune_front` may fine-tune: the Pareto front of the search's architectures
    over (validation accuracy with the supernet's weights ↑, fastest measured p50 of any of its policies ↓),
    fastest first, the largest left out (it is the reference). Each appears once."""
    best: dict = {}
    for e in evals:
        arch = e.candidate.subnet
        if arch == spec.largest():
            continue
        acc, p50 = best.get(arch, (-1.0, float("inf")))
        best[arch] = (max(acc, e.val_accuracy), min(p50, e.objectives()[1]))
    archs = list(best)
    front = pareto_front([(best[a][0], best[a][1]) for a in archs], maximize=[True, False])
    return sorted((archs[i] for i in front), key=lambda a: (best[a][1], -best[a][0]))


def bisect_fastest(n: int, budget: int, qualifies: Callable[[int], bool]) -> list[tuple[int, bool]]:
    """Binary search for the lowest index in ``range(n)`` (items sorted fastest first) for which
    ``qualifies`` holds, assuming it holds for every index above that one; at most ``budget`` calls.
    Returns the (index, qualified) pairs tried, in order."""
    tried: list[tuple[int, bool]] = []
    lo, hi = 0, n - 1
    while lo <= hi and len(tried) < budget:
        mid = (lo + hi) // 2
        ok = qualifies(mid)
        tried.append((mid, ok))
        lo, hi = (lo, mid - 1) if ok else (mid + 1, hi)
    return tried


def finetune_front(cfg: CompileConfig, study: Path, supernet, supernet_info: dict, ds: Dataset, searcher,
                   evaluators: list, reference: Evaluation, evals: list[Evaluation],
                   progress: Progress) -> tuple[Evaluation, list[Evaluation], dict]:
    """``--finetune-epochs``: fine-tune the reference, then up to ``--finetune-top`` architectures of the
    search's Pareto front (:func:`finetune_pool`), each alone (:func:`edgec.search.train.finetune_subnet`): the
    reference on the labels, the others distilled from the reference, for ``--finetune-child-epochs`` (default:
    as many as the reference; a small child trains 6-25× faster than the largest, so it can afford more). A
    fine-tuning is kept only when it raises the architecture's FP32 validation accuracy (else the supernet's
    weights stay), so neither the bar, the teacher nor any architecture is lowered by it.

    The architectures are picked by bisection over the front, fastest first: fine-tune the middle one; if its
    validation accuracy (PyTorch, FP32) is then within ``--max-accuracy-drop`` of the reference's,
    look among the faster half, else among the slower. Fine-tuning reorders the front (a child that sat
    6 points below the largest with shared weights came within 0.2 of it), so the supernet's accuracies
    cannot say how fast a qualifying model can be; the bisection finds the fastest that qualifies in
    log2(front) fine-tunings, assuming that faster architectures of the front do not fine-tune better.

    Every evaluation of a fine-tuned architecture, the reference's included (e.g. its INT8 form), is then
    compiled and measured again with the fine-tuned weights (role ``finetuned``; the reference keeps its
    role; these are not stored, so ``--resume`` measures them again), together with its all-FP32 and all-INT8
    policies when the search had not tried them (a tiny model's FP32 form is often its fastest on a CPU);
    every later build of them (publishing, other targets) uses the new weights. Weights are kept in
    ``study/finetuned/`` so a resumed run does not train them again. Returns (reference, evaluations with
    the new ones appended, the report's ``finetune`` section: each step of the bisection and each candidate's
    validation accuracy before (None for a policy the search had not tried) and after)."""
    from edgec.search.supernet import extract_subnet
    from edgec.search.train import FinetuneSettings, finetune_subnet, predict_logits, recalibrate_bn

    spec = supernet.spec
    ref_settings = FinetuneSettings(epochs=cfg.finetune_epochs, seed=cfg.seed)
    settings = FinetuneSettings(epochs=cfg.finetune_child_epochs or cfg.finetune_epochs, seed=cfg.seed)
    cache_key = supernet_info.get("cache_key")
    weights = FinetunedWeights(study / "finetuned", {"finetune": settings.to_dict(), "supernet": cache_key},
                               metas={FinetunedWeights.key(spec.largest()): {"finetune": ref_settings.to_dict(),
                                                                             "supernet": cache_key}})
    pool = finetune_pool(spec, evals)
    budget = min(cfg.finetune_top, len(pool))
    per_epoch = max(1, len(ds.train_x) // settings.batch_size)
    steps = [ref_settings.epochs * per_epoch] + [settings.epochs * per_epoch] * budget  # of each fine-tuning
    total = sum(steps)
    epochs = (f"{settings.epochs} epochs each" if settings == ref_settings
              else f"{ref_settings.epochs} epochs for the reference, {settings.epochs} for the others")
    progress.stage(f"fine-tuning the reference and up to {budget} of {len(pool)} Pareto architecture(s) "
                   f"(bisection), {epochs}", total)
    teacher, done = None, 0
    remembered = ("val_accuracy_fp32_before", "val_accuracy_fp32_tuned", "kept")  # stored with each weights file

    def val_accuracy(net) -> float:
        return float((predict_logits(net, ds.val_x).argmax(1) == ds.val_y).mean())

    def tune(arch) -> tuple[float, dict]:
        """Fine-tune ``arch`` (or load its stored weights); its validation accuracy (FP32) and its record.
        The fine-tuning is kept only when it raises that accuracy (else the supernet's weights are stored in
        its place: the reference's bar and teacher, and no architecture, get worse by it)."""
        nonlocal teacher, done
        i = done
        static = extract_subnet(supernet, arch)
        t0 = time.perf_counter()
        cached = weights.apply(static, arch)
        record: dict = {"arch": weights.key(arch), "subnet": arch.to_dict(), "cached": cached}
        static = recalibrate_bn(static, ds.train_x)  # in place; the stored weights carry these statistics
        accuracy = val_accuracy(static)
        if cached:
            stored = weights.record_of(arch)  # whether the stored weights are fine-tuned or the supernet's kept
            record.update({k: stored[k] for k in remembered if k in stored})
            progress.log(f"fine-tuning: {'the reference' if i == 0 else weights.key(arch)}'s stored weights "
                         "are used (not trained again)")
        else:
            original = {k: v.clone() for k, v in static.state_dict().items()}
            finetune_subnet(static, ds.train_x, ds.train_y, ref_settings if i == 0 else settings,
                            teacher_logits=teacher,
                            on_step=lambda step, _, loss: progress.advance(sum(steps[:i]) + step, total,
                                                                           f"loss {loss:.3f}"))
            tuned = val_accuracy(recalibrate_bn(static, ds.train_x))
            record.update(val_accuracy_fp32_before=accuracy, val_accuracy_fp32_tuned=tuned, kept=tuned > accuracy)
            if record["kept"]:
                accuracy = tuned
            else:
                static.load_state_dict(original)
                progress.log(f"fine-tuning: {'the reference' if i == 0 else weights.key(arch)}'s validation "
                             f"accuracy did not rise ({accuracy * 100:.2f} → {tuned * 100:.2f} %); it keeps the "
                             "supernet's weights")
            weights.save(static, arch, {k: record[k] for k in remembered})
        done += 1
        progress.advance(sum(steps[:done]), total)
        if teacher is None:
            teacher = predict_logits(static, ds.train_x)
        return accuracy, {**record, "train_s": None if cached else time.perf_counter() - t0,
                          "val_accuracy_fp32": accuracy,
                          "teacher": "labels" if i == 0 else "the reference (KD) + labels"}

    ref_accuracy, ref_record = tune(spec.largest())
    bar = ref_accuracy - cfg.max_accuracy_drop / 100
    trained = [ref_record]

    def qualifies(index: int) -> bool:
        accuracy, record = tune(pool[index])
        trained.append({**record, "qualifies": accuracy >= bar})
        return accuracy >= bar

    archs = [pool[i] for i, _ in bisect_fastest(len(pool), budget, qualifies)]
    progress.advance(total, total)  # the bisection may end before its budget
    # only the architectures whose fine-tuning was kept get new weights (the others keep the supernet's, and
    # their models and figures stay the search's); a file stored before records existed counts as kept
    tuned = {a for a, r in zip([spec.largest(), *archs], trained) if r.get("kept", True)}
    for ev in evaluators:
        ev.finetuned = weights.restricted(tuned)
    todo = [reference] + [e for e in evals if e.candidate.subnet in tuned and e.candidate_id != reference.candidate_id]
    known = {e.candidate_id for e in todo}
    extra = []
    for arch in archs:
        for policy in (QuantPolicy(), QuantPolicy.uniform(spec.layers_of(arch), "int8")):
            candidate = make_candidate(spec, arch, policy)
            if candidate.id not in known:
                known.add(candidate.id)
                extra.append(candidate)
    progress.stage(f"evaluating {len(todo) + len(extra)} candidate(s) after fine-tuning", len(todo) + len(extra))
    after = {}
    for i, item in enumerate([*todo, *extra], 1):
        # the reference first: under --objective max-latency it sets the denominators anew
        candidate = item.candidate if isinstance(item, Evaluation) else item
        role = ("reference" if item is reference else "finetuned" if candidate.subnet in tuned
                else "search")  # a new policy of an architecture that kept the supernet's weights
        after[candidate.id] = searcher.evaluate(candidate, role)
        progress.advance(i, len(todo) + len(extra), candidate.id)
    info = {"epochs": ref_settings.epochs, "child_epochs": settings.epochs, "settings": ref_settings.to_dict(),
            "child_settings": settings.to_dict(), "weights_meta": weights.meta, "weights_meta_by_arch": weights.metas,
            "folder": str(weights.folder), "architectures": trained, "pool": len(pool),
            "bar_val_accuracy_fp32": bar,
            "rule": f"the reference, then up to {budget} of the search's {len(pool)} Pareto architecture(s), "
                    f"picked by bisection for the fastest whose FP32 validation accuracy comes within "
                    f"{cfg.max_accuracy_drop} points of the reference's (fine-tuned when that raised it); every "
                    "evaluation of those whose fine-tuning was kept measured again (and the reference, always), "
                    "with all-FP32 and all-INT8 policies of each",
            "candidates": [{"candidate_id": e.candidate_id, "val_accuracy_before": e.val_accuracy,
                            "val_accuracy_after": after[e.candidate_id].val_accuracy,
                            "p50_ms_before": e.latency.p50_ms, "p50_ms_after": after[e.candidate_id].latency.p50_ms}
                           for e in todo]
                          + [{"candidate_id": c.id, "val_accuracy_before": None,
                              "val_accuracy_after": after[c.id].val_accuracy, "p50_ms_before": None,
                              "p50_ms_after": after[c.id].latency.p50_ms} for c in extra]}
    return (after[reference.candidate_id], [after.get(e.candidate_id, e) for e in evals] + [after[c.id] for c in extra],
            info)


class MaxLatencyEvaluator:
    """``--objective max-latency``: evaluates each candidate on every target and sets its latency
    objective to max over targets of p50 / the reference's p50 on that target — a dimensionless
    ratio, so simulated and measured latencies are never added or compared with each other. The
    reference (evaluated first) defines the denominators; accuracy is the primary target's."""

    def __init__(self, evaluators: list) -> None:
        self.evaluators = evaluators
        self.target, self.models_dir = evaluators[0].target, evaluators[0].models_dir
        self._reference_p50: dict[str, float] = {}

    def model_path(self, candidate: Candidate) -> Path:
        return self.evaluators[0].model_path(candidate)

    def use_reference(self, reference: Evaluation) -> None:
        """Take the denominators from a stored reference (a resumed run)."""
        self._reference_p50 = {name: float(st["p50_ms"]) for name, st in reference.latency_by_target.items()}

    def evaluate(self, candidate: Candidate, role: str = "search") -> Evaluation:
        results = [ev.evaluate(candidate, role) for ev in self.evaluators]
        by_target = {r.target: r.latency for r in results}
        if role == "reference":
            self._reference_p50 = {name: st.p50_ms for name, st in by_target.items()}
        assert self._reference_p50, "the reference is evaluated (or replayed with use_reference) first"
        objective = max(st.p50_ms / self._reference_p50[name] for name, st in by_target.items())
        return replace(results[0], latency_by_target={n: st.to_dict() for n, st in by_target.items()},
                       latency_objective=objective)


def open_targets(cfg: CompileConfig) -> list[Target]:
    """The primary target then ``also_targets``, each checked available (one-line TargetError if not)."""
    targets = [open_target(name, cfg.threads, npu_cpu_fallback=cfg.npu_cpu_fallback)
               for name in (cfg.target, *cfg.also_targets)]
    for t in targets:
        t.require_available()
    return targets


def run_compile(cfg: CompileConfig, progress: Progress | None = None) -> RunResult:
    """Run the whole job into ``cfg.out``. Raises :class:`EdgecError` subclasses for user errors and
    :class:`NoQualifyingCandidate` (after writing the report) when no candidate meets the budgets."""
    import torch

    progress = progress or Progress()
    targets = open_targets(cfg)
    closers: list = list(targets)  # targets and the executor, closed however the run ends
    try:  # what can be refused without any work is refused before the run folder is touched
        ds = load_dataset(cfg.dataset, cfg.data_dir)
        if cfg.storage:
            open_storage(cfg, supernet_spec(ds))
        if cfg.executor == "ray":
            progress.stage(f"connecting to Ray at {cfg.ray_address}" if cfg.ray_address else "starting a local Ray",
                           None)
        executor = open_executor(cfg.executor, cfg.ray_address, [t.name for t in targets], cfg.threads)
        closers.append(executor)
    except BaseException:
        for c in closers:
            c.close()
        raise
    with RunDir(Path(cfg.out), resume=cfg.resume, force=cfg.force) as run:
        try:
            check_resume(run, {**cfg.to_dict(), "dataset_fingerprint": ds.fingerprint()}, RESUME_KEYS, cfg.resume)
            torch.set_num_threads(cfg.threads)
            supernet, supernet_info = get_supernet(ds, cfg, progress)
            spec: SupernetSpec = supernet.spec
            store = EvaluationStore(run.study / "evaluations.jsonl", validate=_check_record)
            if store.skipped:
                progress.log(f"{store.skipped} damaged line(s) in {store.path} ignored; those candidates are re-evaluated")
            stored = len(store.records) - (1 if store.get(make_candidate(spec, spec.largest(), QuantPolicy()).id) else 0)
            if cfg.resume:
                retried = [cid for cid, rec in store.records.items() if "failed" in rec]
                for cid in retried:  # a failure may have been the machine's (a full disk, a killed worker)
                    del store.records[cid]
                progress.log(f"resuming: {len(store.records)} evaluation(s) stored in {store.path} are replayed, "
                             f"not repeated" + (f"; {len(retried)} failed one(s) are tried again" if retried else ""))
            if cfg.resume and cfg.budget_evals < stored:
                raise ConfigError(f"--budget-evals {cfg.budget_evals} is below the {stored} evaluations already stored",
                                  "--resume continues a search, it cannot shrink it",
                                  f"pass --budget-evals {stored} or more")
            fp32_logits: dict = {}
            evaluators = [Evaluator(supernet, ds, t, run.study / "models", cfg, fp32_logits) for t in targets]
            searcher = MaxLatencyEvaluator(evaluators) if cfg.objective == "max-latency" else evaluators[0]
            executor.bind({"supernet": supernet, "dataset": ds, "config": cfg})
            reference, evals, failed, searched = _search(cfg, spec, store, searcher, progress, executor)
            searched["executor"] = executor.info()
            model_info = {"supernet": supernet_info}
            if cfg.finetune_epochs:
                reference, evals, model_info["finetune"] = finetune_front(
                    cfg, run.study, supernet, supernet_info, ds, searcher, evaluators, reference, evals, progress)
            context = {"dataset_info": {"name": ds.name, "fingerprint": ds.fingerprint(), **ds.provenance},
                       "model_info": model_info, "search_info": searched}
            if targets[0].recipe.startswith("qnn-"):  # the HTP has no FP32 path: "FP32" layers get 16-bit activations
                context["reference_description"] = "largest subnet, all layers at 16-bit activations"
            result = _publish(cfg, run.path, evaluators, reference, evals, failed, progress, context, executor)
            if cfg.prune_flops_target:
                result.report["pruning"] = prune_chosen(cfg, run.path, supernet, ds, result.chosen, progress)
                from edgec.compile.package import write_atomic
                from edgec.report import pruning_html

                write_atomic(run.path / "report.json", json.dumps(result.report, indent=2))
                page = (run.path / "report.html").read_text()
                write_atomic(run.path / "report.html",
                             page.replace("</body>", pruning_html(result.report["pruning"]) + "</body>", 1))
            return result
        finally:
            for c in closers:
                c.close()


def prune_chosen(cfg: CompileConfig, out: Path, supernet, ds: Dataset, chosen: Evaluation, progress: Progress) -> dict:
    """The PAGCP pass of ``edgec compile --prune-flops-target``: the chosen subnet, in FP32 with its own
    batch norms, pruned under its validation loss (one classification task), fine-tuned, exported and
    measured against itself on ``cpu-ort`` into ``OUT/pruned/`` (see :mod:`edgec.prune`). Its quantization
    policy is not re-applied to the pruned model. Returns the summary stored under ``pruning`` in report.json."""
    from edgec.prune import PruneConfig, TaskData, prune_job
    from edgec.search.multitask import Task
    from edgec.search.supernet import extract_subnet
    from edgec.search.pagcp import layers_named, output_layer_names
    from edgec.search.train import recalibrate_bn

    import torch

    static = recalibrate_bn(extract_subnet(supernet, chosen.candidate.subnet), ds.train_x)
    fixed = output_layer_names(static, torch.zeros(1, *ds.input_shape))
    data = TaskData(ds.name, (Task("classification", "classification", 0),), ("logits",), ds.train_x,
                    {"classification": ds.train_y}, ds.val_x, {"classification": ds.val_y}, ds.test_x,
                    {"classification": ds.test_y}, ds.provenance, DEFAULT_TRAINING[ds.name]["batch_size"])
    pcfg = PruneConfig(out=out / "pruned", dataset=ds.name, model=f"subnet:{chosen.candidate_id}",
                       flops_target=cfg.prune_flops_target, round_to=cfg.prune_round_to or PruneConfig.round_to,
                       threads=cfg.threads, seed=cfg.seed, force=True,
                       max_task_drop={"classification": cfg.max_accuracy_drop})
    info = {"candidate_id": chosen.candidate_id, "subnet": chosen.candidate.subnet.to_dict(),
            "policy_applied": False, "output_layers": sorted(fixed)}
    result = prune_job(pcfg, static, data, layers_named(fixed), info, progress).report
    return {"folder": "pruned", "candidate_id": chosen.candidate_id, "flops_reduction": result["flops_reduction"],
            "flops_target_met": result["flops_target_met"],
            "speedup_p50_fp32": result["latency"]["speedup_p50"], "drops_test": result["drops"]["test"],
            "drops_val": result["drops"]["val"], "within_max_accuracy_drop": result["max_task_drop"]["met"],
            "note": "FP32 subnet pruned; the chosen quantization policy is not re-applied"}


def _usable_shared(rec: dict | None, reference: Evaluation) -> bool:
    """A record from shared storage may be taken: a well-formed success, measured on the run's target,
    not of the reference (each run evaluates its own)."""
    try:
        _check_record(rec)
    except Exception:  # None, or damaged in the storage: that candidate is evaluated here instead
        return False
    return "failed" not in rec and rec.get("target") == reference.target and rec["candidate_id"] != reference.candidate_id


def _check_record(rec: dict) -> None:
    """Raise unless ``rec`` is a well-formed stored evaluation or failure of the candidate it names."""
    candidate = Candidate.from_dict(rec["candidate"])
    if candidate.id != rec["candidate_id"]:
        raise ValueError("candidate id does not match its config")
    if "failed" in rec:
        if not isinstance(rec["failed"], str):
            raise ValueError("bad failure record")
    else:
        Evaluation.from_dict(rec)


def check_resume(run: RunDir, state: dict, keys, resume: bool, job: str = "compile") -> None:
    """Refuse ``--resume`` when the stored run is another ``job`` or any of ``keys`` differs between
    ``state`` (the settings and data fingerprints that change what the run computes) and the stored
    state; then store ``state``. Used by every resumable job (image compile, ONNX input, transformers)."""
    from edgec.compile.package import write_atomic

    path = run.study / "config.json"
    state = json.loads(json.dumps({**state, "job": job}))  # tuples → lists, as stored
    if resume and (path.exists() or path.is_symlink()):  # else a run killed before it stored this: start afresh
        try:
            stored = json.loads(path.read_text())
            if not isinstance(stored, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as e:
            raise OutputDirError(f"the study state {path} is damaged", str(e),
                                 "start the run over with --force") from None
        if stored.get("job", "compile") != job:
            raise OutputDirError(f"{run.path} holds a '{stored.get('job', 'compile')}' run, not a '{job}' one",
                                 "--resume continues the same kind of run", "drop --resume or pass another --out")
        changed = [k for k in keys if stored.get(k) != state[k]]
        if changed:
            raise ConfigError(f"--resume with changed settings or data: {', '.join(changed)}",
                              "a resumed run must compute what the interrupted one did",
                              f"use the stored values (see {path}) or start a new run with --force")
    write_atomic(path, json.dumps(state, indent=2))


def _record(candidate: Candidate, result: "Evaluation | EdgecError", progress: Progress) -> dict:
    """The store's record of one evaluation's result (a failure keeps its one-line reason)."""
    if isinstance(result, EdgecError):
        progress.log(f"candidate {candidate.id} failed: {result.line()}")
        return {"candidate_id": candidate.id, "candidate": candidate.to_dict(), "failed": result.line()}
    return result.to_dict()


def _evaluate_cached(candidate: Candidate, role: str, store: EvaluationStore, evaluator,
                     progress: Progress, executor=None) -> Evaluation | str:
    """The stored evaluation of ``candidate``, or a new one (stored at once); a str is a failure reason.
    The reference's failure is raised (nothing can be compared without it)."""
    rec = store.get(candidate.id)
    if rec is None:
        (result,) = (executor or InProcessExecutor()).evaluate_many(evaluator, [candidate], role)
        if isinstance(result, EdgecError) and role == "reference":
            raise result
        rec = _record(candidate, result, progress)
        store.add(rec)
    if "failed" in rec:
        return rec["failed"]
    return Evaluation.from_dict({**rec, "role": role})


def _search(cfg, spec, store, evaluator, progress, executor=None):
    reference = _evaluate_cached(make_candidate(spec, spec.largest(), QuantPolicy()), "reference", store,
                                 evaluator, progress, executor)
    assert isinstance(reference, Evaluation)
    if isinstance(evaluator, MaxLatencyEvaluator):
        evaluator.use_reference(reference)
    int8 = QuantPolicy.uniform(spec.quantizable_layers(), "int8")
    initial = [make_candidate(spec, spec.largest(), int8), make_candidate(spec, spec.smallest(), QuantPolicy()),
               make_candidate(spec, spec.smallest(), int8)]
    # the fast end, on at most a quarter of the budget (a small search keeps room for its own proposals)
    initial += [make_candidate(spec, arch, QuantPolicy()) for arch in spec.growth_ladder()[:cfg.budget_evals // 4]]
    if cfg.strategy == "nsga2" and cfg.storage:
        run_id = _run_id(store.path.parent)
        study_name = cfg.study_name or shared_study_name(cfg, spec)
        # each search of a shared study samples with its own seed, else all would propose the same candidates
        strategy = NSGA2Search(spec, (cfg.seed + int(run_id[:8], 16)) % 2**32, cfg.population_size, initial=initial,
                               storage=cfg.storage, study_name=study_name, run_id=run_id)
        progress.log(f"search state shared in {shown_url(cfg.storage)}, study {study_name!r} "
                     f"({len(strategy.shared_records())} evaluations told there by other searches)")
    elif cfg.strategy == "nsga2":
        strategy = NSGA2Search(spec, cfg.seed, cfg.population_size, initial=initial)
    elif cfg.strategy == "linas":
        from edgec.search.linas import LINASSearch

        prior, prior_info = latency_prior(cfg, spec, evaluator, reference, progress)
        progress.log(f"LINAS latency prior: {prior_info}")
        strategy = LINASSearch(spec, cfg.seed, cfg.population_size, initial=initial, latency_prior=prior)
        strategy.prior_info = prior_info
    else:
        strategy = RandomSearch(spec, cfg.seed)
    evals, failed = search_loop(strategy, cfg.budget_evals, lambda c: c, reference, store, evaluator, progress,
                                f"searching ({cfg.strategy}, {cfg.budget_evals} evaluations on {cfg.target})",
                                executor)
    if cfg.storage:  # the run reports, chooses and publishes from the whole shared study, not its own part only
        for rec in strategy.shared_records():
            if store.get(rec["candidate_id"]) is None and _usable_shared(rec, reference):
                store.add(rec)
                evals.append(Evaluation.from_dict({**rec, "role": "search"}))
    info = search_info(cfg.strategy, strategy, evals)
    if cfg.storage:
        info["shared_storage"] = {"storage": shown_url(cfg.storage), "study_name": strategy.study.study_name,
                                  "run_id": strategy.run_id, "trials": len(strategy.study.trials),
                                  "taken_from_other_runs": sum(1 for e in evals if store.get(e.candidate_id).get(
                                      "shared_from_run"))}
    return reference, evals, failed, info


def _run_id(study: Path) -> str:
    """This run's id (``study/run_id``, made once; made anew if damaged): its trials' mark in a shared study."""
    import re
    import uuid

    path = study / "run_id"
    try:
        text = path.read_text().strip() if path.is_file() and not path.is_symlink() else ""
    except (OSError, UnicodeDecodeError):
        text = ""
    if not re.fullmatch(r"[0-9a-f]{32}", text):
        from edgec.compile.package import write_atomic

        text = uuid.uuid4().hex
        write_atomic(path, text)
    return text


def open_storage(cfg: CompileConfig, spec: SupernetSpec):
    """Open (or create) the shared study of ``--storage`` before any work, so a bad URL, an in-memory
    database or a study of other objectives is refused in one line with nothing written; returns it."""
    from edgec.search.strategy import SearchStrategy, open_shared_study

    return open_shared_study(cfg.storage, cfg.study_name or shared_study_name(cfg, spec),
                             list(SearchStrategy.directions))


def shared_study_name(cfg: CompileConfig, spec: SupernetSpec) -> str:
    """The default ``--study-name``: what searches must agree on to share one study — the dataset,
    the searched target, the supernet's space and training (the seed trains its weights) and the
    NSGA-II generation size."""
    key = hashlib.sha256(json.dumps([cfg.dataset, cfg.target, spec.to_dict(), cfg.seed, cfg.train_epochs,
                                     cfg.population_size, cfg.calibration_images], sort_keys=True).encode())
    return f"edgec-{cfg.dataset}-{cfg.target}-{key.hexdigest()[:12]}"


def latency_prior(cfg, spec, evaluator, reference: Evaluation, progress: Progress | None = None) -> tuple[list, str]:
    """LINAS's latency prior: the candidates the target's latency model was measured on (``edgec
    latency build`` for this target and dataset space; one built on another machine is validated
    here first, :func:`edgec.latency_job.trusted_model`), each as (candidate, its p50 / anchor p50 ×
    this run's reference p50 ms) — the anchor *is* the reference, the largest subnet in FP32. Empty
    (and why) when there is no usable model or the objective is not one target's p50."""
    from edgec.latency_job import LatencySettings, anchor_candidate, command_line, sample_pairs, trusted_model

    if cfg.objective != "primary":
        return [], "none (the max-latency objective is a ratio over targets, not one target's p50)"
    settings = LatencySettings(target=cfg.target, dataset=cfg.dataset, data_dir=cfg.data_dir, threads=cfg.threads)
    build = f"'{command_line('build', settings)}'"
    model, path, trust = trusted_model(settings, spec, evaluator.target, progress or Progress())
    if model is None:
        if trust.startswith("no latency model"):
            return [], f"none ({trust}; {build} makes one)"
        return [], f"none ({trust}; rebuild it with {build})"
    if model.meta.get("anchor", {}).get("candidate") != anchor_candidate(spec).to_dict():
        return [], (f"none (the latency model {path} measured its candidates next to "
                    f"{model.meta.get('anchor', {}).get('what', 'another graph')}, not this run's reference)")
    pairs, why = sample_pairs(model, path, spec)  # the model trusted_model loaded, not read again
    if why:
        return [], f"none ({why}; rebuild it with {build})"
    ref_ms = reference.latency.p50_ms
    return ([(c, ratio * ref_ms) for c, ratio in pairs],
            f"{len(pairs)} measured candidates of {path} ({trust}; ratio to the anchor × the reference's "
            f"{ref_ms:.4f} ms)")


def search_info(name: str, strategy, evals: list[Evaluation]) -> dict:
    """The report's ``search`` section: the strategy, and for each evaluated candidate which objectives
    were measured (all of them, always) and, under LINAS, what its predictors said before it was
    evaluated (``predicted_before_evaluation``; latency in the unit it was told: p50 ms)."""
    ids = {e.candidate_id for e in evals}
    info = {"strategy": name, "real_evaluations": len(evals),
            "objectives_per_candidate": {"val_accuracy": "measured", "p50_ms": "measured", "size_bytes": "measured"}}
    if name == "linas":
        info["predicted_before_evaluation"] = {  # in the objectives' own names and units
            cid: {"val_accuracy": p["val_accuracy"], "p50_ms": p["latency"], "size_bytes": p["size_bytes"]}
            for cid, p in strategy.predictions.items() if cid in ids}
        info["iterations"] = strategy.iterations  # each: fit on `measured` real evaluations, `proposed` asked
        info["latency_prior"] = strategy.prior_info
        info["note"] = ("predictions (Ridge / SVR / gradient boosting, chosen by 5-fold CV, retrained on every real "
                        "evaluation) only chose what to evaluate; every value in the evaluations and the Pareto "
                        "front is measured")
    return info


def search_loop(strategy, budget: int, to_candidate: Callable, reference: Evaluation, store: EvaluationStore,
                evaluator, progress: Progress, label: str, executor=None) -> tuple[list[Evaluation], dict[str, str]]:
    """Ask ``strategy`` for proposals until ``budget`` distinct candidates were evaluated, telling it
    each result; ``to_candidate(proposal)`` gives the :class:`Candidate` to evaluate. Returns
    (evaluations, {candidate id: failure}).

    Proposals are asked :data:`EVAL_BATCH` at a time; the batch's candidates not stored yet are
    evaluated together by ``executor`` (in parallel under Ray), stored in the order asked, then every
    proposal is told its result in that order. The batching is the same for every executor, so a
    seed gives the same search in-process and through Ray, and a resumed run replays stored results
    instead of recomputing them.

    A strategy whose state lives in shared storage (``strategy.storage``, :class:`NSGA2Search` with
    ``--storage``) is not replayed: the run's stored evaluations count toward ``budget`` from the
    start, a candidate another search already evaluated is taken from the storage
    (``strategy.shared_record``; stored with ``shared_from_run``), and every result is attached to its
    trial (``strategy.share``) for the other searches."""
    executor = executor or InProcessExecutor()
    evals: dict[str, Evaluation] = {}
    failed: dict[str, str] = {}
    seen: set[str] = set()
    shared = getattr(strategy, "storage", None) is not None
    if shared:  # the study already holds what this run told before it was interrupted
        for cid, rec in store.records.items():
            if cid != reference.candidate_id:
                seen.add(cid)
                if "failed" in rec:
                    failed[cid] = rec["failed"]
                else:
                    evals[cid] = Evaluation.from_dict({**rec, "role": "search"})
    asks = 0
    progress.stage(label, budget)
    while len(seen) < budget and asks < 50 * budget:
        batch, fresh = [], []
        while len(batch) < EVAL_BATCH and len(seen) + len(fresh) < budget and asks < 50 * budget:
            asks += 1
            proposal = strategy.ask()
            candidate = to_candidate(proposal)
            batch.append((proposal, candidate))
            if candidate.id != reference.candidate_id and candidate.id not in seen and \
                    candidate.id not in {c.id for c in fresh}:
                fresh.append(candidate)
        todo = [c for c in fresh if store.get(c.id) is None]
        if shared:
            for c in list(todo):
                rec = strategy.shared_record(c.id)
                if _usable_shared(rec, reference):
                    store.add(rec)
                    todo.remove(c)
        for c, result in zip(todo, executor.evaluate_many(evaluator, todo, "search")):
            store.add(_record(c, result, progress))
        for proposal, candidate in batch:
            if candidate.id == reference.candidate_id:
                strategy.tell(proposal, reference.objectives())
                continue
            rec = store.get(candidate.id)
            if shared:
                strategy.share(proposal, rec)
            if "failed" in rec:
                failed[candidate.id] = rec["failed"]
                strategy.tell(proposal, None)
            else:
                evals[candidate.id] = evals.get(candidate.id) or Evaluation.from_dict({**rec, "role": "search"})
                strategy.tell(proposal, evals[candidate.id].objectives())
            if candidate.id not in seen:
                seen.add(candidate.id)
                progress.advance(len(seen), budget, f"{len(evals)} ok, {len(failed)} failed")
    return list(evals.values()), failed


def _front_ids(evals: list[Evaluation]) -> list[str]:
    idx = pareto_front([e.objectives() for e in evals], maximize=[True, False, False])
    return list(dict.fromkeys(evals[i].candidate_id for i in idx))


def ensure_work_model(evaluator, candidate: Candidate) -> Path:
    """The candidate's work model for the evaluator's target, built again when it is missing or not a
    readable ONNX file (a resumed run whose work files were removed or damaged; compilation is
    deterministic, and the publication gate checks the result against the search's figures)."""
    import onnx

    path = evaluator.model_path(candidate)
    try:
        onnx.load(str(path), load_external_data=False)
    except Exception:  # missing, truncated, garbage: protobuf and OS errors of assorted types
        evaluator.compile(candidate)
    return path


def remeasure(evals: list[Evaluation], evaluator: Evaluator, rounds: int,
              on_round: Callable[[int], None] | None = None, executor=None) -> list[Evaluation]:
    """Measure ``evals``' models again on the evaluator's target in ``rounds`` interleaved rounds (one
    task on one device under Ray); each gets the stats of its median-p50 round, with every round's p50
    in ``latency.extra["round_p50_ms"]``."""
    for e in evals:
        ensure_work_model(evaluator, e.candidate)
    stats = (executor or InProcessExecutor()).measure_interleaved(
        evaluator, {e.candidate_id: evaluator.model_path(e.candidate) for e in evals}, rounds, on_round)
    return [replace(e, latency=replace(stats[e.candidate_id], extra={
        **stats[e.candidate_id].extra, "search_p50_ms": e.latency.p50_ms, "rounds": rounds})) for e in evals]


def _publish(cfg, out: Path, evaluators: list, reference: Evaluation, evals: list[Evaluation], failed: dict,
             progress: Progress, context: dict, executor=None) -> RunResult:
    """Re-measure the finalists, choose, then build, measure and publish the Pareto front and the
    reference for every target (the first is the one searched and chosen on).

    ``evaluators``: one per target, each an :class:`Evaluator` (built-in supernet) or a
    :class:`edgec.onnx_input.PolicyEvaluator` (ONNX model input); ``context``: the keyword
    arguments of :func:`edgec.report.write_reports` that describe data and model.
    """
    from edgec.report import write_reports

    evaluator = evaluators[0]
    target = evaluator.target
    everything = [reference] + evals
    front_ids = _front_ids(everything)
    # The search measured each candidate once, minutes apart; what is published and chosen is
    # re-measured side by side (interleaved rounds), so noise hits every finalist alike.
    finalists = [reference] + [e for e in evals if e.candidate_id in front_ids]
    progress.stage(f"re-measuring {len(finalists)} finalist(s) side by side ({REMEASURE_ROUNDS} rounds)",
                   REMEASURE_ROUNDS)
    executor = executor or InProcessExecutor()
    finalists = remeasure(finalists, evaluator, REMEASURE_ROUNDS,
                          on_round=lambda r: progress.advance(r, REMEASURE_ROUNDS), executor=executor)
    reference = finalists[0]
    front_ids = _front_ids(finalists)
    everything = finalists + [e for e in evals if e.candidate_id not in {f.candidate_id for f in finalists}]
    evals = everything[1:]
    to_publish = [reference] + [e for e in finalists[1:] if e.candidate_id in front_ids]
    blocked: list[dict] = []
    published = _publish_target(out, evaluator, to_publish, reference.candidate_id, progress, blocked)
    passed = {ev.candidate_id for ev, _ in published}  # a candidate whose artifact was blocked is not chosen
    chosen, selection = select_chosen(everything, [i for i in front_ids if i in passed], reference, cfg,
                                      {ev.candidate_id: art.size_bytes for ev, art in published})
    per_target = {target.name: published}
    for extra in evaluators[1:]:
        progress.stage(f"building {len(to_publish)} candidates for {extra.target.name}", len(to_publish))
        built = []
        for ev, result in zip(to_publish, executor.evaluate_many(extra, [ev.candidate for ev in to_publish])):
            if isinstance(result, EdgecError):
                raise result
            built.append(replace(result, role=ev.role))
            progress.advance(len(built), len(to_publish), ev.candidate_id)
        per_target[extra.target.name] = _publish_target(out, extra, built, reference.candidate_id, progress,
                                                        blocked)
    chosen_id = chosen.candidate_id if chosen else None
    artifacts = [replace(art, chosen=art.id == chosen_id) for pubs in per_target.values() for _, art in pubs]
    devices = _device_reports(out, evaluators, per_target, {reference.candidate_id, chosen_id} - {None}, progress,
                              executor)
    target_evals = {name: [ev for ev, _ in pubs] for name, pubs in per_target.items()}
    report = write_reports(out, cfg, targets=[e.target for e in evaluators], reference=reference, evals=evals,
                           failed=failed, front_ids=front_ids, chosen=chosen, selection=selection,
                           artifacts=artifacts, target_evals=target_evals, devices=devices,
                           publication_gate=gate_info(blocked), **context)
    result = RunResult(out, reference, evals, front_ids, chosen, artifacts, report)
    if chosen is None:
        raise NoQualifyingCandidate(
            "no candidate meets the accuracy drop and budgets",
            f"{len(everything)} evaluated, {selection['within_accuracy']} within the accuracy drop, "
            f"best p50 {min(e.latency.p50_ms for e in everything):.4f} ms, "
            f"smallest {min(e.size_bytes for e in everything) / 1024:.1f} KiB; the report is in {out}",
            "relax --max-accuracy-drop / --latency-budget-ms / --size-budget-kb or raise --budget-evals")
    return result


def publication_gate(evaluator, ev: Evaluation, quality: dict) -> dict:
    """The gate an artifact passes before it is published, on the target it is built for.

    Two checks: the file about to be published gives, computed again now, the validation quality the
    search recorded for it (within :data:`GATE_MAX_QUALITY_GAP_PP` points: what is published is what was
    measured and chosen — a stale, damaged or swapped work file fails); and, where accuracy was
    emulated on the CPU (the HTP simulator), the device's own outputs agree with the emulation on
    top-1 (≥ :data:`GATE_MIN_DEVICE_AGREEMENT` of the device-check samples).
    Returns {"passed": bool, "quality_now", "quality_searched", "gap_pp", "device_agreement", "why"}."""
    now = evaluator.search_quality(ev.candidate)
    gap_pp = abs(now - ev.val_accuracy) * 100
    agreement = (quality.get("device_check") or {}).get("top1_agreement")
    why = []
    if not gap_pp <= GATE_MAX_QUALITY_GAP_PP:
        why.append(f"its validation quality is {100 * now:.2f} % now vs {100 * ev.val_accuracy:.2f} % in the "
                   f"search ({gap_pp:.2f} points apart, at most {GATE_MAX_QUALITY_GAP_PP} allowed)")
    if agreement is not None and agreement < GATE_MIN_DEVICE_AGREEMENT:
        why.append(f"the device agrees with the emulation on top-1 for {100 * agreement:.0f} % of "
                   f"{quality['device_check']['samples']} samples ({100 * GATE_MIN_DEVICE_AGREEMENT:.0f} % needed)")
    return {"passed": not why, "quality_now": now, "quality_searched": ev.val_accuracy, "gap_pp": gap_pp,
            "device_agreement": agreement, "why": "; ".join(why)}


def gate_info(blocked: list[dict]) -> dict:
    """The report's ``publication_gate`` section: the rule and the artifacts it blocked."""
    return {"rule": f"every artifact, on its target, before publication: its validation quality computed again "
                    f"from the file within {GATE_MAX_QUALITY_GAP_PP} points of the search's figure, and where "
                    f"accuracy was emulated, device top-1 agreement ≥ {GATE_MIN_DEVICE_AGREEMENT:.0%}",
            "blocked": blocked}


def _publish_target(out: Path, evaluator, evals: list[Evaluation], reference_id: str,
                    progress: Progress, blocked: list | None = None) -> list[tuple[Evaluation, Artifact]]:
    """Publish ``evals``' models for the evaluator's target under ``artifacts/<target>/<id>/``
    (with the target's extra files) and return them with their manifest entries. A model that fails
    :func:`publication_gate` is not published: it is appended to ``blocked`` ({target, id, role, why,
    …}) and said in one line."""
    from edgec.compile.package import publish_model, sha256_file

    target = evaluator.target
    progress.stage(f"publishing {len(evals)} artifacts for {target.name}", len(evals))
    published = []
    folder = out / "artifacts" / target.name
    for i, ev in enumerate(evals, 1):
        model = ensure_work_model(evaluator, ev.candidate)
        io = evaluator.io_params(ev.candidate)
        test_acc, quality = evaluator.test_quality(ev.candidate)
        gate = publication_gate(evaluator, ev, quality)
        if not gate["passed"]:
            role = "reference" if ev.candidate_id == reference_id else "pareto"
            progress.log(f"NOT published: {target.name} artifact {ev.candidate_id} ({role}) failed its gate: "
                         f"{gate['why']}")
            if blocked is not None:
                blocked.append({"target": target.name, "id": ev.candidate_id, "role": role, **gate})
            progress.advance(i, len(evals), ev.candidate_id)
            continue
        role = "reference" if ev.candidate_id == reference_id else "pareto"
        metadata = {"edgec_version": edgec.__version__, "candidate_id": ev.candidate_id, "role": role,
                    "config": ev.candidate.subnet.to_dict(), "policy": ev.candidate.policy.to_dict(),
                    "dataset": evaluator.data_name, "target": target.name, "recipe": target.recipe,
                    "metrics": {"val_accuracy": ev.val_accuracy, "test_accuracy": test_acc, **quality,
                                "p50_ms": ev.latency.p50_ms, "latency_kind": ev.latency.kind}}
        files: dict = {}
        path = publish_model(model, folder / ev.candidate_id, metadata,
                             add_files=lambda d: files.update(target.package(d / "model.onnx", d)))
        input_spec = evaluator.input_spec(io)
        extra_files = sorted(f.name for f in path.parent.iterdir() if f.name != "model.onnx")
        art = Artifact(ev.candidate_id, str(path.relative_to(out)), sha256_file(path), target.name, role, False,
                       test_acc, ev.val_accuracy, ev.latency.p50_ms, ev.latency.p90_ms, ev.latency.kind,
                       path.stat().st_size, ev.candidate.subnet.to_dict(), ev.candidate.policy.to_dict(), input_spec,
                       recipe=target.recipe, files=extra_files, quality=quality,
                       finetuned=evaluator.is_finetuned(ev.candidate.subnet))
        published.append((ev, art))
        progress.advance(i, len(evals), ev.candidate_id)
    keep = {ev.candidate_id for ev, _ in published}
    for stale in folder.iterdir() if folder.is_dir() else ():  # left by an earlier publish of a resumed
        if stale.is_dir() and stale.name not in keep:         # run, or half-made by a killed one
            shutil.rmtree(stale)
    return published


def _device_reports(out: Path, evaluators: list[Evaluator], per_target: dict, ids: set[str], progress: Progress,
                    executor) -> dict:
    """{target: {candidate id: device report}} for ``ids`` (reference and chosen) on every target,
    from each target's :meth:`~edgec.targets.base.Target.profile_model` on the published file (on a
    node with the device under Ray)."""
    reports: dict = {}
    for evaluator in evaluators:
        name = evaluator.target.name
        todo = [(ev, art) for ev, art in per_target[name] if ev.candidate_id in ids]
        progress.stage(f"profiling {len(todo)} artifacts on {name}", len(todo))
        for (ev, _), report in zip(todo, executor.profile_many(evaluator, [out / art.path for _, art in todo])):
            reports.setdefault(name, {})[ev.candidate_id] = report
        progress.advance(len(todo), len(todo))
    return reports
