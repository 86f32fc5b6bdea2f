"""``edgec compile --model smollm2``: per-layer weight precision of a causal LM, searched for perplexity × decode speed × size.

The loop (each stage reported on the progress bar):

1. resolve the model (:mod:`edgec.compile.hf_source`; ``smollm2`` is dequantized from its GGUF once),
   tokenize the text split (:mod:`edgec.text_data`) into 256-token windows;
2. FP32 reference: optimum's ``text-generation-with-past`` export, parity-checked against PyTorch;
   its perplexity on the search windows (the last :data:`SEARCH_WINDOWS` calibration windows) and on
   every evaluation window, and its greedy continuations of :data:`AGREE_PROMPTS` prompts;
3. FP32 fused: the same weights through ONNX Runtime GenAI's builder (:func:`edgec.compile.decoder.build_decoder`),
   parity-checked too — every candidate is this graph with quantized weights;
4. search: NSGA-II (:class:`edgec.search.decoder_policy.DecoderSearch`) over the attention/FFN weight
   precision of every layer (int4w | int8w) and of the LM head, ``--budget-evals`` candidates, each
   built, scored by perplexity on the search windows and timed (TTFT of a 256-token prompt, decode
   tokens/s over 128 greedy tokens with the KV cache; median of :data:`SEARCH_REPEATS`); asked first:
   all int8w, llama.cpp's Q4_K_M layer rule, first/last eighth int8w, all int4w with an 8-bit head,
   all int4w;
5. finalists: the Pareto front's candidates within ``--max-ppl-increase`` on the search windows (the
   :data:`MAX_FINALISTS` fastest) are scored on all evaluation windows and for greedy agreement, and
   re-timed side by side with both FP32 graphs (:data:`REMEASURE_ROUNDS` interleaved rounds); chosen:
   the fastest decode within the bound on the evaluation windows (within 2 % the smaller file);
6. publish: ``artifacts/cpu-ort/<id>/`` (model.onnx, genai_config.json, tokenizer files) for the
   reference and the chosen, ``manifest.json``, ``report.json``, ``report.html``, ``candidates.csv``.

The k-quant fit that sets 4-bit scales is data-free: the calibration text serves only the search
windows. Records are stored as they complete (``study/evaluations.jsonl``); ``--resume`` replays them.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import edgec
from edgec.config import CompileConfig
from edgec.errors import ConfigError, NoQualifyingCandidate
from edgec.rundir import EvaluationStore, RunDir

WINDOW_TOKENS = 256        # perplexity windows (issue 4: fixed 256-token windows)
SEARCH_WINDOWS = 8         # the last calibration windows: the search's perplexity split
PROMPT_TOKENS = 256        # TTFT prompt
NEW_TOKENS = 128           # decode tokens/s over this many greedy tokens
AGREE_PROMPTS = 8          # greedy agreement: prompts = the first AGREE_PROMPT_TOKENS of spread evaluation windows
AGREE_PROMPT_TOKENS = 64
AGREE_NEW_TOKENS = 32
SEARCH_REPEATS = 2         # timed generations per candidate during the search (median)
REMEASURE_ROUNDS = 3
MAX_FINALISTS = 4
LATENCY_TIE = 0.02
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json")


@dataclass
class DecoderResult:
    out: Path
    report: dict
    evaluations: list[dict]
    chosen: dict | None


def run_decoder_compile(cfg: CompileConfig, progress) -> DecoderResult:
    """Run the job in the module docstring. Raises :class:`NoQualifyingCandidate` (exit 3) after
    writing the report when no candidate keeps the perplexity within ``--max-ppl-increase``."""
    import hashlib

    import torch

    from edgec.compile.hf_source import resolve
    from edgec.pipeline import cache_root, check_resume
    from edgec.text_data import load_text

    torch.set_num_threads(cfg.threads)
    progress.stage("loading the model and text", None)
    hf = resolve(cfg.model, cache_root())
    if hf.task != "text-generation":
        raise ConfigError(f"--model {cfg.model} is not a causal LM", f"its task is {hf.task}",
                          "give a *ForCausalLM model (e.g. smollm2)")
    _check_supported(hf)
    text = load_text()
    model_info = {"name": hf.name, "source": hf.source, "path": str(hf.path), "task": hf.task,
                  "config_sha": hashlib.sha256((hf.path / "config.json").read_bytes()).hexdigest()[:16]}
    with RunDir(Path(cfg.out), resume=cfg.resume, force=cfg.force) as run:
        settings = {"model": model_info["source"], "config_sha": model_info["config_sha"],
                    "text": text.info["evaluation_sha256"], "seed": cfg.seed, "threads": cfg.threads,
                    "population_size": cfg.population_size, "edgec": edgec.__version__}
        check_resume(run, settings, list(settings), cfg.resume, job="compile-text-generation")
        return _run(cfg, hf, text, model_info, run, progress)


SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)  # built, parity-checked and searched end to end
CONTEXT_TOKENS = max(WINDOW_TOKENS, PROMPT_TOKENS + NEW_TOKENS)


def _check_supported(hf) -> None:
    """Refuse, in one line and before any export, a causal LM this job has not been built for:
    architectures other than :data:`SUPPORTED_ARCHITECTURES` (the builder graph's node names and the
    parity checks are Llama-family), or a context shorter than the windows and the timing prompt."""
    cfg = hf.config()
    arch = (cfg.get("architectures") or [cfg.get("model_type", "unknown")])[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ConfigError(f"--model {hf.name}: {arch} is not supported for text generation yet",
                          f"edgec compiles {', '.join(SUPPORTED_ARCHITECTURES)} models (e.g. smollm2)",
                          "convert the model to a Llama-architecture checkpoint or use --model smollm2")
    positions = cfg.get("max_position_embeddings") or 0
    if positions < CONTEXT_TOKENS:
        raise ConfigError(f"--model {hf.name}: a context of {positions} tokens is too short",
                          f"perplexity uses {WINDOW_TOKENS}-token windows and timing a {PROMPT_TOKENS}-token prompt "
                          f"plus {NEW_TOKENS} new tokens", f"use a model with max_position_embeddings ≥ {CONTEXT_TOKENS}")


def _valid_record(rec: dict) -> None:
    """A stored evaluation is replayed only when complete and its model file is still there."""
    if not rec.get("error"):
        for key in ("ppl_search", "timing", "size_bytes", "path", "candidate"):
            if key not in rec:
                raise ValueError(f"record lacks {key}")
        if not Path(rec["path"]).is_file():
            raise ValueError("model file moved or deleted")


class _Scorer:
    """Perplexity, greedy continuations and generation timing of one ONNX decoder (ONNX Runtime CPU)."""

    def __init__(self, threads: int, search_windows, eval_windows, prompt, agree_prompts) -> None:
        self.threads, self.search_windows, self.eval_windows = threads, search_windows, eval_windows
        self.prompt, self.agree_prompts = prompt, agree_prompts

    def decoder(self, path: Path):
        from edgec.targets.ort_generate import Decoder, session

        return Decoder(session(path, self.threads))

    def timing(self, dec, repeats: int) -> dict:
        runs = [dec.generate(self.prompt, NEW_TOKENS) for _ in range(repeats)]
        return {"ttft_ms": float(np.median([r["ttft_s"] for r in runs]) * 1000),
                "decode_tokens_per_s": float(np.median([r["decode_tokens_per_s"] for r in runs])),
                "decode_ms_per_token": float(np.median([1000 / r["decode_tokens_per_s"] for r in runs])),
                "prompt_tokens": len(self.prompt), "new_tokens": NEW_TOKENS, "repeats": repeats,
                "threads": self.threads, "kind": "measured"}

    def continuations(self, dec) -> list[list[int]]:
        return [dec.generate(p, AGREE_NEW_TOKENS)["tokens"] for p in self.agree_prompts]


def agreement(tokens: list[list[int]], ref: list[list[int]]) -> dict:
    """Greedy agreement with the reference: ``prefix`` = mean share of each continuation identical to the
    reference's before the first differing token; ``token`` = mean share of equal tokens position by position."""
    prefix, token = [], []
    for a, b in zip(tokens, ref):
        n = min(len(a), len(b))
        k = next((i for i in range(n) if a[i] != b[i]), n)
        prefix.append(k / len(b))
        token.append(sum(x == y for x, y in zip(a, b)) / len(b))
    return {"prefix": float(np.mean(prefix)), "token": float(np.mean(token)), "prompts": len(ref)}


def check_parity(path: Path, model, window: np.ndarray, atol: float = 1e-2) -> float:
    """Max abs difference of the logits of ``path`` (an exported decoder) and the PyTorch ``model`` on one
    token window (n,) int64. Raises :class:`ExportError` above ``atol`` (logits are O(10); FP32 export
    differences measured about 1e-4)."""
    import torch

    from edgec.errors import ExportError
    from edgec.targets.ort_generate import Decoder, session

    ids = np.asarray(window, np.int64)
    onnx_logits = Decoder(session(path)).logits(ids)
    with torch.no_grad():
        torch_logits = model(torch.from_numpy(ids)[None]).logits[0].numpy()
    diff = float(np.max(np.abs(onnx_logits - torch_logits)))
    if diff > atol:
        raise ExportError(f"the exported decoder {Path(path).parent.name} differs from PyTorch by {diff:.2e}",
                          f"tolerance {atol:g}", "report this model; a different opset or builder version may help")
    return diff


def _run(cfg, hf, text, model_info, run: RunDir, progress) -> DecoderResult:
    from edgec.compile.decoder import build_decoder, export_reference, token_windows
    from edgec.compile.hf_source import load_causal_lm
    from edgec.search.decoder_policy import DecoderSearch, ends_mixed, llama_cpp_mixed, uniform
    from edgec.targets.ort_generate import perplexity

    tokenizer, model = load_causal_lm(hf)
    layers = int(model.config.num_hidden_layers)
    cal = token_windows(tokenizer, text.calibration_text, WINDOW_TOKENS)
    ev = token_windows(tokenizer, text.evaluation_text, WINDOW_TOKENS)
    vocab = int(model.config.vocab_size)
    if max(int(cal.max(initial=0)), int(ev.max(initial=0))) >= vocab:
        raise ConfigError(f"--model {hf.name}: the tokenizer produces ids beyond the model's vocabulary ({vocab})",
                          "tokenizer files and weights do not belong together",
                          "save the tokenizer that was trained with this model beside its weights")
    if len(cal) < SEARCH_WINDOWS + 1 or len(ev) < AGREE_PROMPTS:
        raise ConfigError("the text split is too short for this tokenizer", f"{len(cal)} calibration and {len(ev)} "
                          "evaluation windows of 256 tokens", "report this; pydoc_data.topics should give hundreds")
    search_windows = cal[-SEARCH_WINDOWS:]
    spread = np.linspace(0, len(ev) - 1, AGREE_PROMPTS).astype(int)
    scorer = _Scorer(cfg.threads, search_windows, ev, [int(t) for t in cal[0][:PROMPT_TOKENS]],
                     [[int(t) for t in ev[i][:AGREE_PROMPT_TOKENS]] for i in spread])
    models = run.study / "models"

    # -- FP32 reference (optimum) and FP32 fused (ORT GenAI builder) ---------------------------------
    progress.stage("exporting the FP32 reference (optimum) and the fused FP32 graph (ONNX Runtime GenAI)", None)
    baselines = {}
    for role in ("reference", "fp32-fused"):
        folder = models / role
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "model.onnx"
        if not path.is_file():
            if role == "reference":
                export_reference(model, path)
            else:
                build_decoder(hf.path, folder, layers)
        parity = check_parity(path, model, ev[0][:64])
        dec = scorer.decoder(path)
        baselines[role] = {"candidate_id": role, "role": role, "path": str(path), "size_bytes": path.stat().st_size,
                           "parity_max_abs_logit_diff": parity, "ppl_search": perplexity(dec, search_windows),
                           "summary": "FP32, optimum export" if role == "reference"
                           else "FP32, ONNX Runtime GenAI builder (fused attention and norms)"}
        if role == "reference":
            ref_tokens = scorer.continuations(dec)
        del dec
    del model
    ref_ppl_search = baselines["reference"]["ppl_search"]
    ceiling_search = ref_ppl_search * (1 + cfg.max_ppl_increase)

    # -- search -----------------------------------------------------------------------------------
    initial = [uniform(layers, "int8w"), llama_cpp_mixed(layers), ends_mixed(layers),
               uniform(layers, "int4w", "int8w"), uniform(layers, "int4w", "int4w")]
    strategy = DecoderSearch(layers, seed=cfg.seed, population_size=cfg.population_size, initial=initial)
    store = EvaluationStore(run.study / "evaluations.jsonl", validate=_valid_record)
    evals = []
    progress.stage(f"searching (nsga2, {cfg.budget_evals} evaluations on cpu-ort)", cfg.budget_evals)
    for i in range(cfg.budget_evals):
        cand = strategy.ask()
        rec = store.get(cand.id)
        if rec is None:
            rec = _evaluate(cand, hf, layers, models, scorer)
            store.add(rec)
        evals.append(rec)
        strategy.tell(cand, None if rec.get("error") else
                      (rec["ppl_search"], rec["timing"]["decode_ms_per_token"], rec["size_bytes"]))
        best = min((r["ppl_search"] for r in evals if not r.get("error") and r["ppl_search"] <= ceiling_search),
                   default=None)
        progress.advance(i + 1, cfg.budget_evals,
                         f"FP32 ppl {ref_ppl_search:.2f}; " + (f"best within bound {best:.2f}" if best else "none within bound yet"))

    # -- finalists --------------------------------------------------------------------------------
    from edgec.search.pareto import pareto_front

    uniq = list({r["candidate_id"]: r for r in evals if not r.get("error")}.values())
    front = pareto_front([(r["ppl_search"], r["timing"]["decode_ms_per_token"], r["size_bytes"]) for r in uniq],
                         (False, False, False)) if uniq else []
    finalists = sorted((uniq[i] for i in front if uniq[i]["ppl_search"] <= ceiling_search),
                       key=lambda r: r["timing"]["decode_ms_per_token"])[:MAX_FINALISTS]
    progress.stage(f"finalists: {len(ev)} evaluation windows, greedy agreement, {REMEASURE_ROUNDS} interleaved "
                   f"timing rounds ({len(finalists)} + 2 FP32 graphs)", None)
    rows = [baselines["reference"], baselines["fp32-fused"], *finalists]
    for r in rows:
        dec = scorer.decoder(Path(r["path"]))
        r["ppl_eval"] = perplexity(dec, ev)
        r["greedy_agreement"] = agreement(scorer.continuations(dec), ref_tokens)
    timings: dict[str, list] = {r["candidate_id"]: [] for r in rows}
    for _ in range(REMEASURE_ROUNDS):
        for r in rows:
            timings[r["candidate_id"]].append(scorer.timing(scorer.decoder(Path(r["path"])), 1))
    for r in rows:
        t = timings[r["candidate_id"]]
        r["timing_final"] = {**t[0], "repeats": len(t),
                             "ttft_ms": float(np.median([x["ttft_ms"] for x in t])),
                             "decode_tokens_per_s": float(np.median([x["decode_tokens_per_s"] for x in t])),
                             "decode_ms_per_token": float(np.median([x["decode_ms_per_token"] for x in t]))}
    ref_ppl = baselines["reference"]["ppl_eval"]
    ceiling = ref_ppl * (1 + cfg.max_ppl_increase)
    qualified = [r for r in finalists if r["ppl_eval"] <= ceiling]
    chosen = None
    if qualified:
        fastest = max(r["timing_final"]["decode_tokens_per_s"] for r in qualified)
        chosen = min((r for r in qualified if r["timing_final"]["decode_tokens_per_s"] >= fastest * (1 - LATENCY_TIE)),
                     key=lambda r: (r["size_bytes"], -r["timing_final"]["decode_tokens_per_s"]))

    report = _report(cfg, model_info, text.info, layers, baselines, evals, finalists, chosen, len(ev), len(cal))
    _publish(run.path, hf, report, baselines["reference"], chosen)
    _write(run.path, report, evals)
    if chosen is None:
        raise NoQualifyingCandidate(
            f"no candidate kept the perplexity ≤ {ceiling:.2f} (FP32 {ref_ppl:.2f} + {cfg.max_ppl_increase:.0%}) "
            "on the evaluation text", f"{len(finalists)} finalists within the bound on the search windows, "
            f"{len(uniq)} evaluated", "raise --max-ppl-increase or --budget-evals; the report is in " + str(run.path))
    return DecoderResult(run.path, report, evals, chosen)


def _evaluate(cand, hf, layers: int, models: Path, scorer: _Scorer) -> dict:
    """Build → perplexity on the search windows → timing → size; errors become the record's ``error``."""
    from edgec.compile.decoder import build_decoder
    from edgec.errors import EdgecError
    from edgec.targets.ort_generate import perplexity

    t0 = time.perf_counter()
    folder = models / cand.id
    rec = {"candidate_id": cand.id, "candidate": cand.to_dict(), "summary": cand.summary()}
    try:
        path = build_decoder(hf.path, folder, layers, list(cand.precision), cand.lm_head)
        rec["path"], rec["size_bytes"] = str(path), path.stat().st_size
        dec = scorer.decoder(path)
        rec["ppl_search"] = perplexity(dec, scorer.search_windows)
        rec["timing"] = scorer.timing(dec, SEARCH_REPEATS)
    except EdgecError as e:
        rec["error"] = e.line()
    rec["seconds"] = time.perf_counter() - t0
    return rec


def _row(r: dict, ref: dict) -> dict:
    t = r["timing_final"]
    return {"candidate_id": r["candidate_id"], "summary": r["summary"], "candidate": r.get("candidate"),
            "ppl_search": r["ppl_search"], "ppl_eval": r["ppl_eval"], "ppl_increase": r["ppl_eval"] / ref["ppl_eval"] - 1,
            "greedy_agreement": r["greedy_agreement"], "timing": t,
            "decode_speedup": t["decode_tokens_per_s"] / ref["timing_final"]["decode_tokens_per_s"],
            "ttft_ratio": t["ttft_ms"] / ref["timing_final"]["ttft_ms"],
            "size_bytes": r["size_bytes"], "size_ratio": r["size_bytes"] / ref["size_bytes"],
            "parity_max_abs_logit_diff": r.get("parity_max_abs_logit_diff")}


def _report(cfg, model_info, text_info, layers, baselines, evals, finalists, chosen, n_eval, n_cal) -> dict:
    ref = baselines["reference"]
    rows = [{**_row(r, ref), "chosen": r is chosen} for r in finalists]
    return {
        "schema_version": 1, "edgec_version": edgec.__version__, "job": "compile-text-generation",
        "config": cfg.to_dict(), "model": {**model_info, "layers": layers}, "text": text_info,
        "splits": {"search": f"the last {SEARCH_WINDOWS} of {n_cal} calibration windows of {WINDOW_TOKENS} tokens",
                   "evaluation": f"all {n_eval} evaluation windows of {WINDOW_TOKENS} tokens",
                   "agreement_prompts": f"the first {AGREE_PROMPT_TOKENS} tokens of {AGREE_PROMPTS} evaluation "
                                        f"windows spread evenly; {AGREE_NEW_TOKENS} greedy tokens each",
                   "timing_prompt": f"the first {PROMPT_TOKENS} tokens of the calibration text"},
        "quality": "perplexity = exp(mean next-token NLL) over non-overlapping 256-token windows, each scored "
                   "from its start; greedy agreement with the FP32 reference's continuations",
        "timing": f"TTFT = prefill of a {PROMPT_TOKENS}-token prompt + first argmax; decode tokens/s over "
                  f"{NEW_TOKENS} greedy tokens with the KV cache; ONNX Runtime CPU, batch 1, {cfg.threads} threads",
        "space": {"precisions": ["int4w", "int8w"], "groups_per_layer": ["attention (QKV, O)", "FFN (gate, up, down)"],
                  "lm_head": ["int8w", "int4w"], "layers": layers,
                  "recipe": "ONNX Runtime GenAI builder graph; MatMulNBits block 32, asymmetric, k-quant scales "
                            "(ONNX Runtime's port of llama.cpp's), activations int8 per block (accuracy_level 4); "
                            "the token embedding shares the LM head's quantized table (GatherBlockQuantized)"},
        "reference": _row(ref, ref), "fp32_fused": _row(baselines["fp32-fused"], ref),
        "finalists": rows, "evaluated": len(evals), "failed": sum(1 for r in evals if r.get("error")),
        "chosen": next((x for x in rows if x["chosen"]), None), "max_ppl_increase": cfg.max_ppl_increase,
    }


def _publish(out: Path, hf, report: dict, reference: dict, chosen: dict | None) -> None:
    from edgec.compile.package import publish_model, sha256_file, write_atomic

    cfg = hf.config()
    eos = cfg.get("eos_token_id")
    gen_cfg = hf.path / "generation_config.json"
    if gen_cfg.is_file():
        eos = json.loads(gen_cfg.read_text()).get("eos_token_id", eos)
    heads = cfg.get("num_attention_heads")
    shape = {"layers": cfg.get("num_hidden_layers"), "kv_heads": cfg.get("num_key_value_heads", heads),
             "head_dim": cfg.get("head_dim") or (cfg["hidden_size"] // heads if heads else None)}
    artifacts = []
    for role, rec in (("reference", reference), ("chosen", chosen)):
        if rec is None:
            continue
        cid, src = rec["candidate_id"], Path(rec["path"])

        def add_files(folder: Path, src=src) -> None:
            for name in TOKENIZER_FILES:
                if (hf.path / name).is_file():
                    shutil.copyfile(hf.path / name, folder / name)
            if (src.parent / "genai_config.json").is_file():
                shutil.copyfile(src.parent / "genai_config.json", folder / "genai_config.json")
        dest = out / "artifacts" / "cpu-ort" / cid
        path = publish_model(src, dest, {"edgec_role": role, "edgec_model": report["model"]["name"],
                                         "edgec_candidate": json.dumps(rec.get("candidate"))}, add_files=add_files)
        row = report["reference"] if role == "reference" else report["chosen"]
        artifacts.append({
            "id": cid, "role": role, "chosen": role == "chosen", "target": "cpu-ort", "task": "text-generation",
            "path": str(path.relative_to(out)), "sha256": sha256_file(path), "size_bytes": path.stat().st_size,
            "inputs": [{"name": "input_ids", "shape": ["batch", "sequence"], "dtype": "int64"},
                       {"name": "attention_mask", "shape": ["batch", "past + sequence"], "dtype": "int64"},
                       {"name": "past_key_values.<layer>.key|value",
                        "shape": ["batch", "kv_heads", "past", "head_dim"], "dtype": "float32",
                        "note": "the first step (the prompt) takes a past of length 0"}]
            + ([{"name": "position_ids", "shape": ["batch", "sequence"], "dtype": "int64"}] if role == "reference" else []),
            "output": {"name": "logits", "shape": ["batch", "sequence", "vocab"], "dtype": "float32",
                       "cache": "present.<layer>.key|value, fed back as past_key_values.<layer>.* on the next step"},
            **shape, "eos_token_ids": eos if isinstance(eos, list) else [eos],
            "max_position_embeddings": cfg.get("max_position_embeddings"),
            "tokenizer": "tokenizer.json beside model.onnx; chat models: apply chat_template.jinja to the prompt",
            "generation": "greedy loop with the KV cache: examples/generate.py in the edgec repository "
                          f"(python examples/generate.py RUN_DIR/{dest.relative_to(out)})",
            "quantization": "none (FP32)" if role == "reference" else report["space"]["recipe"],
            "perplexity": row["ppl_eval"], "ppl_increase": row["ppl_increase"],
            "greedy_agreement": row["greedy_agreement"],
            "latency": {"ttft_ms": row["timing"]["ttft_ms"], "decode_tokens_per_s": row["timing"]["decode_tokens_per_s"],
                        "kind": "measured", "prompt_tokens": PROMPT_TOKENS, "threads": row["timing"]["threads"]},
            "candidate": rec.get("candidate")})
    report["artifacts"] = artifacts
    write_atomic(out / "manifest.json", json.dumps({"schema_version": 1, "job": "compile-text-generation",
                                                    "model": report["model"]["name"], "artifacts": artifacts}, indent=2))


def _write(out: Path, report: dict, evals: list[dict]) -> None:
    from edgec.compile.package import write_atomic
    from edgec.report import decoder_html

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["candidate_id", "summary", "ppl_search", "ttft_ms", "decode_tokens_per_s", "size_bytes", "seconds",
                "error"])
    for r in evals:
        ok = not r.get("error")
        w.writerow([r["candidate_id"], r.get("summary", ""), f"{r['ppl_search']:.3f}" if ok else "",
                    f"{r['timing']['ttft_ms']:.1f}" if ok else "", f"{r['timing']['decode_tokens_per_s']:.1f}" if ok else "",
                    r.get("size_bytes", ""), f"{r['seconds']:.1f}", r.get("error", "")])
    write_atomic(out / "candidates.csv", buf.getvalue())
    write_atomic(out / "report.json", json.dumps(report, indent=2))
    write_atomic(out / "report.html", decoder_html(report, evals))
