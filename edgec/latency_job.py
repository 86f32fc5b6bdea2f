"""``edgec latency build`` / ``edgec latency validate``: a target's kernel-level latency model
(:mod:`edgec.targets.latency_model`) for the built-in FBNet space of a dataset, and how far to trust it.

- **build**: ``--samples`` random candidates of the space (architecture from
  :meth:`SupernetSpec.sample`, and a per-layer INT8/FP32 policy whose INT8 share is itself drawn
  uniformly, so all-FP32, all-INT8 and mixed graphs are all seen) are compiled with the target's
  own recipe from an untrained supernet with random batch-norm statistics (weights do not change
  the kernels, but shared zero biases would: :func:`representative_supernet`),
  measured on the target (p50, batch 1, ``measured``), and the model is fit on them. Stored
  under ``$EDGEC_CACHE_DIR/latency/`` keyed by target, space, runtime, device and threads.
- **validate**: ``--subnets`` held-out random candidates (another seed) are compiled and measured
  the same way and compared with the model's prediction: share within ±10 %, RMSPE, Spearman rank
  correlation; a table, ``--json FILE`` and an HTML report with the scatter plot. A model built on
  another runtime version, device or thread count is refused by :func:`load_model`; validate names
  the machine it was built on and the one it runs on.

Compiled graphs live in a temporary folder and are deleted; only the measurements are kept.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgec.errors import ConfigError

CALIBRATION_IMAGES = 256
ROUNDS = 5  # interleaved anchor/candidate measurements per candidate (3 measured: 93 % within ±10 % vs 95 %)
VALIDATION_SEED_OFFSET = 10_000  # held-out candidates come from another stream than the training ones


@dataclass
class LatencySettings:
    target: str = "cpu-ort"
    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    threads: int = 2
    samples: int = 300
    subnets: int = 100
    seed: int = 0
    runs: int = 200

    def check(self) -> None:
        if not 10 <= self.samples <= 100_000:
            raise ConfigError(f"bad value for --samples: {self.samples}", "the model needs 10 to 100000 graphs",
                              "e.g. --samples 300")
        if not 10 <= self.subnets <= 100_000:
            raise ConfigError(f"bad value for --subnets: {self.subnets}", "validation needs 10 to 100000 graphs",
                              "e.g. --subnets 100")
        if not 1 <= self.threads <= 256:
            raise ConfigError(f"bad value for --threads: {self.threads}", "between 1 and 256", "e.g. --threads 2")
        if not 20 <= self.runs <= 100_000:
            raise ConfigError(f"bad value for --runs: {self.runs}", "between 20 and 100000 timed runs",
                              "e.g. --runs 200")
        if not 0 <= self.seed <= 2**31 - 1 - VALIDATION_SEED_OFFSET:
            raise ConfigError(f"bad value for --seed: {self.seed}",
                              f"between 0 and {2**31 - 1 - VALIDATION_SEED_OFFSET}", "e.g. --seed 0")


def _machine(target) -> dict:
    d = target.describe()
    return {"target": target.name, "runtime": d.get("runtime"), "device": d.get("device"), "threads": target.threads}


def model_path(settings: LatencySettings, spec, target) -> Path:
    """Where the model of this target, space and machine lives."""
    from edgec.pipeline import cache_root

    m = _machine(target)
    key = hashlib.sha256(json.dumps({"space": spec.to_dict(), **m}, sort_keys=True).encode()).hexdigest()[:12]
    return cache_root() / "latency" / f"{target.name}-{settings.dataset}-{key}.json"


def _space(settings: LatencySettings):
    from edgec.data import load_dataset
    from edgec.search.space import fbnet_space

    ds = load_dataset(settings.dataset, settings.data_dir)
    c, h, _ = ds.input_shape
    return ds, fbnet_space(c, h, ds.num_classes)


def random_candidates(spec, n: int, seed: int) -> list:
    """``n`` random candidates: a uniform architecture and a per-layer policy whose INT8 share is
    drawn uniformly in [0, 1] for each candidate."""
    from edgec.search.space import Candidate, QuantPolicy

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        sub = spec.sample(rng)
        share = rng.random()
        policy = QuantPolicy(tuple((name, "int8" if rng.random() < share else "fp32") for name in spec.layers_of(sub)))
        out.append(Candidate(sub, policy))
    return out


def anchor_candidate(spec):
    """The graph every measurement is taken next to: the space's largest subnet, all FP32."""
    from edgec.search.space import Candidate, QuantPolicy

    return Candidate(spec.largest(), QuantPolicy())


def representative_supernet(spec, seed: int):
    """An untrained supernet whose batch-norm statistics and affine parameters are random, so that
    folded convs get distinct, non-zero biases as in a trained one. (With the defaults every folded
    bias is zero, the exporter shares one tensor among the layers, and ONNX Runtime then leaves
    INT8 convs unfused — graphs a trained supernet never produces.)"""
    import torch

    from edgec.search.supernet import Supernet

    g = torch.Generator().manual_seed(seed)
    net = Supernet(spec)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=g) * 0.4 - 0.2)
    return net.eval()


def measure_candidates(cands, spec, ds, target, settings: LatencySettings, progress, label: str) -> list[dict]:
    """Compile each candidate with the target's recipe (untrained supernet) and measure it next to the
    anchor (:func:`anchor_candidate`) in :data:`ROUNDS` interleaved rounds: a list of ``{"id",
    "candidate", "features", "kernels", "ratio" (median over rounds of p50 / anchor p50),
    "anchor_p50_ms", "p50_ms" (medians)}``."""
    from edgec.compile.export import export_onnx
    from edgec.compile.recipes import build
    from edgec.search.supernet import extract_subnet
    from edgec.targets.latency_model import graph_features, graph_kernels, runtime_view

    supernet = representative_supernet(spec, settings.seed)
    calib = ds.train_x[:CALIBRATION_IMAGES]
    rows = []
    work = Path(tempfile.mkdtemp(prefix="edgec-latency-"))
    progress.stage(label, len(cands))

    def compile_to(c, name: str) -> Path:
        fp32 = export_onnx(extract_subnet(supernet, c.subnet).fused(), ds.input_shape, work / "fp32.onnx")
        path = work / name
        build(target.recipe, fp32, path, c.policy.int8_layers(), calib)
        return path
    try:
        anchor = compile_to(anchor_candidate(spec), "anchor.onnx")
        for i, c in enumerate(cands):
            path = compile_to(c, "model.onnx")
            kernels = graph_kernels(path, runtime_view(path, settings.threads))
            a_ms, m_ms = [], []
            for _ in range(ROUNDS):
                a_ms.append(target.measure_latency(anchor, ds.input_shape, batch=1).p50_ms)
                m_ms.append(target.measure_latency(path, ds.input_shape, batch=1).p50_ms)
            ratio = float(np.median(np.array(m_ms) / np.array(a_ms)))
            rows.append({"id": c.id, "candidate": c.to_dict(), "features": graph_features(kernels).tolist(),
                         "kernels": len(kernels), "ratio": ratio, "anchor_p50_ms": float(np.median(a_ms)),
                         "p50_ms": float(np.median(m_ms))})
            progress.advance(i + 1, len(cands), f"{ratio:.2f}× the anchor")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rows


def _open(settings: LatencySettings):
    from edgec.targets import open_target

    settings.check()
    target = open_target(settings.target, threads=settings.threads)
    if target.name != "cpu-ort":
        target.close()
        raise ConfigError(f"no kernel-level latency model for {settings.target} yet",
                          "its kernels are read from ONNX Runtime's CPU provider's optimized graph",
                          "use --target cpu-ort")
    target.require_available()
    target.runs = settings.runs
    return target


def _cache_folder(path: Path) -> None:
    """Make ``path``'s folder and check it takes a file, before any measuring."""
    import tempfile

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path.parent).close()
    except OSError as e:
        raise ConfigError(f"cannot write the latency model to {path.parent}", e.strerror or str(e),
                          "set EDGEC_CACHE_DIR to a writable folder") from None


def build_model(settings: LatencySettings, progress):
    """Measure ``settings.samples`` random candidates and fit, save and return the model."""
    from edgec.targets.latency_model import KernelPredictor

    ds, spec = _space(settings)
    target = _open(settings)
    try:
        _cache_folder(model_path(settings, spec, target))
        t0 = time.perf_counter()
        rows = measure_candidates(random_candidates(spec, settings.samples, settings.seed), spec, ds, target,
                                  settings, progress, f"measuring {settings.samples} random candidates on "
                                                      f"{settings.target}")
        meta = {**_machine(target), "space": f"fbnet-supernet ({settings.dataset})", "spec": spec.to_dict(),
                "anchor": {"candidate": anchor_candidate(spec).to_dict(), "what": "largest subnet, all FP32"},
                "anchor_p50_ms": float(np.median([r["anchor_p50_ms"] for r in rows])),
                "samples": len(rows), "seed": settings.seed, "runs_per_sample": settings.runs,
                "build_s": time.perf_counter() - t0, "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        model = KernelPredictor.fit(rows, meta)
        path = model_path(settings, spec, target)
        try:
            model.save(path)
        except OSError as e:
            raise ConfigError(f"cannot write the latency model to {path}", e.strerror or str(e),
                              "free some space or set EDGEC_CACHE_DIR to a writable folder") from None
        return model, path
    finally:
        target.close()


def load_model(settings: LatencySettings, spec, target):
    """The model built for this target, space and machine. Raises :class:`ConfigError` when there is
    none (naming a model of the same target and space built on another machine, if any)."""
    from edgec.targets.latency_model import KernelPredictor

    path = model_path(settings, spec, target)
    try:
        if path.is_file():
            return KernelPredictor.load(path), path
        others = sorted(path.parent.glob(f"{target.name}-{settings.dataset}-*.json")) if path.parent.is_dir() else []
    except OSError as e:
        raise ConfigError(f"cannot read the latency models in {path.parent}", e.strerror or str(e),
                          "check EDGEC_CACHE_DIR and its permissions") from None
    why = "none was built here"
    if others:
        m = KernelPredictor.load(others[-1]).meta
        here = _machine(target)
        diff = [f"{k} {m.get(k)} → {here[k]}" for k in ("runtime", "device", "threads") if m.get(k) != here[k]]
        why = f"the one in {others[-1].parent} was built for another machine ({'; '.join(diff) or 'another space'})"
    threads = f" --threads {settings.threads}" if settings.threads != 2 else ""
    raise ConfigError(f"no latency model for {target.name} on {settings.dataset} for this machine", why,
                      f"run 'edgec latency build --target {target.name} --dataset {settings.dataset}{threads}'")


def validate_model(settings: LatencySettings, progress) -> dict:
    """Held-out candidates measured vs predicted: the figures of
    :func:`edgec.targets.latency_model.validation_metrics`, the rows, and the model's provenance."""
    from edgec.targets.latency_model import validation_metrics

    ds, spec = _space(settings)
    target = _open(settings)
    try:
        model, path = load_model(settings, spec, target)
        trained = {s["id"] for s in model.samples}
        # held out: never one the model was fit on (drawn on until there are enough, or refused)
        pool = random_candidates(spec, 10 * settings.subnets, settings.seed + VALIDATION_SEED_OFFSET)
        cands = list({c.id: c for c in pool if c.id not in trained}.values())[:settings.subnets]
        if len(cands) < settings.subnets:
            raise ConfigError(f"only {len(cands)} held-out candidates for --subnets {settings.subnets}",
                              "the model was fit on the others this seed draws (built with a seed 10000 apart?)",
                              "pass another --seed")
        rows = measure_candidates(cands, spec, ds, target, settings, progress,
                                  f"measuring {len(cands)} held-out candidates on {settings.target}")
    finally:
        target.close()
    for r in rows:
        r["predicted_ratio"] = model.predict_ratio_from_features(r["features"])
        r["predicted_ms"] = r["predicted_ratio"] * r["anchor_p50_ms"]
    figures = validation_metrics([r["ratio"] for r in rows], [r["predicted_ratio"] for r in rows])
    train = validation_metrics([s["ratio"] for s in model.samples],
                               [model.predict_ratio_from_features(s["features"]) for s in model.samples])
    drift = [r["anchor_p50_ms"] for r in rows]
    return {**figures, "target": settings.target, "space": model.meta.get("space"), "model": str(path),
            "model_kind": "kernel-level linear (nn-Meter style)", "latency_kind": "predicted vs measured",
            "compared": "p50 / the anchor's p50 measured side by side (predicted vs measured)",
            "anchor_p50_ms": {"at_build": model.meta.get("anchor_p50_ms"), "now_min": min(drift),
                              "now_median": float(np.median(drift)), "now_max": max(drift)},
            "built_on": {k: model.meta.get(k) for k in ("runtime", "device", "threads", "built_at", "samples")},
            "fit": train, "rows": [{k: r[k] for k in ("id", "ratio", "predicted_ratio", "p50_ms", "predicted_ms",
                                                      "anchor_p50_ms", "kernels")} for r in rows]}
