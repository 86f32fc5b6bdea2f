"""Run outputs: report.json (schema-versioned), candidates.csv, manifest.json, report.html.

Every file is written through a temporary file and a rename (:func:`write_atomic`).
Latency numbers carry their kind (``measured`` here for cpu-ort) and are never mixed.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import platform
import time
from pathlib import Path

import edgec
from edgec.compile.package import write_atomic
from edgec.records import Artifact, Evaluation

SCHEMA_VERSION = 1
MANIFEST_SCHEMA_VERSION = 1


def write_reports(out: Path, cfg, ds, supernet_info: dict, target, reference: Evaluation, evals: list[Evaluation],
                  failed: dict, front_ids: list[str], chosen: Evaluation | None, selection: dict,
                  artifacts: list[Artifact]) -> dict:
    """Write the four run outputs into ``out``; returns the report dict."""
    test_acc = {a.id: a.test_accuracy for a in artifacts}
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())

    def row(ev: Evaluation) -> dict:
        return {**ev.to_dict(), "pareto": ev.candidate_id in front_ids, "test_accuracy": test_acc.get(ev.candidate_id)}

    report = {
        "schema_version": SCHEMA_VERSION, "edgec_version": edgec.__version__, "created_at": created,
        "host": {"python": platform.python_version(), "machine": platform.machine()},
        "config": cfg.to_dict(),
        "dataset": {"name": ds.name, "fingerprint": ds.fingerprint(), **ds.provenance},
        "supernet": supernet_info,
        "targets": {target.name: target.describe()},
        "objectives": {"val_accuracy": "maximize", "p50_ms": f"minimize ({target.latency_kind}, batch 1)",
                       "size_bytes": "minimize (ONNX file)"},
        "reference": {**row(reference), "description": "largest subnet, all layers FP32"},
        "evaluations": [row(e) for e in [reference] + evals],
        "failed": [{"candidate_id": k, "error": v} for k, v in failed.items()],
        "pareto_front": front_ids,
        "selection": selection,
        "chosen": row(chosen) if chosen else None,
        "latency_by_target": {target.name: {e.candidate_id: e.latency.to_dict() for e in [reference] + evals}},
        "artifacts": [a.to_dict() for a in artifacts],
    }
    write_atomic(out / "report.json", json.dumps(report, indent=2))
    write_atomic(out / "manifest.json", json.dumps({
        "schema_version": MANIFEST_SCHEMA_VERSION, "edgec_version": edgec.__version__, "created_at": created,
        "dataset": ds.name, "chosen": chosen.candidate_id if chosen else None,
        "artifacts": [a.to_dict() for a in artifacts]}, indent=2))
    write_atomic(out / "candidates.csv", _csv([reference] + evals, front_ids, test_acc))
    write_atomic(out / "report.html", _html(report, reference, evals, front_ids, chosen, artifacts, target))
    return report


def _csv(evals: list[Evaluation], front_ids: list[str], test_acc: dict) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["candidate_id", "role", "target", "val_accuracy", "test_accuracy", "p50_ms", "p90_ms", "p99_ms",
                "latency_kind", "size_bytes", "pareto", "int8_layers", "fp32_layers", "blocks", "widths"])
    for e in evals:
        pol = e.candidate.policy
        w.writerow([e.candidate_id, e.role, e.target, f"{e.val_accuracy:.6f}",
                    "" if e.candidate_id not in test_acc else f"{test_acc[e.candidate_id]:.6f}",
                    f"{e.latency.p50_ms:.6f}", f"{e.latency.p90_ms:.6f}", f"{e.latency.p99_ms:.6f}", e.latency.kind,
                    e.size_bytes, e.candidate_id in front_ids, len(pol.int8_layers()),
                    len(pol.layers) - len(pol.int8_layers()),
                    " ".join(b.name for b in e.candidate.subnet.blocks),
                    " ".join(map(str, e.candidate.subnet.widths))])
    return buf.getvalue()


def pareto_plot_png(reference: Evaluation, evals: list[Evaluation], front_ids: list[str],
                    chosen: Evaluation | None, target_name: str) -> bytes:
    """Validation accuracy vs p50 latency; marker area ∝ ONNX size; PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    everything = [reference] + evals
    max_size = max(e.size_bytes for e in everything)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for group, color, label in (([e for e in everything if e.candidate_id not in front_ids], "#bbbbbb", "evaluated"),
                                ([e for e in everything if e.candidate_id in front_ids], "#1f77b4", "Pareto front")):
        if group:
            ax.scatter([e.latency.p50_ms * 1e3 for e in group], [e.val_accuracy * 100 for e in group],
                       s=[20 + 300 * e.size_bytes / max_size for e in group], c=color, alpha=0.7, label=label,
                       edgecolors="k", linewidths=0.3)
    ax.scatter([reference.latency.p50_ms * 1e3], [reference.val_accuracy * 100], marker="s", s=80, c="none",
               edgecolors="k", label="reference (largest FP32)")
    if chosen:
        ax.scatter([chosen.latency.p50_ms * 1e3], [chosen.val_accuracy * 100], marker="*", s=250, c="#d62728",
                   label="chosen", zorder=5)
    ax.set_xlabel(f"p50 latency on {target_name}, batch 1 (µs, {reference.latency.kind})")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_xscale("log")
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title("Candidates (marker area ∝ ONNX size)")
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _html(report: dict, reference: Evaluation, evals: list[Evaluation], front_ids: list[str],
          chosen: Evaluation | None, artifacts: list[Artifact], target) -> str:
    png = base64.b64encode(pareto_plot_png(reference, evals, front_ids, chosen, target.name)).decode()
    e = html.escape
    rows = "".join(
        f"<tr{' class=chosen' if a.chosen else ''}><td>{e(a.id)}</td><td>{e(a.role)}{' ★ chosen' if a.chosen else ''}"
        f"</td><td>{a.val_accuracy * 100:.2f}</td><td>{a.test_accuracy * 100:.2f}</td><td>{a.p50_ms * 1e3:.1f}</td>"
        f"<td>{a.p90_ms * 1e3:.1f}</td><td>{e(a.latency_kind)}</td><td>{a.size_bytes / 1024:.1f}</td>"
        f"<td>{sum(1 for p in a.policy.values() if p == 'int8')}/{len(a.policy)}</td>"
        f"<td><code>{e(' '.join(a.config['blocks']))}</code> widths {e(str(a.config['widths']))}</td>"
        f"<td><code>{e(a.path)}</code></td></tr>" for a in artifacts)
    sel = report["selection"]
    chosen_line = (f"Chosen: <b>{e(chosen.candidate_id)}</b>, {chosen.latency.p50_ms * 1e3:.1f} µs p50 vs "
                   f"{reference.latency.p50_ms * 1e3:.1f} µs for the reference "
                   f"({reference.latency.p50_ms / chosen.latency.p50_ms:.2f}× lower)." if chosen
                   else "<b>No candidate met the accuracy drop and budgets.</b>")
    ds = report["dataset"]
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>edgec report — {e(ds['name'])}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}}
table{{border-collapse:collapse;font-size:13px}}td,th{{border:1px solid #ccc;padding:3px 6px;text-align:left}}
tr.chosen{{background:#fff3cd}}code{{font-size:12px}}</style></head><body>
<h1>edgec compile — {e(ds['name'])} on {e(target.name)}</h1>
<p>{chosen_line}</p>
<p>Selection: {e(sel['rule'])}; minimum validation accuracy {sel['min_val_accuracy'] * 100:.2f}%,
{sel['qualified']} candidate(s) qualified. Latency kind: <b>{e(reference.latency.kind)}</b>
({e(report['targets'][target.name]['runtime'])}, {e(report['targets'][target.name]['device'])},
{report['targets'][target.name]['threads']} threads).</p>
<img alt="Pareto front" src="data:image/png;base64,{png}">
<h2>Published artifacts</h2>
<table><tr><th>id</th><th>role</th><th>val acc %</th><th>test acc %</th><th>p50 µs</th><th>p90 µs</th><th>kind</th>
<th>size KiB</th><th>INT8 layers</th><th>architecture</th><th>path</th></tr>{rows}</table>
<h2>Data</h2><p>{e(ds['source'])}; {e(ds['preprocessing'])}; test: {e(ds['test_split'])};
validation: {e(ds['val_split'])}.</p>
<p>{len(evals) + 1} candidates evaluated ({len(report['failed'])} failed). Full data: report.json, candidates.csv.
edgec {e(report['edgec_version'])}, {e(report['created_at'])}.</p></body></html>
"""
