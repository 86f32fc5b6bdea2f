"""Real English text for calibrating and evaluating transformers: Python's own documentation.

``pydoc_data.topics`` ships with CPython (79 topics, about 465k characters of technical prose),
so it is on every machine with no download. The split is deterministic and recorded:

- topics sorted by name, whitespace collapsed, split into sentences at ``. ! ?`` followed by
  whitespace; sentences of 40–400 characters are kept, repeated ones once (about 2,800);
- every 4th sentence (index % 4 == 0) → **evaluation**, the rest → **calibration** (importance,
  quantization calibration and the optional recovery);
- for language modelling, the same topics are concatenated into one stream: the evaluation text is
  every 4th topic, the calibration text the rest (token windows never straddle the split).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

SOURCE = "pydoc_data.topics (Python standard library documentation)"
SENTENCE_CHARS = (40, 400)
EVAL_EVERY = 4


@dataclass(frozen=True)
class TextSplit:
    """Calibration and evaluation text: ``*_sentences`` (lists of str) and ``*_text`` (one str each,
    topics joined by blank lines), plus ``info`` (source, rule, counts, sha256 of each part)."""

    calibration_sentences: list[str]
    evaluation_sentences: list[str]
    calibration_text: str
    evaluation_text: str
    info: dict = field(default_factory=dict)


def _sha(parts) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def load_text() -> TextSplit:
    """The deterministic split of ``pydoc_data.topics`` described in the module docstring."""
    from pydoc_data.topics import topics

    keys = sorted(topics)
    sentences: list[str] = []
    for k in keys:
        for s in re.split(r"(?<=[.!?])\s+", " ".join(topics[k].split())):
            if SENTENCE_CHARS[0] <= len(s) <= SENTENCE_CHARS[1]:
                sentences.append(s)
    sentences = list(dict.fromkeys(sentences))  # the docs repeat some sentences: one copy, so no split shares one
    ev = [s for i, s in enumerate(sentences) if i % EVAL_EVERY == 0]
    cal = [s for i, s in enumerate(sentences) if i % EVAL_EVERY]
    ev_topics = [topics[k] for i, k in enumerate(keys) if i % EVAL_EVERY == 0]
    cal_topics = [topics[k] for i, k in enumerate(keys) if i % EVAL_EVERY]
    info = {"source": SOURCE, "topics": len(keys), "characters": sum(len(topics[k]) for k in keys),
            "sentence_rule": f"split at [.!?]+whitespace, {SENTENCE_CHARS[0]}-{SENTENCE_CHARS[1]} chars kept, "
                             "duplicates dropped",
            "split_rule": f"sentence (or topic) index % {EVAL_EVERY} == 0 -> evaluation, else calibration",
            "calibration_sentences": len(cal), "evaluation_sentences": len(ev),
            "calibration_sha256": _sha(cal), "evaluation_sha256": _sha(ev)}
    return TextSplit(cal, ev, "\n\n".join(cal_topics), "\n\n".join(ev_topics), info)


def topic_documents() -> tuple[list[str], list[str]]:
    """The topics themselves as documents, split by the same rule as :func:`load_text`:
    (calibration topics, evaluation topics), each a list of str in name order."""
    from pydoc_data.topics import topics

    keys = sorted(topics)
    return ([topics[k] for i, k in enumerate(keys) if i % EVAL_EVERY],
            [topics[k] for i, k in enumerate(keys) if i % EVAL_EVERY == 0])
