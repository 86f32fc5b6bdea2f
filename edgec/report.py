"""Run outputs: report.json (schema-versioned), candidates.csv, manifest.json, report.html.

Every file is written through a temporary file and a rename (:func:`write_atomic`).
Latency numbers carry their kind (``measured`` on the CPUs, ``simulated`` for the HTP simulator) and are
never mixed: per-device rows compare candidates within one target only.
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


def write_reports(out: Path, cfg, dataset_info: dict, model_info: dict, targets: list, reference: Evaluation,
                  evals: list[Evaluation], failed: dict, front_ids: list[str], chosen: Evaluation | None,
                  selection: dict, artifacts: list[Artifact], target_evals: dict[str, list[Evaluation]],
                  devices: dict[str, dict], quality: str = "validation accuracy",
                  reference_description: str = "largest subnet, all layers FP32",
                  search_info: dict | None = None, publication_gate: dict | None = None) -> dict:
    """Write the four run outputs into ``out``; returns the report dict.

    ``dataset_info``: name, fingerprint, source, preprocessing, test_split, val_split;
    ``model_info``: what was searched (``{"supernet": …}`` or ``{"source_model": …}``);
    ``targets``: the Target objects, the first searched on; ``target_evals``: {target: the published
    candidates' evaluations there}; ``devices``: {target: {candidate id: device report}};
    ``quality``: what ``val_accuracy`` holds (validation accuracy, or fidelity to the FP32 model);
    ``search_info``: the strategy and what was measured or predicted per candidate
    (:func:`edgec.pipeline.search_info`), stored as ``report["search"]``.
    """
    target = targets[0]
    test_acc = {a.id: a.test_accuracy for a in artifacts if a.target == target.name}
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())

    def row(ev: Evaluation) -> dict:
        return {**ev.to_dict(), "pareto": ev.candidate_id in front_ids, "test_accuracy": test_acc.get(ev.candidate_id)}

    report = {
        "schema_version": SCHEMA_VERSION, "edgec_version": edgec.__version__, "created_at": created,
        "host": {"python": platform.python_version(), "machine": platform.machine()},
        "config": _shown_config(cfg),
        "dataset": dataset_info,
        **model_info,
        "quality": quality,
        "targets": {t.name: t.describe() for t in targets},
        "objectives": {"val_accuracy": f"maximize ({quality})", "p50_ms": f"minimize ({target.latency_kind}, batch 1)",
                       "size_bytes": "minimize (ONNX file)"},
        "reference": {**row(reference), "description": reference_description},
        "evaluations": [row(e) for e in [reference] + evals],
        "failed": [{"candidate_id": k, "error": v} for k, v in failed.items()],
        "pareto_front": front_ids,
        "selection": selection,
        "chosen": row(chosen) if chosen else None,
        "latency_by_target": {target.name: {e.candidate_id: e.latency.to_dict() for e in [reference] + evals},
                              **{name: {e.candidate_id: e.latency.to_dict() for e in evs}
                                 for name, evs in target_evals.items() if name != target.name}},
        "devices": _compare_devices(artifacts, target_evals, devices),
        "device_reports": devices,
        "artifacts": [a.to_dict() for a in artifacts],
    }
    if search_info:
        report["search"] = search_info
    if publication_gate:
        report["publication_gate"] = publication_gate
    write_atomic(out / "report.json", json.dumps(report, indent=2))
    write_atomic(out / "manifest.json", json.dumps({
        "schema_version": MANIFEST_SCHEMA_VERSION, "edgec_version": edgec.__version__, "created_at": created,
        "dataset": dataset_info["name"], "quality": quality, "chosen": chosen.candidate_id if chosen else None,
        "artifacts": [a.to_dict() for a in artifacts]}, indent=2))
    write_atomic(out / "candidates.csv", _csv([reference] + evals, front_ids, test_acc))
    write_atomic(out / "report.html", _html(report, reference, evals, front_ids, chosen, artifacts, target,
                                            quality, reference_description))
    return report


def _shown_config(cfg) -> dict:
    """The settings as reported: a password in the search storage's URL hidden."""
    from edgec.search.strategy import shown_url

    d = cfg.to_dict()
    if d.get("storage"):
        d["storage"] = shown_url(d["storage"])
    return d


def _anchor_text(anchor: dict) -> str:
    """The anchor's p50 at build time and now (median, range), in ms."""
    def ms(v) -> str:
        return "?" if v is None else f"{v:.4g}"
    return (f"{ms(anchor.get('at_build'))} ms at build time, {ms(anchor.get('now_median'))} ms now "
            f"(median; {ms(anchor.get('now_min'))}–{ms(anchor.get('now_max'))})")


def _gate_html(gate: dict | None) -> str:
    """The publication gate's rule and, in red, every artifact it kept from publication."""
    if not gate:
        return ""
    e = html.escape
    items = "".join(f"<li>{e(b['target'])} / {e(b['id'])} ({e(b['role'])}): {e(b['why'])}</li>" for b in gate["blocked"])
    blocked = (f"<p style='color:#b00'><b>{len(gate['blocked'])} artifact(s) NOT published</b> (gate failed):</p>"
               f"<ul>{items}</ul>") if gate["blocked"] else ""
    return f"<p>Publication gate: {e(gate['rule'])}.</p>{blocked}"


def _compare_devices(artifacts: list[Artifact], target_evals: dict, devices: dict) -> list[dict]:
    """One row per (target, published candidate): accuracy, latency and its kind, size, NPU coverage,
    and the latency ratio to that target's reference (ratios within one target only)."""
    rows = []
    for name, evs in target_evals.items():
        arts = {a.id: a for a in artifacts if a.target == name}
        ref = next((a for a in arts.values() if a.role == "reference"), None)
        for ev in evs:
            a = arts.get(ev.candidate_id)
            if a is None:
                continue
            cov = devices.get(name, {}).get(a.id, {}).get("npu_coverage")
            rows.append({"target": name, "candidate_id": a.id, "role": a.role, "chosen": a.chosen,
                         "val_accuracy": a.val_accuracy, "test_accuracy": a.test_accuracy, "p50_ms": a.p50_ms,
                         "latency_kind": a.latency_kind, "size_bytes": a.size_bytes,
                         "speedup_vs_reference": ref.p50_ms / a.p50_ms if ref and a.p50_ms > 0 else None,
                         "cycles_p50": ev.latency.extra.get("cycles_p50"),
                         "npu_node_share": cov["npu_node_share"] if cov else None})
    return rows


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
                    chosen: Evaluation | None, target_name: str, quality: str = "validation accuracy",
                    reference_label: str = "reference (largest FP32)") -> bytes:
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
               edgecolors="k", label=reference_label)
    if chosen:
        ax.scatter([chosen.latency.p50_ms * 1e3], [chosen.val_accuracy * 100], marker="*", s=250, c="#d62728",
                   label="chosen", zorder=5)
    ax.set_xlabel(f"p50 latency on {target_name}, batch 1 (µs, {reference.latency.kind})")
    ax.set_ylabel(f"{quality} (%)")
    ax.set_xscale("log")
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title("Candidates (marker area ∝ ONNX size)")
    return _png(fig)


def device_chart_png(name: str, rows: list[dict]) -> bytes:
    """Bar chart of p50 per published candidate on one device (its own latency kind); PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 0.35 * len(rows) + 1.2), dpi=100)
    labels = [f"{r['candidate_id']} ({'reference' if r['role'] == 'reference' else 'chosen' if r['chosen'] else 'front'})"
              for r in rows]
    colors = ["#d62728" if r["chosen"] else "#555555" if r["role"] == "reference" else "#1f77b4" for r in rows]
    if all(r.get("cycles_p50") for r in rows):  # the simulator's own unit, not a converted time
        ax.barh(labels, [r["cycles_p50"] / 1e6 for r in rows], color=colors)
        ax.set_xlabel(f"median accelerator cycles on {name}, batch 1 (millions, {rows[0]['latency_kind']})")
    else:
        ax.barh(labels, [r["p50_ms"] * 1e3 for r in rows], color=colors)
        ax.set_xlabel(f"p50 on {name}, batch 1 (µs, {rows[0]['latency_kind']})")
    ax.invert_yaxis()
    ax.tick_params(axis="y", labelsize=7)
    ax.grid(axis="x", alpha=0.3)
    return _png(fig)


_STYLE = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}"
          "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px;text-align:left}")


def _png(fig) -> bytes:
    """A finished matplotlib figure as PNG bytes; the figure is closed."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _devices_html(report: dict) -> str:
    """Per device: the chart, the side-by-side rows and the reference's/chosen's device reports."""
    e = html.escape
    parts = ["<h2>Devices</h2><p>Latency kinds are never mixed: ratios are within one device only. "
             "<i>simulated</i> = the HTP simulator's cycle counts, shown in ms at the target's assumed clock.</p>"]
    for name, info in report["targets"].items():
        rows = [r for r in report["devices"] if r["target"] == name]
        if not rows:
            continue
        png = base64.b64encode(device_chart_png(name, rows)).decode()
        def fmt(value, spec: str, suffix: str = "") -> str:
            return "" if value is None else f"{value:{spec}}{suffix}"

        table = "".join(
            f"<tr{' class=chosen' if r['chosen'] else ''}><td>{e(r['candidate_id'])}</td><td>{e(r['role'])}"
            f"{' ★' if r['chosen'] else ''}</td><td>{r['test_accuracy'] * 100:.2f}</td><td>{r['p50_ms'] * 1e3:.1f}</td>"
            f"<td>{e(r['latency_kind'])}</td><td>{fmt(r['cycles_p50'], '.3g')}</td>"
            f"<td>{fmt(r['speedup_vs_reference'], '.2f', '×')}</td><td>{r['size_bytes'] / 1024:.1f}</td>"
            f"<td>{fmt(None if r['npu_node_share'] is None else r['npu_node_share'] * 100, '.0f', '%')}</td></tr>"
            for r in rows)
        details = []
        for cid, rep in report.get("device_reports", {}).get(name, {}).items():
            ops = ", ".join(f"{e(o['node'])} ({o['share'] * 100:.0f}%)" for o in rep["top_ops"][:5])
            cov = rep.get("npu_coverage")
            cov_text = "" if not cov else (
                f"; NPU coverage {cov['npu_node_share'] * 100:.0f}% of nodes, {cov['npu_mac_share'] * 100:.0f}% of MACs"
                + (f", on CPU: {e(', '.join(f['node'] + ' (' + f['op'] + ')' for f in cov['fallback'][:5]))}"
                   if cov["fallback"] else ""))
            details.append(f"<li><b>{e(cid)}</b>: session {rep['session_ms'] or 0:.1f} ms, first inference "
                           f"{rep['first_inference_ms'] or 0:.2f} ms, peak RSS "
                           f"{(rep['peak_rss_bytes'] or 0) / 2**20:.0f} MiB{cov_text}; top ops: {ops}</li>")
        parts.append(
            f"<h3>{e(name)}</h3><p>{e(info.get('runtime', ''))}, {e(info.get('device', ''))}, recipe "
            f"{e(info.get('recipe', ''))}, latency kind <b>{e(info.get('latency_kind', ''))}</b></p>"
            f"<img alt='{e(name)} latency' src='data:image/png;base64,{png}'>"
            f"<table><tr><th>id</th><th>role</th><th>test acc %</th><th>p50 µs</th><th>kind</th><th>cycles p50</th>"
            f"<th>vs reference</th><th>size KiB</th><th>NPU nodes</th></tr>{table}</table><ul>{''.join(details)}</ul>")
    return "".join(parts)


def _fidelity_text(quality: dict) -> str:
    """'top-1 agreement 99.8 %, cos 0.9990; on device: 16/16 agree' from an artifact's quality dict."""
    f, check = quality.get("fidelity"), quality.get("device_check")
    parts = []
    if f:
        parts.append(f"{f['metric'].replace('_', ' ')} {f['score'] * 100:.1f}%, max |Δ| {f['max_abs_error']:.3g}")
    if check:
        parts.append(f"device vs emulation: {check['top1_agreement'] * 100:.0f}% top-1 on {check['samples']} samples")
    return html.escape("; ".join(parts))


def _html(report: dict, reference: Evaluation, evals: list[Evaluation], front_ids: list[str],
          chosen: Evaluation | None, artifacts: list[Artifact], target, quality: str,
          reference_description: str) -> str:
    png = base64.b64encode(pareto_plot_png(reference, evals, front_ids, chosen, target.name, quality,
                                           f"reference ({reference_description})")).decode()
    e = html.escape
    rows = "".join(
        f"<tr{' class=chosen' if a.chosen else ''}><td>{e(a.target)}</td><td>{e(a.id)}</td><td>{e(a.role)}{' ★ chosen' if a.chosen else ''}"
        f"</td><td>{a.val_accuracy * 100:.2f}</td><td>{a.test_accuracy * 100:.2f}</td><td>{a.p50_ms * 1e3:.1f}</td>"
        f"<td>{a.p90_ms * 1e3:.1f}</td><td>{e(a.latency_kind)}</td><td>{a.size_bytes / 1024:.1f}</td>"
        f"<td>{sum(1 for p in a.policy.values() if p == 'int8')}/{len(a.policy)}</td>"
        f"<td>{_fidelity_text(a.quality)}</td>"
        f"<td><code>{e(' '.join(a.config['blocks']))}</code> widths {e(str(a.config['widths']))}</td>"
        f"<td><code>{e(a.path)}</code></td></tr>" for a in artifacts)
    sel = report["selection"]
    chosen_line = (f"Chosen: <b>{e(chosen.candidate_id)}</b>, {chosen.latency.p50_ms * 1e3:.1f} µs p50 vs "
                   f"{reference.latency.p50_ms * 1e3:.1f} µs for the reference "
                   f"({reference.latency.p50_ms / chosen.latency.p50_ms:.2f}× lower)." if chosen
                   else "<b>No candidate met the accuracy drop and budgets.</b>")
    ds = report["dataset"]
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>edgec report — {e(ds['name'])}</title>
<style>{_STYLE}tr.chosen{{background:#fff3cd}}code{{font-size:12px}}</style></head><body>
<h1>edgec compile — {e(ds['name'])} on {e(target.name)}</h1>
<p>{chosen_line}</p>
<p>Selection: {e(sel['rule'])}; minimum {e(quality)} {sel['min_val_accuracy'] * 100:.2f}%,
{sel['qualified']} candidate(s) qualified. Latency kind: <b>{e(reference.latency.kind)}</b>
({e(report['targets'][target.name]['runtime'])}, {e(report['targets'][target.name]['device'])},
{report['targets'][target.name].get('threads', '?')} threads).</p>
<img alt="Pareto front" src="data:image/png;base64,{png}">
<h2>Published artifacts</h2>{_gate_html(report.get("publication_gate"))}
<p>Accuracy columns: {e(quality)}.</p>
<table><tr><th>target</th><th>id</th><th>role</th><th>val acc %</th><th>test acc %</th><th>p50 µs</th><th>p90 µs</th><th>kind</th>
<th>size KiB</th><th>INT8 layers</th><th>fidelity vs FP32</th><th>architecture</th><th>path</th></tr>{rows}</table>
{_devices_html(report)}
<h2>Data</h2><p>{e(ds['source'])}; {e(ds['preprocessing'])}; test: {e(ds['test_split'])};
validation: {e(ds['val_split'])}.</p>
{_search_html(report.get("search"), reference.latency.kind)}
{_finetune_html(report.get("finetune"))}
<p>{len(evals) + 1} candidates evaluated ({len(report['failed'])} failed). Full data: report.json, candidates.csv.
edgec {e(report['edgec_version'])}, {e(report['created_at'])}.</p></body></html>
"""


def _search_html(info: dict | None, latency_kind: str) -> str:
    """What the search measured and predicted, per strategy (LINAS: its predictors' choices)."""
    if not info:
        return ""
    e = html.escape
    text = (f"<h2>Search</h2><p>Strategy <b>{e(info['strategy'])}</b>, {info['real_evaluations']} real evaluations. "
            f"Every candidate's validation accuracy, p50 latency ({e(latency_kind)}) and size in this report was "
            f"measured; the Pareto front is measured.")
    if info["strategy"] == "linas":
        iters = info.get("iterations", [])
        chosen = ", ".join(f"{p['objective']}: {p['chosen']}" for p in iters[-1]["predictors"]) if iters else "–"
        text += (f" {len(info.get('predicted_before_evaluation', {}))} candidates were proposed by the predictors "
                 f"(<b>predicted</b> objectives before evaluation are in report.json, search.predicted_before_evaluation) "
                 f"over {len(iters)} LINAS iterations; last predictors chosen by cross-validation: {e(chosen)}. "
                 f"Latency prior: {e(str(info.get('latency_prior', 'none')))}.")
    return text + "</p>"


def _finetune_html(info: dict | None) -> str:
    """``--finetune-epochs``: which architectures were fine-tuned and each candidate's accuracy before/after."""
    if not info:
        return ""

    def row(c: dict) -> str:
        before, after = c["val_accuracy_before"], c["val_accuracy_after"]
        if before is None:  # a policy the search had not tried
            return f"<tr><td>{html.escape(c['candidate_id'])}</td><td>—</td><td>{after * 100:.2f}</td><td>—</td></tr>"
        return (f"<tr><td>{html.escape(c['candidate_id'])}</td><td>{before * 100:.2f}</td>"
                f"<td>{after * 100:.2f}</td><td>{(after - before) * 100:+.2f}</td></tr>")

    rows = "".join(row(c) for c in info["candidates"])

    def step(i: int, a: dict) -> str:
        qualifies = "—" if "qualifies" not in a else ("yes" if a["qualifies"] else "no")
        trained = ("stored" if a["cached"] else f"{a['train_s']:.0f} s") + (
            "" if a.get("kept", True) else "; not kept: the supernet's weights stay")
        return (f"<tr><td>{html.escape(a['arch'])}</td><td>{'reference' if i == 0 else i}</td>"
                f"<td>{a['val_accuracy_fp32'] * 100:.2f}</td><td>{qualifies}</td><td>{trained}</td></tr>")

    steps = "".join(step(i, a) for i, a in enumerate(info["architectures"]))
    return (f"<h2>Fine-tuning</h2><p>{html.escape(info['rule'])}: {len(info['architectures'])} architectures, "
            f"the reference {info['epochs']} epochs on the labels, the others {info.get('child_epochs', info['epochs'])} "
            "epochs distilled from it.</p>"
            "<table><tr><th>architecture</th><th>step</th><th>val acc % (FP32)</th><th>qualifies</th>"
            f"<th>trained</th></tr>{steps}</table>"
            "<p>The candidates of those architectures (role <code>finetuned</code> in report.json and candidates.csv "
            "where the fine-tuning was kept; the other candidates keep the supernet's weights), validation accuracy before and after (%; — : a policy the "
            "search had not tried):</p>"
            f"<table><tr><th>candidate</th><th>before</th><th>after</th><th>Δ pp</th></tr>{rows}</table>")


def channels_chart_png(before: dict[str, int], after: dict[str, int]) -> bytes:
    """Bars of each layer's output channels before and after pruning; PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(before)
    fig, ax = plt.subplots(figsize=(7, 0.4 * len(layers) + 1.2), dpi=100)
    ys = range(len(layers))
    ax.barh([y - 0.2 for y in ys], [before[n] for n in layers], height=0.4, color="#999999", label="before")
    ax.barh([y + 0.2 for y in ys], [after[n] for n in layers], height=0.4, color="#1f77b4", label="kept")
    ax.set_yticks(list(ys), layers, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("output channels")
    ax.legend()
    ax.grid(axis="x", alpha=0.3)
    return _png(fig)


def speed_text(ratio: float) -> str:
    """'2.10× faster' / '1.09× slower' for a latency ratio old/new."""
    return f"{ratio:.2f}× faster" if ratio >= 1 else f"{1 / ratio:.2f}× slower"


def pruning_html(pruning: dict) -> str:
    """The section of compile's report.html on its PAGCP pass (``edgec compile --prune-flops-target``)."""
    drop = pruning["drops_test"]["classification"]
    return (f"<h2>Pruning (PAGCP)</h2><p>The chosen subnet {html.escape(pruning['candidate_id'])} in FP32: "
            f"{pruning['flops_reduction'] * 100:.1f}% of its FLOPs removed, test accuracy {drop:.2f} points lost, "
            f"cpu-ort p50 {speed_text(pruning['speedup_p50_fp32'])}"
            + ("" if pruning["within_max_accuracy_drop"] else " — beyond --max-accuracy-drop, not chosen")
            + f". {html.escape(pruning['note'])}. Details: <a href='pruned/report.html'>pruned/report.html</a>.</p>")


def _count(macs: int) -> str:
    return f"{macs / 1e6:.2f} M" if macs >= 1e6 else f"{macs / 1e3:.1f} k"


def _distilled(finetune: dict) -> str:
    """', classification distilled from the unpruned model (weight W)' when the fine-tuning distilled."""
    tasks = finetune.get("distilled_tasks") or []
    return f", {', '.join(tasks)} distilled from the unpruned model (weight {finetune['kd_weight']:g})" if tasks else ""


def write_prune_html(report: dict) -> str:
    """``report.html`` of ``edgec prune``: kept channels per layer, FLOPs, per-task metrics, latency, steps."""
    e = html.escape
    png = base64.b64encode(channels_chart_png(report["channels"]["before"], report["channels"]["after"])).decode()
    m, tasks = report["metrics"], report["tasks"]
    from edgec.search.multitask import METRIC_LABELS as unit
    metric_head = "".join(f"<th>{split} {e(t['name'])} {unit[t['metric']]}</th>" for split in ("val", "test")
                          for t in tasks)
    metric_rows = "".join(
        f"<tr><td>{e(label)}</td>" + "".join(f"<td>{m[key][split][t['name']][t['metric']]:.2f}</td>"
                                              for split in ("val", "test") for t in tasks) + "</tr>"
        for label, key in (("unpruned", "reference"), ("pruned, before fine-tuning", "pruned_before_finetune"),
                           ("pruned, fine-tuned", "pruned")))
    steps = "".join(
        f"<tr><td>{s['pass_index']}</td><td>{e(s['layer'])}</td><td>{s['channels_before']} → {s['channels_after']}</td>"
        f"<td>{s['ratio'] * 100:.0f}%</td><td>{s['threshold'] * 100:.1f}%</td><td>{e(s['stopped_by'])}</td>"
        f"<td>{s['trials']}</td><td>{s['macs_after'] / 1e6:.2f}</td></tr>" for s in report["steps"])
    lat = report["latency"]
    ds = report["dataset"]
    gate = report.get("max_task_drop")
    gate_line = "" if not gate else (
        f"<p>--max-task-drop {e(json.dumps(gate['limits']))} on the validation split: "
        f"<b>{'met' if gate['met'] else 'NOT met'}</b>.</p>")
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>edgec prune — {e(ds['name'])}</title>
<style>{_STYLE}</style>
</head><body><h1>edgec prune — {e(report['model']['name'])} on {e(ds['name'])} (PAGCP)</h1>
<p>FLOPs (MACs) {_count(report['macs_before'])} → {_count(report['macs_after'])}:
<b>{report['flops_reduction'] * 100:.1f}% removed</b>; parameters {report['params_before'] / 1e3:.1f} k →
{report['params_after'] / 1e3:.1f} k{'' if report['flops_target_met'] is not False else
' (the --flops-target was not reached within the loss budget)'}. cpu-ort p50 (batch 1, {lat['pruned']['threads']} threads, <i>{e(lat['pruned']['kind'])}</i>,
median of {len(lat['pruned']['p50_ms_rounds'])} alternating rounds): {lat['reference']['p50_ms'] * 1e3:.1f} µs →
{lat['pruned']['p50_ms'] * 1e3:.1f} µs (<b>{speed_text(lat['speedup_p50'])}</b>).</p>{gate_line}
<h2>Per-task metrics</h2>
<table><tr><th>model</th>{metric_head}</tr>{metric_rows}</table>
<p>Channel importance: {e(report['config']['importance'])}. Kept widths: multiples of
{report['algorithm']['settings']['round_to']}. Fine-tuning: {report['finetune']['epochs']} epochs at
lr {report['finetune']['lr']}{e(_distilled(report['finetune']))}.</p>
<h2>Kept channels per conv layer</h2><img alt="kept channels" src="data:image/png;base64,{png}">
<h2>Pruning steps</h2><p>Each group's ratio rose in steps while every watched task
({e(', '.join(report['algorithm']['oracle']['watched_tasks']))}) kept its validation loss within
(1 + threshold) of the reference; "stopped by" names the task whose loss crossed first, or
<i>max_ratio</i> (the group cannot shrink further) or <i>flops_target</i> (the target was reached).</p>
<table><tr><th>pass</th><th>group (root layer)</th><th>channels</th><th>removed</th><th>threshold</th><th>stopped by</th>
<th>trials</th><th>MMACs after</th></tr>{steps}</table>
<h2>Data</h2><p>{e(ds['source'])}; {e(ds['preprocessing'])}; test: {e(ds['test_split'])};
validation: {e(ds['val_split'])}.</p><p>edgec {e(report['edgec_version'])}.</p></body></html>
"""


def transformer_plot_png(reference: dict, evals: list[dict], finalists: list[dict], floor: float) -> bytes:
    """Search fidelity (mean cosine) vs p50 latency of every evaluated candidate, finalists and the
    reference marked, the fidelity floor dashed; PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in evals if not r.get("error")]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    ax.scatter([r["latency"]["p50_ms"] for r in ok], [r["fidelity_search"]["cosine"] for r in ok], s=14,
               color="#999999", label="evaluated (search split)")
    ax.scatter([r["latency"]["p50_ms"] for r in finalists], [r["fidelity_search"]["cosine"] for r in finalists],
               s=30, color="#1f77b4", label="finalists (Pareto front within the drop)")
    ax.scatter([reference["latency"]["p50_ms"]], [1.0], marker="*", s=120, color="#d62728", label="FP32 reference")
    ax.axhline(floor, ls="--", color="#d62728", lw=1)
    ax.set_xlabel("cpu-ort p50 latency, ms (measured)")
    ax.set_ylabel("mean cosine to FP32")
    ax.set_ylim(max(0.0, min([floor - 0.05] + [r["fidelity_search"]["cosine"] for r in finalists])), 1.005)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def transformer_html(report: dict, evals: list[dict]) -> str:
    """``report.html`` of ``edgec compile --model minilm``: the search plot, finalists, reference, chosen."""
    e = html.escape

    floor = 1 - report["max_fidelity_drop"]
    finalists = report["finalists"]
    png = base64.b64encode(transformer_plot_png(report["reference"], evals, [
        next(r for r in evals if r["candidate_id"] == f["candidate_id"]) for f in finalists], floor)).decode()
    ref = report["reference"]
    rows = "".join(
        f"<tr><td>{e(f['candidate_id'])}{' ★' if f['chosen'] else ''}</td><td>{e(f['summary'])}</td>"
        f"<td>{f['fidelity_eval']['cosine']:.4f}</td><td>{f['fidelity_eval']['neighbour_agreement'] * 100:.1f}%</td>"
        f"<td>{f['latency']['p50_ms']:.2f}</td><td>{speed_text(f['speedup_p50'])}</td>"
        f"<td>{f['size_bytes'] / 2**20:.1f}</td></tr>" for f in finalists)
    chosen = report["chosen"]
    verdict = (f"Chosen: <b>{e(chosen['candidate_id'])}</b> ({e(chosen['summary'])}), cosine "
               f"{chosen['fidelity_eval']['cosine']:.4f}, p50 {chosen['latency']['p50_ms']:.2f} ms, "
               f"{speed_text(chosen['speedup_p50'])} than the FP32 reference." if chosen else
               f"<b>No candidate kept the mean cosine ≥ {floor:.3f} on the evaluation split.</b>")
    rec = report.get("recovery") or []
    def how(r: dict) -> str:
        ls = r.get("reconstruction")
        parts = [f"least squares on {ls['tokens']:,} tokens, {ls['seconds']:.0f} s"] if ls else []
        if r.get("steps"):
            parts.append(f"{r['steps']} distillation steps on {r['device']}, {r['seconds']:.0f} s")
        return " + ".join(parts)
    rec_line = " ".join(
        f"Recovered {r['candidate_id']}: search-split cosine {r['fidelity_search_before']['cosine']:.4f} → "
        + (f"{r['fidelity_search_after']['cosine']:.4f} ({e(how(r))})." if not r.get("error")
           else f"failed: {e(r['error'])}.") for r in rec
    ) or "No recovery (no pruned sub-network within reach of the floor, or --recovery-candidates 0)."
    lat = report["latency_input"]
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>edgec compile — {e(report['model']['name'])}</title>
<style>{_STYLE}</style>
</head><body><h1>edgec compile — {e(report['model']['name'])} (elastic layers/heads/FFN × per-layer precision)</h1>
<p>{verdict}</p>
<p>Latency: cpu-ort, batch 1, {lat['sequence_length']} tokens, {report['target']['threads']} threads,
<i>{e(lat['kind'])}</i>; finalists and reference re-measured side by side (median of interleaved rounds).
Reference p50 {ref['latency']['p50_ms']:.2f} ms, {ref['size_bytes'] / 2**20:.1f} MiB.</p>
<img alt="fidelity vs latency" src="data:image/png;base64,{png}">
<h2>Finalists (evaluation split)</h2>
<table><tr><th>id</th><th>candidate</th><th>mean cosine</th><th>neighbour agreement</th><th>p50 ms</th>
<th>vs FP32</th><th>MiB</th></tr>{rows}</table>
<p>{report['evaluated']} candidates evaluated ({report['failed']} failed); see candidates.csv. {e(rec_line)}</p>
<h2>Quality and data</h2><p>{e(report['quality'])}. Text: {e(report['text']['source'])},
{e(report['text']['split_rule'])}; splits: {e(json.dumps(report['splits']))}.</p>
<p>Model: {e(report['model']['source'])}. edgec {e(report['edgec_version'])}.</p></body></html>
"""


def decoder_plot_png(report: dict, evals: list[dict]) -> bytes:
    """Search-window perplexity vs decode ms per token of every evaluated candidate, the FP32 graphs and the bound."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in evals if not r.get("error")]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.scatter([r["timing"]["decode_ms_per_token"] for r in ok], [r["ppl_search"] for r in ok], s=18, c="#999",
               label="evaluated (search windows)")
    ids = {f["candidate_id"] for f in report["finalists"]}
    fin = [r for r in ok if r["candidate_id"] in ids]
    ax.scatter([r["timing"]["decode_ms_per_token"] for r in fin], [r["ppl_search"] for r in fin], s=36, c="#c33",
               label="finalists")
    for key, marker, name in (("reference", "*", "FP32 (optimum)"), ("fp32_fused", "D", "FP32 fused")):
        b = report[key]
        ax.scatter([b["timing"]["decode_ms_per_token"]], [b["ppl_search"]], marker=marker, s=90, c="#036", label=name)
    ax.axhline(report["reference"]["ppl_search"] * (1 + report["max_ppl_increase"]), ls="--", c="#c33", lw=1,
               label=f"+{report['max_ppl_increase']:.0%} perplexity")
    ax.set_xlabel("decode ms per token (measured, cpu-ort)")
    ax.set_ylabel("perplexity (search windows)")
    ax.legend(fontsize=8)
    return _png(fig)


def decoder_html(report: dict, evals: list[dict]) -> str:
    """``report.html`` of ``edgec compile --model smollm2``: the search plot, FP32 graphs, finalists, chosen."""
    e = html.escape
    png = base64.b64encode(decoder_plot_png(report, evals)).decode()

    def row(f: dict, name: str | None = None) -> str:
        t = f["timing"]
        return (f"<tr><td>{e(name or f['candidate_id'])}{' ★' if f.get('chosen') else ''}</td><td>{e(f['summary'])}</td>"
                f"<td>{f['ppl_eval']:.3f}</td><td>{f['ppl_increase'] * 100:+.1f}%</td>"
                f"<td>{f['greedy_agreement']['prefix'] * 100:.0f}%</td><td>{t['ttft_ms']:.0f}</td>"
                f"<td>{t['decode_tokens_per_s']:.1f}</td><td>{f['decode_speedup']:.2f}×</td>"
                f"<td>{f['size_bytes'] / 2**20:.1f}</td><td>{f['size_ratio'] * 100:.0f}%</td></tr>")
    rows = row(report["reference"], "reference") + row(report["fp32_fused"], "fp32-fused") + "".join(
        row(f) for f in report["finalists"])
    chosen = report["chosen"]
    verdict = (f"Chosen: <b>{e(chosen['candidate_id'])}</b> ({e(chosen['summary'])}): perplexity "
               f"{chosen['ppl_eval']:.3f} ({chosen['ppl_increase'] * 100:+.1f}% vs FP32), "
               f"{chosen['timing']['decode_tokens_per_s']:.1f} decode tokens/s ({chosen['decode_speedup']:.2f}× FP32), "
               f"TTFT {chosen['timing']['ttft_ms']:.0f} ms, {chosen['size_ratio'] * 100:.0f}% of the FP32 file."
               if chosen else f"<b>No candidate kept the perplexity within +{report['max_ppl_increase']:.0%} of FP32 "
               "on the evaluation windows.</b>")
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>edgec compile — {e(report['model']['name'])}</title>
<style>{_STYLE}</style>
</head><body><h1>edgec compile — {e(report['model']['name'])} (per-layer weight precision)</h1>
<p>{verdict}</p>
<p>{e(report['timing'])}; <i>measured</i>, medians of interleaved rounds for the rows below.</p>
<img alt="perplexity vs decode time" src="data:image/png;base64,{png}">
<h2>FP32 graphs and finalists (evaluation windows)</h2>
<table><tr><th>id</th><th>candidate</th><th>perplexity</th><th>vs FP32</th><th>greedy agreement (prefix)</th>
<th>TTFT ms</th><th>decode tok/s</th><th>vs FP32</th><th>MiB</th><th>size vs FP32</th></tr>{rows}</table>
<p>{report['evaluated']} candidates evaluated ({report['failed']} failed); see candidates.csv.
Recipe: {e(report['space']['recipe'])}.</p>
<h2>Quality and data</h2><p>{e(report['quality'])}. Text: {e(report['text']['source'])},
{e(report['text']['split_rule'])}; splits: {e(json.dumps(report['splits']))}.</p>
<p>Model: {e(report['model']['source'])}. edgec {e(report['edgec_version'])}.</p></body></html>
"""


def latency_scatter_png(rows: list[dict], title: str) -> bytes:
    """Measured vs predicted p50 (as ratios to the anchor) with the ±10 % band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    m = np.array([r["ratio"] for r in rows])
    p = np.array([r["predicted_ratio"] for r in rows])
    lut = np.array([r["lut_predicted_ratio"] for r in rows]) if rows and "lut_predicted_ratio" in rows[0] else None
    both = p if lut is None else np.concatenate([p, lut])
    fig, ax = plt.subplots(figsize=(5, 5))
    lo, hi = float(min(m.min(), both.min())) * 0.9, float(max(m.max(), both.max())) * 1.1
    xs = np.linspace(lo, hi, 50)
    ax.plot(xs, xs, color="#444", lw=1, label="predicted = measured")
    ax.fill_between(xs, xs * 0.9, xs * 1.1, color="#2ca02c", alpha=0.15, label="±10 %")
    ax.scatter(m, p, s=12, color="#1f77b4", label="kernel-level model")
    if lut is not None:
        ax.scatter(m, lut, s=12, color="#ff7f0e", marker="x", label="lookup table (FBNet)")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_xlabel("measured p50 / anchor p50 (side by side)")
    ax.set_ylabel("predicted p50 / anchor p50")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3)
    return _png(fig)


def latency_validation_html(result: dict) -> str:
    """``edgec latency validate``'s report: the figures and the measured-vs-predicted scatter plot."""
    e = html.escape
    png = base64.b64encode(latency_scatter_png(result["rows"], f"{result['target']} — {result['space']}")).decode()
    b = result["built_on"]
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>edgec latency validate — {e(result['target'])}</title>
<style>{_STYLE}</style>
</head><body><h1>Latency model validation — {e(result['target'])}, {e(str(result['space']))}</h1>
<p>{result['n']} held-out random candidates, each measured (p50, batch 1, as a ratio to the anchor graph
measured side by side: {_anchor_text(result['anchor_p50_ms'])}) and predicted by the
{e(result['model_kind'])} model ({e(result['model'])}; built on {e(str(b.get('device')))},
{e(str(b.get('runtime')))}, {b.get('threads')} threads, from {b.get('samples')} measured candidates).</p>
{_elsewhere_html(result)}{_noisy_html(result)}<ul><li>within ±10 %: <b>{result['within_10pct'] * 100:.1f} %</b></li>
<li>RMSPE: <b>{result['rmspe'] * 100:.1f} %</b> (median |error| {result['median_abs_pct_error']:.1f} %)</li>
<li>Spearman rank correlation: <b>{result['spearman']:.3f}</b></li>
<li>on its own training samples: within ±10 % {result['fit']['within_10pct'] * 100:.1f} %, RMSPE
{result['fit']['rmspe'] * 100:.1f} %</li></ul>
{_lut_html(result.get("lut"))}
<img alt="measured vs predicted" src="data:image/png;base64,{png}">
</body></html>
"""


def _noisy_html(result: dict) -> str:
    noisy = result.get("noisy_left_out") or []
    if not noisy:
        return ""
    return (f"<p>{len(noisy)} held-out candidate(s) were never measured in a quiet round (the anchor over "
            f"{result['quiet_tolerance']}× its session's reference p50, even after measuring them again) "
            "and are left out.</p>\n")


def _elsewhere_html(result: dict) -> str:
    if result.get("built_here", True):
        return ""
    h = result["validated_on"]
    return (f"<p><b>Built on another machine.</b> Measured here on {html.escape(str(h['device']))}, "
            f"{html.escape(str(h['runtime']))}, {h['threads']} threads: these figures are this machine's.</p>\n")


def _lut_html(lut: dict | None) -> str:
    if not lut:
        return "<p>No lookup table was built with this model (edgec latency build --no-lut).</p>"
    return (f"<p>The FBNet lookup table ({lut['entries']} parts measured alone, + a fixed overhead of "
            f"{lut['overhead_ratio']:.3f} anchor units) on the same candidates: within ±10 % "
            f"<b>{lut['within_10pct'] * 100:.1f} %</b>, RMSPE <b>{lut['rmspe'] * 100:.1f} %</b> (median |error| "
            f"{lut['median_abs_pct_error']:.1f} %), Spearman <b>{lut['spearman']:.3f}</b>.</p>")


def context_plots_png(result: dict) -> tuple[bytes, bytes]:
    """(perplexity per condition bar chart, TTFT vs context length — full vs compressed) for
    ``edgec context eval``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ppl = result["perplexity"]
    keys = list(result["conditions"])
    fig, ax = plt.subplots(figsize=(7, 3.2))
    colors = {"a": "#999", "b": "#2ca02c", "c": "#1f77b4", "d": "#ff7f0e", "e": "#bbb", "f": "#bbb"}
    ax.barh(range(len(keys)), [ppl[k] for k in keys], color=[colors[k[0]] for k in keys])
    ax.set_yticks(range(len(keys)), [f"({k[0]}) {k[2:].replace('_', ' ')}" for k in keys], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(f"continuation perplexity ({ppl['context_tokens']}-token context, lower is better)")
    ax.grid(axis="x", alpha=0.3)
    bars = _png(fig)
    rows = result["ttft"]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    xs = [r["context_tokens"] for r in rows]
    ax.plot(xs, [r["full_ttft_ms"] for r in rows], "o-", color="#d62728", label="full-context prefill")
    ax.plot(xs, [r["compressed_ttft_ms"] for r in rows], "o-", color="#1f77b4",
            label=f"encoder + projector + short prefill ({result['compression_ratio']}×)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context tokens")
    ax.set_ylabel("time to first token, ms (measured)")
    ax.set_title(f"cpu-ort, {result['variant']} decoder, {result['threads']} threads", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    return bars, _png(fig)


def memory_noun(spec: dict) -> str:
    """What one memory position is, in words, for a compressor ``spec`` (its ``memory`` kind)."""
    return "KV-cache memory positions" if spec.get("memory") == "kv" else "memory embeddings"


def text_equivalent_text(result: dict) -> str:
    """``edgec context eval``'s truncation curve in words: what the memory is worth in context tokens given
    as text, and the perplexity with the last k tokens for each k measured."""
    ppl = result["perplexity"]

    def worth(eq):
        return ("no more than no context" if eq == 0 else "more than the whole context as text" if eq is None
                else f"about {eq:g} context tokens as text")

    curve = " · ".join(f"{c['text_tokens']}: {c['perplexity']:.2f}" for c in ppl.get("text_budget", []))
    t = ppl.get("tail_tokens", 0)
    if not t:
        return (f"the {ppl['memory_tokens']} {memory_noun(result['spec'])} are worth "
                f"{worth(ppl.get('memory_text_equivalent_tokens'))} (perplexity with the last k tokens as text — "
                f"{curve}; memory: {ppl['c_compressed']:.2f})")
    return (f"the compressed context ({ppl['memory_tokens'] - t} {memory_noun(result['spec'])} + the last {t} tokens "
            f"as text) is worth {worth(ppl.get('memory_text_equivalent_tokens'))}, the memory of the whole context "
            f"alone ({ppl['memory_tokens']} positions) {worth(ppl.get('memory_only_text_equivalent_tokens'))} "
            f"(perplexity with the last k tokens as text — {curve}; compressed: {ppl['c_compressed']:.2f}, memory "
            f"alone: {ppl['c_memory_only']:.2f})")


def break_even_text(result: dict) -> str:
    """The break-even context length of ``edgec context eval``'s result, in words."""
    be = result["break_even_context_tokens"]
    if be is None:
        return "never within the lengths measured"
    if be == result["ttft"][0]["context_tokens"]:
        return f"≤ {be:g} tokens (compression pays at every length measured)"
    return f"{be:g} tokens"


def context_html(result: dict) -> str:
    """``edgec context eval``'s report: perplexity under every condition, TTFT, memory, plots."""
    e = html.escape
    bars, ttft = (base64.b64encode(p).decode() for p in context_plots_png(result))
    ppl = result["perplexity"]
    cond = "".join(f"<tr><td>({k[0]}) {e(text)}</td><td>{ppl[k]:.3f}</td></tr>"
                   for k, text in result["conditions"].items())
    rows = "".join(f"<tr><td>{r['context_tokens']}</td><td>{r['memory_tokens']} + {r.get('tail_tokens', 0)}</td>"
                   f"<td>{r['full_ttft_ms']:.1f}</td>"
                   f"<td>{r['compressed_ttft_ms']:.1f}</td><td>{r['encoder_ms']:.1f}</td><td>{r['ttft_speedup']:.2f}×</td></tr>"
                   for r in result["ttft"])
    peak = result.get("peak_memory_1024") or {}
    mem = ("".join(f"<li>{e(mode)}: peak resident {d['peak_rss_bytes'] / 2**20:.0f} MiB, of which "
                   f"{d['inference_peak_bytes'] / 2**20:.0f} MiB during the first-token run</li>" for mode, d in peak.items())
           or "<li>not measured (needs Linux /proc)</li>")
    t = result.get("training") or {}
    gap = result["gap_closure"]
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>edgec context eval</title>
<style>{_STYLE}</style></head><body>
<h1>Context compressor — {e(result['spec']['decoder'])}, {result['compression_ratio']}× compression</h1>
<p>Encoder: the decoder's first {result['spec']['encoder_layers']} block(s) + projector; {result['memory_per_window']}
{'memory positions' if result['spec'].get('memory') == 'kv' else 'memory embeddings'} per {
result['spec']['window_tokens']}-token window{', written into every decoder layer&#39;s key/value cache'
if result['spec'].get('memory') == 'kv' else ', given to the decoder as input embeddings'}. Trained {t.get('steps', '?')} steps
({t.get('restore_steps', '?')} restoration, {t.get('continue_steps', '?')} continuation) in
{(t.get('train_s') or 0) / 60:.1f} min on {t.get('threads', '?')} CPU threads{
f" in {e(str(t['autocast']))}" if t.get('autocast') else ''}. Evaluation text: {e(result['corpus']['eval'])}.</p>
<h2>Continuation perplexity</h2>
<p>{ppl['samples']} held-out passages from {ppl['documents']} documents: a {ppl['context_tokens']}-token context
(N = {ppl['memory_tokens']} decoder positions: the compressed context (c) is the memory of its older part in
{ppl['memory_tokens'] - ppl.get('tail_tokens', 0)} {memory_noun(result['spec'])}, then its last
{ppl.get('tail_tokens', 0)} tokens as text — <code>--tail-tokens</code>), then {ppl['target_tokens']} scored tokens;
PyTorch FP32.
<b>Gap closure</b> (PPL<sub>a</sub> − PPL<sub>c</sub>) / (PPL<sub>a</sub> − PPL<sub>b</sub>) =
<b>{'n/a' if gap is None else f'{gap * 100:.1f} %'}</b>; compressed beats the last-N-tokens text:
<b>{result['c_beats_d']}</b>.</p>
<table><tr><th>condition</th><th>perplexity</th></tr>{cond}</table>
<p>Truncation curve: {e(text_equivalent_text(result))}.</p>
<p>(c) with the memory of the exported <b>{e(result['encoder'])}</b> encoder graph (the one timed below):
<b>{result['c_compressed_onnx_encoder']:.3f}</b>.</p>
<img alt="perplexity per condition" src="data:image/png;base64,{bars}">
<h2>Time to first token on cpu-ort (measured; {e(result['encoder'])} encoder, {e(result['variant'])} decoder)</h2>
<p>Speed-up at 1024 tokens: <b>{'n/a' if result['ttft_speedup_1024'] is None else f"{result['ttft_speedup_1024']:.2f}×"}</b>; break-even context:
<b>{break_even_text(result)}</b>. A {result['ttft'][0]['prompt_tokens']}-token prompt follows the context; medians of
interleaved runs.</p>
<table><tr><th>context tokens</th><th>memory + text tokens</th><th>full prefill ms</th><th>compressed ms</th>
<th>of which encoder ms</th><th>speed-up</th></tr>{rows}</table>
<img alt="TTFT vs context length" src="data:image/png;base64,{ttft}">
<h2>Peak memory, 1024-token context</h2><ul>{mem}</ul>
</body></html>
"""
