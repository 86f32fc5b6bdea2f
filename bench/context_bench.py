"""Benchmark of the context compressor's time to first token on cpu-ort, every decoder precision side by side.

For an exported compressor (``edgec context export``), in one process and on the same held-out text:
for each encoder precision (fp32, int8) × decoder variant in the export (fp32, int8w, int4w …) and each
context length, the full-context
prefill (embedding + decoder over ``[doc_start ; context ; prompt]``) against the compressed path as the
export's chain reads the context (encoder + projector over its older part, then a prefill of the last
``tail_tokens`` and the prompt after the memory — ``ContextRuntime.inputs``), interleaved,
medians of ``--repeats`` pairs after one warm-up. ``measured``; not a test: numbers depend on the machine —
compare the ratios in one table, not absolute milliseconds across runs.

    python bench/context_bench.py runs/context --json runs/context-bench.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", nargs="?", default="runs/context", help="a trained and exported compressor")
    ap.add_argument("--contexts", default="256,512,1024,2048", help="context lengths in tokens")
    ap.add_argument("--repeats", type=int, default=5, help="interleaved pairs per length (default 5)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args()

    import numpy as np
    from rich.console import Console
    from rich.table import Table
    from transformers import AutoTokenizer

    from edgec.context_job import load_corpus, ttft_rows
    from edgec.targets.ort_context import ContextRuntime

    export = Path(args.folder) / "onnx"
    manifest = json.loads((export / "manifest.json").read_text())
    stream = np.concatenate(load_corpus(AutoTokenizer.from_pretrained(export), train=False).eval)
    contexts = [int(c) for c in args.contexts.split(",")]
    table = Table(title=f"time to first token, cpu-ort, {args.threads} threads, medians of {args.repeats} "
                        f"interleaved pairs (measured); {manifest['compression_ratio']}× compression, the last "
                        f"{manifest.get('tail_tokens', 0)} context tokens as text")
    for col in ("encoder", "decoder", "context", "full ms", "compressed ms", "encoder ms", "speed-up"):
        table.add_column(col, justify="right")
    rows = []
    for encoder in manifest.get("encoders", {"fp32": None}):
        for variant in manifest["decoders"]:
            rt = ContextRuntime(export, variant, args.threads, encoder)
            for r in ttft_rows(rt, stream, contexts, args.repeats):
                r["variant"], r["encoder"] = variant, encoder
                rows.append(r)
                table.add_row(encoder, variant, str(r["context_tokens"]), f"{r['full_ttft_ms']:.1f}",
                              f"{r['compressed_ttft_ms']:.1f}", f"{r['encoder_ms']:.1f}", f"{r['ttft_speedup']:.2f}×")
            del rt
    Console().print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
