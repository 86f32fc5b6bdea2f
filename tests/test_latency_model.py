"""The kernel-level latency model (targets/latency_model.py) and `edgec latency build|validate`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from conftest import needs_target
from edgec.compile.export import export_onnx
from edgec.compile.quantize import quantize_qdq
from edgec.errors import ConfigError
from edgec.search.space import BlockConfig, SubnetConfig
from edgec.search.supernet import extract_subnet
from edgec.targets.latency_model import (FORMAT, KernelPredictor, feature_columns, graph_features, graph_kernels,
                                         runtime_view, validation_metrics)


def _count(kernels, cls, precision):
    return sum(1 for k in kernels if k.cls == cls and k.precision == precision)


def test_kernels_follow_how_onnx_runtime_fuses_fp32_int8_and_mixed_graphs(randomized_supernet, spec8, images8,
                                                                         tmp_path):
    k3e6, k5e1 = BlockConfig(3, 6), BlockConfig(5, 1)
    config = SubnetConfig((k3e6, k5e1, k3e6, BlockConfig(), k3e6, k3e6, BlockConfig(), k3e6), (16, 32, 64))
    fp32 = export_onnx(extract_subnet(randomized_supernet, config).fused(), (1, 8, 8), tmp_path / "fp32.onnx")
    layers = spec8.layers_of(config)
    convs = len(layers) - 1  # all but the classifier
    k = graph_kernels(fp32)
    dw = sum(1 for n in layers if n.endswith(".dw"))
    assert _count(k, "dwconv", "fp32") == dw and _count(k, "conv", "fp32") == 1  # the 3×3 stem
    assert _count(k, "conv1x1", "fp32") == convs - dw - 1 and _count(k, "gemm", "fp32") == 1
    assert _count(k, "add", "fp32") == 4  # residuals: both blocks of stage 0 (16 → 16), the last of stages 1 and 2
    assert not any(x.cls in ("quantize", "dequantize") for x in k)
    # MACs of the stem: 16 output channels × 8×8 pixels × 1 input channel × 3×3
    assert next(x for x in k if x.name == "stem").macs == 16 * 64 * 9

    int8 = quantize_qdq(fp32, tmp_path / "int8.onnx", tuple(layers), images8)
    k8 = graph_kernels(int8)
    assert _count(k8, "conv1x1", "int8") == convs - dw - 1 and _count(k8, "dwconv", "int8") == dw
    assert _count(k8, "quantize", "int8") >= 1 and sum(x.precision == "fp32" and x.cls != "other" for x in k8) == 0
    # a mixed policy switches precision: more standalone quantize/dequantize kernels than all-INT8
    mixed = quantize_qdq(fp32, tmp_path / "mixed.onnx", tuple(layers[::2]), images8)
    km = graph_kernels(mixed)
    switches = sum(x.cls in ("quantize", "dequantize") for x in km)
    assert switches > sum(x.cls in ("quantize", "dequantize") for x in k8)
    assert _count(km, "conv1x1", "fp32") + _count(km, "dwconv", "fp32") > 0
    assert graph_features(km).shape == (len(feature_columns()),)
    # what ONNX Runtime really fused: no INT8 kernel in the float graph; in the mixed one, the nodes it fused
    # (its WeightBiasQuantization also fuses float-weight Convs between DequantizeLinear and QuantizeLinear)
    assert not runtime_view(fp32).int8_nodes
    view = runtime_view(mixed)
    names = {n.name for n in onnx.load(str(mixed)).graph.node}
    assert view.int8_nodes and view.int8_nodes <= names
    kr = graph_kernels(mixed, view)
    assert sum(x.precision == "int8" and x.cls in ("conv1x1", "dwconv", "conv", "gemm") for x in kr) \
        == len({n for n in view.int8_nodes if n in layers})
    assert sum(1 for x in kr if x.cls == "layout") == view.layout_kernels
    # a prediction is the sum of per-kernel costs plus the overhead, in anchor units, × the anchor's p50
    model = KernelPredictor({"conv1x1.fp32.count": 0.5, "dwconv.fp32.macs": 2.0}, 0.25, {"anchor_p50_ms": 2.0})
    expected = 0.25 + 0.5 * _count(k, "conv1x1", "fp32") + 2.0 * sum(x.macs for x in k if x.cls == "dwconv") / 1e6
    assert model.predict_ratio(fp32) == pytest.approx(expected)
    assert model.predict_ms(fp32) == pytest.approx(2 * expected) and model.predict_ms(fp32, 3.0) == pytest.approx(3 * expected)


def test_the_fit_recovers_kernel_costs_and_round_trips_through_json(tmp_path):
    cols = feature_columns()
    true = {"conv1x1.int8.macs": 0.02, "dwconv.fp32.elements": 0.004, "conv1x1.fp32.macs": 0.05,
            "quantize.int8.count": 0.01}
    rng = np.random.default_rng(0)
    samples = []
    for i in range(60):
        x = np.zeros(len(cols))
        for name in true:
            x[cols.index(name)] = rng.uniform(1, 20)
        samples.append({"id": str(i), "features": x.tolist(), "ratio": 0.1 + sum(true[n] * x[cols.index(n)] for n in true)})
    model = KernelPredictor.fit(samples, {"target": "cpu-ort", "threads": 2, "anchor_p50_ms": 2.0})
    assert model.overhead_ratio == pytest.approx(0.1, abs=1e-3)
    for name, value in true.items():
        assert model.coef[name] == pytest.approx(value, rel=1e-3)
    assert set(model.coef) <= set(true)
    loaded = KernelPredictor.load(model.save(tmp_path / "m.json"))
    assert loaded.coef == model.coef and loaded.meta["anchor_p50_ms"] == 2.0 and len(loaded.samples) == 60
    x = samples[7]["features"]
    assert loaded.predict_ratio_from_features(x) == pytest.approx(samples[7]["ratio"], rel=1e-3)
    good = json.loads((tmp_path / "m.json").read_text())
    for damage in ({"format": "something-else"}, {"overhead_ratio": float("nan")}, {"coef": {"bogus.x": 1.0}},
                   {"meta": []}, {"samples": "abc"}, {"samples": [{}]}, {"samples": []}):
        (tmp_path / "bad.json").write_text(json.dumps({**good, **damage}))
        with pytest.raises(ConfigError, match="not an edgec latency model"):
            KernelPredictor.load(tmp_path / "bad.json")
    (tmp_path / "bad.json").write_text(json.dumps({k: v for k, v in good.items() if k != "meta"}))
    with pytest.raises(ConfigError, match="no 'meta'"):
        KernelPredictor.load(tmp_path / "bad.json")
    with pytest.raises(ConfigError, match="at least 10"):
        KernelPredictor.fit(samples[:5], {})


def test_validation_metrics():
    m = validation_metrics([1.0, 2.0, 4.0, 8.0], [1.05, 2.5, 3.9, 8.0])
    assert m["n"] == 4 and m["within_10pct"] == 0.75 and m["spearman"] == pytest.approx(1.0)
    assert m["rmspe"] == pytest.approx(np.sqrt((0.05 ** 2 + 0.25 ** 2 + 0.025 ** 2) / 4))
    assert validation_metrics([1.0, 2.0, 3.0], [3.0, 2.0, 1.0])["spearman"] == pytest.approx(-1.0)


def _edgec(*args, env=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "edgec.cli", *args], capture_output=True, text=True, timeout=timeout,
                          env=env)


def _measured(*args, env=None, attempts=3):
    """``_edgec`` for a command that measures latency: when it refuses because the shared host was busy
    ("… on a quiet machine", its designed refusal), run it again, up to ``attempts`` times in all."""
    for _ in range(attempts):
        p = _edgec(*args, env=env)
        if p.returncode != 2 or "on a quiet machine" not in p.stderr:
            break
    return p


def test_latency_cli_refuses_bad_settings_and_a_missing_model_in_one_line(tmp_path):
    env = {**os.environ, "EDGEC_CACHE_DIR": str(tmp_path / "cache")}
    for args, fragment in ((("build", "--samples", "5"), "--samples"),
                           (("validate", "--dataset", "digits", "--subnets", "10", "--runs", "20"),
                            "no latency model for cpu-ort on digits"),
                           (("validate", "--dataset", "digits", "--json", str(tmp_path / "nope" / "f.json")),
                            "cannot write"),
                           (("build", "--dataset", "cifar"), "unknown dataset"),
                           (("build", "--seed", "-1"), "--seed"),
                           (("build", "--threads", "abc"), "see 'edgec latency build --help'"),
                           ((), "build|validate"),
                           (("validate", "--json", str(tmp_path / "x.json"), "--html", str(tmp_path / "x.json")),
                            "same file"),
                           (("validate", "--dataset", "digits", "--json", "/proc/x.json"), "cannot write")):
        p = _edgec("latency", *args, env=env)
        assert p.returncode == 2, p.stderr
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("edgec: error:") and fragment in lines[0], p.stderr
    # a model built for another machine is named as such, even with its lookup table next to it
    folder = tmp_path / "cache" / "latency"
    folder.mkdir(parents=True)
    other = {"format": FORMAT, "coef": {}, "overhead_ratio": 0.1, "samples": [
        {"id": "a", "features": [0.0] * len(feature_columns()), "ratio": 1.0}],
        "meta": {"target": "cpu-ort", "threads": 8, "anchor_p50_ms": 1.0, "runtime": "x", "device": "y"}}
    (folder / "cpu-ort-digits-aaaaaaaaaaaa.json").write_text(json.dumps(other))
    (folder / "cpu-ort-digits-aaaaaaaaaaaa.lut.json").write_text(json.dumps(
        {"format": "edgec-latency-lut/1", "entries": {"stem|fp32": 1.0}, "overhead_ratio": 0.0, "meta": {}}))
    p = _edgec("latency", "validate", "--dataset", "digits", env=env)
    assert p.returncode == 2 and "no latency model for cpu-ort on digits" in p.stderr, p.stderr
    assert "built for another space" in p.stderr, p.stderr  # it has no spec: not one of this space
    p = _edgec("latency", "validate", "--dataset", "digits", "--json", str(folder / "cpu-ort-digits-aaaaaaaaaaaa.json"),
               env=env)  # a report over the cache's own files
    assert p.returncode == 2 and "it is one of the inputs" in p.stderr, p.stderr


@pytest.mark.slow
@pytest.mark.parametrize("sig,code", [(2, 130), (15, 143)])  # SIGINT, SIGTERM
def test_an_interrupted_build_says_so_and_leaves_nothing_behind(tmp_path, sig, code):
    """Ctrl-C or SIGTERM in the middle of measuring: one line, the signal's exit code, no temporary
    folder of compiled graphs and no model in the cache."""
    import time

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {**os.environ, "EDGEC_CACHE_DIR": str(tmp_path / "cache"), "TMPDIR": str(scratch)}
    import signal

    # a test run in the background (nohup, CI) ignores SIGINT, and its children would inherit that
    proc = subprocess.Popen([sys.executable, "-m", "edgec.cli", "latency", "build", "--dataset", "digits", "--samples",
                             "40", "--runs", "30", "--no-lut"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not list(scratch.glob("edgec-latency-*")) and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(2)  # measuring
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code and err.strip().splitlines()[-1] == "edgec: interrupted", err[-500:]
    assert "Traceback" not in err and not list(scratch.glob("edgec-latency-*"))
    assert not list((tmp_path / "cache").rglob("*.json"))


@pytest.mark.slow
def test_latency_build_then_validate_on_digits(tmp_path, monkeypatch):
    """A small model end to end: measured candidates, a fit, held-out figures in the JSON and the HTML."""
    env = {**os.environ, "EDGEC_CACHE_DIR": str(tmp_path / "cache")}
    p = _measured("latency", "build", "--dataset", "digits", "--samples", "24", "--runs", "30", "--no-lut", env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    models = list((tmp_path / "cache" / "latency").glob("cpu-ort-digits-*.json"))
    meta = json.loads(models[0].read_text())["meta"]  # a busy host's noisy candidates are left out, and counted;
    # spares of the same seed make them up while some are noisy, up to 48 in all
    measured = meta["samples"] + len(meta["samples_noisy_left_out"])
    assert len(models) == 1 and 24 <= measured <= 48 and meta["samples"] >= 10
    out = tmp_path / "v.json"
    p = _measured("latency", "validate", "--dataset", "digits", "--subnets", "12", "--runs", "30", "--json", str(out),
               "--html", str(tmp_path / "v.html"), env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    v = json.loads(out.read_text())
    assert v["n"] == len(v["rows"]) >= 10 and 0 <= v["within_10pct"] <= 1 and v["rmspe"] >= 0
    assert -1 <= v["spearman"] <= 1 and all(r["predicted_ratio"] > 0 and r["ratio"] > 0 for r in v["rows"])
    # the anchor's p50 is recorded with each row (how ratios are formed: test_measure_candidates_…)
    assert all(r["p50_ms"] > 0 and r["anchor_p50_ms"] > 0 for r in v["rows"])
    assert v["built_here"] is True and v["validated_on"]["threads"] == 2
    assert not {r["id"] for r in v["rows"]} & {s["id"] for s in json.loads(models[0].read_text())["samples"]}
    page = (tmp_path / "v.html").read_text()
    assert "data:image/png;base64," in page and "No lookup table" in page and v["lut"] is None

    assert "uses this model's measured candidates as its latency prior" in p.stdout or "will not use" in p.stdout
    own_record = list(models[0].parent.glob(models[0].stem + ".validated-*.json"))  # every validation is recorded
    assert len(own_record) == 1 and json.loads(own_record[0].read_text())["spearman"] == v["spearman"]
    original = models[0].read_text()
    # the same model as if built on another machine (8 threads there): validated here, recorded, trusted
    doc = json.loads(models[0].read_text())
    doc["meta"]["threads"] = 8
    foreign = models[0].with_name("cpu-ort-digits-0123456789ab.json")
    foreign.write_text(json.dumps(doc))
    models[0].unlink()
    p = _measured("latency", "validate", "--dataset", "digits", "--subnets", "12", "--runs", "30", "--json", str(out),
               "--html", str(tmp_path / "v.html"), env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    v = json.loads(out.read_text())
    assert v["built_here"] is False and v["built_on"]["threads"] == 8 and v["validated_on"]["threads"] == 2
    assert "Built on another machine" in (tmp_path / "v.html").read_text() and "another machine" in p.stdout
    records = list(foreign.parent.glob(foreign.stem + ".validated-*.json"))
    assert len(records) == 1 and json.loads(records[0].read_text())["spearman"] == v["spearman"]

    import edgec.latency_job as lj
    from edgec.pipeline import Progress
    from edgec.targets import open_target

    monkeypatch.setenv("EDGEC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(lj, "AUTO_VALIDATION_SUBNETS", 12)
    settings = lj.LatencySettings(dataset="digits", runs=30)
    _, spec = lj._space(settings)
    target = open_target("cpu-ort", threads=2)
    try:
        monkeypatch.setattr(lj, "PRIOR_MIN_SPEARMAN", -1.0)  # the trust rule itself: next assertion
        model, path, trust = lj.trusted_model(settings, spec, target, Progress())
        assert path == foreign and "built on another machine (threads 8 → 2)" in trust
        assert f"Spearman {v['spearman']:.3f}" in trust  # the recorded validation, not a new one
        monkeypatch.setattr(lj, "PRIOR_MIN_SPEARMAN", 1.01)
        assert lj.trusted_model(settings, spec, target, Progress())[0] is None
        # the model changes: its record no longer applies and the validation runs again by itself
        doc["meta"]["built_at"] = "elsewhere, later"
        foreign.write_text(json.dumps(doc))
        monkeypatch.setattr(lj, "PRIOR_MIN_SPEARMAN", -1.0)
        before = records[0].read_text()
        model, path, trust = lj.trusted_model(settings, spec, target, Progress())
        assert model is not None and records[0].read_text() != before, trust  # why not, when it fails
        assert json.loads(records[0].read_text())["model_sha256"] == lj.sha256_file(foreign)
        # the model built here again: its own recorded validation decides, as for a foreign one
        models[0].write_text(original)
        model, path, trust = lj.trusted_model(settings, spec, target, Progress())
        assert path == models[0] and trust.startswith("built on this machine, validated here on")
        monkeypatch.setattr(lj, "PRIOR_MIN_SPEARMAN", 1.01)
        model, path, trust = lj.trusted_model(settings, spec, target, Progress())
        assert model is None and "was built on this machine and" in trust
        own_record[0].unlink()  # never validated: used, and said so
        model, path, trust = lj.trusted_model(settings, spec, target, Progress())
        assert path == models[0] and "not validated yet ('edgec latency validate --target cpu-ort --dataset digits'" in trust
    finally:
        target.close()


def test_lookup_table_parts_sum_and_round_trip(spec8, tmp_path):
    from edgec.errors import ConfigError, ModelError
    from edgec.latency_job import lut_keys
    from edgec.search.space import QuantPolicy
    from edgec.search.strategy import make_candidate
    from edgec.targets.latency_model import BlockLUT, lut_parts

    keys = lut_keys(spec8)
    assert len(keys) == len(set(keys))
    rng = np.random.default_rng(0)
    for _ in range(20):  # every part any candidate needs is a key of the table
        sub = spec8.sample(rng)
        policy = QuantPolicy(tuple((n, "int8" if rng.random() < 0.5 else "fp32") for n in spec8.layers_of(sub)))
        parts = lut_parts(spec8, make_candidate(spec8, sub, policy))
        assert {k for k, _ in parts} <= set(keys)
        # each layer group's weights sum to 1: stem + one per kept block + head
        assert sum(w for _, w in parts) == pytest.approx(2 + sum(not b.skip for b in sub.blocks))
    sub = spec8.largest()
    fp32 = make_candidate(spec8, sub, QuantPolicy())
    int8 = make_candidate(spec8, sub, QuantPolicy.uniform(spec8.quantizable_layers(), "int8"))
    entries = {k: (2.0 if k.endswith("|int8") else 1.0) for k in keys}
    lut = BlockLUT(entries, 0.5, {"target": "cpu-ort"})
    n_parts = 2 + len(sub.blocks)
    assert lut.predict_ratio(spec8, fp32) == pytest.approx(0.5 + n_parts)
    assert lut.predict_ratio(spec8, int8) == pytest.approx(0.5 + 2 * n_parts)
    # a block with one INT8 layer of three counts that layer's share of the block's MACs as INT8
    costs = {n: m for n, m, _ in spec8.layer_costs(sub)}
    one = make_candidate(spec8, sub, QuantPolicy((("stages.0.0.dw", "int8"),)))
    share = costs["stages.0.0.dw"] / sum(costs[f"stages.0.0.{p}"] for p in ("expand", "dw", "project"))
    assert lut.predict_ratio(spec8, one) == pytest.approx(0.5 + n_parts + share)
    loaded = BlockLUT.load(lut.save(tmp_path / "t.lut.json"))
    assert loaded.entries == entries and loaded.overhead_ratio == 0.5
    with pytest.raises(ModelError, match="lacks parts"):
        BlockLUT({"stem|fp32": 1.0}, 0.0, {}).predict_ratio(spec8, fp32)
    for bad in ('{"entries": {"a": -1}, "overhead_ratio": 0, "meta": {}}',
                '{"entries": {"a": true}, "overhead_ratio": 0, "meta": {}}',
                '{"entries": {"a": "0.5"}, "overhead_ratio": 0, "meta": {}}',
                '{"entries": {"a": 1}, "overhead_ratio": "0.3", "meta": {}}',
                '{"entries": {"a": 1}, "overhead_ratio": 0, "meta": []}',
                '{"entries": {"a": 1}, "overhead_ratio": 0, "meta": {}, "x": ' + "[" * 100_000 + "]" * 100_000 + "}"):
        (tmp_path / "bad.json").write_text('{"format": "edgec-latency-lut/1", ' + bad[1:])
        with pytest.raises(ConfigError, match="not an edgec latency lookup table"):
            BlockLUT.load(tmp_path / "bad.json")


def _measure_parts(target_name: str, runs: int, keys: list[str]) -> dict:
    """Lookup-table entries of ``keys`` (digits space) measured on the target; checks they are all there
    and non-negative."""
    from edgec.latency_job import LatencySettings, _open, _space, lut_keys, measure_lut
    from edgec.pipeline import Progress

    settings = LatencySettings(target=target_name, dataset="digits", runs=runs)
    ds, spec = _space(settings)
    assert set(keys) <= set(lut_keys(spec))
    target = _open(settings)
    try:
        entries = measure_lut(spec, ds, target, settings, Progress(), keys=keys)
    finally:
        target.close()
    assert set(entries) == set(keys) and all(v >= 0 for v in entries.values())
    return entries


@pytest.mark.slow
def test_lookup_table_parts_are_measured_alone_minus_a_graphs_own_cost():
    from edgec.latency_job import LatencySettings, _space, lut_keys

    keys = lut_keys(_space(LatencySettings(dataset="digits"))[1])
    small = [k for k in keys if "k3_e1|in16|out16" in k] + [k for k in keys if "k5_e6|in32|out32|hw8" in k]
    entries = _measure_parts("cpu-ort", 30, small)
    # FP32 against FP32: a tiny INT8 block alone is mostly its own quantize/dequantize (CI measured the
    # INT8 k3_e1 part at 0.064 anchors vs 0.062 for a 5×5, 6×-expanded INT8 one), so INT8 sizes do not order
    big, tiny = entries["block|k5_e6|in32|out32|hw8|s1|fp32"], entries["block|k3_e1|in16|out16|hw8|s1|fp32"]
    assert big > tiny  # 1.1 M MACs vs 26 k: measured here at 0.17 vs 0.03 anchors


def test_measure_candidates_keeps_quiet_rounds_and_takes_their_median_ratio_to_the_anchor():
    """Scripted latencies (no timing): each round measures the anchor then the candidate. Rounds whose
    anchor ran slow (host noise) are dropped and more are measured until 5 are quiet; the ratio is the
    median of the quiet rounds' ratios (the first 5 rounds' median would be 0.8)."""
    from types import SimpleNamespace

    from edgec.latency_job import ROUNDS, LatencySettings, _space, measure_candidates, random_candidates
    from edgec.pipeline import Progress

    settings = LatencySettings(dataset="digits")
    ds, spec = _space(settings)
    cand = random_candidates(spec, 1, seed=3)
    assert ROUNDS == 5
    anchor_ms = [2.0, 1.0, 2.0, 2.0, 1.0, 1.1, 1.0, 1.0, 9.0]  # slow, quiet, slow, slow, then quiet ones
    model_ms = [1.6, 0.5, 1.6, 1.6, 0.5, 0.55, 0.5, 0.5, 9.0]  # the slow host mode does not keep ratios
    script = iter([ms for pair in zip(anchor_ms, model_ms) for ms in pair])
    target = SimpleNamespace(name="cpu-ort", recipe="ort-qdq-u8s8",
                             measure_latency=lambda path, shape, batch: SimpleNamespace(p50_ms=next(script)))
    rows = measure_candidates(cand, spec, ds, target, settings, Progress(), "scripted")
    assert len(rows) == 1 and rows[0]["id"] == cand[0].id
    assert rows[0]["rounds_measured"] == 8 and rows[0]["rounds_quiet"] == 5 and rows[0]["quiet"]  # not the 9th
    assert rows[0]["ratio"] == pytest.approx(0.5) and rows[0]["anchor_p50_ms"] == pytest.approx(1.0)
    assert rows[0]["p50_ms"] == pytest.approx(0.5) and len(rows[0]["features"]) == len(feature_columns())


def test_a_candidate_measured_only_while_the_host_was_slow_is_measured_again_then_flagged(monkeypatch):
    """Two candidates; the host is slow whenever the second one is measured (its anchor at 2× the
    session's fastest): after the first pass and the retries it is flagged, never silently used."""
    from types import SimpleNamespace

    from edgec.latency_job import MAX_ROUNDS_FACTOR, RETRY_PASSES, ROUNDS, LatencySettings, _space
    from edgec.latency_job import measure_candidates, random_candidates
    from edgec.pipeline import Progress

    settings = LatencySettings(dataset="digits")
    ds, spec = _space(settings)
    cands = random_candidates(spec, 2, seed=4)
    calls = {"n": 0}

    def measure(path, shape, batch):  # anchor, candidate, anchor, candidate, …
        calls["n"] += 1
        slow = measure.current == 1
        return SimpleNamespace(p50_ms=(2.0 if slow else 1.0) * (1.0 if calls["n"] % 2 else 0.5))

    import edgec.latency_job as lj
    original = lj.candidate_kernels

    def kernels(target_name, model, fp32, int8_layers, threads):  # before each candidate's measurement:
        measure.current = 0 if kernels.calls == 0 else 1             # the first, then only the second again
        kernels.calls += 1
        return original(target_name, model, fp32, int8_layers, threads)
    kernels.calls = 0
    target = SimpleNamespace(name="cpu-ort", recipe="ort-qdq-u8s8", measure_latency=measure)
    monkeypatch.setattr(lj, "candidate_kernels", kernels)
    rows = measure_candidates(cands, spec, ds, target, settings, Progress(), "scripted")
    assert [r["id"] for r in rows] == [c.id for c in cands]
    assert rows[0]["quiet"] and rows[0]["ratio"] == pytest.approx(0.5) and rows[0]["rounds_measured"] == ROUNDS
    assert not rows[1]["quiet"] and rows[1]["rounds_quiet"] == 0
    assert rows[1]["rounds_measured"] == (1 + RETRY_PASSES) * MAX_ROUNDS_FACTOR * ROUNDS


def test_too_few_quiet_candidates_are_made_up_from_the_spares_in_the_same_session(monkeypatch):
    """``measure_enough`` (build and validate): of the first 3 candidates one is only ever measured while
    the host is slow (its anchor at 2× the session's reference); after its retries, one spare of the pool
    is measured in its place — not the rest of the pool — and the slow one stays flagged. A spare that is
    slow as well is made up by the next one."""
    from types import SimpleNamespace

    import edgec.latency_job as lj
    from edgec.latency_job import LatencySettings, _space, measure_enough, random_candidates
    from edgec.pipeline import Progress

    settings = LatencySettings(dataset="digits")
    ds, spec = _space(settings)
    pool = random_candidates(spec, 6, seed=5)
    slow_ones = {pool[1].id}
    # candidate_kernels runs before each candidate's rounds: the order the candidates are measured in
    order = iter([pool[0].id, pool[1].id, pool[2].id, *[pool[1].id] * lj.RETRY_PASSES, pool[3].id])
    original = lj.candidate_kernels

    def kernels(target_name, model, fp32, int8_layers, threads):
        measure.current = next(order)
        return original(target_name, model, fp32, int8_layers, threads)

    def measure(path, shape, batch):
        if path.name == "anchor.onnx":
            return SimpleNamespace(p50_ms=2.0 if measure.current in slow_ones else 1.0)
        return SimpleNamespace(p50_ms=0.5)
    monkeypatch.setattr(lj, "candidate_kernels", kernels)
    target = SimpleNamespace(name="cpu-ort", recipe="ort-qdq-u8s8", measure_latency=measure)
    rows = measure_enough(pool, 3, spec, ds, target, settings, Progress(), "scripted")
    assert [r["id"] for r in rows] == [c.id for c in pool[:4]]
    assert [r["quiet"] for r in rows] == [True, False, True, True]
    assert all(r["ratio"] == pytest.approx(0.5) for r in rows if r["quiet"])
    assert next(order, None) is None  # nothing measured beyond the one spare
    # a noisy spare is made up by the next one, in a further pass
    slow_ones.add(pool[3].id)
    order = iter([pool[0].id, pool[1].id, pool[2].id, *[pool[1].id] * lj.RETRY_PASSES,
                  pool[3].id, *[pool[3].id] * lj.RETRY_PASSES, pool[4].id])
    rows = measure_enough(pool, 3, spec, ds, target, settings, Progress(), "scripted")
    assert [r["quiet"] for r in rows] == [True, False, True, False, True] and next(order, None) is None


def test_a_lookup_table_part_measured_before_the_hosts_fastest_anchor_is_measured_again():
    """The first part has no earlier anchor to be judged against: its rounds, all slow and with a
    distorted ratio (CI once measured a 1×-expanded 3×3 block above a 6×-expanded 5×5 one this way), count
    as quiet until a later part's anchor shows the host's real speed; then it is measured again."""
    from types import SimpleNamespace

    from edgec.latency_job import ROUNDS, LatencySettings, _space, measure_lut
    from edgec.pipeline import Progress

    settings = LatencySettings(dataset="digits")
    ds, spec = _space(settings)
    keys = ["block|k3_e1|in16|out16|hw8|s1|fp32", "block|k5_e6|in32|out128|hw4|s2|fp32"]
    seen: list[str] = []

    def measure(path, shape, batch):  # per round: anchor, part, null graph
        name = Path(path).name
        seen.append(name)
        slow = seen.count("anchor.onnx") <= ROUNDS  # slow while the first part is measured the first time
        return SimpleNamespace(p50_ms={"anchor.onnx": 2.0 if slow else 1.0, "part.onnx": 1.8 if slow else 0.5}
                               .get(name, 0.1))
    target = SimpleNamespace(name="cpu-ort", recipe="ort-qdq-u8s8", static_batch=False, measure_latency=measure)
    entries = measure_lut(spec, ds, target, settings, Progress(), keys=keys)
    assert entries[keys[0]] == pytest.approx(0.4) and entries[keys[1]] == pytest.approx(0.4)  # not 0.85
    assert seen.count("part.onnx") == 3 * ROUNDS  # the first part twice, the second once


def test_quiet_rounds_give_up_after_three_times_the_rounds():
    from edgec.latency_job import QuietRounds

    q = QuietRounds(2)
    slow = iter([(1.0, 1.0), (3.0, 3.0), (3.0, 3.0), (3.0, 3.0), (3.0, 3.0), (3.0, 3.0), (7.0, 7.0)])
    used, every = q.measure(slow.__next__)
    assert len(every) == 6 and used == [(1.0, 1.0)]  # 3 × 2 rounds, one of them quiet
    later = iter([(2.0, 2.0), (2.5, 2.5)] * 3)
    used, every = q.measure(later.__next__)  # the session's fastest anchor (1.0) still rules: none quiet
    assert len(every) == 6 and used == []


def test_one_lucky_fast_round_does_not_make_a_quiet_machine_noisy():
    """The session's reference is the 5th percentile of its anchor p50s: the fastest while fewer than 20
    rounds were seen (one lucky 0.5 ms round then rules), after that a typical quiet round's."""
    from edgec.latency_job import QUIET_TOLERANCE, QuietRounds

    q = QuietRounds(5)
    assert q.reference_ms == float("inf")
    first = iter([(0.5,), *[(1.0,)] * 14])
    used, every = q.measure(first.__next__)
    assert len(every) == 15 and used == [(0.5,)] and q.reference_ms == 0.5
    used, every = q.measure(iter([(1.0,)] * 5).__next__)  # 20 rounds seen: the second fastest
    assert len(every) == 5 and len(used) == 5 and q.reference_ms == 1.0
    assert q.is_quiet(QUIET_TOLERANCE * 1.0) and not q.is_quiet(QUIET_TOLERANCE * 1.0 + 0.01)


def test_npu_kernels_follow_the_policy_activation_precision_and_count_requantizations(randomized_supernet, spec8,
                                                                                      tmp_path):
    """The HTP recipe: policy-INT8 layers run with uint8 activations, the others with uint16; every switch
    between the two is a requantize kernel; the quantized graph input is uint8."""
    from edgec.targets.latency_model import npu_kernels

    sub = SubnetConfig((BlockConfig(3, 1), BlockConfig(), BlockConfig(3, 3), BlockConfig(), BlockConfig(),
                        BlockConfig(3, 1), BlockConfig(), BlockConfig()), (16, 32, 64))
    fp32 = export_onnx(extract_subnet(randomized_supernet, sub).fused(), (1, 8, 8), tmp_path / "fp32.onnx")
    layers = spec8.layers_of(sub)
    all8 = npu_kernels(fp32, layers)
    assert {k.precision for k in all8} == {"int8"} and not [k for k in all8 if k.cls == "quantize"]
    all16 = npu_kernels(fp32, ())
    switches = [k for k in all16 if k.cls == "quantize"]
    assert len(switches) == 1 and switches[0].name == "stem/requantize"  # only the uint8 input switches
    assert {k.precision for k in all16 if k.cls != "quantize"} == {"int16"}
    one = npu_kernels(fp32, ("stages.1.0.expand",))  # an 8-bit layer between 16-bit ones: in and out
    assert [k.name for k in one if k.cls == "quantize"] == ["stem/requantize", "stages.1.0.expand/requantize",
                                                           "stages.1.0.dw/requantize"]
    assert next(k for k in one if k.name == "stages.1.0.expand").precision == "int8"
    assert [k.macs for k in one if k.cls != "quantize"] == [k.macs for k in graph_kernels(fp32)]
    f = graph_features(one)
    cols = feature_columns()
    assert f[cols.index("conv1x1.int8.count")] == 1 and f[cols.index("quantize.int16.count")] == 2


def _build_and_validate(target: str, tmp_path, samples: int, subnets: int, runs: int) -> tuple[dict, dict]:
    """``edgec latency build --no-lut`` then ``validate`` on the digits space: (the model's meta, the
    validation's JSON); checks that one model and no table were written and every row was validated."""
    env = {**os.environ, "EDGEC_CACHE_DIR": str(tmp_path / "cache")}
    p = _edgec("latency", "build", "--target", target, "--dataset", "digits", "--samples", str(samples),
               "--runs", str(runs), "--no-lut", env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    models = list((tmp_path / "cache" / "latency").glob(f"{target}-digits-*"))
    assert len(models) == 1  # the model alone: no table next to it
    out = tmp_path / "v.json"
    p = _edgec("latency", "validate", "--target", target, "--dataset", "digits", "--subnets", str(subnets),
               "--runs", str(runs), "--json", str(out), "--html", str(tmp_path / "v.html"), env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    v = json.loads(out.read_text())
    assert v["n"] == subnets and v["built_here"] is True
    return json.loads(models[0].read_text())["meta"], v


@pytest.mark.slow
@needs_target("npu-qnn-htp")
def test_npu_cycle_model_builds_and_validates_on_simulated_cycles(tmp_path):
    """The same kernel-level model over the HTP simulator's cycles: labelled simulated, its own anchor,
    and the LINAS prior does not read it as ratios to the compile's reference (its table is measured
    in the next test; --no-lut keeps this one short)."""
    meta, v = _build_and_validate("npu-qnn-htp", tmp_path, samples=10, subnets=10, runs=3)
    assert meta["latency_kind"] == "simulated" and meta["anchor"]["what"] == "smallest subnet, all INT8"
    assert "HTP simulator" in meta["device"] and meta["rounds"] == 3
    assert v["latency_kind"] == "predicted vs simulated"
    assert all(r["ratio"] > 1 and r["predicted_ratio"] > 0 for r in v["rows"])  # the anchor is the smallest graph


@pytest.mark.slow
@needs_target("npu-qnn-htp")
def test_npu_lookup_table_parts_run_on_the_simulator_next_to_its_anchor():
    """The HTP takes only what its recipe made, so each part, its anchor (the smallest subnet in INT8)
    and its null graph (a 1×1 depthwise conv, the cheapest op a quantized-I/O graph keeps) are built
    with the QNN recipe; a 6×-expanded 5×5 block in 16-bit costs more cycles than a 1×-expanded 3×3 one."""
    small = ["block|k3_e1|in16|out16|hw8|s1|fp32", "block|k5_e6|in32|out128|hw4|s2|fp32", "stem|int8"]
    entries = _measure_parts("npu-qnn-htp", 3, small)
    assert entries["block|k5_e6|in32|out128|hw4|s2|fp32"] > entries["block|k3_e1|in16|out16|hw8|s1|fp32"]


@needs_target("cpu-openvino")
def test_openvino_kernels_are_the_nodes_of_its_compiled_runtime_graph(randomized_supernet, spec8, images8, tmp_path):
    """OpenVINO's CPU plugin fuses Conv + bias + Relu (+ the residual Add) into one node and says at
    which precision each node runs; the NNCF recipe's INT8 layers run as u8/i8 convolutions."""
    from edgec.compile.nncf_ptq import quantize_nncf
    from edgec.targets.latency_model import model_kernels, openvino_kernels

    k3e6, k5e1 = BlockConfig(3, 6), BlockConfig(5, 1)
    config = SubnetConfig((k3e6, k5e1, k3e6, BlockConfig(), k3e6, k3e6, BlockConfig(), k3e6), (16, 32, 64))
    fp32 = export_onnx(extract_subnet(randomized_supernet, config).fused(), (1, 8, 8), tmp_path / "fp32.onnx")
    layers = spec8.layers_of(config)
    dw = sum(1 for n in layers if n.endswith(".dw"))
    k = openvino_kernels(fp32)
    assert _count(k, "dwconv", "fp32") == dw and _count(k, "conv", "fp32") == 1  # the 3×3 stem
    assert _count(k, "conv1x1", "fp32") == len(layers) - 1 - dw - 1 and _count(k, "gemm", "fp32") == 1
    assert not any(x.precision == "int8" for x in k) and not any(x.cls == "add" for x in k)  # Adds fused
    # the stem's MACs: 16 output channels × 8×8 pixels × 1 input channel × 3×3; elements: 64 in + 1024 out
    stem = next(x for x in k if x.cls == "conv")
    assert stem.macs == 16 * 64 * 9 and stem.elements == 64 + 16 * 64
    assert [x.macs for x in k if x.macs] == [x.macs for x in graph_kernels(fp32) if x.macs]

    int8 = quantize_nncf(fp32, tmp_path / "int8.onnx", tuple(layers), images8[:256])
    k8 = openvino_kernels(int8)
    convs = [x for x in k8 if x.cls in ("conv1x1", "dwconv", "conv")]
    assert len(convs) == len(layers) - 1 and sum(x.precision == "int8" for x in convs) >= len(convs) - 1
    mixed = quantize_nncf(fp32, tmp_path / "mixed.onnx", tuple(n for n in layers if n.startswith("stages.1")), images8[:256])
    km = openvino_kernels(mixed)
    n_int8 = sum(x.precision == "int8" for x in km if x.cls in ("conv1x1", "dwconv", "conv"))
    assert 0 < n_int8 < len(convs) and any(x.cls == "layout" for x in km)  # precision switches reorder
    assert [(x.cls, x.precision, x.macs) for x in model_kernels("cpu-openvino", mixed)] == \
        [(x.cls, x.precision, x.macs) for x in km]  # names OpenVINO generates differ between compilations
    model = KernelPredictor({"conv1x1.int8.count": 0.5}, 0.25, {"anchor_p50_ms": 2.0, "target": "cpu-openvino"})
    assert model.predict_ratio(mixed) == pytest.approx(0.25 + 0.5 * _count(km, "conv1x1", "int8"))
    from edgec.errors import ModelError

    (tmp_path / "bad.onnx").write_bytes(b"not a model")
    with pytest.raises(ModelError, match="OpenVINO cannot compile bad.onnx"):
        openvino_kernels(tmp_path / "bad.onnx")
    with pytest.raises(ModelError, match="no model file"):
        openvino_kernels(tmp_path / "missing.onnx")
    import torch

    # other ranks: ungrouped 5-D weights are a 3-D conv, not a grouped 2-D one (4×4³ outputs × 2 inputs × 3³)
    c3 = export_onnx(torch.nn.Conv3d(2, 4, 3, padding=1).eval(), (2, 4, 4, 4), tmp_path / "c3.onnx")
    assert [x.macs for x in openvino_kernels(c3) if x.cls == "conv"] == [4 * 4 ** 3 * 2 * 27]
    c1 = export_onnx(torch.nn.Conv1d(2, 4, 3, padding=1).eval(), (2, 8), tmp_path / "c1.onnx")
    assert [x.macs for x in openvino_kernels(c1) if x.cls == "conv"] == [4 * 8 * 2 * 3]


@pytest.mark.slow
@needs_target("cpu-openvino")
def test_openvino_model_and_lookup_table_build_and_validate(tmp_path):
    """Both latency models on cpu-openvino: NNCF-built candidates measured next to the largest FP32
    subnet, a fit, held-out figures; and table parts measured alone next to the same anchor."""
    meta, v = _build_and_validate("cpu-openvino", tmp_path, samples=12, subnets=10, runs=20)
    assert meta["latency_kind"] == "measured" and meta["runtime"].startswith("openvino ")
    assert meta["anchor"]["what"] == "largest subnet, all FP32"
    assert v["latency_kind"] == "predicted vs measured"
    assert all(0 < r["ratio"] and r["predicted_ratio"] > 0 for r in v["rows"])
    small = ["block|k3_e1|in16|out16|hw8|s1|fp32", "block|k5_e6|in32|out32|hw8|s1|fp32", "stem|int8"]
    entries = _measure_parts("cpu-openvino", 30, small)
    # 1.1 M MACs vs 26 k: measured here at 0.15 vs 0.04 anchors (CI once had the small one first at 0.16,
    # judged against no earlier anchor: such parts are now measured again)
    assert entries["block|k5_e6|in32|out32|hw8|s1|fp32"] > entries["block|k3_e1|in16|out16|hw8|s1|fp32"]


def test_damaged_model_files_and_validation_records_are_refused_or_redone(tmp_path, monkeypatch, spec8):
    """Files in the latency cache are ours but may be damaged: never a traceback, never garbage used."""
    import edgec.latency_job as lj
    from edgec.pipeline import Progress

    good = {"format": FORMAT, "coef": {}, "overhead_ratio": 0.1,
            "samples": [{"id": "a", "features": [0.0] * len(feature_columns()), "ratio": 1.0}],
            "meta": {"target": "cpu-ort", "threads": 2, "anchor_p50_ms": 1.0}}
    path = tmp_path / "m.json"
    bad_samples = ([{**good["samples"][0], "features": ["abc"] * len(feature_columns())}],
                   [{**good["samples"][0], "features": [None] * len(feature_columns())}],
                   [{**good["samples"][0], "ratio": 0}])
    for text in (b"\xff\xfe\x00garbage", ("[" * 100_000 + "]" * 100_000).encode(),
                 *(json.dumps({**good, "samples": s}).encode() for s in bad_samples),
                 json.dumps({**good, "meta": {**good["meta"], "anchor_p50_ms": float("nan")}}).encode()):
        path.write_bytes(text)
        with pytest.raises(ConfigError, match="is not an edgec latency model"):
            KernelPredictor.load(path)
    # a model of another machine whose validation record here is damaged: validated again, not trusted blindly
    monkeypatch.setenv("EDGEC_CACHE_DIR", str(tmp_path / "cache"))
    folder = tmp_path / "cache" / "latency"
    folder.mkdir(parents=True)
    foreign = folder / "cpu-ort-digits-0123456789ab.json"
    foreign.write_text(json.dumps({**good, "meta": {**good["meta"], "threads": 8, "spec": spec8.to_dict()}}))
    target = SimpleTarget()
    record = lj.revalidation_path(foreign, target)
    calls = []
    monkeypatch.setattr(lj, "validate_model", lambda settings, progress: calls.append(1) or
                        {"n": 12, "spearman": 0.97, "within_10pct": 0.9})
    settings = lj.LatencySettings(dataset="digits")
    for damage in ("[]", '{"spearman": "high"}', "{}", "\xff", json.dumps({"model_sha256": lj.sha256_file(foreign),
                                                                           "spearman": None, "n": 3})):
        record.write_text(damage)
        model, used, trust = lj.trusted_model(settings, spec8, target, Progress())
        assert used == foreign and "Spearman 0.970" in trust
    assert len(calls) == 5


class SimpleTarget:
    """Enough of a cpu-ort target for the cache's file names (no measuring)."""

    name, threads, latency_kind = "cpu-ort", 2, "measured"

    def describe(self):
        return {"runtime": "onnxruntime test", "device": "test cpu"}
