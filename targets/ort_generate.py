"""Causal-LM inference with ONNX Runtime: prefill, greedy decoding with the KV cache, perplexity.

For decoders exported by optimum with task ``text-generation-with-past``: inputs ``input_ids``,
``attention_mask``, ``position_ids`` and ``past_key_values.<i>.key|value`` (float32, shape
``[batch, kv_heads, past_len, head_dim]``); outputs ``logits`` (``[batch, seq, vocab]``) and
``present.<i>.key|value``. The cache stays in ONNX Runtime ``OrtValue`` s between steps (I/O
binding), so a decode step copies no cache through numpy.

Imports only numpy and onnxruntime, so it runs in the latency worker without torch.

Timing definitions (issue 4, section 4): **TTFT** = wall time of the prefill run on the prompt
(which yields the first new token's logits) plus its argmax; **decode tokens/s** = new tokens
after the first / wall time of their decode steps (each step feeds one token and the cache),
including copying the prefill's cache into the decode buffers.

Graphs whose attention is ONNX Runtime's ``GroupQueryAttention`` (ONNX Runtime GenAI's builder)
decode with a shared cache buffer (past and present bound to one buffer of prompt + new tokens;
SmolLM2's chosen candidate: 92.7 → 114 tokens/s side by side, identical tokens); other graphs (optimum's, with Concat) refuse that
binding on the first step and fall back to a growing cache, remembered per :class:`Decoder`.
"""

from __future__ import annotations

import time

import numpy as np


def session(model_path: str, threads: int = 2):
    """An ONNX Runtime CPU session for ``model_path`` with the cpu-ort settings (all graph
    optimizations, ``threads`` intra-op threads, sequential)."""
    import onnxruntime as ort

    from edgec.targets.ort_worker import _session_options

    return ort.InferenceSession(str(model_path), _session_options(threads), providers=["CPUExecutionProvider"])


class Decoder:
    """Greedy generation and scoring on one ONNX Runtime session of a with-past decoder."""

    def __init__(self, sess) -> None:
        import onnxruntime as ort

        self.sess = sess
        self._ort = ort
        names = [i.name for i in sess.get_inputs()]
        self.past_names = [n for n in names if n.startswith("past_key_values.")]
        self.present_names = [n.replace("past_key_values.", "present.") for n in self.past_names]
        shape = next(i.shape for i in sess.get_inputs() if i.name == self.past_names[0])
        self.kv_heads, self.head_dim = int(shape[1]), int(shape[3])
        self.has_position_ids = "position_ids" in names
        # graphs built without the embedding (``inputs_embeds``): ``embed`` maps token ids (1, n) int64 to
        # (1, n, hidden) float32 — set it before generating from token ids
        self.takes_embeds = "inputs_embeds" in names
        self.embed = None
        self.shared_cache: bool | None = None  # None: not tried yet (see generate)

    def _bind_tokens(self, b, x: np.ndarray) -> None:
        """Bind ``x``: token ids (1, n) int64, or embeddings (1, n, hidden) float32 for an ``inputs_embeds``
        graph (token ids are embedded with :attr:`embed` there)."""
        if x.dtype == np.int64 and self.takes_embeds:
            x = np.ascontiguousarray(self.embed(x), np.float32)
        b.bind_cpu_input("inputs_embeds" if self.takes_embeds else "input_ids", x)

    def _empty_past(self) -> dict:
        z = np.zeros((1, self.kv_heads, 0, self.head_dim), np.float32)
        return {n: self._ort.OrtValue.ortvalue_from_numpy(z) for n in self.past_names}

    def _run(self, ids: np.ndarray, past: dict, past_len: int):
        """One forward of ``ids`` (1, n) int64 after ``past_len`` cached tokens → (logits of the last
        position (vocab,) float32, new cache as OrtValues)."""
        n = ids.shape[1]
        b = self.sess.io_binding()
        self._bind_tokens(b, ids)
        b.bind_cpu_input("attention_mask", np.ones((1, past_len + n), np.int64))
        if self.has_position_ids:
            b.bind_cpu_input("position_ids", np.arange(past_len, past_len + n, dtype=np.int64)[None])
        for name in self.past_names:
            b.bind_ortvalue_input(name, past[name])
        b.bind_output("logits")
        for name in self.present_names:
            b.bind_output(name)
        self.sess.run_with_iobinding(b)
        outs = b.get_outputs()
        logits = outs[0].numpy()[0, -1]
        return logits, {p: o for p, o in zip(self.past_names, outs[1:])}

    def _shared_buffers(self, past: dict, capacity: int) -> dict:
        """The prefill's cache copied into buffers of ``capacity`` positions: {name: (numpy array, OrtValue)}
        (the array is kept so the OrtValue's memory stays alive)."""
        out = {}
        for name in self.past_names:
            a = past[name].numpy()
            buf = np.zeros((1, self.kv_heads, capacity, self.head_dim), np.float32)
            buf[:, :, :a.shape[2]] = a
            out[name] = (buf, self._ort.OrtValue.ortvalue_from_numpy(buf))
        return out

    def _run_shared(self, ids: np.ndarray, shared: dict, past_len: int) -> np.ndarray:
        """One decode step writing the new keys/values into the cache buffers in place: past and present
        are bound to the same buffer, which ONNX Runtime's GroupQueryAttention takes as its
        ``past_present_share_buffer`` mode (no past→present copy per step). Logits (vocab,) float32."""
        b = self.sess.io_binding()
        self._bind_tokens(b, ids)
        b.bind_cpu_input("attention_mask", np.ones((1, past_len + ids.shape[1]), np.int64))
        if self.has_position_ids:
            b.bind_cpu_input("position_ids", np.arange(past_len, past_len + ids.shape[1], dtype=np.int64)[None])
        b.bind_output("logits")  # first: get_outputs() follows the binding order
        for name, present in zip(self.past_names, self.present_names):
            value = shared[name][1]
            b.bind_ortvalue_input(name, value)
            b.bind_ortvalue_output(present, value)
        options = None
        if self.shared_cache is None:  # the probing step: a graph that refuses it is not an error to log
            options = self._ort.RunOptions()
            options.log_severity_level = 4
        self.sess.run_with_iobinding(b, options)
        return b.get_outputs()[0].numpy()[0, -1]

    def generate(self, prompt_ids, new_tokens: int, eos_id: int | None = None, past: dict | None = None,
                 past_len: int = 0) -> dict:
        """Greedy decoding of up to ``new_tokens`` tokens after ``prompt_ids`` (a list of token ids, or for an
        ``inputs_embeds`` graph also a (n, hidden) float32 array of prompt embeddings), after a cache
        ``past`` of ``past_len`` positions ({past name: OrtValue}; None: empty). Returns ``{"tokens":
        list[int], "ttft_s", "decode_s", "decode_tokens_per_s"}`` (see the module docstring); stops
        early at ``eos_id`` when given."""
        ids = np.asarray(prompt_ids)
        ids = ids.astype(np.float32)[None] if ids.ndim == 2 else ids.astype(np.int64)[None]
        t0 = time.perf_counter()
        logits, past = self._run(ids, self._empty_past() if past is None else past, past_len)
        tok = int(np.argmax(logits))
        ttft = time.perf_counter() - t0
        tokens, length = [tok], past_len + ids.shape[1]
        t1 = time.perf_counter()
        shared = None
        if self.shared_cache is not False and new_tokens > 1 and tok != eos_id:
            shared = self._shared_buffers(past, length + new_tokens)
        while len(tokens) < new_tokens and tok != eos_id:
            step = np.array([[tok]], np.int64)
            if shared is not None:
                try:
                    logits = self._run_shared(step, shared, length)
                    self.shared_cache = True
                except Exception:  # noqa: BLE001 — the graph's attention cannot write into the cache in place
                    if self.shared_cache:
                        raise
                    self.shared_cache, shared = False, None
                    continue
            else:
                logits, past = self._run(step, past, length)
            length += 1
            tok = int(np.argmax(logits))
            tokens.append(tok)
        decode = time.perf_counter() - t1
        steps = len(tokens) - 1
        return {"tokens": tokens, "ttft_s": ttft, "decode_s": decode,
                "decode_tokens_per_s": steps / decode if decode > 0 else float("nan")}

    def logits(self, ids: np.ndarray) -> np.ndarray:
        """Logits (n, vocab) float32 of one sequence ``ids`` (n,) int64 from an empty cache."""
        ids = np.asarray(ids, np.int64)[None]
        feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        if self.has_position_ids:
            feed["position_ids"] = np.arange(ids.shape[1], dtype=np.int64)[None]
        z = np.zeros((1, self.kv_heads, 0, self.head_dim), np.float32)
        feed.update({n: z for n in self.past_names})
        return self.sess.run(["logits"], feed)[0][0]

    def window_nll(self, ids: np.ndarray) -> tuple[float, int]:
        """Summed negative log-likelihood (nats) of tokens 1..n-1 of one window ``ids`` (n,) given the
        tokens before them, and the number of scored tokens."""
        ids = np.asarray(ids, np.int64)[None]
        logits = self.logits(ids[0])[:-1].astype(np.float64)
        m = logits.max(-1, keepdims=True)
        logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
        target = ids[0, 1:]
        return float(-logp[np.arange(len(target)), target].sum()), len(target)


def perplexity(dec: Decoder, windows: np.ndarray) -> float:
    """exp(mean token NLL) over ``windows`` (w, n) int64, each scored independently from its start."""
    nll, count = 0.0, 0
    for w in windows:
        s, c = dec.window_nll(w)
        nll, count = nll + s, count + c
    return float(np.exp(nll / count))
