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

    def __init__(self, seed: int, population_size: int) -> None:
        import optuna

        if population_size < 2:
            raise ConfigError(f"population_size must be ≥ 2, got {population_size}")
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        sampler = optuna.samplers.NSGAIISampler(population_size=population_size, seed=seed)
        self.study = optuna.create_study(directions=list(self.directions), sampler=sampler)
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


class NSGA2Search(_OptunaNSGA2, SearchStrategy):
    """NSGA-II over the joint space via Optuna's ask/tell API.

    ``population_size``: candidates per generation (the first is random plus the
    ``initial`` candidates, enqueued in order). Objectives: (validation accuracy ↑,
    p50 latency ms ↓, size bytes ↓).
    """

    def __init__(self, spec: SupernetSpec, seed: int = 0, population_size: int = 16,
                 initial: Sequence[Candidate] = ()) -> None:
        super().__init__(seed, population_size)
        self.spec = spec
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
        self._asked(candidate.id, trial)
        return candidate

    def tell(self, candidate: Candidate, values: Sequence[float] | None) -> None:
        self._tell(candidate.id, values)


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


