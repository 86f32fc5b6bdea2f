"""Search strategies: ask/tell over candidates of the joint architecture + quantization space.

The default is NSGA-II (Deb et al. 2002) through Optuna's ``NSGAIISampler``,
seeded, over one categorical parameter per block op, per stage width and per
quantizable layer's precision — the joint search of SimQ-NAS (Sridhar et al.
2023, §3). The strategy knows no runtime: the caller evaluates each asked
candidate and tells its objective values back.

Resume: the study lives in memory and is rebuilt from the stored evaluations;
replaying the same seed and the same told values asks the same candidates in the
same order, so an interrupted search continues where it stopped and evaluates the
same candidates as an uninterrupted one would have.
"""

from __future__ import annotations

import abc
from typing import Sequence

import numpy as np

from edgec.errors import ConfigError
from edgec.search.space import BLOCK_OPS, PRECISIONS, Candidate, QuantPolicy, SubnetConfig, SupernetSpec, BlockConfig


def make_candidate(spec: SupernetSpec, subnet: SubnetConfig, policy: QuantPolicy) -> Candidate:
    """A candidate whose policy lists exactly the layers ``subnet`` has (so its id is canonical)."""
    layers = spec.layers_of(subnet)
    full = QuantPolicy(tuple((n, policy.precision(n)) for n in layers))
    return Candidate(subnet, full)


class SearchStrategy(abc.ABC):
    """Ask/tell interface: ``ask()`` a candidate, evaluate it, ``tell()`` its objective values."""

    #: one of "maximize" / "minimize" per objective, in the order ``tell`` receives them
    directions: tuple[str, ...] = ("maximize", "minimize", "minimize")

    @abc.abstractmethod
    def ask(self) -> Candidate: ...

    @abc.abstractmethod
    def tell(self, candidate: Candidate, values: Sequence[float] | None) -> None:
        """``values`` None marks the candidate failed (it will not be proposed as a parent)."""


class RandomSearch(SearchStrategy):
    """Uniform random candidates from a seeded ``numpy.random.Generator`` (a baseline)."""

    def __init__(self, spec: SupernetSpec, seed: int = 0) -> None:
        self.spec, self.rng = spec, np.random.default_rng(seed)

    def ask(self) -> Candidate:
        subnet = self.spec.sample(self.rng)
        layers = self.spec.layers_of(subnet)
        return make_candidate(self.spec, subnet,
                              QuantPolicy(tuple((n, PRECISIONS[self.rng.integers(2)]) for n in layers)))

    def tell(self, candidate: Candidate, values: Sequence[float] | None) -> None:
        pass


class _OptunaNSGA2:
    """Optuna's NSGA-II study with ask/tell bookkeeping; subclasses turn trials into proposals."""

    directions = SearchStrategy.directions

    def __init__(self, seed: int, population_size: int, storage: str | None = None,
                 study_name: str | None = None) -> None:
        import optuna

        if population_size < 2:
            raise ConfigError(f"population_size must be ≥ 2, got {population_size}")
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        sampler = optuna.samplers.NSGAIISampler(population_size=population_size, seed=seed)
        self.storage = storage
        if storage is None:
            self.study = optuna.create_study(directions=list(self.directions), sampler=sampler)
        else:
            self.study = open_shared_study(storage, study_name or "edgec", list(self.directions), sampler)
        self._open: dict = {}  # proposal key → asked trials not yet told

    def _asked(self, key, trial) -> None:
        self._open.setdefault(key, []).append(trial)

    def _tell(self, key, values: Sequence[float] | None) -> None:
        import optuna

        trial = self._open[key].pop(0)
        if values is None:
            self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
        else:
            self.study.tell(trial, list(values))


def open_shared_study(storage: str, study_name: str, directions: list[str], sampler):
    """An Optuna study in RDB storage (``sqlite:///file.db``, ``postgresql://user@host/db``) that several
    searches share: created if missing, else loaded. Raises :class:`ConfigError` in one line when the
    URL is unusable or the stored study optimizes other objectives."""
    import optuna

    try:
        study = optuna.create_study(storage=storage, study_name=study_name, directions=directions, sampler=sampler,
                                    load_if_exists=True)
    except Exception as e:  # sqlalchemy / optuna errors of many types: bad URL, no driver, unreachable
        raise ConfigError(f"cannot open the search storage {storage!r}", " ".join(str(e).split())[:200] or
                          type(e).__name__, "pass an Optuna RDB URL such as sqlite:///runs/search.db") from None
    if [d.name.lower() for d in study.directions] != directions:
        raise ConfigError(f"study {study_name!r} in {storage} optimizes other objectives",
                          f"{[d.name.lower() for d in study.directions]} vs {directions}",
                          "pass another --study-name")
    return study


class NSGA2Search(_OptunaNSGA2, SearchStrategy):
    """NSGA-II over the joint space via Optuna's ask/tell API.

    ``population_size``: candidates per generation (the first is random plus the
    ``initial`` candidates, enqueued in order). Objectives: (validation accuracy ↑,
    p50 latency ms ↓, size bytes ↓).
    """

    def __init__(self, spec: SupernetSpec, seed: int = 0, population_size: int = 16,
                 initial: Sequence[Candidate] = (), storage: str | None = None, study_name: str | None = None,
                 run_id: str = "") -> None:
        """``storage``/``study_name``: share the study with other searches through Optuna's RDB storage
        (each asked trial is claimed with its candidate id and ``run_id``; each told one carries its
        evaluation record, see :meth:`shared_record`). The ``initial`` candidates are enqueued only
        into a study that has no trials yet."""
        super().__init__(seed, population_size, storage, study_name)
        self.spec, self.run_id = spec, run_id
        if storage is None or not self.study.trials:
            for c in initial:
                self.study.enqueue_trial(self._params(c))

    def _params(self, c: Candidate) -> dict:
        params = {}
        for i, block in enumerate(c.subnet.blocks):
            params[f"block{i}"] = block.name
        for s, w in enumerate(c.subnet.widths):
            params[f"width{s}"] = w
        for layer in self.spec.quantizable_layers():
            params[f"q:{layer}"] = c.policy.precision(layer)
        return params

    def ask(self) -> Candidate:
        trial = self.study.ask()
        blocks = []
        for i, (_, bi) in enumerate(self.spec.block_positions()):
            ops = BLOCK_OPS + (("skip",) if bi > 0 else ())
            blocks.append(BlockConfig.from_name(trial.suggest_categorical(f"block{i}", ops)))
        widths = tuple(trial.suggest_categorical(f"width{s}", stage.width_choices)
                       for s, stage in enumerate(self.spec.stages))
        policy = QuantPolicy(tuple((layer, trial.suggest_categorical(f"q:{layer}", PRECISIONS))
                                   for layer in self.spec.quantizable_layers()))
        candidate = make_candidate(self.spec, SubnetConfig(tuple(blocks), widths), policy)
        if self.storage is not None:  # a claim other searches can see
            trial.set_user_attr("candidate_id", candidate.id)
            trial.set_user_attr("run_id", self.run_id)
        self._asked(candidate.id, trial)
        return candidate

    def tell(self, candidate: Candidate, values: Sequence[float] | None) -> None:
        self._tell(candidate.id, values)

    def share(self, candidate: Candidate, record: dict) -> None:
        """With shared storage: attach ``candidate``'s evaluation record to its next trial to be told."""
        if self.storage is not None and self._open.get(candidate.id):
            import json

            self._open[candidate.id][0].set_user_attr("record", json.dumps(record, sort_keys=True))

    def shared_record(self, candidate_id: str) -> dict | None:
        """With shared storage: the evaluation record another search told for ``candidate_id``, if any."""
        if self.storage is None:
            return None
        import json

        import optuna

        for t in self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
            if t.user_attrs.get("candidate_id") == candidate_id and "record" in t.user_attrs \
                    and t.user_attrs.get("run_id") != self.run_id:
                return {**json.loads(t.user_attrs["record"]), "shared_from_run": t.user_attrs.get("run_id") or "?"}
        return None


class PolicySearch(_OptunaNSGA2):
    """NSGA-II over a fixed model's per-layer precision only (INT8 / FP32 per layer; SimQ-NAS §3
    without the architecture part), for ONNX models given as input. Ask/tell like
    :class:`NSGA2Search`; objectives (fidelity ↑, latency ↓, size ↓). ``initial`` policies are
    asked first, in order.
    """

    def __init__(self, layers: Sequence[str], seed: int = 0, population_size: int = 16,
                 initial: Sequence[QuantPolicy] = ()) -> None:
        super().__init__(seed, population_size)
        self.layers = tuple(layers)
        for policy in initial:
            self.study.enqueue_trial({f"q{i}": policy.precision(n) for i, n in enumerate(self.layers)})

    def ask(self) -> QuantPolicy:
        trial = self.study.ask()
        policy = QuantPolicy(tuple((n, trial.suggest_categorical(f"q{i}", PRECISIONS))
                                   for i, n in enumerate(self.layers)))
        self._asked(policy, trial)
        return policy

    def tell(self, policy: QuantPolicy, values: Sequence[float] | None) -> None:
        self._tell(policy, values)


