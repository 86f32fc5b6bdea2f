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
import contextlib
import errno
import os
from typing import Sequence

import numpy as np

from edgec.errors import ConfigError, OutputDirError
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


@contextlib.contextmanager
def storage_errors(storage: str | None):
    """Optuna's storage failures during a search, as one line: a full disk as the :class:`OSError` the
    CLI reports as such, anything else as :class:`OutputDirError` (rerun with --resume)."""
    import optuna

    try:
        yield
    except optuna.exceptions.StorageInternalError as e:
        cause = " ".join(str(e.__cause__ or e).split())
        if "full" in cause.lower() or "too large" in cause.lower():
            raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} ({cause[:120]})",
                          shown_url(storage or "")) from None
        raise OutputDirError(f"the search storage {shown_url(storage or '')} failed", cause[:200],
                             "check the database, then rerun the same command with --resume") from None


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
        with storage_errors(self.storage):
            if values is None:
                self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
            else:
                self.study.tell(trial, list(values))


def shown_url(storage: str) -> str:
    """``storage`` as it may be printed and reported: any password hidden."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(storage).render_as_string(hide_password=True)
    except Exception:
        return storage.split("@")[-1] if "@" in storage else storage


def open_shared_study(storage: str, study_name: str, directions: list[str], sampler=None):
    """An Optuna study in RDB storage (``sqlite:///file.db``, ``postgresql://user@host/db``) that several
    searches share: created if missing, else loaded (two searches creating it at once: retried). Raises
    :class:`ConfigError` in one line when the URL is unusable, in-memory, or the stored study optimizes
    other objectives."""
    import time

    import optuna

    shown = shown_url(storage)
    if storage.strip().rstrip("/") in ("sqlite:", "sqlite://") or ":memory:" in storage:
        raise ConfigError(f"search storage {shown!r} is in memory", "nothing another search could share",
                          "pass a file, e.g. --storage sqlite:///runs/search.db")
    for attempt in range(3):
        try:
            study = optuna.create_study(storage=storage, study_name=study_name, directions=directions,
                                        sampler=sampler, load_if_exists=True)
            break
        except Exception as e:  # sqlalchemy / optuna errors of many types: bad URL, no driver, unreachable
            text = " ".join(str(e).split())
            if ("UNIQUE constraint" in text or "IntegrityError" in type(e).__name__) and attempt < 2:
                time.sleep(0.5 + attempt)  # another search is creating the same tables or study right now
                continue
            fix = ("install its driver (postgresql://: pip install psycopg2-binary)" if isinstance(e, ImportError)
                   else "check that the folder exists and is writable" if "unable to open database" in text
                   else "pass an Optuna RDB URL such as sqlite:///runs/search.db")
            raise ConfigError(f"cannot open the search storage {shown!r}", text.replace(storage, shown)[:200] or
                              type(e).__name__, fix) from None
    if [d.name.lower() for d in study.directions] != directions:
        raise ConfigError(f"study {study_name!r} in {shown} optimizes other objectives",
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
        try:
            with storage_errors(self.storage):
                return self._ask()
        except ValueError as e:  # optuna: the shared study's trials were asked over other choices
            if self.storage is None or "dynamic value space" not in str(e):
                raise
            raise ConfigError(f"study {self.study.study_name!r} in {shown_url(self.storage)} searched another space",
                              "its trials offer other choices for the same parameters",
                              "pass another --study-name") from None

    def _ask(self) -> Candidate:
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

            with storage_errors(self.storage):
                self._open[candidate.id][0].set_user_attr("record", json.dumps(record, sort_keys=True))

    def shared_records(self) -> list[dict]:
        """With shared storage: every evaluation record other searches told, in trial order."""
        if self.storage is None:
            return []
        import json

        import optuna

        records = []
        with storage_errors(self.storage):
            trials = self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        for t in trials:
            if "record" not in t.user_attrs or t.user_attrs.get("run_id") == self.run_id:
                continue
            try:
                rec = json.loads(t.user_attrs["record"])
            except (TypeError, ValueError):  # damaged in the storage: that candidate is evaluated here if asked
                continue
            if isinstance(rec, dict) and isinstance(rec.get("candidate_id"), str):
                records.append({**rec, "shared_from_run": t.user_attrs.get("run_id") or "?"})
        return records

    def shared_record(self, candidate_id: str) -> dict | None:
        """With shared storage: the evaluation record another search told for ``candidate_id``, if any."""
        return next((r for r in self.shared_records() if r.get("candidate_id") == candidate_id), None)


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


