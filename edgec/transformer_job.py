"""``edgec compile --model minilm``: SimQ-NAS over a pretrained encoder's elastic dims × per-layer precision.

The loop (each stage reported on the progress bar):

1. resolve the model (:mod:`edgec.compile.hf_source`), read the text split (:mod:`edgec.text_data`);
2. FP32 reference: the pretrained model exported through optimum, parity-checked, its sentence
   embeddings on the search and evaluation sentences are what every candidate is compared with;
3. elastic model: importance on 512 calibration sentences, heads/channels rewired into importance
   order (every width is then a prefix);
4. search: NSGA-II over (depth, heads and FFN width per layer, attention/FFN precision per layer),
   ``--budget-evals`` candidates, each extracted (physically smaller), exported, quantized with its
   policy, scored on the 256 held-out calibration sentences ("search" split: mean cosine) and
   measured on cpu-ort (p50 at batch 1, ``--sequence-length`` tokens); asked first: the full model
   all INT8 (with and without the embedding table), with FP32 attention, and the mildest uniform
   prunings (FFN 3/4, heads 2/3, both, FFN 1/2);
5. recovery (``--recovery-candidates``, default 2; 0 = none): the fastest evaluated sub-networks
   that remove structure and score within ``RECOVERY_REACH`` below the fidelity floor are
   extracted again, their output projections refit by least squares to the FP32 model's block
   sums (:func:`edgec.search.elastic_transformer.reconstruct`), with ``--recovery-steps N`` then
   distilled from the FP32 model for N steps (on the GPU when torch sees one), exported, quantized
   with the same policy and evaluated again, as new candidates (id ``<id>-ls`` or ``<id>-ls-r<N>``);
6. finalists: the Pareto front's candidates within ``--max-fidelity-drop`` on the search split are
   scored on the evaluation split and re-measured side by side with the reference (interleaved
   rounds); the chosen one is the fastest within the drop on the evaluation split (finalists
   within 2 % of its p50 count as equally fast, and then the smallest file wins);
7. publish: ``artifacts/cpu-ort/<id>/`` (model.onnx + tokenizer files) for the reference and the
   chosen, ``manifest.json``, ``report.json``, ``report.html``, ``candidates.csv``.

Evaluation records are stored as they complete (``study/evaluations.jsonl``); ``--resume``
replays them into the search so it asks the same candidates again without re-evaluating them.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path


import edgec
from edgec.config import CompileConfig
from edgec.errors import ConfigError, NoQualifyingCandidate
from edgec.rundir import EvaluationStore, RunDir

IMPORTANCE_SENTENCES = 512
SEARCH_SENTENCES = 256       # held out from the calibration sentences: the search's fidelity split
PARITY_SENTENCES = 16
RECOVERY_BATCH = 32
LS_BATCH = 64                # sentences per batch in least-squares reconstruction
RECOVERY_REACH = 0.12        # recover only sub-networks at most this far below the floor (measured: 0.885 → 0.980)
SEARCH_RUNS = 100            # timed runs per candidate during the search (finalists get REMEASURE_ROUNDS × runs)
REMEASURE_ROUNDS = 3
LATENCY_TIE = 0.02           # p50s within 2 % count as equal when choosing (then the smaller file wins)
# the tokenizer only: sentence-transformers' module files would make the folder look loadable by
# SentenceTransformer, which it is not (no weights in PyTorch form)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


@dataclass
class TransformerResult:
    out: Path
    report: dict
    evaluations: list[dict]
    chosen: dict | None


def _state_settings(cfg: CompileConfig, model_info: dict, text_info: dict) -> dict:
    return {"model": model_info["source"], "config_sha": model_info["config_sha"], "text": text_info["evaluation_sha256"],
            "seed": cfg.seed, "sequence_length": cfg.sequence_length,
            "threads": cfg.threads, "strategy": cfg.strategy, "population_size": cfg.population_size,
            "edgec": edgec.__version__}


def run_transformer_compile(cfg: CompileConfig, progress) -> TransformerResult:
    """Run the job in the module docstring. Raises :class:`NoQualifyingCandidate` (exit 3) after
    writing the report when no candidate keeps the fidelity within ``--max-fidelity-drop``."""
    import hashlib

    import torch

    from edgec.compile.hf_source import resolve, task_of
    from edgec.pipeline import cache_root
    from edgec.text_data import load_text

    def refuse(task: str) -> ConfigError:
        return ConfigError(f"--model {cfg.model}: this job compiles encoders, not {task} models",
                           "causal LMs go through edgec.decoder_job", "use --model minilm or an encoder directory")
    if task_of(cfg.model) not in (None, "feature-extraction"):  # before any conversion
        raise refuse(task_of(cfg.model))
    torch.set_num_threads(cfg.threads)
    progress.stage("loading the model and text", None)
    hf = resolve(cfg.model, cache_root())
    if hf.task != "feature-extraction":
        raise refuse(hf.task)
    text = load_text()
    model_info = {"name": hf.name, "source": hf.source, "path": str(hf.path), "task": hf.task,
                  "config_sha": hashlib.sha256((hf.path / "config.json").read_bytes()).hexdigest()[:16]}
    with RunDir(Path(cfg.out), resume=cfg.resume, force=cfg.force) as run:
        from edgec.pipeline import check_resume

        settings = _state_settings(cfg, model_info, text.info)
        check_resume(run, settings, list(settings), cfg.resume, job="compile-transformer")
        return _run(cfg, hf, text, model_info, run, progress)


def _run(cfg, hf, text, model_info, run: RunDir, progress) -> TransformerResult:
    from edgec.compile.hf_source import load_encoder
    from edgec.compile.transformer import check_parity, embed_torch, export_encoder, tokenize_torch
    from edgec.search.elastic_transformer import (Arch, ElasticSpace, TransformerCandidate, TransformerSearch,
                                                  TransformerSubnet, collect_importance, rewire)
    from edgec.targets import open_target

    tokenizer, teacher = load_encoder(hf)
    Arch(teacher)  # refuses unsupported layouts before any work
    positions = getattr(teacher.config, "max_position_embeddings", None)
    if positions and cfg.sequence_length > positions:
        raise ConfigError(f"bad value for sequence_length: {cfg.sequence_length}",
                          f"{hf.name} takes at most {positions} tokens", f"e.g. --sequence-length {min(128, positions)}")
    cal = text.calibration_sentences
    search_sents, eval_sents = cal[-SEARCH_SENTENCES:], text.evaluation_sentences
    train_sents = cal[:-SEARCH_SENTENCES]
    ref_search = embed_torch(teacher, tokenizer, search_sents)
    ref_eval = embed_torch(teacher, tokenizer, eval_sents)

    models = run.study / "models"
    target = open_target(cfg.target, threads=cfg.threads)
    try:
        # -- reference ---------------------------------------------------------------------------
        progress.stage("exporting the FP32 reference (optimum)", None)
        ref_dir = models / "reference"
        ref_dir.mkdir(parents=True, exist_ok=True)
        ref_path = ref_dir / "model.onnx"
        if not ref_path.is_file():
            export_encoder(teacher, ref_path)
        parity = check_parity(ref_path, teacher, tokenizer, eval_sents[:PARITY_SENTENCES])
        shape = (cfg.sequence_length,)

        # -- elastic model -------------------------------------------------------------------------
        student = copy.deepcopy(teacher)
        space = ElasticSpace.for_model(student)
        imp = collect_importance(student, (tokenize_torch(tokenizer, train_sents[i:i + 64])
                                           for i in range(0, IMPORTANCE_SENTENCES, 64)))
        rewire(student, imp)

        # -- search --------------------------------------------------------------------------------
        full = space.full()
        n = full.layers
        int8 = (("int8", "int8"),) * n
        # asked first: quantization alone, then the mildest uniform prunings (the ones recovery can reach)
        initial = [TransformerCandidate(full, int8, "int8"), TransformerCandidate(full, int8),
                   TransformerCandidate(full, (("fp32", "int8"),) * n, "int8"),
                   TransformerCandidate(TransformerSubnet(n, full.heads, (space.ffn[1],) * n), int8, "int8"),
                   TransformerCandidate(TransformerSubnet(n, (space.heads[1],) * n, full.ffn), int8, "int8"),
                   TransformerCandidate(TransformerSubnet(n, (space.heads[1],) * n, (space.ffn[1],) * n), int8, "int8"),
                   TransformerCandidate(TransformerSubnet(n, full.heads, (space.ffn[2],) * n), int8, "int8")]
        strategy = TransformerSearch(space, seed=cfg.seed, population_size=cfg.population_size, initial=initial)
        store = EvaluationStore(run.study / "evaluations.jsonl")
        evaluator = _Evaluator(student, tokenizer, target, models, shape, search_sents, ref_search)
        evaluator.recovery = _Recovery(teacher, tokenizer, train_sents, cfg.seed)
        evals = []
        progress.stage(f"searching (nsga2, {cfg.budget_evals} evaluations on {cfg.target})", cfg.budget_evals)
        for i in range(cfg.budget_evals):
            cand = strategy.ask()
            rec = store.get(cand.id)
            if rec is None:
                rec = evaluator.evaluate(cand)
                store.add(rec)
            evals.append(rec)
            strategy.tell(cand, None if rec.get("error") else
                          (rec["fidelity_search"]["cosine"], rec["latency"]["p50_ms"], rec["size_bytes"]))
            best = max((r["fidelity_search"]["cosine"] for r in evals if not r.get("error")), default=0)
            progress.advance(i + 1, cfg.budget_evals, f"best cosine {best:.4f}")

        # -- recovery of the fastest sub-networks within reach ---------------------------------------
        floor = 1.0 - cfg.max_fidelity_drop
        ok = [r for r in evals if not r.get("error")]
        uniq = list({r["candidate_id"]: r for r in ok}.values())
        recovered = []
        if cfg.recovery_candidates:
            pool = sorted((r for r in uniq if r["candidate"]["subnet"] != full.to_dict()
                           and r["fidelity_search"]["cosine"] >= floor - RECOVERY_REACH),
                          key=lambda r: r["latency"]["p50_ms"])[:cfg.recovery_candidates]
            if pool:
                how = "least-squares reconstruction" + (f" + {cfg.recovery_steps} distillation steps on "
                                                         f"{evaluator.recovery.device}" if cfg.recovery_steps else "")
                progress.stage(f"recovery of {len(pool)} sub-networks ({how})", len(pool) * (1 + cfg.recovery_steps))
            for k, r in enumerate(pool):
                cand = TransformerCandidate.from_dict(r["candidate"])
                rec_id = f"{cand.id}-ls" + (f"-r{cfg.recovery_steps}" if cfg.recovery_steps else "")
                rec = store.get(rec_id)
                per = 1 + cfg.recovery_steps
                if rec is None:
                    rec = evaluator.evaluate(cand, recover=True, recovery_steps=cfg.recovery_steps, record_id=rec_id,
                                             on_step=lambda s, n, loss, k=k: progress.advance(
                                                 k * per + 1 + s, len(pool) * per, f"loss {loss:.4f}"))
                    store.add(rec)
                progress.advance((k + 1) * per, len(pool) * per,
                                 f"{rec_id}: cosine {r['fidelity_search']['cosine']:.4f} → "
                                 + (f"{rec['fidelity_search']['cosine']:.4f}" if not rec.get("error") else "failed"))
                rec["before_recovery"] = {"candidate_id": r["candidate_id"], "fidelity_search": r["fidelity_search"]}
                recovered.append(rec)
            uniq += [r for r in recovered if not r.get("error")]

        # -- finalists -----------------------------------------------------------------------------
        from edgec.search.pareto import pareto_front

        front = pareto_front([(r["fidelity_search"]["cosine"], r["latency"]["p50_ms"], r["size_bytes"])
                              for r in uniq], (True, False, False)) if uniq else []
        finalists = [uniq[i] for i in front if uniq[i]["fidelity_search"]["cosine"] >= floor]
        progress.stage(f"finalists: evaluation split and {REMEASURE_ROUNDS} interleaved latency rounds "
                       f"({len(finalists)} + reference)", None)
        for r in finalists:
            r["fidelity_eval"] = evaluator.fidelity(Path(r["path"]), eval_sents, ref_eval)
        from edgec.targets.base import measure_interleaved

        paths = {"reference": ref_path, **{r["candidate_id"]: Path(r["path"]) for r in finalists}}
        stats = measure_interleaved(target, paths, shape, REMEASURE_ROUNDS)
        reference = {"candidate_id": "reference", "role": "reference", "path": str(ref_path),
                     "size_bytes": ref_path.stat().st_size, "latency": stats["reference"].to_dict(),
                     "fidelity_eval": {"cosine": 1.0, "neighbour_agreement": 1.0,
                                       "note": "the reference defines fidelity (parity max abs diff "
                                               f"{parity:.1e} vs PyTorch)"},
                     "parity_max_abs_diff": parity}
        for r in finalists:
            r["latency_final"] = stats[r["candidate_id"]].to_dict()
        qualified = [r for r in finalists if r["fidelity_eval"]["cosine"] >= floor]
        chosen = None
        if qualified:  # the fastest; within LATENCY_TIE of it (noise on a shared machine) the smallest file
            fastest = min(r["latency_final"]["p50_ms"] for r in qualified)
            chosen = min((r for r in qualified if r["latency_final"]["p50_ms"] <= fastest * (1 + LATENCY_TIE)),
                         key=lambda r: (r["size_bytes"], r["latency_final"]["p50_ms"]))

        report = _report(cfg, model_info, text.info, space, recovered, reference, evals, finalists, chosen, target)
        _publish(run.path, hf, report, reference, chosen)
        _write(run.path, report, evals + recovered)
        if chosen is None:
            raise NoQualifyingCandidate(
                f"no candidate kept the mean cosine ≥ {floor:.3f} on the evaluation sentences",
                f"{len(finalists)} finalists within the drop on the search split, {len(ok)} evaluated",
                "raise --max-fidelity-drop, --budget-evals or --recovery-steps; the report is in " + str(run.path))
        return TransformerResult(run.path, report, evals + recovered, chosen)
    finally:
        target.close()


class _Recovery:
    """Recovers extracted sub-networks from the FP32 teacher on the calibration sentences (all but the
    search split): least-squares reconstruction of each block's output projections
    (:func:`edgec.search.elastic_transformer.reconstruct`, on the CPU; runs of 2–3 consecutive sentences
    added as longer contexts measured no better: 0.9819 vs 0.9825 on the evaluation split), then, with
    ``steps``, distillation (:func:`edgec.search.elastic_transformer.distill`, on the GPU when torch
    sees one; batches of :data:`RECOVERY_BATCH` sentences)."""

    def __init__(self, teacher, tokenizer, sentences, seed: int) -> None:
        import torch

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.teacher, self.tok, self.sentences, self.seed = teacher, tokenizer, sentences, seed
        self._ls_batches = None

    def ls_batches(self) -> list[dict]:
        from edgec.compile.transformer import tokenize_torch

        if self._ls_batches is None:
            texts = sorted(self.sentences, key=len)  # little padding per batch
            self._ls_batches = [tokenize_torch(self.tok, texts[i:i + LS_BATCH]) for i in range(0, len(texts), LS_BATCH)]
        return self._ls_batches

    def run(self, sub, steps: int, on_step=None) -> dict:
        from edgec.compile.transformer import tokenize_torch
        from edgec.search.elastic_transformer import distill, reconstruct

        out = {"reconstruction": reconstruct(sub, self.teacher, self.ls_batches())}
        if not steps:
            return out
        rng = random.Random(self.seed)
        teacher = self.teacher.to(self.device)
        sub.to(self.device)

        def batch():
            return tokenize_torch(self.tok, rng.sample(self.sentences, RECOVERY_BATCH), self.device)
        try:
            return {**out, **distill(sub, teacher, batch, steps, seed=self.seed, on_step=on_step)}
        finally:
            sub.to("cpu")
            self.teacher.to("cpu")


class _Evaluator:
    """Builds and measures one candidate: extract → export → parity → quantize → fidelity → latency."""

    def __init__(self, elastic_model, tokenizer, target, models: Path, shape, search_sents, ref_search) -> None:
        self.model, self.tok, self.target, self.models, self.shape = elastic_model, tokenizer, target, models, shape
        self.search_sents, self.ref_search = search_sents, ref_search

    def fidelity(self, path: Path, sentences, ref) -> dict:
        from edgec.compile.transformer import embed_onnx, fidelity

        return fidelity(embed_onnx(path, self.tok, sentences, threads=self.target.threads), ref)

    def evaluate(self, cand, recover: bool = False, recovery_steps: int = 0, record_id: str | None = None,
                 on_step=None) -> dict:
        """The candidate's record; with ``recover`` its extracted sub-network is first recovered
        (:class:`_Recovery`: reconstruction, then ``recovery_steps`` of distillation) and the record is
        stored under ``record_id``."""
        from edgec.compile.transformer import check_parity, export_encoder, quantize_policy
        from edgec.errors import EdgecError
        from edgec.search.elastic_transformer import Arch, extract

        t0 = time.perf_counter()
        rid = record_id or cand.id
        folder = self.models / rid
        folder.mkdir(parents=True, exist_ok=True)
        rec = {"candidate_id": rid, "candidate": cand.to_dict(), "summary": cand.summary()}
        try:
            sub = extract(self.model, cand.subnet)
            if recover:
                rec["recovery"] = self.recovery.run(sub, recovery_steps, on_step)
                rec["summary"] += ", recovered (least squares" + (f" + {recovery_steps} steps)" if recovery_steps else ")")
            fp32 = export_encoder(sub, folder / "fp32.onnx")
            rec["parity_max_abs_diff"] = check_parity(fp32, sub, self.tok, self.search_sents[:PARITY_SENTENCES])
            path = folder / "model.onnx"
            rec["quantization"] = quantize_policy(fp32, path, cand.policy(Arch(sub)))
            fp32.unlink()
            rec["params"] = sum(p.numel() for p in sub.parameters())
            rec["size_bytes"] = path.stat().st_size
            rec["path"] = str(path)
            rec["fidelity_search"] = self.fidelity(path, self.search_sents, self.ref_search)
            old = self.target.runs
            self.target.runs = SEARCH_RUNS
            try:
                rec["latency"] = self.target.measure_latency(path, self.shape).to_dict()
            finally:
                self.target.runs = old
        except EdgecError as e:
            rec["error"] = e.line()
        rec["seconds"] = time.perf_counter() - t0
        return rec


def _report(cfg, model_info, text_info, space, recovery, reference, evals, finalists, chosen, target) -> dict:
    ref_p50 = reference["latency"]["p50_ms"]
    rows = []
    for r in finalists:
        rows.append({"candidate_id": r["candidate_id"], "summary": r["summary"], "candidate": r["candidate"],
                     "fidelity_search": r["fidelity_search"], "fidelity_eval": r["fidelity_eval"],
                     "latency": r["latency_final"], "speedup_p50": ref_p50 / r["latency_final"]["p50_ms"],
                     "size_bytes": r["size_bytes"], "params": r["params"], "chosen": r is chosen})
    return {
        "schema_version": 1, "edgec_version": edgec.__version__, "job": "compile-transformer", "config": cfg.to_dict(),
        "model": model_info, "text": text_info,
        "splits": {"importance": f"first {IMPORTANCE_SENTENCES} calibration sentences",
                   "recovery": "calibration sentences except the last 256",
                   "search": f"last {SEARCH_SENTENCES} calibration sentences",
                   "evaluation": f"all {text_info['evaluation_sentences']} evaluation sentences"},
        "quality": "mean cosine similarity of mean-pooled, L2-normalized sentence embeddings to the FP32 "
                   "PyTorch model's; neighbour agreement = same top-1 nearest other sentence",
        "space": space.to_dict(),
        "target": {**target.describe(), "recipe": "per candidate: fp32 | int8 dynamic (per-channel) | int4w MatMulNBits"},
        "recovery": [{"candidate_id": r["candidate_id"], "summary": r["summary"], "error": r.get("error"),
                      "fidelity_search_before": r["before_recovery"]["fidelity_search"],
                      "fidelity_search_after": r.get("fidelity_search"), **r.get("recovery", {})} for r in recovery],
        "latency_input": {"batch": 1, "sequence_length": cfg.sequence_length, "kind": target.latency_kind},
        "reference": reference, "finalists": rows, "evaluated": len(evals),
        "failed": sum(1 for r in evals if r.get("error")),
        "chosen": rows[[r["candidate_id"] for r in finalists].index(chosen["candidate_id"])] if chosen else None,
        "max_fidelity_drop": cfg.max_fidelity_drop,
    }


def _publish(out: Path, hf, report: dict, reference: dict, chosen: dict | None) -> None:
    from edgec.compile.package import publish_model, sha256_file, write_atomic
    from edgec.compile.transformer import MAX_TOKENS

    def add_tokenizer(folder: Path) -> None:
        for name in TOKENIZER_FILES:
            src = hf.path / name
            if src.is_dir():
                shutil.copytree(src, folder / name)
            elif src.is_file():
                shutil.copyfile(src, folder / name)

    artifacts = []
    for role, rec in (("reference", reference), ("chosen", chosen)):
        if rec is None:
            continue
        cid = rec["candidate_id"]
        dest = out / "artifacts" / "cpu-ort" / cid
        path = publish_model(Path(rec["path"]), dest, {"edgec_role": role, "edgec_model": report["model"]["name"],
                                                       "edgec_candidate": json.dumps(rec.get("candidate"))},
                             add_files=add_tokenizer)
        lat = rec.get("latency_final") or rec["latency"]
        artifacts.append({
            "id": cid, "role": role, "chosen": role == "chosen", "target": "cpu-ort",
            "path": str(path.relative_to(out)), "sha256": sha256_file(path), "size_bytes": path.stat().st_size,
            "task": "feature-extraction",
            "inputs": [{"name": n, "shape": ["batch", "sequence"], "dtype": "int64"}
                       for n in ("input_ids", "attention_mask", "token_type_ids")],
            "output": {"name": "last_hidden_state", "shape": ["batch", "sequence", "hidden"], "dtype": "float32",
                       "postprocessing": "mean over tokens where attention_mask is 1, then L2-normalize"},
            "tokenizer": "tokenizer.json beside model.onnx",
            "max_sequence_length": MAX_TOKENS,  # fidelity was scored on texts truncated to this
            "quantization": _quantization_text(rec.get("candidate")),
            "fidelity": rec["fidelity_eval"],
            "latency": {"p50_ms": lat["p50_ms"], "kind": lat["kind"], "batch": 1,
                        "sequence_length": report["latency_input"]["sequence_length"], "threads": lat["threads"]},
            "candidate": rec.get("candidate")})
    report["artifacts"] = artifacts
    write_atomic(out / "manifest.json", json.dumps({"schema_version": 1, "job": "compile-transformer",
                                                    "model": report["model"]["name"], "artifacts": artifacts},
                                                   indent=2))


def _quantization_text(candidate: dict | None) -> str:
    if candidate is None:
        return "none (FP32)"
    precs = {p for pair in candidate["precision"] for p in pair} | {candidate.get("embedding", "fp32")}
    parts = []
    if "int8" in precs:
        parts.append("int8: ONNX Runtime dynamic quantization (MatMulInteger, per-channel int8 weights; "
                     "uint8 embedding table where chosen)")
    if "int4w" in precs:
        parts.append("int4w: 4-bit weight-only MatMulNBits, block 32")
    return "; ".join(parts) or "none (FP32)"


def _write(out: Path, report: dict, evals: list[dict]) -> None:
    from edgec.compile.package import write_atomic
    from edgec.report import transformer_html

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["candidate_id", "summary", "layers", "cosine_search", "neighbour_agreement_search", "p50_ms",
                "size_bytes", "error"])
    for r in evals:
        ok = not r.get("error")
        w.writerow([r["candidate_id"], r.get("summary", ""), r["candidate"]["subnet"]["layers"],
                    f"{r['fidelity_search']['cosine']:.5f}" if ok else "",
                    f"{r['fidelity_search']['neighbour_agreement']:.4f}" if ok else "",
                    f"{r['latency']['p50_ms']:.3f}" if ok else "", r.get("size_bytes", ""), r.get("error", "")])
    write_atomic(out / "candidates.csv", buf.getvalue())
    write_atomic(out / "report.json", json.dumps(report, indent=2))
    write_atomic(out / "report.html", transformer_html(report, evals))
