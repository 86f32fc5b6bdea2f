"""Running an exported context compressor with ONNX Runtime: the chain an app follows.

An export folder (``edgec context export``) holds ``manifest.json`` and three graphs:

- ``encoder.onnx``: ``window_ids`` (windows, window_tokens) int64 → ``memory`` (windows,
  memory_per_window, hidden) float32 — the decoder's first blocks and the projector; ``encoder-int8.onnx``
  is the same graph with dynamic INT8 MatMuls (the manifest's ``encoders`` lists both);
- ``embed.onnx``: ``input_ids`` (batch, seq) int64 → ``inputs_embeds`` (batch, seq, hidden) float32;
- ``decoder-<variant>/model.onnx``: the decoder without its embedding (ONNX Runtime GenAI's builder,
  ``inputs_embeds``, KV cache), one folder per precision variant.

The chain (:meth:`ContextRuntime.inputs`): a context of L tokens gets N = L // group_tokens decoder
positions; its last t = min(``tail_tokens``, N // 2) tokens stay text (the manifest's ``tail_tokens``; 0
in exports of before 2026-12-03) and the (N − t) × group_tokens tokens before them are compressed
(:func:`split_context`; the oldest ones are dropped). Cut those into windows of ``window_tokens`` (the
last one right-padded with ``doc_start_id``), run the encoder, keep the first M = N − t memory
positions, then

- ``memory = "embeddings"``: the encoder gives ``memory`` (windows, memory_per_window, hidden); feed the
  decoder ``[embed(doc_start_id) ; memory ; embed(tail + prompt)]`` with an empty cache;
- ``memory = "kv"``: the encoder gives ``memory_keys`` / ``memory_values`` (layers, kv_heads, 1 +
  windows × memory_per_window, head_dim) — the decoder's cache of ``[doc_start ; memory]``, keys rotated
  as the decoder caches them; keep the first 1 + M positions of each layer as ``past_key_values`` and
  feed ``embed([bridge_token_id] + tail + prompt)`` (``bridge_token_id`` is the extra last row of
  ``embed.onnx``'s table, a trained embedding).

The memory-token count is part of the manifest and of the encoder graph; a mismatch between them is
refused when loading.

Imports only numpy and onnxruntime.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np

from edgec.errors import ConfigError, ModelError

MANIFEST_FORMAT = "edgec-context-export/1"
MAX_TAIL_TOKENS = 4096  # the longest context edgec context eval takes


def context_windows(context_ids, group_tokens: int, window_tokens: int, pad_id: int) -> tuple[np.ndarray, int]:
    """A context (L,) int → (windows (W, window_tokens) int64 right-padded with ``pad_id``, memory count
    M = L // group_tokens); the oldest ``L % group_tokens`` tokens are dropped."""
    ids = np.asarray(context_ids, np.int64)
    ids = ids[len(ids) % group_tokens:]
    n = max(1, math.ceil(len(ids) / window_tokens))
    out = np.full((n, window_tokens), pad_id, np.int64)
    out.reshape(-1)[: len(ids)] = ids
    return out, len(ids) // group_tokens


def split_context(context_ids, group_tokens: int, tail_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """The compressed reading of a context (L,) int within its budget of N = L // group_tokens decoder
    positions: (the ids to compress, (N − t) × group_tokens of them; the last t ids, kept as text), t =
    min(tail_tokens, N // 2). The memory's N − t positions and the t tokens of text fill the N positions;
    the oldest ``L − t − (N − t) × group_tokens`` ids (about ``t × (group_tokens − 1)``) are dropped.
    ``tail_tokens = 0``: the whole context (less its oldest ``L % group_tokens`` ids) is compressed.
    :class:`ConfigError` for ids that are not a flat integer list, or a group / tail out of range."""
    if type(group_tokens) is not int or group_tokens < 1 or type(tail_tokens) is not int \
            or not 0 <= tail_tokens <= MAX_TAIL_TOKENS:
        raise ConfigError(f"cannot split a context in groups of {group_tokens!r} with a tail of {tail_tokens!r}",
                          f"group_tokens must be an integer ≥ 1, tail_tokens one from 0 to {MAX_TAIL_TOKENS}",
                          "pass the manifest's group_tokens and tail_tokens")
    ids = np.asarray(context_ids)
    if ids.ndim != 1 or (len(ids) and ids.dtype.kind not in "iu"):
        raise ConfigError("the context is not a flat list of token ids", f"got an array of shape {ids.shape} "
                          f"and dtype {ids.dtype}", "pass token ids from the tokenizer")
    ids = ids.astype(np.int64)
    n = len(ids) // group_tokens
    t = min(tail_tokens, n // 2)
    end = len(ids) - t
    return ids[end - (n - t) * group_tokens: end], ids[end:]


class ContextRuntime:
    """The exported compressor's sessions. ``folder``: an export folder (or the compressor's folder
    holding it as ``onnx/``); ``variant``: the decoder's
    precision variant named in the manifest; ``threads``: intra-op threads per session; ``encoder``: the
    encoder's precision among the manifest's ``encoders`` (None: ``int8`` when the export has it — the
    faster one, its perplexity is in ``edgec context eval`` — else ``fp32``). Raises
    :class:`ModelError` for a missing/foreign manifest, a missing graph, a memory-token mismatch, an
    ``onnx/`` export older than the ``compressor.safetensors`` beside it (retrained since), or — with
    ``verify`` (default) — a graph whose sha256 is not the one the manifest recorded at export (changed or
    damaged since; 1–2 s for the ~800 MB a runtime loads)."""

    def __init__(self, folder: Path, variant: str = "fp32", threads: int = 2, encoder: str | None = None,
                 verify: bool = True) -> None:
        from edgec.rundir import sha256_file
        from edgec.targets.ort_generate import Decoder, session

        folder = Path(folder)
        if not (folder / "manifest.json").exists() and (folder / "onnx" / "manifest.json").exists():
            folder = folder / "onnx"  # the compressor's folder: its export is in onnx/
        try:
            m = json.loads((folder / "manifest.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ModelError(f"no readable manifest.json in {folder}", " ".join(str(e).split())[:160],
                             "export the compressor with edgec context export") from None
        if not isinstance(m, dict) or m.get("format") != MANIFEST_FORMAT:
            raise ModelError(f"{folder}/manifest.json is not an edgec context export",
                             f"format {m.get('format')!r}" if isinstance(m, dict) else "not a JSON object",
                             "export it again with edgec context export")
        try:
            spec = m["compressor"]
            self.group, self.window = int(spec["group_tokens"]), int(spec["window_tokens"])
            self.memory_per_window, self.doc_start = int(m["memory_per_window"]), int(m["doc_start_id"])
            decoders = {k: str(v["path"]) for k, v in m["decoders"].items()}
            hidden = int(spec["hidden_size"])
            self.memory_kind = str(spec.get("memory", "embeddings"))
            self.tail_tokens = m.get("tail_tokens", 0)  # older exports compressed the whole context
            self.bridge = m["bridge_token_id"] if self.memory_kind == "kv" else None
            io = m.get("decoder_io") if isinstance(m.get("decoder_io"), dict) else {}
            cache_dims = [io.get("layers"), io.get("kv_heads"), io.get("head_dim")]
            if self.memory_kind == "kv" and not all(type(v) is int and v > 0 for v in [self.bridge, *cache_dims]):
                raise TypeError("bridge_token_id and decoder_io's layers, kv_heads, head_dim must be positive integers")
            listed = m["encoders"] if "encoders" in m else {"fp32": m["encoder"]}  # older exports: FP32 only
            encoders = {str(k): str(v["path"]) for k, v in listed.items()}
            paths = {"embed": folder / str(m["embed"]["path"])}
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ModelError(f"{folder}/manifest.json is damaged", f"bad or missing field ({type(e).__name__}: {e})",
                             "export it again with edgec context export") from None
        if self.group < 1 or self.window % self.group or self.window // self.group != self.memory_per_window:
            raise ModelError(f"{folder}/manifest.json contradicts itself",
                             f"{self.window}-token windows in groups of {self.group} do not give "
                             f"{self.memory_per_window} memory embeddings per window",
                             "export the compressor again; memory-token counts are fixed by training")
        if type(self.tail_tokens) is not int or not 0 <= self.tail_tokens <= MAX_TAIL_TOKENS:
            raise ModelError(f"{folder}/manifest.json is damaged",
                             f"tail_tokens is {self.tail_tokens!r}, not an integer from 0 to {MAX_TAIL_TOKENS}",
                             "export it again with edgec context export")
        if self.memory_kind not in ("embeddings", "kv"):
            raise ModelError(f"{folder}/manifest.json names an unknown memory kind {self.memory_kind!r}",
                             "this edgec knows embeddings and kv", "export it again with this edgec")
        if variant not in decoders:
            raise ModelError(f"the export has no decoder variant {variant!r}", f"it has {', '.join(decoders)}",
                             "pick one of those")
        if encoder is None:
            encoder = "int8" if "int8" in encoders else "fp32"
        if encoder not in encoders:
            raise ModelError(f"the export has no encoder variant {encoder!r}", f"it has {', '.join(encoders) or 'none'}",
                             "pick one of those, or export again with edgec context export")
        weights = folder.parent / "compressor.safetensors"
        if folder.name == "onnx" and weights.is_file() \
                and m.get("compressor_sha256") != sha256_file(weights):
            raise ModelError(f"the export in {folder} is of other weights than {weights.name} beside it",
                             "the compressor was retrained after it was exported",
                             f"export it again: edgec context export {folder.parent}")
        self.manifest, self.encoder_variant = m, encoder
        paths["encoder"], paths["decoder"] = folder / encoders[encoder], folder / decoders[variant]
        for name, p in paths.items():
            if not p.is_file():
                raise ModelError(f"the export is missing its {name} graph", f"{p} is not a file",
                                 "export it again with edgec context export"
                                 + (", or use the fp32 encoder" if name == "encoder" and encoder != "fp32" else ""))
            if folder.resolve() not in p.resolve().parents:
                raise ModelError(f"the export's {name} graph is outside it", f"{p} resolves outside {folder}",
                                 "export it again with edgec context export")
        recorded = m.get("sha256") if isinstance(m.get("sha256"), dict) else {}
        for name, p in paths.items() if verify else ():
            want = recorded.get(p.relative_to(folder).as_posix())
            if want is not None and sha256_file(p) != want:
                raise ModelError(f"the export's {name} graph {p.name} is not the one exported",
                                 "its sha256 differs from the manifest's (changed or damaged since the export)",
                                 "export it again with edgec context export")

        def load(path):
            try:
                return session(str(path), threads)
            except Exception as e:  # noqa: BLE001 — onnxruntime raises its own types for damaged graphs
                raise ModelError(f"ONNX Runtime cannot load {path.name} in {folder}", " ".join(str(e).split())[:200],
                                 "export it again with edgec context export") from None

        self.encoder = load(paths["encoder"])  # checked before the big graphs are loaded
        ins, outs = self.encoder.get_inputs(), self.encoder.get_outputs()
        if self.memory_kind == "kv":
            layers, kv_heads, head_dim = cache_dims
            want = [layers, kv_heads, None, head_dim]
            ok = [o.name for o in outs] == ["memory_keys", "memory_values"] and all(
                len(o.shape) == 4 and all(w is None or s == w for s, w in zip(o.shape, want)) for o in outs)
            expect = f"window_ids → memory_keys, memory_values ({layers}, {kv_heads}, 1 + windows × " \
                     f"{self.memory_per_window}, {head_dim})"
        else:
            out_shape = outs[0].shape if len(outs) == 1 else None
            ok = out_shape is not None and len(out_shape) == 3 and out_shape[1] == self.memory_per_window \
                and out_shape[2] == hidden
            expect = f"window_ids → memory (windows, {self.memory_per_window}, {hidden})"
        in_shape = ins[0].shape if len(ins) == 1 else None
        if [i.name for i in ins] != ["window_ids"] or len(in_shape) != 2 or in_shape[1] != self.window or not ok:
            raise ModelError(f"the encoder graph {paths['encoder'].name} does not match the manifest",
                             f"{[(i.name, i.shape) for i in ins]} → {[(o.name, o.shape) for o in outs]}; the manifest "
                             f"says window_ids (windows, {self.window}) → " + expect.split(" → ", 1)[1],
                             "export the compressor again; memory-token counts are fixed by training")
        if self.memory_kind == "kv":  # the cache length per window is dynamic in the graph: one probe window
            got = self.encoder.run(None, {"window_ids": np.zeros((1, self.window), np.int64)})[0].shape[2]
            if got != 1 + self.memory_per_window:
                raise ModelError(f"the encoder graph {paths['encoder'].name} does not match the manifest",
                                 f"one window gives {got - 1} memory positions, the manifest says "
                                 f"{self.memory_per_window}", "export the compressor again; memory-token counts "
                                 "are fixed by training")
        self.embed_sess = load(paths["embed"])
        meta = self.embed_sess.get_modelmeta().custom_metadata_map
        rows = int(meta["embedding_rows"]) if str(meta.get("embedding_rows", "")).isdigit() else None
        if self.memory_kind == "kv" and rows != self.bridge + 1:
            raise ModelError(f"the embedding graph {paths['embed'].name} does not hold the bridge embedding",
                             f"bridge_token_id {self.bridge} must be its table's last row; the table has "
                             f"{rows if rows is not None else 'an unknown number of'} rows",
                             "export the compressor again with edgec context export")
        self.vocab_size = self.bridge if self.memory_kind == "kv" else rows  # None: not recorded (older export)
        self.decoder = Decoder(load(paths["decoder"]))
        try:  # the builder's graph holds rotary tables for this many positions
            self.max_positions = int(json.loads((paths["decoder"].parent / "genai_config.json").read_text())
                                     ["model"]["context_length"])
        except (OSError, ValueError, KeyError, TypeError):
            self.max_positions = None  # not recorded: not checked
        self.decoder.embed = self.embed
        if self.memory_kind == "kv" and (len(self.decoder.past_names) != 2 * layers or self.decoder.kv_heads != kv_heads
                                         or self.decoder.head_dim != head_dim):
            raise ModelError(f"the decoder graph {paths['decoder'].name} does not match the manifest",
                             f"its cache is {len(self.decoder.past_names) // 2} layers × {self.decoder.kv_heads} heads "
                             f"× {self.decoder.head_dim}, the KV memory's {layers} × {kv_heads} × {head_dim}",
                             "export the compressor again")

    def embed(self, ids) -> np.ndarray:
        """Token ids (1, n) or (n,) int64 → (1, n, hidden) float32."""
        ids = np.asarray(ids, np.int64).reshape(1, -1)
        return self.embed_sess.run(None, {"input_ids": ids})[0]

    def token_ids(self, ids, what: str) -> np.ndarray:
        """``ids`` as a flat int64 array of vocabulary ids; :class:`ConfigError` otherwise (``what`` names them)."""
        a = ids if isinstance(ids, np.ndarray) and ids.dtype.kind in "iu" else \
            np.asarray(ids if len(ids) else [], dtype=object)
        if a.ndim != 1 or (a.dtype == object and not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool)
                                                         for v in a)):
            raise ConfigError(f"the {what} is not a flat list of token ids", f"got an array of shape {a.shape}",
                              "pass token ids from the tokenizer, e.g. tokenizer(text)['input_ids']")
        a = a.astype(np.int64)
        hi = self.vocab_size
        if len(a) and (a.min() < 0 or (hi is not None and a.max() >= hi)):
            raise ConfigError(f"the {what} holds token ids outside the vocabulary",
                              f"ids {int(a.min())}…{int(a.max())}, vocabulary 0…{'?' if hi is None else hi - 1}",
                              "tokenize with the export's tokenizer")
        return a

    def memory(self, context_ids, encoder_session=None) -> np.ndarray:
        """A context (L,) int → memory, by this runtime's encoder or by ``encoder_session`` (another encoder
        graph of the same export, e.g. to compare precisions): (L // group_tokens, hidden) float32 input
        embeddings, or for ``memory="kv"`` the cache of ``[doc_start ; memory]``, (2 (keys, values),
        layers, kv_heads, 1 + L // group_tokens, head_dim) float32."""
        out, m = self._encode(context_ids, encoder_session)
        if self.memory_kind == "kv":
            return np.stack(out)[:, :, :, : 1 + m]
        return out[0].reshape(-1, out[0].shape[-1])[:m]

    def _encode(self, context_ids, encoder_session=None) -> tuple[list, int]:
        """The encoder graph's raw outputs for a context, and its memory count M."""
        win, m = context_windows(context_ids, self.group, self.window, self.doc_start)
        return (encoder_session or self.encoder).run(None, {"window_ids": win}), m

    def split(self, context_ids) -> tuple[np.ndarray, np.ndarray]:
        """(the context ids the encoder compresses, the last ones kept as text): :func:`split_context` with
        the manifest's ``group_tokens`` and ``tail_tokens``."""
        return split_context(self.token_ids(context_ids, "context"), self.group, self.tail_tokens)

    def prefix(self, context_ids, prompt_ids) -> np.ndarray:
        """``[embed(doc_start) ; memory(older context) ; embed(tail + prompt)]`` (n, hidden) float32 — the
        decoder's input for ``memory="embeddings"`` (see :meth:`inputs` for both kinds and :meth:`split`)."""
        if self.memory_kind == "kv":
            raise ModelError("this export keeps its memory in the decoder's cache", "there is no input prefix",
                             "use ContextRuntime.inputs")
        older, tail = self.split(context_ids)
        parts = [self.embed([self.doc_start])[0]]
        if len(older):
            parts.append(self.memory(older))
        parts.append(self.embed([*tail.tolist(), *list(prompt_ids)])[0])
        return np.concatenate(parts)

    def inputs(self, context_ids, prompt_ids, compressed: bool = True) -> tuple[np.ndarray, dict, int]:
        """What the decoder's first call takes: (inputs_embeds (n, hidden) float32 — feed it as ``x[None]``
        —, past_key_values {input name: OrtValue (1, kv_heads, past, head_dim) float32}, past length; the
        call also takes ``attention_mask = ones(1, past + n)``). Compressed, the context is read as
        :meth:`split` cuts it — the memory of its older part, then its last ``tail_tokens`` as text; with
        ``memory="kv"`` the memory is the past and the input is ``embed([bridge] + tail + prompt)``;
        otherwise the past is empty and the input :meth:`prefix` (or, not compressed, the whole context as
        text). :class:`ConfigError` for ids that are not a flat list of vocabulary ids, or for more positions
        than the decoder graph has (its ``genai_config.json``'s ``context_length``)."""
        x, past, past_len = self._inputs(context_ids, prompt_ids, compressed)
        self._check_positions(past_len + len(x), compressed)
        return x, past, past_len

    def _inputs(self, context_ids, prompt_ids, compressed: bool) -> tuple[np.ndarray, dict, int]:
        context_ids, prompt_ids = self.token_ids(context_ids, "context"), self.token_ids(prompt_ids, "prompt")
        if not compressed:
            return self.full_prefix(context_ids, prompt_ids), self.decoder._empty_past(), 0
        if self.memory_kind != "kv":
            return self.prefix(context_ids, prompt_ids), self.decoder._empty_past(), 0
        older, tail = split_context(context_ids, self.group, self.tail_tokens)  # ids checked above
        (keys, values), m = self._encode(older)  # not memory(): no stacked copy on the timed path
        ort = self.decoder._ort
        past = {}
        for name in self.decoder.past_names:
            layer = int(name.split(".")[1])
            a = np.ascontiguousarray((keys if name.endswith(".key") else values)[layer, :, : 1 + m][None])
            past[name] = ort.OrtValue.ortvalue_from_shape_and_type(a.shape, np.float32)  # owns its memory
            past[name].update_inplace(a)
        return self.embed([self.bridge, *tail.tolist(), *list(prompt_ids)])[0], past, 1 + m

    def _check_positions(self, positions: int, compressed: bool) -> None:
        """:class:`ConfigError` when a call would need more positions than the decoder graph has."""
        if self.max_positions is not None and positions > self.max_positions:
            raise ConfigError(f"the {'compressed ' if compressed else ''}context, prompt and new tokens need "
                              f"{positions} decoder positions", f"the decoder has {self.max_positions}",
                              "shorten the context or the prompt, ask for fewer new tokens"
                              + ("" if compressed else ", or read the context compressed"))

    def full_prefix(self, context_ids, prompt_ids) -> np.ndarray:
        """``embed([doc_start] + context + prompt)`` (n, hidden): the uncompressed baseline."""
        return self.embed([self.doc_start, *list(context_ids), *list(prompt_ids)])[0]

    def ttft_s(self, context_ids, prompt_ids, compressed: bool) -> tuple[float, int]:
        """Seconds from the token ids to the first new token (embedding, encoder + projector when
        ``compressed``, decoder prefill, argmax), and that token."""
        t0 = time.perf_counter()
        x, past, past_len = self.inputs(context_ids, prompt_ids, compressed)
        logits, _ = self.decoder._run(x[None], past, past_len)
        tok = int(np.argmax(logits))
        return time.perf_counter() - t0, tok

    def generate(self, context_ids, prompt_ids, new_tokens: int, compressed: bool = True,
                 eos_id: int | None = None) -> dict:
        """Greedy continuation of ``prompt_ids`` given a context (compressed or as text), stopping at ``eos_id``
        (default: the manifest's ``eos_token_id``); see :meth:`edgec.targets.ort_generate.Decoder.generate`
        for the result — its ``ttft_s`` counts from the token ids, so it includes the embedding and, when
        ``compressed``, the encoder (as :meth:`ttft_s` does)."""
        if eos_id is None:
            eos_id = self.manifest.get("eos_token_id")
        t0 = time.perf_counter()
        x, past, past_len = self.inputs(context_ids, prompt_ids, compressed)
        prepare_s = time.perf_counter() - t0
        self._check_positions(past_len + len(x) + max(int(new_tokens) - 1, 0), compressed)
        out = self.decoder.generate(x, new_tokens, eos_id, past=past, past_len=past_len)
        out["ttft_s"] += prepare_s
        return out
