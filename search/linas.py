"""LINAS: predictor-guided multi-objective search over the joint architecture + quantization space.

Lightweight Iterative Neural Architecture Search (Cummings et al., "A Hardware-Aware Framework for
Accelerating Neural Architecture Search Across Modalities", 2022, §3.2; Intel DyNAS-T): real
evaluations are expensive, predictions are cheap, so

1. evaluate an initial random population for real;
2. fit one predictor per objective on every real evaluation so far (:class:`ObjectivePredictor`:
   Ridge, SVR or gradient boosting, whichever has the lowest cross-validated error);
   latency is predicted like accuracy, from the candidate's encoding and shape-derived costs
3. run an inner NSGA-II (pymoo) for thousands of *predicted* evaluations;
4. evaluate for real the ``batch_size`` candidates of its final population whose predicted objectives
   add the most hypervolume to the measured front (greedily, :meth:`LINASSearch._select`); go to 2
   until the budget is spent.

Every candidate the caller is told about was evaluated for real: predictions only choose what to
evaluate next, and are kept (:attr:`LINASSearch.predictions`) so a report can show them next to the
measurements. Like the other strategies it speaks ask/tell and is deterministic for a seed and the
told values, so an interrupted search resumes by replay.

Candidates are encoded (:class:`CandidateCodec`) as an integer genome — per block its op index
(FBNet's k×e choices, plus ``skip`` where allowed), per stage its width index, per quantizable layer
INT8 (1) or FP32 (0) — and, for the predictors, as a feature vector: the one-hot ops, width
fractions and INT8 bits, plus shape-derived costs (multiply-accumulates and weight parameters in
FP32 and INT8 layers, from :meth:`SupernetSpec.layer_costs`, and the number of precision switches
along the layer chain, where the runtime inserts quantize/dequantize kernels).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from edgec.errors import ConfigError
from edgec.search.space import BLOCK_OPS, BlockConfig, Candidate, QuantPolicy, SubnetConfig, SupernetSpec
from edgec.search.strategy import RandomSearch, SearchStrategy, make_candidate

PREDICTOR_FAMILIES = ("ridge", "svr", "gbr")


class CandidateCodec:
    """Integer genome ↔ :class:`Candidate`, and the predictors' feature vector, for one supernet."""

    def __init__(self, spec: SupernetSpec) -> None:
        self.spec = spec
        self.positions = tuple(spec.block_positions())
        self.block_options = tuple(BLOCK_OPS + (("skip",) if bi > 0 else ()) for _, bi in self.positions)
        self.layers = spec.quantizable_layers()
        self.upper = np.array([len(o) - 1 for o in self.block_options]
                              + [len(s.width_choices) - 1 for s in spec.stages] + [1] * len(self.layers))

    @property
    def genome_length(self) -> int:
        return len(self.upper)

    def genome(self, c: Candidate) -> np.ndarray:
        """(genome_length,) int64."""
        ops = [opts.index(b.name) for opts, b in zip(self.block_options, c.subnet.blocks)]
        widths = [s.width_choices.index(w) for s, w in zip(self.spec.stages, c.subnet.widths)]
        policy = c.policy.to_dict()
        bits = [int(policy.get(n) == "int8") for n in self.layers]
        return np.array(ops + widths + bits, dtype=np.int64)

    def candidate(self, g: Sequence[float]) -> Candidate:
        """The candidate of a genome (values are rounded and clipped to their range)."""
        g = np.clip(np.rint(np.asarray(g, dtype=np.float64)), 0, self.upper).astype(np.int64)
        nb, ns = len(self.positions), len(self.spec.stages)
        blocks = tuple(BlockConfig.from_name(opts[i]) for opts, i in zip(self.block_options, g[:nb]))
        widths = tuple(s.width_choices[i] for s, i in zip(self.spec.stages, g[nb:nb + ns]))
        policy = QuantPolicy(tuple((n, "int8" if b else "fp32") for n, b in zip(self.layers, g[nb + ns:])))
        return make_candidate(self.spec, SubnetConfig(blocks, widths), policy)

    def features(self, candidates: Sequence[Candidate]) -> np.ndarray:
        """(N, F) float64 predictor inputs (module docstring); MACs in millions, parameters in thousands."""
        rows = []
        for c in candidates:
            onehot = [float(b.name == op) for opts, b in zip(self.block_options, c.subnet.blocks) for op in opts]
            widths = [w / max(s.width_choices) for s, w in zip(self.spec.stages, c.subnet.widths)]
            costs = self.spec.layer_costs(c.subnet)
            policy = c.policy.to_dict()  # once: this runs for every inner-loop prediction
            int8 = [policy.get(n) == "int8" for n, _, _ in costs]
            present = {n for n, _, _ in costs}
            bits = [float(n in present and policy.get(n) == "int8") for n in self.layers]
            macs = np.array([m for _, m, _ in costs], dtype=np.float64) / 1e6
            params = np.array([p for _, _, p in costs], dtype=np.float64) / 1e3
            q = np.array(int8, dtype=bool)
            switches = float(np.sum(q[1:] != q[:-1]))
            rows.append(onehot + widths + bits + [macs[~q].sum(), macs[q].sum(), params[~q].sum(), params[q].sum(),
                                                  float(len(costs)), float(q.sum()), switches])
        return np.array(rows, dtype=np.float64)


class ObjectivePredictor:
    """One objective's predictor, chosen among Ridge, SVR (RBF) and gradient boosting — and, for a
    ``relative`` objective, fit on the value or on its logarithm — by k-fold cross-validated error
    (k = min(5, n)), then refit on all samples (LINAS §3.2 uses such light regressors; which one wins
    depends on how many samples there are and on the objective).

    ``relative``: the error that matters is relative (latency, size): CV error is the mean
    |pred − y| / y and log(y) is tried as a target too; otherwise mean |pred − y| (accuracy).
    Inputs are standardized for Ridge and SVR. Deterministic (fixed ``random_state``).
    """

    def __init__(self, relative: bool = False, families: Sequence[str] = PREDICTOR_FAMILIES) -> None:
        unknown = set(families) - set(PREDICTOR_FAMILIES)
        if unknown or not families:
            raise ConfigError(f"unknown predictor families {sorted(unknown) or '(none)'}",
                              f"known: {', '.join(PREDICTOR_FAMILIES)}")
        self.relative, self.families = relative, tuple(families)
        self.model, self.chosen, self.log_target, self.cv_error = None, None, False, {}

    @staticmethod
    def _make(family: str):
        from sklearn.ensemble import GradientBoostingRegressor
        from sklearn.linear_model import RidgeCV
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler
        from sklearn.svm import SVR

        if family == "ridge":
            return make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-3, 3, 13)))
        if family == "svr":
            from sklearn.compose import TransformedTargetRegressor

            return TransformedTargetRegressor(make_pipeline(StandardScaler(), SVR(C=3.0, epsilon=0.05)),
                                              transformer=StandardScaler())
        return GradientBoostingRegressor(n_estimators=150, max_depth=3, learning_rate=0.05, subsample=0.8,
                                         random_state=0)

    def fit(self, x: np.ndarray, y: np.ndarray) -> "ObjectivePredictor":
        """``x`` (N, F) float64, ``y`` (N,) float64 (> 0 when ``relative``); needs N ≥ 3."""
        from sklearn.model_selection import KFold, cross_val_predict

        y = np.asarray(y, dtype=np.float64)
        if len(y) < 3:
            raise ConfigError(f"only {len(y)} evaluations to fit a predictor on", "at least 3 are needed")
        folds = KFold(n_splits=min(5, len(y)), shuffle=True, random_state=0)
        self.cv_error = {}
        for family in self.families:
            for log in (False, True) if self.relative else (False,):
                target = np.log(np.maximum(y, 1e-12)) if log else y
                pred = cross_val_predict(self._make(family), x, target, cv=folds)
                pred = np.exp(pred) if log else pred
                err = np.abs(pred - y) / np.maximum(np.abs(y), 1e-12) if self.relative else np.abs(pred - y)
                self.cv_error[f"{family}{'-log' if log else ''}"] = float(np.mean(err))
        best = min(self.cv_error, key=self.cv_error.get)
        self.chosen, self.log_target = best.removesuffix("-log"), best.endswith("-log")
        self.model = self._make(self.chosen).fit(x, np.log(np.maximum(y, 1e-12)) if self.log_target else y)
        return self

    def describe(self) -> dict:
        """What was chosen and every option's CV error (relative or absolute, as fit)."""
        return {"chosen": self.chosen + ("-log" if self.log_target else ""), "cv_error": self.cv_error,
                "cv_error_kind": "mean relative" if self.relative else "mean absolute"}

    def predict(self, x: np.ndarray) -> np.ndarray:
        """(N,) float64 in the objective's own units."""
        p = self.model.predict(x)
        return np.exp(p) if self.log_target else p


class LINASSearch(SearchStrategy):
    """LINAS (module docstring) with the ask/tell interface of :class:`SearchStrategy`.

    Objectives as told: (validation accuracy ↑, latency ↓, size ↓). ``initial`` candidates are
    asked first, then random ones (the same stream :class:`RandomSearch` with this seed draws) until
    ``population_size`` evaluations succeeded; after that every ``batch_size`` (default
    ``population_size``) asks come from one predictor-guided iteration with an inner NSGA-II of
    ``inner_population`` × ``inner_generations`` predicted evaluations.

    ``latency_prior``: (candidate, latency in the unit told) pairs measured beforehand on the same
    target — the samples the target's latency model was built on (``edgec latency build``) — added
    to the latency predictor's training data, so latency is predicted from the start with what the
    latency model learned, not only from the few real evaluations so far.
    """

    def __init__(self, spec: SupernetSpec, seed: int = 0, population_size: int = 16,
                 initial: Sequence[Candidate] = (), batch_size: int | None = None,
                 inner_population: int = 100, inner_generations: int = 40,
                 latency_prior: Sequence[tuple[Candidate, float]] = ()) -> None:
        if population_size < 4:
            raise ConfigError(f"population_size must be ≥ 4 for LINAS, got {population_size}",
                              "its predictors need a few real evaluations to start from")
        if batch_size is not None and batch_size < 1 or inner_population < 4 or inner_generations < 1:
            raise ConfigError("bad LINAS settings", f"batch_size {batch_size} (≥ 1 or None), inner_population "
                              f"{inner_population} (≥ 4), inner_generations {inner_generations} (≥ 1)")
        self.spec, self.seed, self.population_size = spec, seed, population_size
        self.batch_size = batch_size or population_size
        self.inner_population, self.inner_generations = inner_population, inner_generations
        self.codec = CandidateCodec(spec)
        self.latency_prior = list(latency_prior)
        #: where the prior came from, for reports (the caller may say more)
        self.prior_info = f"{len(self.latency_prior)} (candidate, latency) pairs"
        self._prior_x = self.codec.features([c for c, _ in self.latency_prior]) if self.latency_prior else None
        self._random = RandomSearch(spec, seed)
        self._queue: list[Candidate] = list(initial)
        self._told: dict[str, tuple[Candidate, tuple[float, ...] | None]] = {}
        self._proposed: set[str] = set()
        self.iterations: list[dict] = []
        #: candidate id → predicted objectives when the predictors proposed it
        self.predictions: dict[str, dict[str, float]] = {}

    def _measured(self) -> list[tuple[Candidate, tuple[float, ...]]]:
        return [(c, v) for c, v in self._told.values() if v is not None]

    def ask(self) -> Candidate:
        while not self._queue:
            if len(self._measured()) < self.population_size:
                self._queue.append(self._random.ask())
            else:
                self._queue.extend(self._iterate() or [self._random.ask()])  # a space too small to propose anew
        c = self._queue.pop(0)
        self._proposed.add(c.id)
        return c

    def tell(self, candidate: Candidate, values: Sequence[float] | None) -> None:
        """``values``: (accuracy, latency, size); None — or anything not three finite numbers with
        latency and size > 0 — marks the candidate failed (the predictors never see it)."""
        try:
            v = tuple(float(x) for x in values) if values is not None else None
        except (TypeError, ValueError):
            v = None
        if v is not None and (len(v) != 3 or not all(np.isfinite(v)) or v[1] <= 0 or v[2] <= 0):
            v = None
        self._told[candidate.id] = (candidate, v)

    def fit_predictors(self) -> tuple[ObjectivePredictor, ...]:
        """One predictor per objective, on every successful evaluation told so far."""
        measured = self._measured()
        x = self.codec.features([c for c, _ in measured])
        y = np.array([v for _, v in measured], dtype=np.float64)
        x_lat, y_lat = x, y[:, 1]
        if self._prior_x is not None:  # the latency model's measured candidates, in the told unit
            x_lat = np.vstack([x, self._prior_x])
            y_lat = np.concatenate([y_lat, [v for _, v in self.latency_prior]])
        return (ObjectivePredictor().fit(x, y[:, 0]), ObjectivePredictor(relative=True).fit(x_lat, y_lat),
                ObjectivePredictor(relative=True).fit(x, y[:, 2]))

    def _select(self, pool: list[int], objs: np.ndarray, measured: np.ndarray) -> list[int]:
        """Greedy batch choice: repeatedly the pool candidate whose *predicted* objectives add the most
        hypervolume to the measured front plus the ones already chosen (objectives scaled by the
        measured range; reference point: the measured worst + 10 % of the range). When no candidate
        adds any, the rest of the batch spreads over the pool's predicted front by accuracy.
        ``objs``, ``measured``: (·, 3) minimized (−accuracy, latency, size)."""
        from pymoo.indicators.hv import HV
        from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting

        lo, hi = measured.min(0), measured.max(0)
        scale = np.where(hi > lo, hi - lo, 1.0)
        norm = lambda a: (a - lo) / scale  # noqa: E731
        hv = HV(ref_point=np.full(3, 1.1))
        front = norm(measured[NonDominatedSorting().do(measured, only_non_dominated_front=True)])
        chosen: list[int] = []
        while len(chosen) < self.batch_size:
            base = hv(front)
            gains = [(hv(np.vstack([front, norm(objs[i])[None]])) - base, i) for i in pool if i not in chosen]
            gains = [(g, i) for g, i in gains if g > 1e-12]
            if not gains:
                break
            _, best = max(gains)
            chosen.append(best)
            front = np.vstack([front, norm(objs[best])[None]])
        rest = [i for i in pool if i not in chosen]
        if rest and len(chosen) < self.batch_size:
            ranks = NonDominatedSorting().do(objs[rest], return_rank=True)[1]
            order = sorted(range(len(rest)), key=lambda j: (ranks[j], objs[rest[j], 0]))
            first = [rest[j] for j in order if ranks[j] == 0]
            need = self.batch_size - len(chosen)
            if len(first) > need:
                first = [first[j] for j in np.unique(np.linspace(0, len(first) - 1, need).round().astype(int))]
            chosen += first[:need]
            chosen += [rest[j] for j in order if rest[j] not in chosen][:self.batch_size - len(chosen)]
        return chosen

    def _iterate(self) -> list[Candidate]:
        """One LINAS iteration: fit, inner NSGA-II over predictions, the next batch to evaluate."""
        from pymoo.algorithms.moo.nsga2 import NSGA2
        from pymoo.core.problem import Problem
        from pymoo.operators.crossover.sbx import SBX
        from pymoo.operators.mutation.pm import PM
        from pymoo.operators.repair.rounding import RoundingRepair
        from pymoo.optimize import minimize
        from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting

        predictors = self.fit_predictors()
        codec = self.codec

        def predict(genomes: np.ndarray) -> tuple[list[Candidate], np.ndarray]:
            cands = [codec.candidate(g) for g in genomes]
            x = codec.features(cands)
            objs = np.stack([-predictors[0].predict(x), predictors[1].predict(x), predictors[2].predict(x)], 1)
            return cands, objs

        class Predicted(Problem):
            def __init__(self) -> None:
                super().__init__(n_var=codec.genome_length, n_obj=3, xl=0, xu=codec.upper, vtype=int)

            def _evaluate(self, x, out, *args, **kwargs):
                out["F"] = predict(x)[1]

        # Start from the measured front plus random genomes, so the inner search refines what works.
        measured = self._measured()
        g = np.array([codec.genome(c) for c, _ in measured])
        f = np.array([(-v[0], v[1], v[2]) for _, v in measured])
        best = g[NonDominatedSorting().do(f, only_non_dominated_front=True)]
        rng = np.random.default_rng([self.seed, len(self.iterations)])
        n_random = max(0, self.inner_population - len(best))
        start = np.vstack([best[:self.inner_population],
                           rng.integers(0, codec.upper + 1, size=(n_random, codec.genome_length))])
        algorithm = NSGA2(pop_size=self.inner_population, sampling=start.astype(float),
                          crossover=SBX(prob=0.9, eta=15, vtype=float, repair=RoundingRepair()),
                          mutation=PM(eta=20, vtype=float, repair=RoundingRepair()), eliminate_duplicates=True)
        res = minimize(Predicted(), algorithm, ("n_gen", self.inner_generations),
                       seed=int(rng.integers(2**31 - 1)), verbose=False)
        pop_x = res.pop.get("X")
        cands, objs = predict(pop_x)
        done = self._proposed | {c.id for c in self._queue}
        unique = {}
        for i, c in enumerate(cands):
            if c.id not in done:
                unique.setdefault(c.id, i)
        batch = self._select(list(unique.values()), objs, f)
        seen = set(done) | {cands[i].id for i in batch}
        out = []
        for i in batch:
            c = cands[i]
            self.predictions[c.id] = {"val_accuracy": float(-objs[i, 0]), "latency": float(objs[i, 1]),
                                      "size_bytes": float(objs[i, 2])}
            out.append(c)
        for _ in range(100 * self.batch_size):  # the inner search collapsed onto evaluated candidates
            if len(out) >= self.batch_size:
                break
            c = self._random.ask()
            if c.id not in seen:
                seen.add(c.id)
                out.append(c)
        self.iterations.append({"measured": len(measured), "proposed": len(out),
                                "predictors": [{"objective": name, **p.describe()}
                                               for name, p in zip(("val_accuracy", "latency", "size_bytes"),
                                                                  predictors)]})
        return out
