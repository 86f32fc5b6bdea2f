"""Benchmark of ``edgec compile --model minilm`` against the usual tools, side by side on cpu-ort.

In one process, on the same 584 evaluation sentences and the same machine:

- FP32 ONNX exported by optimum (``onnx_export_from_model``, task feature-extraction),
- Optimum's own dynamic INT8 (``ORTQuantizer`` + ``AutoQuantizationConfig`` preset for this CPU:
  ``avx512_vnni`` where /proc/cpuinfo lists avx512_vnni, else ``avx2``; ``is_static=False``),
- Optimum's graph optimization (``ORTOptimizer``, level 2) in FP32, and its dynamic INT8 on top
  (a note instead of a row when Optimum's quantizer fails on the optimized graph),
- NNCF INT8 post-training quantization of the ONNX model (``nncf.quantize``, ``ModelType.TRANSFORMER``,
  300 calibration sentences padded to the sequence length),
- edgec's chosen candidate (from a finished run's manifest, ``--run``, or a new compile),

each timed in ``--rounds`` interleaved rounds (median of the per-round p50, batch 1, 128 tokens,
2 threads, ``measured``), with mean cosine fidelity and nearest-neighbour agreement against the FP32
PyTorch model, and file size. Not a test: numbers depend on the machine.

    python bench/minilm_bench.py --run runs/minilm
    python bench/minilm_bench.py --recovery-steps 300 --budget-evals 60 --json runs/minilm-bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _preset():
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    if "avx512_vnni" in flags:
        return "avx512_vnni", AutoQuantizationConfig.avx512_vnni(is_static=False)
    return "avx2", AutoQuantizationConfig.avx2(is_static=False)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", help="a finished 'edgec compile --model minilm' run directory")
    ap.add_argument("--out", default="runs/bench-minilm", help="run directory for a new compile")
    ap.add_argument("--budget-evals", type=int, default=60)
    ap.add_argument("--recovery-steps", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--runs", type=int, default=200, help="timed runs per round")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="write the rows to this file")
    args = ap.parse_args()

    import numpy as np
    from rich.console import Console
    from rich.table import Table
    from transformers import AutoModel, AutoTokenizer

    from edgec.cli import _RichProgress, _stdout_console
    from edgec.compile.hf_source import resolve
    from edgec.compile.transformer import embed_onnx, embed_torch, export_encoder, fidelity
    from edgec.config import CompileConfig
    from edgec.pipeline import cache_root
    from edgec.targets import get_target
    from edgec.targets.base import measure_interleaved
    from edgec.text_data import load_text
    from edgec.transformer_job import run_transformer_compile

    console = _stdout_console()
    if args.run:
        out = Path(args.run)
    else:
        out = Path(args.out)
        cfg = CompileConfig(model="minilm", budget_evals=args.budget_evals, recovery_steps=args.recovery_steps,
                            out=str(out), force=True, threads=args.threads)
        with _RichProgress(Console(stderr=True)) as progress:
            run_transformer_compile(cfg, progress)
    manifest = json.loads((out / "manifest.json").read_text())
    chosen = next(a for a in manifest["artifacts"] if a["chosen"])

    hf = resolve("minilm", cache_root())
    tok = AutoTokenizer.from_pretrained(hf.path)
    model = AutoModel.from_pretrained(hf.path).eval()
    text = load_text()
    ref = embed_torch(model, tok, text.evaluation_sentences)
    work = Path(tempfile.mkdtemp(prefix="minilm-bench-"))
    paths = {"FP32 ONNX (optimum)": export_encoder(model, work / "fp32.onnx")}

    from optimum.onnxruntime import ORTQuantizer

    preset_name, qconfig = _preset()
    ORTQuantizer.from_pretrained(work, file_name="fp32.onnx").quantize(save_dir=work / "optimum", quantization_config=qconfig)
    paths[f"Optimum dynamic INT8 ({preset_name})"] = next((work / "optimum").glob("*.onnx"))
    # Optimum's graph optimization (ORTOptimizer, level 2: attention, LayerNorm and GELU fusions), and its
    # quantizer on that graph — the pipeline a user of Optimum would try next
    from optimum.onnxruntime import ORTOptimizer
    from optimum.onnxruntime.configuration import OptimizationConfig

    notes = []
    model.config.save_pretrained(work)
    ORTOptimizer.from_pretrained(work, file_names=["fp32.onnx"]).optimize(
        save_dir=work / "o2", optimization_config=OptimizationConfig(optimization_level=2))
    o2 = next((work / "o2").glob("*.onnx"))
    paths["Optimum O2 fused FP32"] = o2
    try:
        ORTQuantizer.from_pretrained(work / "o2", file_name=o2.name).quantize(save_dir=work / "o2-int8",
                                                                             quantization_config=qconfig)
        paths[f"Optimum O2 + dynamic INT8 ({preset_name})"] = next((work / "o2-int8").glob("*.onnx"))
    except Exception as e:  # noqa: BLE001 — a failing baseline is a finding, printed under the table
        notes.append(f"Optimum O2 + dynamic INT8: ORTQuantizer failed: {' '.join(str(e).split())[:200]}")

    import nncf
    import onnx

    calib = [dict(tok([s], padding="max_length", truncation=True, max_length=128, return_tensors="np"))
             for s in text.calibration_sentences[:300]]
    calib = [{k: v.astype(np.int64) for k, v in c.items()} for c in calib]
    qm = nncf.quantize(onnx.load(str(work / "fp32.onnx")), nncf.Dataset(calib), model_type=nncf.ModelType.TRANSFORMER,
                       subset_size=len(calib))
    onnx.save(qm, str(work / "nncf.onnx"))
    paths["NNCF INT8 PTQ (static QDQ)"] = work / "nncf.onnx"
    paths[f"edgec chosen {chosen['id']}"] = out / chosen["path"]

    target = get_target("cpu-ort", threads=args.threads, runs=args.runs, warmup_runs=20)
    try:
        stats = measure_interleaved(target, paths, (128,), args.rounds)
    finally:
        target.close()
    base = stats["FP32 ONNX (optimum)"].p50_ms
    opt_key = f"Optimum dynamic INT8 ({preset_name})"
    rows = []
    for name, path in paths.items():
        f = fidelity(embed_onnx(path, tok, text.evaluation_sentences, threads=args.threads), ref)
        rows.append({"model": name, "p50_ms": stats[name].p50_ms, "round_p50_ms": stats[name].extra["round_p50_ms"],
                     "speedup_vs_fp32": base / stats[name].p50_ms,
                     "speedup_vs_optimum_int8": stats[opt_key].p50_ms / stats[name].p50_ms,
                     "cosine": f["cosine"], "neighbour_agreement": f["neighbour_agreement"],
                     "size_bytes": path.stat().st_size, "kind": stats[name].kind})
    table = Table(title=f"all-MiniLM-L6-v2 on cpu-ort ({args.threads} threads, batch 1, 128 tokens, "
                        f"median of {args.rounds} interleaved rounds; {len(text.evaluation_sentences)} sentences)")
    for col in ("model", "p50 ms", "vs FP32", "vs Optimum INT8", "mean cosine", "NN agree %", "MiB", "kind"):
        table.add_column(col, justify="left" if col in ("model", "kind") else "right")
    for r in rows:
        table.add_row(r["model"], f"{r['p50_ms']:.2f}", f"{r['speedup_vs_fp32']:.2f}×",
                      f"{r['speedup_vs_optimum_int8']:.2f}×", f"{r['cosine']:.4f}",
                      f"{r['neighbour_agreement'] * 100:.1f}", f"{r['size_bytes'] / 2**20:.1f}", r["kind"])
    console.print(table)
    for note in notes:
        console.print(note)
    console.print(f"chosen candidate: {json.dumps(chosen['candidate'])}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "notes": notes, "run": str(out), "chosen": chosen},
                                              indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
