"""A Dolphin-style context compressor for a frozen decoder: long text → a few memory embeddings.

Dolphin (Nexa AI, 2024, "Dolphin: Long Context as a New Modality for Energy-Efficient On-Device
Language Models", §3) reads a long context with a small encoder, emits a fixed number of memory
embeddings per window and maps them with a projector into the main decoder's input-embedding space;
the decoder then takes ``[memory ; prompt]`` through ``inputs_embeds`` and never prefills the long
text. ICAE (Ge et al. 2024, §3) trains the same shape with a restoration (autoencoding) stage and a
continuation (language-modelling) stage while the decoder stays frozen.

edgec's compressor, for a Llama-family decoder (SmolLM2-135M):

- **encoder** = the decoder's own token embedding and first ``encoder_layers`` transformer blocks
  (shared weights: nothing new to ship for them), run causally on independent windows of
  ``window_tokens`` tokens (positions restart at 0 in each window);
- **memory**: the encoder's states of each group of ``group_tokens`` consecutive tokens are
  RMS-normalized, concatenated (``group_tokens × hidden`` features) and mapped by the **projector**
  (a linear map initialized to the group mean scaled to the embeddings' RMS, plus a zero-initialized
  GELU MLP) to one embedding in the decoder's input space — so a window of 256 tokens yields
  256 / 8 = 32 memory embeddings (Dolphin's count) and the compression ratio is ``group_tokens``;
- the decoder reads ``[<|endoftext|> ; memory ; prompt]`` (``memory="embeddings"``), or — with
  ``memory="kv"`` — the memory enters **every layer's key/value cache** instead of the input: the
  projector maps each group to one hidden state per decoder layer, which that layer's own (frozen)
  input norm and key/value projections turn into the cache entry of one position (RoPE at its
  position); the decoder then prefills only ``[bridge ; prompt]`` after ``[<|endoftext|> ; memory]``
  in its cache. ``bridge`` is one trained embedding (the query that predicts the first token after
  the memory). This is prefix-tuning's placement (Li & Liang 2021, §4) used for compressed context
  as in 500xCompressor (Li et al., ACL 2025, §3: KV values of the compressed tokens carry more than
  their output embeddings); measured here: perplexity 15.15 vs 16.44 for input embeddings after the
  same 120 training steps.

Because the encoder is causal, a short last window is padded on the right without changing the
states of its real tokens, and groups made only of padding are dropped. A context whose length is
not a multiple of ``group_tokens`` loses its oldest ``length % group_tokens`` tokens.

Only the projector (and ``bridge``) is trained (:func:`trainable_state`); the decoder and the encoder blocks stay
frozen. Everything here is torch; training loops, checkpoints and the CLI live in
``edgec.context_job``.
"""

from __future__ import annotations

import ast
import sys
import sysconfig
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from edgec.errors import ConfigError, ModelError

DOC_START = "<|endoftext|>"
MEMORY_KINDS = ("kv", "embeddings")


@dataclass(frozen=True)
class CompressorSpec:
    """What fixes a compressor's shapes; stored with every checkpoint and artifact.

    ``encoder_layers``: decoder blocks reused as the encoder; ``group_tokens``: context tokens per
    memory embedding (= compression ratio); ``window_tokens``: encoder window length (a multiple of
    ``group_tokens``); ``projector_hidden``: width of the projector's MLP; ``hidden_size``: the
    decoder's embedding width; ``decoder``: the decoder's name (as given to ``--decoder``); ``memory``:
    where the memory enters the decoder, ``"embeddings"`` (input embeddings, Dolphin) or ``"kv"`` (every
    layer's key/value cache); files without it are ``"embeddings"`` (edgec before the KV memory).
    The defaults here are what a file without the key means; ``edgec context train``'s own defaults
    are :class:`edgec.context_job.TrainSettings`' (4 encoder layers, ``kv``)."""

    encoder_layers: int = 1
    group_tokens: int = 8
    window_tokens: int = 256
    projector_hidden: int = 1024
    hidden_size: int = 576
    decoder: str = "smollm2"
    memory: str = "embeddings"

    @property
    def memory_per_window(self) -> int:
        return self.window_tokens // self.group_tokens

    def memory_tokens(self, context_tokens: int) -> int:
        """Memory embeddings for a context of ``context_tokens`` tokens."""
        return context_tokens // self.group_tokens

    def check(self, decoder_layers: int | None = None) -> None:
        """Raise :class:`ConfigError` for shapes that cannot work."""
        if not 1 <= self.group_tokens <= 64:
            raise ConfigError(f"group_tokens {self.group_tokens} is out of range", "1 to 64 context tokens per "
                              "memory embedding", "use 8 (Dolphin's 8× compression) unless you measured otherwise")
        if self.window_tokens < self.group_tokens or self.window_tokens % self.group_tokens:
            raise ConfigError(f"window_tokens {self.window_tokens} is not a multiple of group_tokens "
                              f"{self.group_tokens}", "each window must split into whole groups",
                              "use 256 with group_tokens 8")
        hi = decoder_layers if decoder_layers is not None else 64
        if not 0 <= self.encoder_layers <= hi:
            raise ConfigError(f"--encoder-layers {self.encoder_layers} is out of range",
                              f"the decoder has {hi} layers", f"pass --encoder-layers between 0 and {hi}")
        if self.memory not in MEMORY_KINDS:
            raise ConfigError(f"memory {self.memory!r} is not a memory kind", f"choose from {', '.join(MEMORY_KINDS)}",
                              "use kv")
        if not 1 <= self.projector_hidden <= 16384:
            raise ConfigError(f"projector_hidden {self.projector_hidden} is out of range", "1 to 16384",
                              "use 1024")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> CompressorSpec:
        known = set(cls.__dataclass_fields__)
        if not isinstance(d, dict) or set(d) - known:
            raise ModelError("the compressor's spec is not readable", f"unknown keys {sorted(set(d) - known)}"
                             if isinstance(d, dict) else "not an object", "retrain it with edgec context train")
        if any(not isinstance(v, str if k in ("decoder", "memory") else int) or isinstance(v, bool) for k, v in d.items()):
            raise ModelError("the compressor's spec is not readable", "decoder and memory must be strings, the rest "
                             "integers",
                             "retrain it with edgec context train --force")
        spec = cls(**d)
        try:
            spec.check()
        except ConfigError as e:
            raise ModelError("the compressor's spec is damaged", e.what, "retrain it with edgec context train --force") \
                from None
        if not 1 <= spec.hidden_size <= 65536:
            raise ModelError("the compressor's spec is damaged", f"hidden_size {spec.hidden_size}", "retrain it")
        return spec


def _torch():
    import torch

    return torch


def build_projector(spec: CompressorSpec, embedding_rms: float, layer_rms=None):
    """The projector. ``memory="embeddings"``: ``(W, T, hidden)`` float32 encoder states → ``(W, T /
    group_tokens, hidden)`` memory embeddings. ``memory="kv"``: → ``(W, T / group_tokens, layers, hidden)``,
    one hidden state per decoder layer (``layer_rms``: a sequence of the decoder's typical hidden-state RMS
    at each layer's input, required there; it sets the number of layers), plus ``bridge`` (hidden,).

    The linear path starts at the RMS-normalized group mean scaled to the embeddings' RMS (per layer:
    to that layer's RMS), so an untrained compressor already emits averaged states; the MLP path (GELU)
    starts at zero."""
    torch = _torch()
    nn = torch.nn
    g, d = spec.group_tokens, spec.hidden_size

    class Projector(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm_weight = nn.Parameter(torch.ones(d))
            self.linear = nn.Linear(g * d, d)
            self.up = nn.Linear(g * d, spec.projector_hidden)
            self.down = nn.Linear(spec.projector_hidden, d)
            with torch.no_grad():
                self.linear.weight.copy_(torch.eye(d).repeat(1, g) * (embedding_rms / g))
                self.linear.bias.zero_()
                self.down.weight.zero_()
                self.down.bias.zero_()

        def forward(self, states):  # (W, T, d) → (W, T / g, d)
            states = states * torch.rsqrt(states.pow(2).mean(-1, keepdim=True) + 1e-6) * self.norm_weight
            x = states.reshape(states.shape[0], states.shape[1] // g, g * d)
            return self.linear(x) + self.down(torch.nn.functional.gelu(self.up(x)))

    class KVProjector(nn.Module):
        def __init__(self, rms) -> None:
            super().__init__()
            self.layers = len(rms)
            self.norm_weight = nn.Parameter(torch.ones(d))
            self.gain = nn.Parameter(torch.as_tensor(rms, dtype=torch.float32)[:, None].repeat(1, d))  # (L, d)
            self.up = nn.Linear(g * d, spec.projector_hidden)
            self.down = nn.Linear(spec.projector_hidden, self.layers * d)
            self.bridge = nn.Parameter(torch.full((d,), embedding_rms))
            with torch.no_grad():
                self.down.weight.zero_()
                self.down.bias.zero_()

        def forward(self, states):  # (W, T, d) → (W, T / g, L, d)
            states = states * torch.rsqrt(states.pow(2).mean(-1, keepdim=True) + 1e-6) * self.norm_weight
            w, t = states.shape[0], states.shape[1] // g
            base = states.reshape(w, t, g, d).mean(2)[:, :, None, :] * self.gain
            x = states.reshape(w, t, g * d)
            return base + self.down(torch.nn.functional.gelu(self.up(x))).reshape(w, t, self.layers, d)

    if spec.memory == "kv":
        if layer_rms is None:
            raise ValueError("a KV-memory projector needs layer_rms (one value per decoder layer)")
        return KVProjector(layer_rms)
    return Projector()


def hidden_rms(lm, ids) -> list[float]:
    """The typical RMS of ``lm``'s hidden state at each layer's input on token ids ``ids`` (n,) int64
    (the first position left out: Llama-family models park huge activations there), one float per layer —
    the KV projector's starting scale."""
    torch = _torch()
    with torch.no_grad():
        hs = lm(torch.as_tensor(ids, dtype=torch.int64)[None], output_hidden_states=True).hidden_states
    return [float(h[0, 1:].float().pow(2).mean().sqrt()) for h in hs[: lm.config.num_hidden_layers]]


class Compressor:
    """Encoder (the decoder's first blocks) + projector around a frozen Llama-family causal LM.

    ``lm``: a transformers ``LlamaForCausalLM``-like model (``model.embed_tokens``, ``model.layers``,
    ``model.rotary_emb``); its parameters are frozen here. ``projector``: from
    :func:`build_projector` (trainable)."""

    def __init__(self, lm, spec: CompressorSpec, projector=None) -> None:
        torch = _torch()
        cfg = lm.config
        if not all(hasattr(lm, "model") and hasattr(lm.model, a) for a in ("embed_tokens", "layers", "rotary_emb")):
            raise ModelError(f"{type(lm).__name__} is not a Llama-family causal LM",
                             "the compressor reuses model.embed_tokens, model.layers and model.rotary_emb",
                             "use smollm2 or another LlamaForCausalLM")
        if cfg.hidden_size != spec.hidden_size:
            raise ModelError(f"the compressor was built for hidden size {spec.hidden_size}",
                             f"the decoder has {cfg.hidden_size}", "use the decoder it was trained with")
        spec.check(cfg.num_hidden_layers)
        if spec.memory == "kv" and (getattr(cfg, "model_type", None) != "llama" or any(
                hasattr(layer.self_attn, "k_norm") for layer in lm.model.layers)):
            raise ModelError(f"--memory kv needs a plain Llama decoder, not {getattr(cfg, 'model_type', '?')}",
                             "the KV memory applies each layer's norm, k/v projections and RoPE as Llama does",
                             "use --memory embeddings with this decoder")
        self.lm, self.spec = lm, spec
        for p in lm.parameters():
            p.requires_grad_(False)
        self.embed = lm.model.embed_tokens
        rms = float(self.embed.weight.pow(2).mean().sqrt())
        if projector is None:
            # the layers' typical scale, on a fixed token sequence (only where the KV projector starts)
            probe = np.arange(256) * 7919 % cfg.vocab_size if spec.memory == "kv" else None
            projector = build_projector(spec, rms, None if probe is None else hidden_rms(lm, probe))
        elif spec.memory == "kv" and getattr(projector, "layers", None) != cfg.num_hidden_layers:
            raise ModelError(f"the compressor's KV memory is for {getattr(projector, 'layers', '?')} decoder layers",
                             f"the decoder has {cfg.num_hidden_layers}", "use the decoder it was trained with")
        self.projector = projector
        self._torch = torch
        self._start_cache: dict = {}  # doc_start id → the decoder's cache of that one token

    # -- the encoder ------------------------------------------------------------------------------
    def encode_windows(self, window_ids):
        """``window_ids`` (W, window_tokens) int64 → memory (W, memory_per_window, hidden) float32, or
        (W, memory_per_window, layers, hidden) for ``memory="kv"``."""
        torch = self._torch
        h = self.embed(window_ids)
        t = window_ids.shape[1]
        pos = torch.arange(t)[None]
        cos_sin = self.lm.model.rotary_emb(h, pos)
        mask = torch.full((t, t), float("-inf")).triu(1)[None, None]
        for layer in self.lm.model.layers[: self.spec.encoder_layers]:
            h = layer(h, attention_mask=mask, position_ids=pos, position_embeddings=cos_sin)
        return self.projector(h)

    def windows(self, context_ids: np.ndarray, pad_id: int) -> tuple[np.ndarray, int]:
        """A context (L,) int → (windows (W, window_tokens) int64 right-padded with ``pad_id``, memory
        count M = L // group_tokens); the oldest ``L % group_tokens`` tokens are dropped."""
        from edgec.targets.ort_context import context_windows  # the app's chain cuts windows the same way

        return context_windows(context_ids, self.spec.group_tokens, self.spec.window_tokens, pad_id)

    def memory(self, context_ids: np.ndarray, pad_id: int = 0):
        """A context (L,) int → memory (L // group_tokens, hidden) float32, or (L // group_tokens, layers,
        hidden) for ``memory="kv"`` (torch, keeps the graph)."""
        torch = self._torch
        win, m = self.windows(context_ids, pad_id)
        mem = self.encode_windows(torch.from_numpy(win))
        return mem.reshape(-1, *mem.shape[2:])[:m]

    # -- the decoder side ----------------------------------------------------------------------------
    def token_embeds(self, ids):
        return self.embed(ids)

    def _start_kv(self, doc_start: int) -> list:
        """The decoder's cache entries of ``[doc_start]`` at position 0: [(key, value)] per layer, each
        (1, kv_heads, 1, head_dim) float32 (computed once per id, no gradient)."""
        cache = self._start_cache
        if doc_start not in cache:
            torch = self._torch
            with torch.no_grad(), torch.autocast("cpu", enabled=False):
                pkv = self.lm(torch.tensor([[doc_start]]), use_cache=True).past_key_values
            layers = getattr(pkv, "layers", None)
            cache[doc_start] = [(lay.keys, lay.values) for lay in layers] if layers is not None else \
                [(pkv[i][0], pkv[i][1]) for i in range(self.lm.config.num_hidden_layers)]
        return cache[doc_start]

    def memory_kv(self, mem, doc_start: int):
        """KV memory (B, M, layers, hidden) → the decoder's cache for ``[doc_start ; memory]``: (keys,
        values), each (layers, B, kv_heads, 1 + M, head_dim) — every layer's own input norm and k/v
        projections applied to its memory state, RoPE at positions 1..M (Llama layout, as the cache
        stores keys)."""
        torch = self._torch
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        cfg = self.lm.config
        b, m = mem.shape[:2]
        kvh = cfg.num_key_value_heads
        hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        pos = torch.arange(1, m + 1)[None]
        cos, sin = self.lm.model.rotary_emb(mem[:, :, 0], pos)
        keys, values = [], []
        for i, (layer, (k0, v0)) in enumerate(zip(self.lm.model.layers, self._start_kv(doc_start))):
            n = layer.input_layernorm(mem[:, :, i])
            k = layer.self_attn.k_proj(n).view(b, m, kvh, hd).transpose(1, 2)
            v = layer.self_attn.v_proj(n).view(b, m, kvh, hd).transpose(1, 2)
            k, _ = apply_rotary_pos_emb(k, k, cos, sin)
            keys.append(torch.cat([k0.expand(b, -1, -1, -1).to(k.dtype), k], 2))
            values.append(torch.cat([v0.expand(b, -1, -1, -1).to(v.dtype), v], 2))
        return torch.stack(keys), torch.stack(values)

    def cached_logits(self, keys, values, target_ids):
        """Logits (B, T, vocab) predicting ``target_ids`` (B, T) int64 after a cache (keys, values as
        :meth:`memory_kv` returns) and the trained ``bridge`` embedding."""
        torch = self._torch
        from transformers import DynamicCache

        cache = DynamicCache()
        for i in range(len(keys)):
            cache.update(keys[i], values[i], i)
        bridge = self.projector.bridge.to(self.embed.weight.dtype)
        x = torch.cat([bridge.expand(target_ids.shape[0], 1, -1), self.embed(target_ids[:, :-1])], 1)
        return self.lm(inputs_embeds=x, past_key_values=cache, use_cache=True).logits

    def memory_logits(self, mem, target_ids, doc_start: int):
        """Logits (B, T, vocab) predicting ``target_ids`` (B, T) int64 after ``[doc_start ; memory]``, the
        memory ``mem`` as :meth:`memory` returns it, batched: (B, M, hidden) input embeddings or (B, M,
        layers, hidden) KV memory states (see the module docstring)."""
        torch = self._torch
        if self.spec.memory == "kv":
            return self.cached_logits(*self.memory_kv(mem, doc_start), target_ids)
        start = self.embed(torch.tensor([[doc_start]])).expand(mem.shape[0], -1, -1)
        return self.target_logits(torch.cat([start, mem.to(start.dtype)], 1), target_ids)

    def memory_nll(self, mem, target_ids, doc_start: int):
        """Summed next-token NLL (nats) of ``target_ids`` (B, T) after ``[doc_start ; memory]`` (see
        :meth:`memory_logits`)."""
        return self.summed_nll(self.memory_logits(mem, target_ids, doc_start), target_ids)

    def summed_nll(self, logits, target_ids):
        """Summed cross-entropy (nats) of ``logits`` (B, T, vocab) against ``target_ids`` (B, T) int64."""
        return self._torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                                       target_ids.reshape(-1), reduction="sum")

    def target_logits(self, prefix_embeds, target_ids):
        """Logits (B, T, vocab) predicting ``target_ids`` (B, T) int64 after ``prefix_embeds`` (B, P, hidden)
        float32 — the last prefix position predicts the first target token."""
        torch = self._torch
        x = torch.cat([prefix_embeds, self.embed(target_ids[:, :-1])], 1)
        return self.lm(inputs_embeds=x).logits[:, prefix_embeds.shape[1] - 1:]

    def target_nll(self, prefix_embeds, target_ids):
        """Summed next-token NLL (nats) of ``target_ids`` (B, T) int64 after ``prefix_embeds``
        (B, P, hidden) float32."""
        return self.summed_nll(self.target_logits(prefix_embeds, target_ids), target_ids)


def trainable_state(projector) -> dict:
    """The projector's tensors by name (what a checkpoint stores)."""
    return {k: v.detach().contiguous() for k, v in projector.state_dict().items()}


def load_projector(spec: CompressorSpec, tensors: dict):
    """A projector for ``spec`` with ``tensors`` loaded; :class:`ModelError` when names or shapes do not
    match (e.g. a compressor trained with another memory-token count)."""
    gain = tensors.get("gain")
    layers = int(gain.shape[0]) if spec.memory == "kv" and gain is not None and gain.ndim == 2 else 1
    proj = build_projector(spec, 1.0, [1.0] * layers)
    want = {k: tuple(v.shape) for k, v in proj.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    if want != got:
        diff = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
        raise ModelError("the compressor's weights do not match its spec",
                         f"{', '.join(f'{k}: {got.get(k)} vs {want.get(k)}' for k in diff[:3])}",
                         "load it with the spec stored beside it, or retrain it")
    proj.load_state_dict(tensors)
    return proj


# -- training text ---------------------------------------------------------------------------------
DOCSTRING_MIN_CHARS = 2000
_SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "turtledemo",
              "__pycache__", "ensurepip", "venv", "tkinter"}


def stdlib_docstrings() -> list[str]:
    """English prose from the standard library's own docstrings: one document per module (module, class
    and function docstrings in ast.walk order, joined by blank lines), modules of at least
    :data:`DOCSTRING_MIN_CHARS` characters, sorted by path. Deterministic for a given Python."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(root.rglob("*.py")):
        if _SKIP_DIRS & set(path.relative_to(root).parts[:-1]):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        parts = []
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                d = ast.get_docstring(node)
                if d and len(d) >= 80:
                    parts.append(d)
        text = "\n\n".join(dict.fromkeys(parts))
        if len(text) >= DOCSTRING_MIN_CHARS:
            docs.append(text)
    return docs


def python_version() -> str:
    return ".".join(map(str, sys.version_info[:3]))
