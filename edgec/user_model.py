"""A user's multi-task model for ``edgec prune``: ``package.module:factory``, a checkpoint, tasks and data.

- The model: ``factory()`` from an importable module (the current directory is on the
  import path) returns a ``torch.nn.Module`` whose forward takes ``x (B, C, H, W) float32``
  and returns one tensor or a tuple of tensors. Importing it runs the user's own code.
- The weights: ``.safetensors`` (preferred) or a torch file read with
  ``torch.load(weights_only=True)`` — a state dict, or a dict holding one under
  ``state_dict``. Never unpickled otherwise; loaded with ``strict=True``.
- The tasks: ``--task NAME=KIND:OUTPUT`` — ``classification`` (integer labels, the output
  is (B, classes) logits) or ``dense`` (float targets shaped like the output), read from
  output number ``OUTPUT`` of the forward.
- The data: ``.npz`` files (never unpickled) with ``x`` and one array per task name;
  ``--eval-data`` is the split the oracle and the report use, ``--train-data`` (optional)
  is used for BN recalibration and fine-tuning.

Errors are :class:`ModelError` / :class:`DataError` / :class:`ConfigError`, one line each.
"""

from __future__ import annotations

import importlib
import re
import sys
import warnings
from pathlib import Path

import numpy as np

from edgec.errors import ConfigError, DataError, ModelError

FACTORY_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
TASK_SPEC = re.compile(r"^(?P<name>[A-Za-z_]\w{0,63})=(?P<kind>classification|dense):(?P<output>\d{1,3})$")
MAX_CHECKPOINT_BYTES = 4 << 30


def check_factory_spec(spec: str) -> None:
    if not FACTORY_SPEC.match(spec):
        raise ConfigError(f"unknown model {spec!r}", "expected the built-in 'multitask' or a factory "
                          "'package.module:function'", "pass --model multitask or --model mypkg.models:build")


def parse_tasks(specs: tuple[str, ...]):
    from edgec.search.multitask import Task

    tasks = []
    for spec in specs:
        m = TASK_SPEC.match(spec)
        if not m:
            raise ConfigError(f"bad --task {spec!r}", "expected NAME=KIND:OUTPUT with KIND classification or dense",
                              "e.g. --task labels=classification:0 --task depth=dense:1")
        tasks.append(Task(m["name"], m["kind"], int(m["output"])))
    names = [t.name for t in tasks]
    reserved = [n for n in names if n in ("x", "input") or re.fullmatch(r"output_\d+", n)]
    if len(set(names)) != len(names) or reserved:
        raise ConfigError("task names must be unique and not x, input or output_N",
                          f"got {', '.join(names)} (x is the npz inputs; input and output_N name ONNX tensors)",
                          "give each --task its own name")
    return tuple(tasks)


def build_model(spec: str):
    """Import ``package.module`` and call ``factory()``; returns the module in eval mode."""
    import torch.nn as nn

    module_name, _, attr = spec.partition(":")
    if str(Path.cwd()) not in sys.path and "" not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    except (Exception, SystemExit) as e:  # the user's module can raise anything while importing
        raise ModelError(f"cannot import {module_name!r} for --model {spec}", f"{type(e).__name__}: {e}",
                         "run edgec where the package is importable (or pip install it)") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ModelError(f"{module_name} has no callable {attr!r}", "--model names a factory function",
                         "pass --model package.module:function")
    try:
        model = factory()
    except (Exception, SystemExit) as e:
        raise ModelError(f"{spec}() failed", f"{type(e).__name__}: {e}", "check the factory") from None
    if not isinstance(model, nn.Module):
        raise ModelError(f"{spec}() returned {type(model).__name__}", "it must return a torch.nn.Module",
                         "return the model from the factory")
    return model.eval()


def _file_head(path: Path, n: int) -> bytes:
    """The first ``n`` bytes of ``path`` (its format's magic number; fewer for a shorter file)."""
    with path.open("rb") as f:
        return f.read(n)


def load_weights(model, path_text: str) -> None:
    """Load a checkpoint into ``model`` (strict). Raises :class:`ModelError`."""
    import torch

    path = Path(path_text)
    if not path.is_file():
        raise ModelError(f"checkpoint {path} not found" if not path.exists() else f"checkpoint {path} is not a file",
                         "--checkpoint needs a .safetensors or torch state-dict file", "pass the right path")
    if path.stat().st_size > MAX_CHECKPOINT_BYTES:
        raise ModelError(f"checkpoint {path} is larger than 4 GiB", "edgec prunes small edge models",
                         "pass the model's own weights")
    head = _file_head(path, 4)
    if not head:
        raise ModelError(f"checkpoint {path} is empty", "a 0-byte file holds no weights", "pass the model's weights")
    if path.suffix != ".safetensors" and not head.startswith((b"PK\x03\x04", b"\x80")):
        raise ModelError(f"cannot read checkpoint {path}", "it is neither a torch.save file (zip or pickle "
                         "protocol 2+) nor named .safetensors", "pass a .safetensors file or a torch state dict")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:  # weights_only: tensors and plain containers only, no code runs
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                state = torch.load(str(path), map_location="cpu", weights_only=True)
            if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
                state = state["state_dict"]
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ValueError("it holds no state dict of tensors")
    except Exception as e:
        why = ("it is not a weights-only state dict (it would need unpickling arbitrary objects, which edgec "
               "never does)" if isinstance(e, __import__("pickle").UnpicklingError) or "weights_only" in str(e)
               else f"{type(e).__name__}: {_plain(str(e))}")
        raise ModelError(f"cannot read checkpoint {path}", why,
                         "save it with safetensors (or torch.save(model.state_dict()))") from None
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ModelError(f"checkpoint {path} holds NaN or Inf", f"in {bad[0]}" + (f" and {len(bad) - 1} more"
                         if len(bad) > 1 else ""), "pass weights from a finished training")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        detail = " ".join(str(e).split())[:300]
        raise ModelError(f"checkpoint {path} does not fit {type(model).__name__}", detail,
                         "pass the checkpoint saved from this factory's model") from None


def _plain(text: str) -> str:
    """The first line of ``text`` without terminal escape codes, at most 200 characters."""
    text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", text)
    return (text.splitlines() or [""])[0][:200]


def read_task_npz(path_text: str, tasks, flag: str) -> tuple[np.ndarray, dict]:
    """(x (N, C, H, W) float32, {task: array}) from an .npz (never unpickled). Raises :class:`DataError`."""
    path = Path(path_text)
    if not path.is_file():
        raise DataError(f"{flag} {path} not found" if not path.exists() else f"{flag} {path} is not a file",
                        "it must be an .npz file", "pass the right path")
    head = _file_head(path, 4)
    if head != b"PK\x03\x04":  # numpy would try to unpickle anything else (and refuse it)
        raise DataError(f"cannot read {flag} {path}", "it is empty" if not head else "it is not an .npz archive "
                        "(no zip header)", "save it with numpy.savez (no object arrays)")
    try:
        with np.load(path, allow_pickle=False) as z:
            if not hasattr(z, "files"):
                raise ValueError("it is a single .npy array, not an .npz archive")
            arrays = {k: z[k] for k in z.files}
    except Exception as e:
        why = ("it holds pickled (object) data, which edgec never loads" if "allow_pickle" in str(e)
               else f"{type(e).__name__}: {_plain(str(e))}")
        raise DataError(f"cannot read {flag} {path}", why, "save it with numpy.savez (no object arrays)") from None
    missing = [k for k in ["x", *(t.name for t in tasks)] if k not in arrays]
    if missing:
        raise DataError(f"{flag} {path} lacks array {missing[0]!r}", f"it has {', '.join(arrays) or 'none'}",
                        "store x and one array per --task name")
    x = arrays["x"]
    if x.ndim != 4 or len(x) == 0 or not np.issubdtype(x.dtype, np.floating):
        raise DataError(f"x in {flag} {path} is unusable", f"expected (N ≥ 1, C, H, W) floats, got {x.shape} {x.dtype}",
                        "store images as float32 (N, C, H, W)")
    if not np.isfinite(x).all() or np.abs(x).max() > np.finfo(np.float32).max:
        raise DataError(f"x in {flag} {path} contains NaN, Inf or values beyond float32", "", "clean the inputs")
    x = x.astype(np.float32)
    targets = {}
    for t in tasks:
        a = arrays[t.name]
        if a.ndim == 0 or len(a) != len(x):
            raise DataError(f"{t.name} in {flag} {path} has {a.shape[0] if a.ndim else 0} rows", f"x has {len(x)}",
                            "store one row per sample of x")
        if t.kind == "classification":
            if a.ndim != 1 or not np.issubdtype(a.dtype, np.integer):
                raise DataError(f"{t.name} in {flag} {path} is no label vector", f"got {a.shape} {a.dtype}",
                                "store (N,) integer class ids")
            targets[t.name] = a.astype(np.int64)
        else:
            if (not np.issubdtype(a.dtype, np.floating) or not np.isfinite(a).all()
                    or np.abs(a).max(initial=0) > np.finfo(np.float32).max):
                raise DataError(f"{t.name} in {flag} {path} is unusable", "a dense target must be finite floats",
                                "store float32 targets shaped like the output")
            targets[t.name] = a.astype(np.float32)
    return x, targets


def check_against_model(model, x: np.ndarray, targets: dict, tasks, flag: str) -> int:
    """Run the model on two samples and check each task's output against its targets; returns the output count."""
    import torch

    from edgec.search.multitask import as_outputs

    n = min(len(x), 2)
    try:
        with torch.no_grad():
            outs = model.eval()(torch.from_numpy(x[:n]))
    except Exception as e:
        raise ModelError("the model fails on the data's x", f"{type(e).__name__}: {_plain(str(e))}",
                         f"check x's shape in {flag} ({tuple(x.shape[1:])} per sample)") from None
    outs = as_outputs(outs)
    if not all(isinstance(o, torch.Tensor) and o.ndim >= 1 and o.shape[0] == n for o in outs):
        raise ModelError("the model's outputs are unusable", "forward must return a tensor or a tuple of tensors, "
                         "each with the batch as its first dimension", "return (batch, …) tensors from forward")
    for t in tasks:
        if t.output >= len(outs):
            raise ConfigError(f"--task {t.name} reads output {t.output}", f"the model returns {len(outs)} output(s)",
                              "number outputs from 0")
        out = outs[t.output]
        if t.kind == "classification":
            if out.ndim != 2:
                raise ConfigError(f"--task {t.name}: output {t.output} is no (batch, classes) logits",
                                  f"its shape is {tuple(out.shape)}", "use dense for other outputs")
            if targets[t.name].min() < 0 or targets[t.name].max() >= out.shape[1]:
                raise DataError(f"labels of {t.name} in {flag} are out of range",
                                f"the output has {out.shape[1]} classes", "fix the labels")
        elif tuple(out.shape[1:]) != tuple(targets[t.name].shape[1:]):
            raise DataError(f"{t.name} in {flag} does not match output {t.output}",
                            f"targets {tuple(targets[t.name].shape[1:])} vs output {tuple(out.shape[1:])} per sample",
                            "store targets shaped like the output")
    return len(outs)


def load_user_job(cfg):
    """(model, TaskData, ignored_layers(model) callable, info) for ``edgec prune --model pkg.mod:factory``."""
    import torch

    from edgec.prune import TaskData
    from edgec.search.pagcp import layers_named, output_layer_names

    tasks = parse_tasks(cfg.tasks)
    model = build_model(cfg.model)
    load_weights(model, cfg.checkpoint)
    eval_x, eval_t = read_task_npz(cfg.eval_data, tasks, "--eval-data")
    n_out = check_against_model(model, eval_x, eval_t, tasks, "--eval-data")
    train_x = train_t = None
    if cfg.train_data:
        train_x, train_t = read_task_npz(cfg.train_data, tasks, "--train-data")
        if train_x.shape[1:] != eval_x.shape[1:]:
            raise DataError("--train-data and --eval-data differ in x's shape",
                            f"{train_x.shape[1:]} vs {eval_x.shape[1:]}", "pass splits of one dataset")
        if len(train_x) < 16:
            raise DataError(f"--train-data {cfg.train_data} has {len(train_x)} samples",
                            "fine-tuning and BN recalibration need at least 16", "pass more training data")
        check_against_model(model, train_x, train_t, tasks, "--train-data")
    names = {t.output: t.name for t in tasks}
    output_names = tuple(names.get(i, f"output_{i}") for i in range(n_out))
    data = TaskData("user data", tasks, output_names, train_x, train_t, eval_x, eval_t, eval_x, eval_t, {
        "source": f"--eval-data {cfg.eval_data}" + (f", --train-data {cfg.train_data}" if cfg.train_data else ""),
        "preprocessing": "as given", "test_split": "the --eval-data split (no separate test split)",
        "val_split": "--eval-data (the oracle reads its first 1000 samples)"})
    fixed = output_layer_names(model, torch.zeros(1, *eval_x.shape[1:]))
    info = {"factory": cfg.model, "checkpoint": str(cfg.checkpoint), "output_layers": sorted(fixed)}
    return model, data, layers_named(fixed), info
