"""Where candidate evaluations and device profiles run: in this process (default) or as Ray tasks.

The search asks its strategy for a batch of candidates (:data:`edgec.pipeline.EVAL_BATCH` at a time,
whatever the executor, so a seed gives the same search either way), has the executor evaluate
them, and stores and tells the results in the order asked: the search stays the single writer of
the study, and a candidate already stored is never sent out again.

``--executor ray [--ray-address ADDR]`` (:class:`RayExecutor`):

- **build tasks** (1 CPU, any node): extract the subnet, recalibrate BN, export ONNX, check parity,
  apply the target's recipe and compute the validation accuracy — in a temporary folder on the
  worker; the files come back as bytes and the driver writes them under ``study/models/``.
- **device tasks** (the custom resource ``target:<name>`` plus the target's threads as CPUs):
  latency, side-by-side re-measurement of the finalists and device profiles run only on a node
  that advertises the target — a board joins with
  ``ray start --address ADDR --resources '{"target:npu-qnn-htp": 1}'``. One unit of the resource per
  device means one measurement at a time on it, and the CPUs a measurement holds keep builds off
  the cores it times on the same host.
- A task whose worker process dies is retried (``max_retries`` = :data:`MAX_RETRIES`); an
  :class:`~edgec.errors.EdgecError` raised in a task is a result (the candidate failed), not retried.
- Without ``--ray-address`` a local Ray instance is started with this machine's CPUs and one unit
  of ``target:<name>`` for each target of the run.

Ray is not a dependency of the default path: it is imported only here, only for ``--executor ray``
(``pip install 'edgec[ray]'``).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from edgec.errors import ConfigError, EdgecError

MAX_RETRIES = 2  # times Ray reruns a task whose worker process died (SIGKILL, OOM, a lost node)
CONNECT_TIMEOUT_S = 5.0  # for the head's port to answer before Ray is asked to connect
EXECUTORS = ("in-process", "ray")


class InProcessExecutor:
    """Evaluate and profile one candidate after the other in this process (the default)."""

    name = "in-process"

    def evaluate_many(self, evaluator, candidates: Sequence, role: str = "search") -> list:
        """``evaluator.evaluate`` of each candidate, in order; an :class:`EdgecError` is returned, not raised."""
        results: list = []
        for c in candidates:
            try:
                results.append(evaluator.evaluate(c, role))
            except EdgecError as e:
                results.append(e)
        return results

    def measure_interleaved(self, evaluator, models: Mapping[Any, Path], rounds: int,
                            on_round: Callable[[int], None] | None = None) -> dict:
        from edgec.targets.base import measure_interleaved

        return measure_interleaved(evaluator.target, models, evaluator.input_shape, rounds, on_round)

    def profile_many(self, evaluator, model_paths: Sequence[Path]) -> list[dict]:
        """The target's device report (:meth:`~edgec.targets.base.Target.profile_model`) of each model, in order."""
        return [evaluator.target.profile_model(p, evaluator.input_shape, batch=1) for p in model_paths]

    def bind(self, state: dict) -> None:
        """Nothing to ship: evaluations run on the evaluator given."""

    def info(self) -> dict:
        return {"executor": self.name}

    def close(self) -> None:
        pass


# ---- what runs inside Ray workers ------------------------------------------------------------------

_WORKER_TARGETS: dict = {}  # per worker process: opened targets, reused by later tasks


def _worker_target(name: str, options: dict):
    from edgec.targets import open_target

    key = (name, tuple(sorted(options.items())))
    if key not in _WORKER_TARGETS:
        _WORKER_TARGETS[key] = open_target(name, **options)
    return _WORKER_TARGETS[key]


def _error_result(e: EdgecError) -> dict:
    return {"error": [type(e).__name__, e.what, e.why, e.fix]}


def _as_error(result: dict) -> EdgecError:
    import edgec.errors as errors

    name, what, why, fix = result["error"]
    cls = getattr(errors, name, EdgecError)
    if not (isinstance(cls, type) and issubclass(cls, EdgecError)):
        cls = EdgecError
    return cls(what, why, fix)


def build_task(state: dict, target_name: str, candidate) -> dict:
    """Build ``candidate`` for ``target_name`` in a temporary folder; its files as bytes, val accuracy,
    parity and compile seconds (or ``{"error": …}``). ``state``: {"supernet", "dataset", "config"}."""
    import torch

    from edgec.pipeline import Evaluator

    cfg = state["config"]
    torch.set_num_threads(cfg.threads)  # as in the driver: BN recalibration sums in the same order
    try:
        target = _worker_target(target_name, {"threads": cfg.threads, "npu_cpu_fallback": cfg.npu_cpu_fallback})
        with tempfile.TemporaryDirectory(prefix="edgec-build-") as tmp:
            ev = Evaluator(state["supernet"], state["dataset"], target, Path(tmp), cfg)
            t0 = time.perf_counter()
            path, parity = ev.compile(candidate)
            val_accuracy = ev.accuracy(candidate, state["dataset"].val_x, state["dataset"].val_y)
            compile_s = time.perf_counter() - t0
            files = {f.name: f.read_bytes() for f in ev.folder(candidate).iterdir() if f.is_file()}
            return {"files": files, "model": path.name, "parity": parity, "val_accuracy": val_accuracy,
                    "compile_s": compile_s, "node": os.uname().nodename}
    except EdgecError as e:
        return _error_result(e)


def device_task(target_name: str, options: dict, kind: str, models: dict, input_shape: tuple,
                rounds: int = 1) -> dict:
    """On a node with the device: ``kind`` "measure" (one model), "interleaved" (``rounds`` side by
    side) or "profile". ``models``: {key: (file name, bytes)}. Returns {"result": …} or {"error": …}."""
    from edgec.targets.base import measure_interleaved

    try:
        target = _worker_target(target_name, options)
        with tempfile.TemporaryDirectory(prefix="edgec-device-") as tmp:
            paths, sha256 = {}, {}
            for i, (key, (name, data)) in enumerate(models.items()):
                sha256[key] = hashlib.sha256(data).hexdigest()
                folder = Path(tmp) / str(i)
                folder.mkdir()
                (folder / name).write_bytes(data)
                paths[key] = folder / name
            if kind == "measure":
                (path,) = paths.values()
                result: Any = target.measure_latency(path, tuple(input_shape), batch=1).to_dict()
            elif kind == "interleaved":
                stats = measure_interleaved(target, paths, tuple(input_shape), rounds)
                result = {key: s.to_dict() for key, s in stats.items()}
            else:
                (path,) = paths.values()
                result = target.profile_model(path, tuple(input_shape), batch=1)
            return {"result": result, "node": os.uname().nodename, "sha256": sha256}  # of what was measured
    except EdgecError as e:
        return _error_result(e)


# ---- the driver side ------------------------------------------------------------------------------

def check_reachable(address: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Refuse, in one line and within ``timeout_s``, a ``host[:port]`` nothing answers on (``ray.init``
    itself retries for minutes)."""
    import socket

    host, _, port = address.rpartition(":") if ":" in address else (address, "", "6379")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except ValueError:
        raise ConfigError(f"bad --ray-address {address!r}", "it is HOST:PORT of the cluster's head",
                          "e.g. --ray-address 10.0.0.5:6379 ('ray status' on the head shows it)") from None
    except OSError as e:
        raise ConfigError(f"cannot reach Ray at {address}", f"no answer within {timeout_s:.0f} s "
                          f"({e.strerror or type(e).__name__})",
                          "check --ray-address ('ray status' on the head shows it) and that the head is up") from None


class RayExecutor:
    """Candidate builds as Ray tasks on any node, measurements as tasks on nodes advertising
    ``target:<name>`` (see the module docstring). Connects when made, so a bad address or a missing
    device fails before any work; :meth:`bind` then puts what build tasks need (supernet, dataset,
    config) in Ray's object store once.

    Raises :class:`ConfigError` when Ray is not installed, the address cannot be reached, or no node
    advertises a target the run needs."""

    name = "ray"

    def __init__(self, address: str | None, targets: Sequence[str], threads: int, state: dict | None = None) -> None:
        try:
            import ray
        except ImportError:
            raise ConfigError("--executor ray needs Ray", "it is not installed",
                              "pip install 'edgec[ray]' (or pip install ray)") from None
        self.ray, self.threads = ray, threads
        self.address = address
        self._owns = not ray.is_initialized()  # a library caller already connected to Ray keeps its connection
        if self._owns and address:
            check_reachable(address)
        try:
            if not self._owns:
                pass
            elif address:
                ray.init(address=address, log_to_driver=False, include_dashboard=False)
            else:  # "local": a new instance even where another cluster runs on this machine
                ray.init(address="local", num_cpus=os.cpu_count() or 1, resources={f"target:{t}": 1 for t in targets},
                         log_to_driver=False, include_dashboard=False)
        except Exception as e:  # ConnectionError, RuntimeError, ValueError, depending on the failure
            text = " ".join(str(e).split())
            auth = "auth" in text.lower() or "unauthenticated" in text.lower()
            raise ConfigError(f"cannot start or reach Ray{f' at {address}' if address else ''}",
                              text[:200] or type(e).__name__,
                              "the cluster uses token authentication (Ray ≥ 2.59 starts clusters with it): export "
                              "RAY_AUTH_MODE=token, and RAY_AUTH_TOKEN from 'ray get-auth-token' on the head, then "
                              "rerun" if auth or address else
                              "drop --executor ray, or start Ray yourself and pass --ray-address") from None
        have = ray.cluster_resources()
        missing = [t for t in targets if have.get(f"target:{t}", 0) < 1]
        if missing:
            self.close()
            raise ConfigError(f"no Ray node advertises {', '.join('target:' + t for t in missing)}",
                              "device tasks run only on nodes that have the device",
                              f"on the device's machine: ray start --address {address or 'ADDR'} "
                              f"--resources '{{\"target:{missing[0]}\": 1}}'")
        self._build = ray.remote(num_cpus=1, max_retries=MAX_RETRIES)(build_task)
        self._device = {t: ray.remote(num_cpus=self._device_cpus(t, threads), resources={f"target:{t}": 1},
                                      max_retries=MAX_RETRIES)(device_task) for t in targets}
        self._state = None
        self.nodes: dict[str, int] = {}  # node name → tasks run there
        if state is not None:
            self.bind(state)

    def bind(self, state: dict) -> None:
        """What build tasks need — {"supernet", "dataset", "config"} — into Ray's object store, once."""
        self._state = self.ray.put(state)

    def _device_cpus(self, target: str, threads: int) -> float:
        """CPUs a measurement holds: the runtime's threads, but no more than the largest node that has the
        device offers (a task asking for more than any such node has would wait forever)."""
        offered = [n.get("Resources", {}).get("CPU", 0) for n in self.ray.nodes()
                   if n.get("Alive") and n.get("Resources", {}).get(f"target:{target}", 0) >= 1]
        return float(min(threads, max(offered, default=0)))

    def _options(self, evaluator) -> dict:
        cfg = evaluator.cfg
        return {"threads": cfg.threads, "npu_cpu_fallback": cfg.npu_cpu_fallback}

    def _get(self, ref) -> dict:
        result = self.ray.get(ref)
        node = result.get("node")
        if node:
            self.nodes[node] = self.nodes.get(node, 0) + 1
        return result

    def _device_submit(self, evaluator, kind: str, models: Mapping[Any, Path], rounds: int = 1):
        """Submit one device task; returns (its ref, the sha256 of each model sent)."""
        name = evaluator.target.name
        payload = {key: (Path(p).name, Path(p).read_bytes()) for key, p in models.items()}
        ref = self._device[name].remote(name, self._options(evaluator), kind, payload, tuple(evaluator.input_shape),
                                        rounds)
        return ref, {key: hashlib.sha256(data).hexdigest() for key, (_, data) in payload.items()}

    def _device_result(self, submitted, kind: str):
        ref, sent = submitted
        result = self._get(ref)
        if "error" in result:
            raise _as_error(result)
        if result["sha256"] != sent:  # every result must be of the model sent for it
            raise RuntimeError(f"a {kind} task measured other bytes than it was sent")
        return result["result"]

    def _device_call(self, evaluator, kind: str, models: Mapping[Any, Path], rounds: int = 1):
        return self._device_result(self._device_submit(evaluator, kind, models, rounds), kind)

    def evaluate_many(self, evaluator, candidates: Sequence, role: str = "search") -> list:
        """Build every candidate in parallel, measure each on its device as its build returns; results
        in the order given (an :class:`Evaluation` or the :class:`EdgecError` it failed with)."""
        import edgec
        from edgec.compile.package import write_atomic_bytes
        from edgec.records import Evaluation
        from edgec.targets.base import LatencyStats

        if evaluator.finetuned is not None:  # fine-tuned weights live in this run's study, on this machine
            return InProcessExecutor().evaluate_many(evaluator, candidates, role)
        name = evaluator.target.name
        builds = [self._build.remote(self._state, name, c) for c in candidates]
        results: list = []
        for c, ref in zip(candidates, builds):
            built = self._get(ref)
            if "error" in built:
                results.append(_as_error(built))
                continue
            folder = evaluator.folder(c)
            folder.mkdir(parents=True, exist_ok=True)
            for fname, data in built["files"].items():  # the driver alone writes the study
                write_atomic_bytes(folder / fname, data)
            path = folder / built["model"]
            try:
                latency = LatencyStats.from_dict(self._device_call(evaluator, "measure", {c.id: path}))
            except EdgecError as e:
                results.append(e)
                continue
            results.append(Evaluation(c, name, built["val_accuracy"], latency, path.stat().st_size, built["parity"],
                                      built["compile_s"], edgec.__version__, role))
        return results

    def measure_interleaved(self, evaluator, models: Mapping[Any, Path], rounds: int,
                            on_round: Callable[[int], None] | None = None) -> dict:
        """:func:`edgec.targets.base.measure_interleaved` as one task on a node with the device."""
        stats = self._device_call(evaluator, "interleaved", models, rounds)
        if on_round:
            on_round(rounds)
        from edgec.targets.base import LatencyStats

        return {key: LatencyStats.from_dict(s) for key, s in stats.items()}

    def profile_many(self, evaluator, model_paths: Sequence[Path]) -> list[dict]:
        """Device reports of each model, all submitted at once (they queue for the device: one unit of
        ``target:<name>`` per device), in order."""
        submitted = [self._device_submit(evaluator, "profile", {"model": p}) for p in model_paths]
        return [self._device_result(s, "profile") for s in submitted]

    def info(self) -> dict:
        return {"executor": self.name, "ray_address": self.address or "local instance",
                "ray_version": self.ray.__version__, "tasks_per_node": self.nodes,
                "max_retries": MAX_RETRIES}

    def close(self) -> None:
        if self._owns and self.ray.is_initialized():
            self.ray.shutdown()


def open_executor(name: str, address: str | None, targets: Sequence[str], threads: int):
    """The executor for ``--executor NAME``, connected (bind its state before evaluating);
    :class:`ConfigError` for an unknown name."""
    if name == "in-process":
        return InProcessExecutor()
    if name == "ray":
        return RayExecutor(address, targets, threads)
    raise ConfigError(f"unknown executor {name!r}", f"known: {', '.join(EXECUTORS)}", "use --executor ray or drop it")
