"""``edgec context train | export | eval``: train, export and evaluate a context compressor.

The compressor itself (encoder = the decoder's first blocks, projector, memory layout) is
:mod:`edgec.compile.context`. This module owns the jobs around it:

- **train** — Dolphin's / ICAE's two stages with the decoder frozen (Ge et al. 2024, ICAE §3.2):
  *restoration* (compress a 256-token window, the decoder re-generates it from the memory alone),
  then *continuation* (compress a context C1 of 256–1024 tokens, predict the next 128 tokens C2).
  Training text: the calibration topics of ``pydoc_data.topics`` (:mod:`edgec.text_data`'s split)
  plus the standard library's docstrings (one document per module); the evaluation topics are never
  trained on. Each step's batch is drawn from ``numpy.random.default_rng([seed, step])``, so a
  resumed run sees the same batches as an uninterrupted one. Checkpoints (projector + AdamW state,
  safetensors) are written atomically every ``checkpoint_every`` steps; rerunning the same command
  resumes from the last one. The result is ``<out>/compressor.safetensors`` + ``compressor.json``.
- **export** — encoder + projector, embedding and decoder graphs per precision, parity-checked, with the
  manifest that chains them (:func:`export`).
- **eval** — continuation perplexity under the issue's conditions (a)–(f) (:data:`CONDITIONS`), plus the
  truncation curve (the last k context tokens as text, k from 0 to the whole context), which says how
  many tokens of text the compressed context is worth; time to first token and peak memory on cpu-ort
  (:func:`evaluate`).

The compressed context is read as the app's chain reads it (:func:`edgec.targets.ort_context.split_context`):
a context of L tokens gets N = L // group_tokens decoder positions, its last ``tail_tokens`` (at most N // 2)
stay text and the memory covers the tokens before them. Training needs nothing for this: continuation
already teaches the decoder to read the memory and then the text that follows it.

Everything runs on the CPU: training autocasts the frozen decoder's forward/backward to bfloat16 where
oneDNN supports bfloat16 (AVX-512 CPUs; natively with AVX-512 BF16 / AMX) and stays float32 elsewhere
(:func:`train_dtype`).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from edgec.compile.package import make_readable, sha256_file, write_atomic
from edgec.errors import ConfigError, ModelError, OutputDirError
from edgec.rundir import TMP_PREFIX

DEFAULT_DIR = Path("runs") / "context"
# a context's last tokens the app's chain keeps as text (at most half its positions): measured on the default
# compressor, 512-token contexts, 64 positions: 0 → perplexity 13.43, 8 → 11.92, 16 → 11.32, 32 → 10.43,
# 40 → 10.25 (the last 64 tokens as text: 11.54); 32 keeps at least half the positions memory
DEFAULT_TAIL_TOKENS = 32
CONTEXT_CHOICES = (256, 512, 768, 1024)
CONTRAST_LR_FACTOR = 0.25  # the contrast stage's peak learning rate, of --lr (a fine-tune of a trained projector)
WINDOW_TOKENS = 256
FORMAT = "edgec-context-compressor/1"


@dataclass(frozen=True)
class TrainSettings:
    """``edgec context train`` options (see ``--help``); :meth:`check` raises :class:`ConfigError`."""

    out: str = str(DEFAULT_DIR)
    decoder: str = "smollm2"
    encoder_layers: int = 4
    group_tokens: int = 8
    memory: str = "kv"
    restore_steps: int = 150
    continue_steps: int = 600
    batch_size: int = 4
    target_tokens: int = 128
    lr: float = 2e-3
    distill: float = 0.0
    contrast_steps: int = 0
    contrast: float = 1.0
    tail_tokens: int = DEFAULT_TAIL_TOKENS
    seed: int = 0
    threads: int = 2
    checkpoint_every: int = 25
    force: bool = False
    extra: dict = field(default_factory=dict)

    def check(self) -> None:
        ints = {"restore_steps": (0, 100_000), "continue_steps": (0, 100_000), "contrast_steps": (0, 100_000),
                "tail_tokens": (0, 1024), "batch_size": (1, 64),
                "target_tokens": (8, 1024), "seed": (0, 2**32 - 1), "threads": (1, 256),
                "checkpoint_every": (1, 100_000)}
        for name, (lo, hi) in ints.items():
            v = getattr(self, name)
            if not lo <= v <= hi:
                raise ConfigError(f"--{name.replace('_', '-')} {v} is out of range", f"allowed {lo} to {hi}",
                                  "pick a value in range")
        if not 1 <= self.group_tokens <= 64 or WINDOW_TOKENS % self.group_tokens:
            raise ConfigError(f"--group-tokens {self.group_tokens} does not divide the {WINDOW_TOKENS}-token "
                              "encoder window", "each window must split into whole groups of tokens",
                              "use 8 (Dolphin's 32 memory embeddings per window), or 4, 16, 32")
        if not 0 <= self.encoder_layers <= 64:
            raise ConfigError(f"--encoder-layers {self.encoder_layers} is out of range", "0 to the decoder's "
                              "layer count", "use 4 (the default) or fewer for a decoder of fewer layers")
        from edgec.compile.context import MEMORY_KINDS

        if self.memory not in MEMORY_KINDS:
            raise ConfigError(f"--memory {self.memory!r} is not a memory kind", f"choose from {', '.join(MEMORY_KINDS)}",
                              "use kv (every layer's key/value cache) or embeddings (input embeddings, Dolphin)")
        if not str(self.out).strip():
            raise ConfigError("--out is empty", "a folder is needed", f"pass a folder, e.g. {DEFAULT_DIR}")
        if self.restore_steps + self.continue_steps + self.contrast_steps == 0:
            raise ConfigError("nothing to train", "--restore-steps, --continue-steps and --contrast-steps are all 0",
                              "give at least one step")
        if not (0 < self.lr <= 1.0) or not math.isfinite(self.lr):
            raise ConfigError(f"--lr {self.lr} is out of range", "a learning rate in (0, 1]", "use 2e-3")
        if not (0 <= self.distill <= 100) or not math.isfinite(self.distill):
            raise ConfigError(f"--distill {self.distill} is out of range", "a weight in [0, 100]", "use 0 or 1")
        if not (0 <= self.contrast <= 100) or not math.isfinite(self.contrast):
            raise ConfigError(f"--contrast {self.contrast} is out of range", "a weight in [0, 100]", "use 1")
        if self.contrast_steps and self.contrast and self.batch_size < 2:
            raise ConfigError("--contrast-steps needs --batch-size 2 or more", "each passage is contrasted with "
                              "another passage's memory from its batch", "use the default --batch-size 4")

    @property
    def total_steps(self) -> int:
        return self.restore_steps + self.continue_steps + self.contrast_steps

    def identity(self) -> dict:
        """The options a resumed run must share with the checkpoint; with no contrast stage, its options are
        left out (runs from before the stage match)."""
        d = asdict(self)
        for k in ("out", "force", "threads", "checkpoint_every", "extra"):
            d.pop(k)
        if not self.contrast_steps:
            for k in ("contrast_steps", "contrast", "tail_tokens"):
                d.pop(k)
        return d


@dataclass
class Corpus:
    """Tokenized documents: ``train`` and ``eval`` lists of (int64 arrays), plus ``info`` for reports."""

    train: list
    eval: list
    info: dict


def load_corpus(tokenizer, train: bool = True) -> Corpus:
    """Training documents (calibration topics + stdlib docstrings; skipped, left empty, with
    ``train=False``) and evaluation documents (evaluation topics), tokenized without special tokens."""
    from edgec.compile.context import python_version, stdlib_docstrings
    from edgec.text_data import topic_documents

    cal, ev = topic_documents()

    def tok(texts):
        return [np.asarray(ids, np.int64) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]

    evaluation = tok(ev)
    info = {"eval": f"pydoc_data.topics evaluation topics (index % 4 == 0, {len(ev)})",
            "eval_tokens": int(sum(len(d) for d in evaluation))}
    if not train:
        return Corpus([], evaluation, info)
    docs = stdlib_docstrings()
    training = tok(cal) + tok(docs)
    info.update(train=f"pydoc_data.topics calibration topics (index % 4 != 0, {len(cal)}) + standard-library "
                      f"docstrings ({len(docs)} modules, Python {python_version()})",
                train_tokens=int(sum(len(d) for d in training)))
    return Corpus(training, evaluation, info)


def _pick(docs: list, need: int, rng, n: int) -> list[np.ndarray]:
    """``n`` slices of ``need`` tokens: documents drawn with probability ∝ usable length, random offsets."""
    usable = np.array([max(0, len(d) - need + 1) for d in docs], np.float64)
    if usable.sum() == 0:
        raise ModelError(f"no document has {need} tokens", "the corpus is too short", "use shorter contexts")
    idx = rng.choice(len(docs), size=n, p=usable / usable.sum())
    out = []
    for i in idx:
        o = int(rng.integers(0, usable[i]))
        out.append(docs[i][o:o + need])
    return out


def batch_for(step: int, settings: TrainSettings, corpus: Corpus, window_tokens: int):
    """(stage, contexts (B, L) int64, targets (B, T) int64) of training step ``step`` — a pure function of
    (seed, step), so resuming repeats nothing and skips nothing. Stages: ``restoration``, ``continuation``,
    then ``contrast`` (continuation's batches, read with the tail: :func:`contrast_loss`)."""
    rng = np.random.default_rng([settings.seed, step])
    if step < settings.restore_steps:
        w = np.stack(_pick(corpus.train, window_tokens, rng, settings.batch_size))
        return "restoration", w, w
    length = int(rng.choice(CONTEXT_CHOICES))
    s = np.stack(_pick(corpus.train, length + settings.target_tokens, rng, settings.batch_size))
    stage = "continuation" if step < settings.restore_steps + settings.continue_steps else "contrast"
    return stage, s[:, :length], s[:, length:]


def contrast_loss(comp, contexts: np.ndarray, targets: np.ndarray, doc_start: int, tail_tokens: int,
                  weight: float) -> tuple:
    """The contrast stage's loss of one batch: (loss, {"ce": mean CE of the targets after the memory and the
    tail, "ce_other": the same after the next passage's memory and this one's tail, "ce_tail": after the
    tail alone, "hinge": the mean of the per-passage hinges below}, nats per token).

    Each context (B, L) int64 is read as the app reads it (:func:`~edgec.targets.ort_context.split_context`:
    the memory of its older part, then its last ``tail_tokens`` as text); the targets (B, T) int64 are
    scored. Loss = CE + ``weight`` × mean over passages of max(0, CE_tail − CE_other): another passage's
    memory is trained to be worth no more than no memory. Without it, most of what a continuation-trained
    memory adds is generic — a learned soft prompt that helps any passage (measured on the default
    compressor: another document's memory + the tail 10.93 perplexity, the tail alone 13.09, the own memory
    10.44) — and the negative controls of Dolphin-style evaluations ((e), (f)) cannot tell it from reading.
    The hinge is the negative pair of a contrastive objective — edgec's own addition for those controls, not
    part of Dolphin's or ICAE's training. The passages of a batch are drawn independently, so "another" may
    rarely be the same document. Gradient reaches only the projector (the decoder is frozen)."""
    import torch

    from edgec.targets.ort_context import split_context

    b = len(contexts)
    older, tails = zip(*(split_context(c, comp.spec.group_tokens, tail_tokens) for c in contexts))
    t = len(tails[0])
    tail, tgt = torch.from_numpy(np.stack(tails)), torch.from_numpy(np.ascontiguousarray(targets))
    mem = torch.stack([comp.memory(c, doc_start) for c in older])
    with_tail = torch.cat([tail, tgt], 1)

    def ce(logits):
        return torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                                                 reduction="none").view(b, -1).mean(1)
    own = ce(comp.memory_logits(mem, with_tail, doc_start)[:, t:])
    loss, stats = own.mean(), {"ce": float(own.detach().mean())}
    if weight:
        other = ce(comp.memory_logits(mem.roll(1, 0), with_tail, doc_start)[:, t:])
        with torch.no_grad():
            start = comp.token_embeds(torch.tensor([[doc_start]])).expand(b, -1, -1)
            alone = ce(comp.target_logits(torch.cat([start, comp.token_embeds(tail)], 1), tgt))
        hinge = torch.relu(alone - other).mean()
        loss = loss + weight * hinge
        stats.update(ce_other=float(other.detach().mean()), ce_tail=float(alone.mean()), hinge=float(hinge.detach()))
    return loss, stats


def train_dtype() -> str:
    """The autocast dtype of training on this CPU: ``"bfloat16"`` where oneDNN supports bfloat16 (its
    ``avx512_core`` level and up: AVX-512 CPUs, natively with AVX-512 BF16 or AMX), else ``"float32"``.
    On an AVX2-only CPU a bfloat16 matmul with its backward measured ~10× slower than float32 (0.5 s vs
    0.05 s for 512×576×1536), which made a training step minutes long."""
    import torch

    try:
        native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch without the probe: stay safe
        native = False
    return "bfloat16" if native else "float32"


def _lr_at(step: int, total: int, lr: float) -> float:
    warm = max(1, min(20, total // 10))
    if step < warm:
        return lr * (step + 1) / warm
    return lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def _atomic_tensors(path: Path, tensors: dict, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(f"{TMP_PREFIX}{path.name}-{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        make_readable(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _remove_if_empty(folder: Path) -> None:
    """Remove ``folder`` only while it is empty: a run stopped before its first checkpoint leaves nothing
    behind, but never deletes what another run started in the same folder since wrote there."""
    try:
        folder.rmdir()
    except OSError:
        pass


def _optimizer_tensors(opt) -> dict:
    out = {}
    for i, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            out[f"optim.{i}.{k}"] = v.detach().reshape(-1) if k == "step" else v.detach()
    return out


def _load_optimizer(opt, tensors: dict) -> None:
    state: dict = {}
    for name, v in tensors.items():
        if name.startswith("optim."):
            _, i, k = name.split(".", 2)
            state.setdefault(int(i), {})[k] = v.reshape(()) if k == "step" else v
    sd = opt.state_dict()
    sd["state"] = state
    opt.load_state_dict(sd)


def compressor_paths(out: Path) -> tuple[Path, Path]:
    return out / "compressor.safetensors", out / "compressor.json"


def load_decoder(name: str):
    """(HFModel, tokenizer, frozen FP32 causal LM) for ``--decoder``."""
    from edgec.compile.hf_source import load_causal_lm, resolve
    from edgec.pipeline import cache_root

    try:
        hf = resolve(name, cache_root())
    except ConfigError as e:  # resolve speaks of compile's --model
        raise ConfigError(e.what.replace("--model", "--decoder", 1), e.why, e.fix) from None
    if hf.task != "text-generation":
        raise ConfigError(f"--decoder {name} is not a causal LM", f"its task is {hf.task}",
                          "give smollm2, a Llama-family GGUF file or Hugging Face directory")
    tokenizer, lm = load_causal_lm(hf)
    lm.config._attn_implementation = "sdpa"  # training speed; export switches back to eager
    return hf, tokenizer, lm


def train(settings: TrainSettings, progress) -> dict:
    """Train (or resume) a compressor into ``settings.out``; returns its ``compressor.json`` content.

    Raises :class:`ConfigError` for bad options or an output folder holding another run,
    :class:`OutputDirError` when it cannot be written, :class:`ModelError` for a decoder that is not
    Llama-family."""
    settings.check()  # before torch's import: a bad option is answered at once
    import torch

    from edgec.compile.context import Compressor, CompressorSpec

    out = Path(settings.out)
    weights, meta_path = compressor_paths(out)
    ckpt, ckpt_meta = out / "checkpoint.safetensors", out / "checkpoint.json"
    extend = None
    if meta_path.exists() and not settings.force:
        extend = _extendable(meta_path, weights, settings)
        if extend is None:
            raise ConfigError(f"{out} already holds a trained compressor", "training again would replace it",
                              "pass --force to retrain, or --out another folder (or only add --contrast-steps N "
                              "to the options it was trained with, to give it a contrast stage)")
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".probe-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise OutputDirError(f"cannot write {out}", e.strerror or str(e), "pass --out a writable folder") from None
    torch.manual_seed(settings.seed)
    torch.set_num_threads(settings.threads)
    progress.stage("loading the decoder")
    try:
        hf, tokenizer, lm = load_decoder(settings.decoder)
        spec = CompressorSpec(encoder_layers=settings.encoder_layers, group_tokens=settings.group_tokens,
                              window_tokens=WINDOW_TOKENS, hidden_size=lm.config.hidden_size,
                              decoder=settings.decoder, memory=settings.memory)
        comp = Compressor(lm, spec)
    except BaseException:
        if created:  # leave no empty folder behind for a decoder we could not use
            _remove_if_empty(out)
        raise
    doc_start = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    doc_start = 0 if doc_start is None else int(doc_start)
    corpus = load_corpus(tokenizer)
    opt = torch.optim.AdamW(comp.projector.parameters(), lr=settings.lr, weight_decay=0.01)
    total = settings.total_steps
    start, history, elapsed = 0, [], 0.0
    if extend is not None and not ckpt_meta.exists():  # a finished run gets its contrast stage: from its weights
        try:
            comp.projector.load_state_dict(extend["tensors"])
        except (RuntimeError, KeyError, ValueError) as e:
            raise ModelError(f"cannot read the compressor in {out}", "its weights do not fit its compressor.json "
                             f"({' '.join(str(e).split())[:120]})", "retrain it with edgec context train --force") from None
        start, history, elapsed = settings.restore_steps + settings.continue_steps, extend["history"], extend["elapsed"]
        progress.log(f"adding {settings.contrast_steps} contrast steps to the compressor trained in {out}")
    elif ckpt_meta.exists() and not settings.force:
        damaged = ModelError(f"the checkpoint in {out} is damaged", "checkpoint.json and checkpoint.safetensors "
                             "do not belong together or cannot be read", "pass --force to start over")
        try:
            m = json.loads(ckpt_meta.read_text())
            from safetensors import safe_open

            with safe_open(str(ckpt), "pt") as f:
                tensors = {k: f.get_tensor(k) for k in f.keys()}
                step_in_tensors = (f.metadata() or {}).get("step")
        except Exception as e:  # noqa: BLE001 — json, OS and safetensors' own error types
            raise damaged from e
        total_steps = settings.total_steps
        if (not isinstance(m, dict) or str(m.get("step")) != step_in_tensors or not isinstance(m.get("identity"), dict)
                or not isinstance(m.get("history"), list) or not isinstance(m.get("elapsed_s"), (int, float))
                or not isinstance(m.get("step"), int) or not 0 < m["step"] <= total_steps
                or len(m["history"]) != m["step"]):
            raise damaged
        if isinstance(m.get("identity"), dict):  # checkpoints from before --memory were of input embeddings
            m["identity"].setdefault("memory", "embeddings")
        if m.get("identity") != settings.identity():
            diff = sorted(k for k in settings.identity() if m.get("identity", {}).get(k) != settings.identity()[k])
            raise ConfigError(f"{out} holds a checkpoint of another training run", f"options differ: {', '.join(diff)}",
                              "rerun with the same options to resume, --force to start over, or --out another folder")
        try:
            comp.projector.load_state_dict({k: v for k, v in tensors.items() if not k.startswith("optim.")})
            _load_optimizer(opt, tensors)
        except (RuntimeError, KeyError, ValueError) as e:
            raise damaged from e
        start, history, elapsed = int(m["step"]), m["history"], float(m["elapsed_s"])
        progress.log(f"resuming from step {start} of {total}")
    try:
        return _train_loop(settings, comp, corpus, opt, spec, hf, doc_start, start, history, elapsed, progress)
    except BaseException:
        if created:  # interrupted before the first checkpoint: nothing to resume, no empty folder left
            _remove_if_empty(out)
        raise


def _extendable(meta_path: Path, weights: Path, settings: TrainSettings) -> dict | None:
    """A finished compressor that ``settings`` extend — trained with the same options and no contrast stage,
    ``settings`` adding one — as {"tensors", "history", "elapsed"}; None when it is another run.
    :class:`ModelError` when its files cannot be read."""
    if not settings.contrast_steps:
        return None
    try:
        meta = json.loads(meta_path.read_text())
        trained = meta["training"]
        same = {k: v for k, v in settings.identity().items() if k not in ("contrast_steps", "contrast", "tail_tokens")}
        stored = {"memory": "embeddings", **trained}  # runs from before --memory were of input embeddings
        if trained.get("contrast_steps") or any(stored.get(k) != v for k, v in same.items()):
            return None
        history = trained["history"]
        if not isinstance(history, list) or len(history) != settings.restore_steps + settings.continue_steps:
            return None
        from safetensors.torch import load_file

        return {"tensors": load_file(str(weights)), "history": history, "elapsed": float(trained["train_s"])}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelError(f"cannot read the compressor in {meta_path.parent}", " ".join(str(e).split())[:200],
                         "retrain it with edgec context train --force") from None


def _memory_loss(comp, contexts: np.ndarray, targets: np.ndarray, doc_start: int, distill: float):
    """Restoration's and continuation's loss of one batch: mean CE of ``targets`` (B, T) after the memory of
    ``contexts`` (B, L), plus ``distill`` × the KL to the decoder reading the context as text."""
    import torch

    window = comp.spec.window_tokens
    win = torch.from_numpy(np.ascontiguousarray(contexts.reshape(-1, window)))
    mem = comp.encode_windows(win)
    mem = mem.reshape(len(contexts), -1, *mem.shape[2:])
    tgt = torch.from_numpy(targets)
    logits = comp.memory_logits(mem, tgt, doc_start).float()
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1))
    if distill:
        # knowledge distillation from the same decoder reading the full context as text: the
        # gradient concentrates on the tokens the context actually changes
        with torch.no_grad():
            full = comp.token_embeds(torch.from_numpy(np.concatenate(
                [np.full((len(contexts), 1), doc_start, np.int64), contexts], 1)))
            teacher = torch.log_softmax(comp.target_logits(full, tgt).float(), -1)
        kl = torch.nn.functional.kl_div(torch.log_softmax(logits, -1), teacher, log_target=True,
                                        reduction="batchmean") / tgt.shape[1]
        loss = loss + distill * kl
    return loss


def _train_loop(settings, comp, corpus, opt, spec, hf, doc_start, start, history, elapsed, progress) -> dict:
    import torch

    from edgec.compile.context import trainable_state

    out = Path(settings.out)
    weights, meta_path = compressor_paths(out)
    ckpt, ckpt_meta = out / "checkpoint.safetensors", out / "checkpoint.json"
    total = settings.total_steps
    first_contrast = settings.restore_steps + settings.continue_steps
    t0 = time.perf_counter() - elapsed
    stage_name, running = None, []
    dtype = train_dtype()
    why = "oneDNN supports it on this CPU" if dtype == "bfloat16" else "no oneDNN bfloat16 on this CPU (no AVX-512)"
    progress.log(f"autocast: {dtype} ({why})")
    for step in range(start, total):
        stage, contexts, targets = batch_for(step, settings, corpus, spec.window_tokens)
        if stage != stage_name:
            stage_name, running = stage, []
            first, last = {"restoration": (1, settings.restore_steps),
                           "continuation": (settings.restore_steps + 1, first_contrast),
                           "contrast": (first_contrast + 1, total)}[stage]
            progress.stage(f"{stage}, steps {first}–{last}", total)
        if step == first_contrast and step:  # a fine-tune of the trained projector: its own optimizer
            opt = torch.optim.AdamW(comp.projector.parameters(), lr=settings.lr, weight_decay=0.01)
        for g in opt.param_groups:
            g["lr"] = (_lr_at(step, first_contrast, settings.lr) if stage != "contrast" else
                       _lr_at(step - first_contrast, settings.contrast_steps, settings.lr * CONTRAST_LR_FACTOR))
        stats = {}
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            if stage == "contrast":
                loss, stats = contrast_loss(comp, contexts, targets, doc_start, settings.tail_tokens, settings.contrast)
            else:
                loss = _memory_loss(comp, contexts, targets, doc_start, settings.distill if stage == "continuation" else 0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(comp.projector.parameters(), 1.0)
        opt.step()
        running.append(float(loss.detach()))
        history.append({"step": step + 1, "stage": stage, "loss": round(running[-1], 4),
                        "context_tokens": int(contexts.shape[1]), **{k: round(v, 4) for k, v in stats.items()}})
        progress.advance(step + 1, total, f"loss {np.mean(running[-20:]):.3f} (mean of the last 20 steps)")
        if (step + 1) % settings.checkpoint_every == 0 or step + 1 == total:
            # the step is in both files: a crash between the two writes is detected on resume
            _atomic_tensors(ckpt, {**trainable_state(comp.projector), **_optimizer_tensors(opt)},
                            {"step": str(step + 1)})
            write_atomic(ckpt_meta, json.dumps({"identity": settings.identity(), "step": step + 1,
                                                "history": history, "elapsed_s": time.perf_counter() - t0}))
    train_s = time.perf_counter() - t0
    meta = {"format": FORMAT, "spec": spec.to_dict(), "decoder_source": hf.source, "doc_start_id": doc_start,
            "training": {**settings.identity(), "train_s": round(train_s, 1), "steps": total,
                         "threads": settings.threads, "autocast": dtype, "corpus": corpus.info,
                         "final_loss": {s: round(float(np.mean([h["loss"] for h in history if h["stage"] == s][-25:])), 4)
                                        for s in ("restoration", "continuation", "contrast")
                                        if any(h["stage"] == s for h in history)},
                         "history": history,
                         **({"contrast_last_25": {k: round(float(np.mean([h[k] for h in history[-25:] if k in h])), 4)
                                                  for k in ("ce", "ce_other", "ce_tail", "hinge")
                                                  if any(k in h for h in history[-25:])}}
                            if settings.contrast_steps else {})},
            "trainable_parameters": int(sum(p.numel() for p in comp.projector.parameters()))}
    _atomic_tensors(weights, trainable_state(comp.projector))
    write_atomic(meta_path, json.dumps(meta, indent=1))
    ckpt.unlink(missing_ok=True)
    ckpt_meta.unlink(missing_ok=True)
    return meta


def check_tail_tokens(tail_tokens: int) -> None:
    from edgec.targets.ort_context import MAX_TAIL_TOKENS

    if not 0 <= tail_tokens <= MAX_TAIL_TOKENS:
        raise ConfigError(f"--tail-tokens {tail_tokens} is out of range",
                          f"0 (compress the whole context) to {MAX_TAIL_TOKENS}", f"use {DEFAULT_TAIL_TOKENS}")


def check_threads(threads: int) -> None:
    if not 1 <= threads <= 256:
        raise ConfigError(f"--threads {threads} is out of range", "1 to 256", "use 2")


def require_trained(folder: Path) -> tuple[Path, Path]:
    """The compressor's (weights, meta) paths; :class:`ConfigError` when ``folder`` holds no trained one."""
    weights, meta_path = compressor_paths(Path(folder))
    if not meta_path.is_file() or not weights.is_file():
        raise ConfigError(f"no trained compressor in {folder}", "compressor.json and compressor.safetensors "
                          "are written by edgec context train", f"run: edgec context train --out {folder}")
    return weights, meta_path


def load_compressor(folder: Path, lm=None):
    """(Compressor, meta) from ``folder`` (``compressor.safetensors`` + ``compressor.json``), on ``lm``
    (loaded from the spec's decoder when None). Raises :class:`ConfigError` when the folder has no
    trained compressor and :class:`ModelError` for damaged files or a decoder that does not match."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from edgec.compile.context import Compressor, CompressorSpec, load_projector

    weights, meta_path = require_trained(folder)
    try:
        meta = json.loads(meta_path.read_text())
        spec = CompressorSpec.from_dict(meta["spec"])
        tensors = load_file(str(weights))
    except (json.JSONDecodeError, KeyError, TypeError, SafetensorError, OSError) as e:
        why = f"missing key {e}" if isinstance(e, KeyError) else " ".join(str(e).split())[:200]
        raise ModelError(f"cannot read the compressor in {folder}", why,
                         "retrain it with edgec context train --force") from None
    if lm is not None and not 0 <= meta.get("doc_start_id", -1) < lm.config.vocab_size:
        raise ModelError(f"{meta_path} is damaged", "doc_start_id is outside the vocabulary", "retrain it")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ModelError(f"{meta_path} is not an edgec compressor",
                         f"format {meta.get('format')!r}" if isinstance(meta, dict) else "not a JSON object",
                         "retrain it with edgec context train --force")
    if (not isinstance(meta.get("doc_start_id"), int) or not isinstance(meta.get("training"), dict)
            or not isinstance(meta.get("decoder_source"), str)):
        raise ModelError(f"{meta_path} is damaged", "doc_start_id, training or decoder_source is missing or of the "
                         "wrong type", "retrain it with edgec context train --force")
    projector = load_projector(spec, tensors)
    tokenizer = None
    if lm is None:
        _, tokenizer, lm = load_decoder(spec.decoder)
    return Compressor(lm, spec, projector), meta, tokenizer


CONDITIONS = {
    "a_no_context": "no context",
    "b_full_context": "the full context as text",
    "c_compressed": "the compressed context: the memory of its older part, then its last t tokens as text "
                    "(N positions in all, the app's chain)",
    "c_memory_only": "the memory of the whole context, no text (N positions)",
    "d_last_tokens": "the last N tokens of the context as text (N = memory count: the same budget)",
    "e_zero_memory": "zeroed memory, the same last t tokens (negative control)",
    "e_shuffled_memory": "memory in shuffled order, the same last t tokens (negative control)",
    "e_tail_only": "the last t tokens alone, no memory (what (c)'s text gives by itself)",
    "f_other_document": "memory of another document's context, the same last t tokens (negative control)",
    "f_other_document_memory_only": "memory of another document's whole context, no text (negative control "
                                    "for the memory alone, (c) memory only: read next to (a) and the text reference)",
    "f_other_document_text": "another document's full context as text (reference for (f): what any text of "
                             "this corpus gives, whatever it says)",
}


def eval_samples(docs: list, context_tokens: int, target_tokens: int, samples: int) -> list[tuple[int, np.ndarray]]:
    """Deterministic held-out (doc index, tokens of length context+target) slices: every document cut into
    non-overlapping slices, then ``samples`` of them taken evenly spaced across the whole list."""
    need = context_tokens + target_tokens
    pool = [(i, d[o:o + need]) for i, d in enumerate(docs) for o in range(0, len(d) - need + 1, need)]
    if len(pool) < 2 or len({i for i, _ in pool}) < 2:
        raise ModelError(f"the evaluation text has too few {need}-token passages", f"{len(pool)} found",
                         "use a shorter --context-tokens")
    pick = np.unique(np.linspace(0, len(pool) - 1, min(samples, len(pool))).round().astype(int))
    return [pool[k] for k in pick]


def text_budgets(memory_tokens: int, context_tokens: int) -> list[int]:
    """The truncation curve's budgets: how many of the context's last tokens are given as text — 0 (= (a)),
    N/8, N/4, N/2, N (= (d)), 2N and the whole context (= (b)), N = ``memory_tokens``."""
    m = memory_tokens
    return sorted({k for k in (0, m // 8, m // 4, m // 2, m, 2 * m, context_tokens) if k <= context_tokens})


def text_equivalent_tokens(curve: list[dict], ppl: float) -> float | None:
    """How many context tokens given as text the memory is worth: where ``ppl`` (the memory's perplexity)
    meets the truncation curve ``[{"text_tokens": k, "perplexity": p}, ...]`` (k ascending), interpolated
    linearly in k between the first two points that bracket it. 0.0 when the memory is no better than no
    context; None when it beats every point (the whole context included)."""
    pts = [(float(c["text_tokens"]), float(c["perplexity"])) for c in curve]
    if ppl >= pts[0][1]:
        return 0.0
    for (k0, p0), (k1, p1) in zip(pts, pts[1:]):
        if p0 >= ppl >= p1:
            return round(k1 if p0 == p1 else k0 + (k1 - k0) * (p0 - ppl) / (p0 - p1), 1)
    return None


def perplexities(comp, doc_start: int, samples: list, context_tokens: int, tail_tokens: int = 0,
                 batch_size: int = 8, progress=None) -> dict:
    """Continuation perplexity of the last ``len - context_tokens`` tokens of each sample under every
    condition of :data:`CONDITIONS` (FP32, PyTorch); the compressed context (c) is read as the app's chain
    reads it (:func:`~edgec.targets.ort_context.split_context` with ``tail_tokens``: N positions, the
    memory of the older part, then the last t tokens as text). Returns {condition: perplexity} plus
    ``gap_closure`` = (PPL_a − PPL_c) / (PPL_a − PPL_b), ``memory_tokens`` (N), ``tail_tokens`` (t), ``tokens_scored``,
    the truncation curve ``text_budget`` (perplexity with the last k context tokens as text, k from
    :func:`text_budgets`) and ``memory_text_equivalent_tokens`` (:func:`text_equivalent_tokens`)."""
    import torch

    from edgec.targets.ort_context import split_context

    docs = [d for d, _ in samples]
    seqs = np.stack([s for _, s in samples])
    ctx, tgt = seqs[:, :context_tokens], seqs[:, context_tokens:]
    m = comp.spec.memory_tokens(context_tokens)
    older, tails = zip(*(split_context(c, comp.spec.group_tokens, tail_tokens) for c in ctx))
    t_len = len(tails[0])
    tail = np.stack(tails)  # (samples, t)
    same = {0: "a_no_context", m: "d_last_tokens", context_tokens: "b_full_context"}
    extra = [k for k in text_budgets(m, context_tokens) if k not in same]
    sums = {k: 0.0 for k in [*CONDITIONS, *(f"last_{k}" for k in extra)]}
    other = []
    for i in range(len(samples)):  # the next sample from another document
        j = next(k % len(samples) for k in range(i + 1, i + len(samples)) if docs[k % len(samples)] != docs[i])
        other.append(j)
    rng = np.random.default_rng(0)
    with torch.no_grad():
        mem = torch.stack([comp.memory(c, doc_start) for c in older])
        whole = torch.stack([comp.memory(c, doc_start) for c in ctx]) if t_len else None  # no tail: (c) itself
        start = comp.token_embeds(torch.tensor([[doc_start]]))
        # memory conditions: [doc_start ; memory] as the compressor reads it, then the tail as text
        memory_conditions = {"c_compressed", "e_zero_memory", "e_shuffled_memory", "f_other_document"}
        steps = list(range(0, len(samples), batch_size))
        for n, b in enumerate(steps):
            sl = slice(b, b + batch_size)
            k = len(seqs[sl])
            s = start.expand(k, -1, -1)
            c_ids = torch.from_numpy(ctx[sl])
            perm = torch.from_numpy(rng.permutation(mem.shape[1]))
            prefixes = {
                "a_no_context": s,
                "b_full_context": torch.cat([s, comp.token_embeds(c_ids)], 1),
                "c_compressed": mem[sl],
                "d_last_tokens": torch.cat([s, comp.token_embeds(c_ids[:, context_tokens - m:])], 1),
                "e_zero_memory": torch.zeros_like(mem[sl]),
                "e_shuffled_memory": mem[sl][:, perm],
                "e_tail_only": torch.cat([s, comp.token_embeds(torch.from_numpy(tail[sl]))], 1),
                "f_other_document": mem[other[sl]],
                "f_other_document_text": torch.cat([s, comp.token_embeds(torch.from_numpy(ctx[other[sl]]))], 1),
                **{f"last_{n}": torch.cat([s, comp.token_embeds(c_ids[:, context_tokens - n:])], 1) for n in extra},
            }
            t = torch.from_numpy(tgt[sl])
            with_tail = torch.from_numpy(np.concatenate([tail[sl], tgt[sl]], 1))
            for name, prefix in prefixes.items():
                if name in memory_conditions:  # the tail is read after the memory, only the target is scored
                    nll = comp.summed_nll(comp.memory_logits(prefix, with_tail, doc_start)[:, t_len:], t)
                else:
                    nll = comp.target_nll(prefix, t)
                sums[name] += float(nll)
            if t_len:  # the memory of the whole context, no text: this passage's, and another document's
                sums["c_memory_only"] += float(comp.memory_nll(whole[sl], t, doc_start))
                sums["f_other_document_memory_only"] += float(comp.memory_nll(whole[other[sl]], t, doc_start))
            if progress:
                progress.advance(n + 1, len(steps))
    n_tok = tgt.size
    if not t_len:
        sums["c_memory_only"] = sums["c_compressed"]
        sums["f_other_document_memory_only"] = sums["f_other_document"]
    ppl = {k: math.exp(v / n_tok) for k, v in sums.items()}
    a, b, c = ppl["a_no_context"], ppl["b_full_context"], ppl["c_compressed"]
    curve = [{"text_tokens": k, "perplexity": round(ppl[same.get(k, f"last_{k}")], 4)}
             for k in text_budgets(m, context_tokens)]
    return {**{k: round(ppl[k], 4) for k in CONDITIONS}, "gap_closure": round((a - c) / (a - b), 4) if a != b else None,
            "gap_closure_memory_only": round((a - ppl["c_memory_only"]) / (a - b), 4) if a != b else None,
            "text_budget": curve, "memory_text_equivalent_tokens": text_equivalent_tokens(curve, c),
            "memory_only_text_equivalent_tokens": text_equivalent_tokens(curve, ppl["c_memory_only"]),
            "memory_tokens": m, "tail_tokens": t_len, "tokens_scored": int(n_tok), "samples": len(samples),
            "documents": len(set(docs))}


def runtime_memory_perplexity(comp, rt, doc_start: int, samples: list, context_tokens: int) -> float:
    """Continuation perplexity (as :func:`perplexities`' (c), the context read as ``rt`` splits it) with the
    memory computed by an exported encoder — ``rt`` a :class:`~edgec.targets.ort_context.ContextRuntime`
    — and the PyTorch decoder: the quality of the graph that is timed."""
    import torch

    nll, n_tok = 0.0, 0
    with torch.no_grad():
        for _, seq in samples:
            older, tail = rt.split(seq[:context_tokens])
            mem = torch.from_numpy(rt.memory(older))
            tgt = torch.from_numpy(np.asarray(seq[context_tokens:], np.int64))[None]
            ids = torch.from_numpy(np.concatenate([tail, tgt[0].numpy()]))[None]
            if comp.spec.memory == "kv":  # the graph's cache entries (2, layers, kv_heads, 1 + M, head_dim)
                logits = comp.cached_logits(mem[0][:, None], mem[1][:, None], ids)
            else:
                logits = comp.memory_logits(mem[None], ids, doc_start)
            nll += float(comp.summed_nll(logits[:, len(tail):], tgt))
            n_tok += tgt.numel()
    return round(math.exp(nll / n_tok), 4)


# -- export ----------------------------------------------------------------------------------------
DECODER_VARIANTS = {"fp32": None, "int8w": "int8w", "int4w": "int4w"}


def _embed_graph(weight: np.ndarray, path: Path) -> None:
    """``input_ids`` (batch, seq) int64 → ``inputs_embeds`` (batch, seq, hidden) float32: one Gather."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    g = helper.make_graph(
        [helper.make_node("Gather", ["embed_tokens.weight", "input_ids"], ["inputs_embeds"], axis=0)], "embed",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("inputs_embeds", TensorProto.FLOAT, ["batch", "seq", weight.shape[1]])],
        [numpy_helper.from_array(weight.astype(np.float32), "embed_tokens.weight")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    helper.set_model_props(model, {"embedding_rows": str(weight.shape[0])})  # the runtime checks ids against it
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def _encoder_graph(comp, path: Path, doc_start: int) -> None:
    """``window_ids`` (windows, window_tokens) int64 → ``memory`` (windows, memory_per_window, hidden), or
    for ``memory="kv"`` → ``memory_keys``, ``memory_values`` (layers, kv_heads, 1 + windows ×
    memory_per_window, head_dim): the decoder's cache of ``[doc_start ; memory]``, keys rotated."""
    import torch

    kv = comp.spec.memory == "kv"

    class EncoderGraph(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.projector = comp.embed, comp.projector
            self.layers = torch.nn.ModuleList(comp.lm.model.layers[: comp.spec.encoder_layers]
                                              if not kv else comp.lm.model.layers)

        def forward(self, window_ids):
            mem = comp.encode_windows(window_ids)
            if not kv:
                return mem
            keys, values = comp.memory_kv(mem.reshape(1, -1, *mem.shape[2:]), doc_start)
            return keys[:, 0], values[:, 0]

    if kv:
        comp._start_kv(doc_start)  # computed now: constants in the graph, not a traced decoder forward
    attn = comp.lm.config._attn_implementation
    comp.lm.config._attn_implementation = "eager"
    try:
        example = torch.zeros((2, comp.spec.window_tokens), dtype=torch.int64)
        with torch.no_grad():
            names = ["memory_keys", "memory_values"] if kv else ["memory"]
            axes = {n: {2: "memory_positions"} for n in names} if kv else {"memory": {0: "windows"}}
            torch.onnx.export(EncoderGraph().eval(), (example,), str(path), input_names=["window_ids"],
                              output_names=names, dynamic_axes={"window_ids": {0: "windows"}, **axes},
                              opset_version=18, dynamo=False)
    finally:
        comp.lm.config._attn_implementation = attn


def _quantize_encoder(src: Path, dst: Path) -> None:
    """The encoder graph with dynamic INT8 MatMuls: ONNX Runtime's ``quantize_dynamic`` (weights INT8
    per tensor, activations quantized at run time; the embedding Gather stays FP32). Measured on the
    default compressor (AMD EPYC, 2 threads): 70 → 32 ms for four 256-token windows, continuation
    perplexity 15.519 → 15.513; per-channel weights were slower (41 ms) for no gain."""
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # its "consider pre-processing" advice is printed for every model
    try:
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"],
                         per_channel=False)
    finally:
        root.setLevel(level)


ENCODER_VARIANTS = {"fp32": "encoder.onnx", "int8": "encoder-int8.onnx"}


def export(folder: Path, variants: tuple[str, ...], threads: int, progress,
           tail_tokens: int = DEFAULT_TAIL_TOKENS) -> dict:
    """Export the compressor trained in ``folder`` to ``folder/onnx`` (encoder + projector, embedding,
    decoder per precision variant, tokenizer files, ``manifest.json``), check parity against PyTorch and
    return the manifest. ``tail_tokens``: how many of a context's last tokens the app's chain keeps as text
    (the manifest's ``tail_tokens``; see :func:`~edgec.targets.ort_context.split_context`). Written into a temporary folder and renamed into place. The encoder comes in
    two precisions (:data:`ENCODER_VARIANTS`): FP32 and dynamic INT8 (:func:`_quantize_encoder`), whose
    memory's cosine similarity to the FP32 memory is recorded, not gated (``edgec context eval``
    measures its perplexity).

    Parity (FP32): encoder memory max |Δ| and the decoder's last-position logits on a held-out
    ``[doc_start ; memory ; prompt]`` prefix (max |Δ|, same argmax). Raises :class:`ExportError` when
    the FP32 graphs disagree with PyTorch (memory |Δ| > 1e-3 or logits |Δ| > 1e-2), and
    :class:`ConfigError` / :class:`ModelError` as :func:`load_compressor`."""
    import tempfile

    import torch

    from edgec.compile.decoder import build_decoder
    from edgec.compile.hf_source import resolve
    from edgec.errors import ExportError
    from edgec.pipeline import cache_root
    from edgec.targets.ort_context import MANIFEST_FORMAT, ContextRuntime, split_context
    from edgec.targets.ort_generate import session

    unknown = [v for v in variants if v not in DECODER_VARIANTS]
    if unknown or not variants or "fp32" not in variants:
        raise ConfigError(f"--variants {','.join(variants)}: " + (f"unknown {unknown[0]!r}" if unknown else
                          "fp32 is required (it is the parity reference)"),
                          f"choose from {', '.join(DECODER_VARIANTS)}", "e.g. --variants fp32,int8w")
    check_threads(threads)
    check_tail_tokens(tail_tokens)
    folder = Path(folder)
    require_trained(folder)
    progress.stage("loading the compressor")
    comp, meta, tokenizer = load_compressor(folder)
    spec = comp.spec
    hf = resolve(spec.decoder, cache_root())
    dest = folder / "onnx"
    try:
        work = Path(tempfile.mkdtemp(prefix=".onnx-", dir=folder))
    except OSError as e:
        raise OutputDirError(f"cannot write the export into {folder}", e.strerror or str(e),
                             "make the folder writable, or copy the compressor to a writable one") from None
    try:
        progress.stage("exporting encoder + projector (FP32, dynamic INT8), embedding", 3)
        _encoder_graph(comp, work / ENCODER_VARIANTS["fp32"], meta["doc_start_id"])
        progress.advance(1, 3)
        _quantize_encoder(work / ENCODER_VARIANTS["fp32"], work / ENCODER_VARIANTS["int8"])
        progress.advance(2, 3)
        table = comp.embed.weight.detach()
        kv = spec.memory == "kv"
        if kv:  # the trained bridge embedding as one extra row: bridge_token_id = the vocabulary size
            table = torch.cat([table, comp.projector.bridge.detach()[None]])
        _embed_graph(table.numpy(), work / "embed.onnx")
        progress.advance(3, 3)
        decoders = {}
        progress.stage("building decoders (ONNX Runtime GenAI builder, inputs_embeds)", len(variants))
        layers = comp.lm.config.num_hidden_layers
        for n, v in enumerate(variants):
            prec = DECODER_VARIANTS[v]
            build_decoder(hf.path, work / f"decoder-{v}", layers,
                          None if prec is None else [(prec, prec)] * layers,
                          lm_head="fp32" if prec is None else "int8w", inputs_embeds=True)
            decoders[v] = {"path": f"decoder-{v}/model.onnx",
                           "precision": "fp32" if prec is None else f"{prec} weights (MatMulNBits, block 32), "
                                                                    "int8w LM head"}
            progress.advance(n + 1, len(variants))
        tok_files = []
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (hf.path / name).is_file():
                shutil.copyfile(hf.path / name, work / name)
                tok_files.append(name)
        cfg = comp.lm.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        cache_shape = [cfg.num_hidden_layers, cfg.num_key_value_heads, "1 + windows * memory_per_window", head_dim,
                       "float32"]
        manifest = {
            "format": MANIFEST_FORMAT, "compressor": spec.to_dict(), "memory_per_window": spec.memory_per_window,
            "compression_ratio": spec.group_tokens, "tail_tokens": int(tail_tokens),
            "doc_start_id": meta["doc_start_id"],
            **({"bridge_token_id": int(cfg.vocab_size)} if kv else {}),
            "encoder": {"path": "encoder.onnx", "inputs": {"window_ids": ["windows", spec.window_tokens, "int64"]},
                        "outputs": {"memory_keys": cache_shape, "memory_values": cache_shape} if kv else
                        {"memory": ["windows", spec.memory_per_window, spec.hidden_size, "float32"]}},
            "encoders": {"fp32": {"path": ENCODER_VARIANTS["fp32"], "precision": "fp32"},
                         "int8": {"path": ENCODER_VARIANTS["int8"],
                                  "precision": "dynamic INT8 MatMuls (weights per tensor), FP32 embedding"}},
            "embed": {"path": "embed.onnx", "rows": int(table.shape[0]), "inputs": {"input_ids": ["batch", "seq", "int64"]},
                      "outputs": {"inputs_embeds": ["batch", "seq", spec.hidden_size, "float32"]}},
            "decoders": decoders, "tokenizer": tok_files,
            "compressor_sha256": sha256_file(compressor_paths(folder)[0]),
            "eos_token_id": comp.lm.config.eos_token_id,
            "decoder_io": {"inputs": ["inputs_embeds (batch, seq, hidden) float32",
                                      "attention_mask (batch, past + seq) int64, ones",
                                      "past_key_values.<i>.key|value (batch, kv_heads, past, head_dim) float32"],
                           "outputs": ["logits (batch, seq, vocab) float32",
                                       "present.<i>.key|value (batch, kv_heads, past + seq, head_dim) float32"],
                           "layers": comp.lm.config.num_hidden_layers,
                           "kv_heads": comp.lm.config.num_key_value_heads,
                           "head_dim": getattr(comp.lm.config, "head_dim", None)
                           or comp.lm.config.hidden_size // comp.lm.config.num_attention_heads,
                           "genai_config": "decoder-<variant>/genai_config.json"},
            "chain": ["tokenize the context and the prompt with the tokenizer (no special tokens)",
                      f"N = len(context) // {spec.group_tokens}, t = min({int(tail_tokens)} (tail_tokens), N // 2): "
                      f"tail = the context's last t tokens, kept as text; older = the (N - t) * {spec.group_tokens} "
                      "tokens before them, compressed (the oldest of the context are dropped: N positions in all)",
                      f"cut older into windows of {spec.window_tokens} tokens (at least one: all doc_start_id "
                      "when nothing is left), right-padding the last with doc_start_id",
                      *(["keys, values = encoder(window_ids) (either graph of encoders; int8 is the faster); "
                         "P = 1 + N - t; past_key_values.<i>.key = keys[i, :, :P][None], "
                         "past_key_values.<i>.value = values[i, :, :P][None] (the cache of [doc_start ; memory])",
                         "decoder: inputs_embeds = embed([[bridge_token_id] + tail + prompt_ids]), attention_mask = "
                         "ones(1, P + 1 + t + len(prompt_ids)), past_key_values as above"] if kv else
                        [f"memory = encoder(window_ids).reshape(-1, {spec.hidden_size})[: N - t] "
                         "(either graph of encoders; int8 is the faster)",
                         "prefix = concat(embed([doc_start_id]), memory, embed(tail + prompt_ids))",
                         "decoder: inputs_embeds = prefix[None], attention_mask = ones(1, len(prefix)), "
                         "past_key_values of length 0"]),
                      "then per generated token: inputs_embeds = embed([[token]]), attention_mask = ones(1, past + 1), "
                      "past_key_values = the previous step's present; stop at eos_token_id"],
            "decoder_source": meta["decoder_source"], "training": {k: v for k, v in meta["training"].items()
                                                                   if k != "history"},
        }
        write_atomic(work / "manifest.json", json.dumps(manifest, indent=1))
        # parity against PyTorch on held-out text
        progress.stage("parity checks against PyTorch")
        corpus = load_corpus(tokenizer, train=False)
        (_, seq), = eval_samples(corpus.eval, 512, 16, 1)[:1]
        rt = ContextRuntime(work, "fp32", threads, encoder="fp32")
        prompt = seq[512:]
        older, tail = split_context(seq[:512], spec.group_tokens, tail_tokens)  # as the chain reads the context
        read = np.concatenate([tail, prompt])
        with torch.no_grad():
            mem = comp.memory(older, meta["doc_start_id"])
            if kv:  # the cache of [doc_start ; memory], then [bridge ; tail ; prompt]; logits after the prompt
                keys, values = comp.memory_kv(mem[None], meta["doc_start_id"])
                mem_t = torch.stack([keys[:, 0], values[:, 0]]).numpy()
                nxt = torch.from_numpy(np.append(read, 0).astype(np.int64))[None]
                logits_t = comp.cached_logits(keys, values, nxt)[0, -1].numpy()
            else:
                mem_t = mem.numpy()
                start = comp.token_embeds(torch.tensor([[meta["doc_start_id"]]]))[0]
                prefix_t = torch.cat([start, mem, comp.token_embeds(torch.from_numpy(read))])
                logits_t = comp.lm(inputs_embeds=prefix_t[None]).logits[0, -1].numpy()
        mem_o = rt.memory(older)
        x, past, past_len = rt.inputs(seq[:512], prompt)
        logits_o, _ = rt.decoder._run(x[None], past, past_len)
        parity = {"memory_max_abs_diff": float(np.abs(mem_o - mem_t).max()),
                  "logits_max_abs_diff": float(np.abs(logits_o - logits_t).max()),
                  "same_next_token": bool(np.argmax(logits_o) == np.argmax(logits_t))}
        if parity["memory_max_abs_diff"] > 1e-3 or parity["logits_max_abs_diff"] > 1e-2:
            raise ExportError("the exported compressor does not match PyTorch",
                              f"memory |Δ| {parity['memory_max_abs_diff']:.2g}, logits |Δ| "
                              f"{parity['logits_max_abs_diff']:.2g}", "report this with the decoder used")
        mem_q = rt.memory(older, session(str(work / ENCODER_VARIANTS["int8"]), threads))  # not a 2nd decoder
        cos = (mem_q * mem_o).sum(-1) / np.maximum(np.linalg.norm(mem_q, axis=-1) * np.linalg.norm(mem_o, axis=-1),
                                                    1e-12)
        manifest["encoders"]["int8"].update(memory_cosine_to_fp32=round(float(cos.mean()), 6),
                                            memory_cosine_to_fp32_min=round(float(cos.min()), 6),
                                            memory_max_abs_diff=float(np.abs(mem_q - mem_o).max()))
        for v in variants:
            if v != "fp32":
                q = ContextRuntime(work, v, threads, encoder="fp32")
                x, past, past_len = q.inputs(seq[:512], prompt)
                lo, _ = q.decoder._run(x[None], past, past_len)
                decoders[v]["same_next_token_as_fp32"] = bool(np.argmax(lo) == np.argmax(logits_t))
        manifest["parity_fp32"] = parity
        manifest["sha256"] = {p.relative_to(work).as_posix(): sha256_file(p) for p in sorted(work.rglob("*.onnx"))}
        manifest["size_bytes"] = {p.relative_to(work).as_posix(): p.stat().st_size for p in sorted(work.rglob("*.onnx"))}
        write_atomic(work / "manifest.json", json.dumps(manifest, indent=1))
        old = folder / f".onnx-old-{os.getpid()}"
        if dest.exists():
            dest.rename(old)
        work.rename(dest)
        make_readable(dest)  # mkdtemp made it private; the export is meant to be shipped
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return manifest


# -- evaluation --------------------------------------------------------------------------------------
TTFT_CONTEXTS = (64, 128, 256, 512, 1024, 2048)
PROMPT_TOKENS = 16

_PEAK_SCRIPT = """
import json, sys
from pathlib import Path
from edgec.targets.ort_context import ContextRuntime
rt = ContextRuntime(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[7])
ids = json.loads(sys.argv[4])
ctx, prompt = ids[:int(sys.argv[5])], ids[int(sys.argv[5]):]
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
before = status("VmRSS:")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak (VmHWM) to the current resident set
rt.ttft_s(ctx, prompt, sys.argv[6] == "compressed")
print(json.dumps({"rss_before_bytes": before, "peak_rss_bytes": status("VmHWM:")}))
"""


def peak_memory(export_dir: Path, variant: str, threads: int, ids: np.ndarray, context_tokens: int,
                encoder: str = "fp32") -> dict:
    """Peak resident memory of one first-token run per mode, each in a fresh process (Linux
    ``/proc/self/clear_refs`` resets the peak after the sessions are loaded): {mode: {"rss_before_bytes",
    "peak_rss_bytes", "inference_peak_bytes"}}; empty when /proc is not available."""
    import subprocess
    import sys

    if not Path("/proc/self/clear_refs").exists():
        return {}
    out = {}
    for mode in ("full", "compressed"):
        r = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(export_dir), variant, str(threads),
                            json.dumps([int(i) for i in ids]), str(context_tokens), mode, encoder],
                           capture_output=True, text=True, timeout=600)
        if r.returncode:
            return {}
        d = json.loads(r.stdout.strip().splitlines()[-1])
        d["inference_peak_bytes"] = d["peak_rss_bytes"] - d["rss_before_bytes"]
        out[mode] = d
    return out


def ttft_rows(rt, stream: np.ndarray, contexts=TTFT_CONTEXTS, repeats: int = 5, progress=None) -> list[dict]:
    """Time to first token on cpu-ort, full-context prefill vs encoder + projector + short prefill, for each
    context length (the first ``L`` tokens of ``stream`` then a :data:`PROMPT_TOKENS`-token prompt). One
    warm-up each, then ``repeats`` interleaved pairs; medians in ms (``kind`` measured)."""
    rows = []
    for n, length in enumerate(contexts):
        ctx, prompt = stream[:length], stream[length:length + PROMPT_TOKENS]
        rt.ttft_s(ctx, prompt, True)
        rt.ttft_s(ctx, prompt, False)
        full, comp, enc = [], [], []
        older, tail = rt.split(ctx)
        for r in range(repeats):
            for compressed in ((True, False) if r % 2 else (False, True)):
                (comp if compressed else full).append(rt.ttft_s(ctx, prompt, compressed)[0])
            t0 = time.perf_counter()
            rt.memory(older)
            enc.append(time.perf_counter() - t0)
        f, c = float(np.median(full)) * 1e3, float(np.median(comp)) * 1e3
        t = len(tail)
        rows.append({"context_tokens": length, "memory_tokens": length // rt.group - t, "tail_tokens": t,
                     "prompt_tokens": PROMPT_TOKENS, "full_prefill_tokens": 1 + length + PROMPT_TOKENS,
                     "compressed_prefill_tokens": (1 + t + PROMPT_TOKENS if rt.memory_kind == "kv"  # [bridge ; tail ; prompt]
                                                   else 1 + length // rt.group + PROMPT_TOKENS),
                     "full_ttft_ms": round(f, 2), "compressed_ttft_ms": round(c, 2),
                     "encoder_ms": round(float(np.median(enc)) * 1e3, 2), "ttft_speedup": round(f / c, 3),
                     "repeats": repeats, "kind": "measured"})
        if progress:
            progress.advance(n + 1, len(contexts), f"{length} tokens: {f / c:.2f}×")
    return rows


def break_even(rows: list[dict]) -> float | None:
    """The context length (tokens) where compression starts to pay: linear interpolation of the speed-up
    between the measured lengths around 1.0; the shortest length when it pays everywhere, None never."""
    for prev, row in zip([None, *rows], rows):
        if row["ttft_speedup"] >= 1.0:
            if prev is None:
                return float(row["context_tokens"])
            a, b = prev["ttft_speedup"], row["ttft_speedup"]
            x0, x1 = prev["context_tokens"], row["context_tokens"]
            return round(x0 + (1.0 - a) * (x1 - x0) / (b - a), 1)
    return None


def _field(d: dict, key: str, sub: str):
    """``d[key][sub]`` of a manifest that may be damaged; None where it is missing or not a dict."""
    v = d.get(key)
    return v.get(sub) if isinstance(v, dict) else None


def evaluate(folder: Path, context_tokens: int, samples: int, variant: str, threads: int, progress,
             encoder: str = "int8", tail_tokens: int = DEFAULT_TAIL_TOKENS) -> dict:
    """``edgec context eval``: perplexities under every condition (PyTorch, FP32), the (c) perplexity with
    the memory of the exported ``encoder`` graph (fp32 or int8), and TTFT / peak memory on cpu-ort with that
    encoder and the ``variant`` decoder (exporting first when ``folder/onnx`` is missing or stale). Returns
    the figures (see the CLI's --json)."""
    import torch

    if not 64 <= context_tokens <= 4096 or context_tokens % 8:
        raise ConfigError(f"--context-tokens {context_tokens} is out of range", "64 to 4096, a multiple of 8",
                          "use 512")
    if not 2 <= samples <= 10_000:
        raise ConfigError(f"--samples {samples} is out of range", "2 to 10000", "use 48")
    check_threads(threads)
    check_tail_tokens(tail_tokens)
    if variant not in DECODER_VARIANTS:
        raise ConfigError(f"--variant {variant!r} is not a decoder precision", f"choose from {', '.join(DECODER_VARIANTS)}",
                          "use fp32")
    if encoder not in ENCODER_VARIANTS:
        raise ConfigError(f"--encoder {encoder!r} is not an encoder precision",
                          f"choose from {', '.join(ENCODER_VARIANTS)}", "use int8")
    folder = Path(folder)
    require_trained(folder)
    export_dir = folder / "onnx"
    old: dict = {}
    if (export_dir / "manifest.json").is_file():
        try:
            old = json.loads((export_dir / "manifest.json").read_text())
        except (OSError, json.JSONDecodeError):
            old = {}
        old = old if isinstance(old, dict) else {}
    same_weights = bool(old) and old.get("compressor_sha256") == sha256_file(compressor_paths(folder)[0])
    encoders = old.get("encoders") if isinstance(old.get("encoders"), dict) else {}
    current = same_weights and all(  # a missing encoder graph: export again, not fail after the perplexity pass
        isinstance(encoders.get(v), dict) and (export_dir / str(encoders[v].get("path"))).is_file()
        for v in ENCODER_VARIANTS) and (  # the first KV exports had no bridge row count: export again
        _field(old, "compressor", "memory") != "kv" or isinstance(_field(old, "embed", "rows"), int)) and (
        old.get("tail_tokens", 0) == tail_tokens)  # the chain the export describes is the one measured
    old_variants = [v for v in (old.get("decoders") or {}) if v in DECODER_VARIANTS] if isinstance(
        old.get("decoders"), dict) else []
    if current and variant not in old_variants:
        raise ConfigError(f"--variant {variant}: not in the export", f"it has {', '.join(old_variants) or 'none'}",
                          f"export it first: edgec context export {folder} --variants "
                          + ",".join(dict.fromkeys(["fp32", *old_variants, variant])))
    torch.set_num_threads(threads)
    progress.stage("loading the compressor")
    comp, meta, tokenizer = load_compressor(folder)
    corpus = load_corpus(tokenizer, train=False)
    pool = eval_samples(corpus.eval, context_tokens, 128, samples)
    progress.stage(f"perplexity, {len(CONDITIONS)} conditions and the truncation curve × {len(pool)} held-out passages "
                   "(PyTorch FP32)",
                   math.ceil(len(pool) / 8))
    t0 = time.perf_counter()
    ppl = perplexities(comp, meta["doc_start_id"], pool, context_tokens, tail_tokens, progress=progress)
    ppl["eval_s"] = round(time.perf_counter() - t0, 1)
    ppl["context_tokens"], ppl["target_tokens"] = context_tokens, 128
    if not current:
        if old:
            if old.get("compressor_sha256") and not same_weights:
                why = "from other weights (the compressor was retrained)"
            elif same_weights and old.get("tail_tokens", 0) != tail_tokens:
                why = f"with --tail-tokens {old.get('tail_tokens', 0)}"
            else:
                why = "by an older edgec, or is damaged"
            progress.log(f"{export_dir} was exported {why}: exporting again")
        export(folder, tuple(dict.fromkeys(["fp32", "int8w", *old_variants, variant])), threads, progress,
               tail_tokens)
    from edgec.targets.ort_context import ContextRuntime

    manifest = json.loads((export_dir / "manifest.json").read_text())
    rt = ContextRuntime(export_dir, variant, threads, encoder)
    progress.stage(f"perplexity with the {encoder} ONNX encoder's memory")
    ppl_rt = runtime_memory_perplexity(comp, rt, meta["doc_start_id"], pool, context_tokens)
    comp_config = comp.lm.config
    del comp
    stream = np.concatenate(corpus.eval)
    max_pos = int(getattr(comp_config, "max_position_embeddings", 1 << 30))
    contexts = [n for n in TTFT_CONTEXTS if 1 + n + PROMPT_TOKENS <= min(max_pos, len(stream))]
    progress.stage(f"time to first token on cpu-ort ({variant} decoder), full vs compressed", len(contexts))
    rows = ttft_rows(rt, stream, contexts, progress=progress)
    peak = {}
    if 1024 in contexts:
        progress.stage("peak memory at 1024 tokens (one process per mode)")
        peak = peak_memory(export_dir, variant, threads, stream[:1024 + PROMPT_TOKENS], 1024, encoder)
    by_len = {r["context_tokens"]: r for r in rows}
    spec = manifest["compressor"]
    return {"compressor": folder.as_posix(), "spec": spec, "compression_ratio": spec["group_tokens"],
            "memory_per_window": manifest["memory_per_window"], "conditions": CONDITIONS, "perplexity": ppl,
            "gap_closure": ppl["gap_closure"], "c_beats_d": ppl["c_compressed"] < ppl["d_last_tokens"],
            "memory_text_equivalent_tokens": ppl["memory_text_equivalent_tokens"], "tail_tokens": tail_tokens,
            "ttft": rows, "ttft_speedup_1024": by_len[1024]["ttft_speedup"] if 1024 in by_len else None,
            "break_even_context_tokens": break_even(rows), "peak_memory_1024": peak,
            "encoder": encoder, "c_compressed_onnx_encoder": ppl_rt,
            "encoder_parity": manifest.get("encoders", {}).get(encoder, {}),
            "variant": variant, "threads": threads, "target": "cpu-ort", "parity_fp32": manifest.get("parity_fp32"),
            "training": manifest.get("training"), "corpus": corpus.info, "eval_samples": len(pool)}
