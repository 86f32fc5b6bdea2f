"""``edgec compile MODEL.onnx --calib-data calib.npz``: for users who only have an ONNX model.

No architecture search: the per-layer quantization policy (INT8 / FP32 per conv or
linear layer; on the HTP uint8 / uint16 activations) is searched per target with
NSGA-II (:class:`edgec.search.strategy.PolicySearch`). The quality objective is
**fidelity** to the FP32 model on the user's data (:func:`edgec.compile.source.fidelity`):
top-1 agreement for classifiers, mean cosine similarity otherwise (max abs error and,
for image outputs, PSNR reported too). The reference is the model with every layer
FP32 (fidelity 1.0 by definition on CPU targets). Fidelity is measured on
``--eval-data`` when given, else on the calibration inputs (reported as in-sample).
Everything else — run directory, resume, re-measuring finalists, per-target
artifacts, reports — is the built-in pipeline's (:func:`edgec.pipeline._publish`).
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np

import edgec
from edgec.config import CompileConfig
from edgec.errors import ModelError
from edgec.pipeline import (RESUME_KEYS, MaxLatencyEvaluator, Progress, RunResult, TargetBuilder, _evaluate_cached, _publish,
                            check_resume,
                            open_targets,
                            search_loop)
from edgec.records import Evaluation
from edgec.rundir import EvaluationStore, RunDir
from edgec.search.space import Candidate, QuantPolicy, SubnetConfig
from edgec.search.strategy import PolicySearch
from edgec.targets import Target

SOURCE = SubnetConfig((), ())  # ONNX input: the architecture is the user's model, unchanged


class PolicyEvaluator(TargetBuilder):
    """Builds the source model for one target with a policy and measures fidelity and latency."""

    def __init__(self, source, target: Target, models_dir: Path, calib_x: np.ndarray, eval_x: np.ndarray,
                 reference_out: np.ndarray, cfg: CompileConfig, data_name: str) -> None:
        self.source, self.target, self.models_dir, self.cfg = source, target, models_dir, cfg
        self.calib_x, self.eval_x, self.reference_out, self.data_name = calib_x, eval_x, reference_out, data_name
        self.input_shape = tuple(source.input_shape[1:])

    def compile(self, candidate: Candidate) -> tuple[Path, float]:
        """Write the source model built with the candidate's policy for the target; (path, 0.0)."""
        return self._build(candidate, self.source.path, self.calib_x), 0.0

    def quality(self, candidate: Candidate, outputs: np.ndarray | None = None) -> dict:
        """Fidelity of the built model to the FP32 model on the evaluation inputs (``outputs``: the
        built model's outputs there, when already computed)."""
        from edgec.compile.source import fidelity

        out = self.outputs(candidate, self.eval_x) if outputs is None else outputs
        return {**fidelity(self.reference_out, out), "on": self.data_name,
                "computed_with": self.target.accuracy_backend}

    def search_quality(self, candidate: Candidate) -> float:
        """What :meth:`evaluate` records as its quality (the fidelity score), computed again from the file."""
        return self.quality(candidate)["score"]

    def test_quality(self, candidate: Candidate) -> tuple[float, dict]:
        from edgec.pipeline import DEVICE_CHECK_SAMPLES

        out = self.outputs(candidate, self.eval_x)
        q = self.quality(candidate, out)
        quality = {"fidelity": q}
        check = self.device_check(candidate, self.eval_x[:DEVICE_CHECK_SAMPLES], out)
        if check:
            quality["device_check"] = check
        return q["score"], quality

    def input_spec(self, io: dict | None) -> dict:
        return self._input_spec(io, self.source.input_name, self.input_shape, "as the source model expects",
                                {"name": self.source.output_name})

    def evaluate(self, candidate: Candidate, role: str = "search") -> Evaluation:
        t0 = time.perf_counter()
        path, _ = self.compile(candidate)
        q = self.quality(candidate)
        compile_s = time.perf_counter() - t0
        latency = self.target.measure_latency(path, self.input_shape, batch=1)
        return Evaluation(candidate, self.target.name, q["score"], latency, path.stat().st_size, 0.0, compile_s,
                          edgec.__version__, role, {"fidelity": q})


def _fingerprint(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def run_onnx_compile(cfg: CompileConfig, progress: Progress | None = None) -> RunResult:
    """Policy search on the ONNX model ``cfg.model`` for ``cfg.target`` (+ ``cfg.also_targets``),
    publishing like :func:`edgec.pipeline.run_compile`. Raises :class:`EdgecError` subclasses."""
    from edgec.compile.accuracy import onnx_logits
    from edgec.compile.source import load_inputs, prepare_source

    progress = progress or Progress()
    targets = open_targets(cfg)
    with RunDir(Path(cfg.out), resume=cfg.resume, force=cfg.force) as run:
        try:
            source = prepare_source(Path(cfg.model), run.study / "source.onnx", cfg.input_shape)
            for t in targets:  # what a target cannot run is refused before any work, naming the user's file
                t.check_source(source.path, shown_as=Path(cfg.model).name)
            calib_x = load_inputs(Path(cfg.calib_data), source, "calibration data", 256)
            eval_x = (load_inputs(Path(cfg.eval_data), source, "evaluation data", 1) if cfg.eval_data
                      else calib_x)
            data_paths = [Path(cfg.model), Path(cfg.calib_data)] + ([Path(cfg.eval_data)] if cfg.eval_data else [])
            check_resume(run, {**cfg.to_dict(), "dataset_fingerprint": _fingerprint(data_paths)}, RESUME_KEYS,
                         cfg.resume)
            try:
                reference_out = onnx_logits(source.path, eval_x, threads=cfg.threads)
            except ModelError as e:  # name the user's file, not edgec's working copy
                raise ModelError(e.what.replace(source.path.name, Path(cfg.model).name), e.why, e.fix) from None
            data_name = f"{Path(cfg.eval_data).name if cfg.eval_data else Path(cfg.calib_data).name + ' (in-sample)'}"
            evaluators = [PolicyEvaluator(source, t, run.study / "models", calib_x, eval_x, reference_out, cfg,
                                          data_name) for t in targets]
            store = EvaluationStore(run.study / "evaluations.jsonl")
            searcher = MaxLatencyEvaluator(evaluators) if cfg.objective == "max-latency" else evaluators[0]
            reference, evals, failed = _policy_search(cfg, source.layers, store, searcher, progress)
            metric = reference.quality.get("fidelity", {}).get("metric", "fidelity")
            context = {
                "dataset_info": {"name": data_name, "fingerprint": _fingerprint(data_paths),
                                 "source": f"calibration {cfg.calib_data} ({len(calib_x)} inputs)",
                                 "preprocessing": "none (inputs as given)",
                                 "test_split": f"fidelity on {data_name} ({len(eval_x)} inputs)",
                                 "val_split": f"the same {len(eval_x)} inputs"},
                "model_info": {"source_model": {"path": str(Path(cfg.model).resolve()),
                                                "input": {"name": source.input_name,
                                                          "shape": list(source.input_shape)},
                                                "output": source.output_name, "layers": list(source.layers)}},
                "quality": f"fidelity to the FP32 model ({metric})",
                "reference_description": "the source model, all layers FP32"}
            return _publish(cfg, run.path, evaluators, reference, evals, failed, progress, context)
        finally:
            for t in targets:
                t.close()


def _policy_search(cfg: CompileConfig, layers: tuple[str, ...], store: EvaluationStore, evaluator,
                   progress: Progress):
    reference = _evaluate_cached(Candidate(SOURCE, QuantPolicy.uniform(layers, "fp32")), "reference", store,
                                 evaluator, progress)
    assert isinstance(reference, Evaluation)
    if isinstance(evaluator, MaxLatencyEvaluator):
        evaluator.use_reference(reference)
    strategy = PolicySearch(layers, cfg.seed, cfg.population_size, initial=[QuantPolicy.uniform(layers, "int8")])
    budget = min(cfg.budget_evals, 2 ** len(layers) - 1)  # never more than the distinct non-FP32 policies
    evals, failed = search_loop(strategy, budget, lambda policy: Candidate(SOURCE, policy), reference, store,
                                evaluator, progress, f"searching per-layer policies ({budget} evaluations on {cfg.target})")
    return reference, evals, failed
