"""Per-layer weight precision of a causal LM, searched jointly for perplexity, decode speed and size.

SimQ-NAS (Sarah et al. 2023, §3) searches sub-networks and per-layer quantization together with a
multi-objective evolutionary search; for an on-device decoder the dominant knob is the precision of
each layer's weights (decoding reads every weight once per token, so bytes are time), and which
layers tolerate 4 bits is model-specific (llama.cpp's Q4_K_M keeps the first and last eighth and
every third layer's attention-V/FFN-down in higher precision: :func:`llama_cpp_mixed` — a rule of
thumb, asked first as a seed, not assumed).

A :class:`DecoderCandidate` gives, for every decoder layer, the precision of its attention Linears
(QKV and output projections) and of its FFN Linears (gate, up, down), and of the LM head (which the
token embedding shares when the model ties them). :class:`DecoderSearch` is Optuna's NSGA-II over one
categorical per group; objectives (perplexity ↓, decode ms per token ↓, size bytes ↓).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

SEARCH_PRECISIONS = ("int4w", "int8w")  # FP32 Linears only add bytes to a weight-bound decoder
HEAD_PRECISIONS = ("int8w", "int4w")


@dataclass(frozen=True)
class DecoderCandidate:
    """``precision[i] = (attention, FFN)`` of layer ``i`` and ``lm_head``, each one of
    :data:`edgec.compile.decoder.PRECISIONS`. ``id``: a stable hash."""

    precision: tuple[tuple[str, str], ...]
    lm_head: str = "int8w"

    @property
    def id(self) -> str:
        import hashlib
        import json

        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:12]

    def to_dict(self) -> dict:
        return {"precision": [list(p) for p in self.precision], "lm_head": self.lm_head}

    @classmethod
    def from_dict(cls, d: dict) -> "DecoderCandidate":
        return cls(tuple((a, f) for a, f in d["precision"]), d.get("lm_head", "int8w"))

    def counts(self) -> dict[str, int]:
        """Number of Linear groups (attention or FFN of one layer) per precision."""
        out: dict[str, int] = {}
        for pair in self.precision:
            for p in pair:
                out[p] = out.get(p, 0) + 1
        return out

    def summary(self) -> str:
        c = self.counts()
        groups = ", ".join(f"{k} {v}" for k, v in sorted(c.items()))
        return f"{len(self.precision)} layers; groups: {groups}; LM head {self.lm_head}"


def uniform(layers: int, prec: str, lm_head: str = "int8w") -> DecoderCandidate:
    """Every layer's attention and FFN in ``prec``."""
    return DecoderCandidate(((prec, prec),) * layers, lm_head)


def llama_cpp_mixed(layers: int) -> DecoderCandidate:
    """llama.cpp's Q4_K_M layer rule (``llama-quant.cpp``, ``use_more_bits``): layers in the first or last
    eighth, and every third layer in between, keep 8 bits; the rest 4; LM head 8 bits."""
    def more(i: int) -> bool:
        return i < layers / 8 or i >= 7 * layers / 8 or (i - round(layers / 8)) % 3 == 2
    return DecoderCandidate(tuple(("int8w", "int8w") if more(i) else ("int4w", "int4w") for i in range(layers)),
                            "int8w")


def ends_mixed(layers: int) -> DecoderCandidate:
    """The first and last eighth of the layers in 8 bits, the rest 4; LM head 8 bits."""
    k = max(1, round(layers / 8))
    return DecoderCandidate(tuple(("int8w", "int8w") if i < k or i >= layers - k else ("int4w", "int4w")
                                  for i in range(layers)), "int8w")


class DecoderSearch:
    """NSGA-II (Optuna's ``NSGAIISampler``, seeded) over per-layer precision; ask/tell with objectives
    (perplexity ↓, decode ms per token ↓, size bytes ↓); ``initial`` candidates are asked first."""

    directions = ("minimize", "minimize", "minimize")

    def __init__(self, layers: int, precisions: Sequence[str] = SEARCH_PRECISIONS, seed: int = 0,
                 population_size: int = 12, initial: Sequence[DecoderCandidate] = ()) -> None:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.layers, self.precisions = layers, tuple(precisions)
        sampler = optuna.samplers.NSGAIISampler(population_size=population_size, seed=seed)
        self.study = optuna.create_study(directions=list(self.directions), sampler=sampler)
        self._open: dict[str, list] = {}
        for c in initial:
            p = {"lm_head": c.lm_head}
            for i, (a, f) in enumerate(c.precision):
                p[f"q_attn{i}"], p[f"q_ffn{i}"] = a, f
            self.study.enqueue_trial(p)

    def ask(self) -> DecoderCandidate:
        t = self.study.ask()
        head = t.suggest_categorical("lm_head", HEAD_PRECISIONS)
        prec = tuple((t.suggest_categorical(f"q_attn{i}", self.precisions),
                      t.suggest_categorical(f"q_ffn{i}", self.precisions)) for i in range(self.layers))
        c = DecoderCandidate(prec, head)
        self._open.setdefault(c.id, []).append(t)
        return c

    def tell(self, c: DecoderCandidate, values: Sequence[float] | None) -> None:
        import optuna

        t = self._open[c.id].pop(0)
        if values is None:
            self.study.tell(t, state=optuna.trial.TrialState.FAIL)
        else:
            self.study.tell(t, list(values))
