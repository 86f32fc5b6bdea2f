"""LINAS (predictor-guided search): the candidate encoding, the predictors, and the search itself on a
deterministic synthetic objective where the answer is known to be reachable."""

import numpy as np
import pytest
import torch

from edgec.search.linas import CandidateCodec, LINASSearch, ObjectivePredictor
from edgec.search.pareto import hypervolume
from edgec.search.space import fbnet_space
from edgec.search.strategy import RandomSearch


def test_layer_costs_match_the_extracted_subnet(randomized_supernet, spec8):
    """Parameters and MACs from the spec's shapes equal those of the static subnet that is exported."""
    from edgec.search.supernet import extract_subnet

    rng = np.random.default_rng(0)
    for _ in range(5):
        cfg = spec8.sample(rng)
        net = extract_subnet(randomized_supernet, cfg)
        macs = {}

        def hook(name):
            def f(module, inputs, output):
                w = module.weight
                per_output = w[0].numel()  # inputs per output element (groups already in the weight's shape)
                macs[name] = output[0].numel() * per_output if output.dim() == 4 else output.numel() * w.shape[1]
            return f

        for name, m in net.named_modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                m.register_forward_hook(hook(name.removesuffix(".conv")))
        net(torch.zeros(1, 1, 8, 8))
        costs = spec8.layer_costs(cfg)
        assert [n for n, _, _ in costs] == list(spec8.layers_of(cfg))
        weights = {n.removesuffix(".conv.weight").removesuffix(".weight"): p.numel()
                   for n, p in net.named_parameters() if n.endswith("weight") and p.dim() in (2, 4)}
        assert {n: p for n, _, p in costs} == weights
        assert {n: m for n, m, _ in costs} == macs


def test_genome_round_trip_and_features(spec8):
    codec = CandidateCodec(spec8)
    search = RandomSearch(spec8, 3)
    cands = [search.ask() for _ in range(30)]
    for c in cands:
        g = codec.genome(c)
        assert g.shape == (codec.genome_length,) and np.all(g >= 0) and np.all(g <= codec.upper)
        assert codec.candidate(g).id == c.id
    x = codec.features(cands)
    assert x.shape[0] == 30 and np.all(np.isfinite(x))
    # out-of-range genes are clipped into the space, never an invalid candidate
    c = codec.candidate(codec.upper + 5.0)
    spec8.validate(c.subnet)


def test_predictor_picks_a_model_that_fits():
    rng = np.random.default_rng(0)
    x = rng.random((60, 5))
    y_linear = 2 * x[:, 0] + x[:, 1] + 0.01 * rng.standard_normal(60)
    p = ObjectivePredictor().fit(x, y_linear)
    assert p.chosen == "ridge" and p.cv_error["ridge"] < 0.05
    assert np.max(np.abs(p.predict(x) - y_linear)) < 0.05
    y_mult = np.exp(3 * x[:, 0] - 2 * x[:, 1])  # multiplicative: the log target fits it linearly
    q = ObjectivePredictor(relative=True, families=("ridge",)).fit(x, y_mult)
    assert q.describe()["chosen"] == "ridge-log" and q.cv_error["ridge-log"] < q.cv_error["ridge"]
    with pytest.raises(Exception, match="at least 3"):
        ObjectivePredictor().fit(x[:2], y_linear[:2])


def _synthetic(codec):
    """Accuracy saturating in MACs, minus a little per INT8 layer; latency and size from the costs."""
    def f(c):
        mf, mi, pf, pi, _, nq, switches = codec.features([c])[0][-7:]
        acc = 0.95 - 0.15 * np.exp(-(mf + mi) / 2.0) - 0.003 * nq
        return acc, 0.05 + 0.08 * mf + 0.03 * mi + 0.01 * switches, 4 * pf + pi
    return f


def _run(strategy, f, n):
    points, ids = [], []
    for _ in range(n):
        c = strategy.ask()
        v = f(c)
        strategy.tell(c, v)
        points.append(v)
        ids.append(c.id)
    return points, ids


def _linas(spec, seed):
    return LINASSearch(spec, seed=seed, population_size=8, inner_population=40, inner_generations=15)


def test_linas_is_deterministic_and_never_repeats_a_candidate():
    spec = fbnet_space(1, 28, 10)
    f = _synthetic(CandidateCodec(spec))
    a = _linas(spec, 0)
    _, ids = _run(a, f, 20)
    _, again = _run(_linas(spec, 0), f, 20)
    assert ids == again  # same seed, same told values → same asks (what resume by replay needs)
    assert len(set(ids)) == len(ids)
    _, rnd_ids = _run(RandomSearch(spec, 0), f, 8)
    assert ids[:8] == rnd_ids  # the initial population is random search's, same seed
    assert len(a.iterations) == 2 and set(ids[8:]) <= set(a.predictions)  # all but the first 8 were predicted
    assert all(p["chosen"] for it in a.iterations for p in it["predictors"])


@pytest.mark.parametrize("seed", [0, 1])
def test_linas_reaches_with_40_evaluations_what_random_search_needs_80_for(seed):
    spec = fbnet_space(1, 28, 10)
    f = _synthetic(CandidateCodec(spec))
    hv = lambda pts: hypervolume(pts, [True, False, False], (0.80, 0.6, 1200.0))  # noqa: E731
    lin, _ = _run(_linas(spec, seed), f, 40)
    rnd, _ = _run(RandomSearch(spec, seed), f, 80)
    assert hv(lin) > hv(rnd)


def test_the_latency_prior_trains_the_latency_predictor():
    """With the latency model's measured candidates as a prior, latency is predicted well after only the
    initial population; without it, from 8 samples, it is not."""
    spec = fbnet_space(1, 28, 10)
    codec = CandidateCodec(spec)
    f = _synthetic(codec)
    rnd = RandomSearch(spec, 7)
    prior = [(c, f(c)[1]) for c in (rnd.ask() for _ in range(150))]
    held_out = [rnd.ask() for _ in range(50)]
    truth = np.array([f(c)[1] for c in held_out])
    errors = {}
    for name, given in (("with", prior), ("without", ())):
        s = LINASSearch(spec, seed=0, population_size=8, latency_prior=given)
        _run(s, f, 8)  # the initial population only: no iteration yet
        latency = s.fit_predictors()[1]
        errors[name] = float(np.mean(np.abs(latency.predict(codec.features(held_out)) - truth) / truth))
    assert errors["with"] < 0.05 < errors["without"]


def test_bad_settings_and_bad_told_values(spec8):
    from edgec.errors import ConfigError

    for kwargs in ({"batch_size": 0}, {"batch_size": -3}, {"inner_population": 0}, {"inner_generations": 0}):
        with pytest.raises(ConfigError, match="bad LINAS settings"):
            LINASSearch(spec8, 0, 4, **kwargs)
    s = LINASSearch(spec8, 0, 4)
    cands = [s.ask() for _ in range(4)]
    for c, v in zip(cands, [(0.9, float("nan"), 1.0), (0.9, 1.0), ("a", 1, 1), (0.9, -1.0, 1.0)]):
        s.tell(c, v)  # none of these is a measurement: all count as failed
    assert s._measured() == []
    for c in cands:
        s.tell(c, (0.9, 1.0, 1.0))
    assert len(s._measured()) == 4


def test_a_damaged_latency_model_gives_no_prior_and_says_why(monkeypatch, tmp_path, spec8):
    import json
    from types import SimpleNamespace

    import edgec.latency_job
    from edgec.config import CompileConfig
    from edgec.latency_job import anchor_candidate, random_candidates
    from edgec.pipeline import latency_prior
    from edgec.targets.latency_model import FORMAT, feature_columns

    path = tmp_path / "model.json"
    monkeypatch.setattr(edgec.latency_job, "model_path", lambda settings, spec, target: path)
    cfg = CompileConfig(dataset="digits")
    reference = SimpleNamespace(latency=SimpleNamespace(p50_ms=2.0))
    evaluator = SimpleNamespace(target=SimpleNamespace(name="cpu-ort", threads=2, latency_kind="measured",
                                                       describe=lambda: {"runtime": "test", "device": "test cpu"}))
    assert latency_prior(cfg, spec8, evaluator, reference)[1].startswith("none (no latency model")
    good = [{"id": c.id, "candidate": c.to_dict(), "features": [0.0] * len(feature_columns()), "ratio": 0.5}
            for c in random_candidates(spec8, 3, 0)]
    doc = {"format": FORMAT, "coef": {}, "overhead_ratio": 0.1,
           "meta": {"target": "cpu-ort", "threads": 2, "anchor_p50_ms": 1.0,
                    "anchor": {"candidate": anchor_candidate(spec8).to_dict()}}}
    path.write_text(json.dumps({**doc, "samples": good}))
    prior, info = latency_prior(cfg, spec8, evaluator, reference)
    assert len(prior) == 3 and all(ms == 1.0 for _, ms in prior) and "3 measured candidates" in info
    for damage in ("abc", {"policy": {}}, {**good[0]["candidate"], "subnet": {"blocks": ["k9_e9"], "widths": []}}):
        path.write_text(json.dumps({**doc, "samples": [{**good[0], "candidate": damage}]}))
        prior, info = latency_prior(cfg, spec8, evaluator, reference)
        assert prior == [] and "damaged sample" in info and str(path) in info
    path.write_text(json.dumps({**doc, "samples": [{**good[0], "ratio": -0.3}]}))  # refused when loaded
    assert "is unusable" in latency_prior(cfg, spec8, evaluator, reference)[1]
    other_anchor = {**doc, "meta": {**doc["meta"], "anchor": {"candidate": anchor_candidate(spec8, "npu-qnn-htp").to_dict(),
                                                            "what": "smallest subnet, all INT8"}}}
    path.write_text(json.dumps({**other_anchor, "samples": good}))
    prior, info = latency_prior(cfg, spec8, evaluator, reference)
    assert prior == [] and "next to smallest subnet, all INT8, not this run's reference" in info
    path.write_text("not json")
    assert "is unusable" in latency_prior(cfg, spec8, evaluator, reference)[1]
    path.write_text(json.dumps({**doc, "meta": {**doc["meta"], "anchor": "largest"}, "samples": good}))
    assert "is unusable" in latency_prior(cfg, spec8, evaluator, reference)[1]
    path.write_text(json.dumps({**doc, "meta": {**doc["meta"], "target": "npu-qnn-htp"}, "samples": good}))
    prior, info = latency_prior(cfg, spec8, evaluator, reference)  # another target's model under this one's name
    assert "is a latency model of 'npu-qnn-htp', not cpu-ort" in info and prior == []
