"""Supernet training (sandwich rule + in-place distillation), BN recalibration and checkpoints.

Sandwich rule (Yu & Huang, "Universally Slimmable Networks", 2019, §3.2; BigNAS,
Yu et al. 2020, §3.1): every step trains the largest subnet, the smallest and
two random ones and sums their gradients. In-place distillation: the largest
subnet learns from the labels, the others from its detached soft predictions
(the same papers; Once-for-All §3.2 does the same with a fixed teacher).
``label_weight`` can mix in the labels' cross-entropy; on digits (25 epochs, one
seed) pure distillation left shallow subnets closest to the largest, so it is 0.

Checkpoints are safetensors plus a JSON config — never pickle.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from edgec.errors import ModelError
from edgec.rundir import TMP_PREFIX
from edgec.search.space import SupernetSpec
from edgec.search.supernet import StaticNet, Supernet

CHECKPOINT_FORMAT = 1


@dataclass(frozen=True)
class TrainSettings:
    """Supernet training settings; part of the checkpoint cache key."""

    epochs: int = 40          # passes over the training split
    batch_size: int = 128     # images per step (each of the 4 sandwich subnets sees the batch)
    lr: float = 3e-3          # AdamW peak learning rate, cosine-decayed to 0
    weight_decay: float = 1e-4
    random_subnets: int = 2   # random subnets per step besides the largest and smallest
    skip_prob: float = 0.5    # chance a skippable block is skipped in a random subnet
    label_weight: float = 0.0  # smaller subnets' loss: this × cross-entropy + (1 − this) × KD from the largest
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def cache_key(spec: SupernetSpec, settings: TrainSettings, train_x: np.ndarray, train_y: np.ndarray) -> str:
    """SHA-256 (16 hex digits) of the spec, the settings and the training data bytes."""
    h = hashlib.sha256()
    h.update(json.dumps({"spec": spec.to_dict(), "train": settings.to_dict(), "format": CHECKPOINT_FORMAT},
                        sort_keys=True).encode())
    h.update(np.ascontiguousarray(train_x).tobytes())
    h.update(np.ascontiguousarray(train_y).tobytes())
    return h.hexdigest()[:16]


def train_supernet(spec: SupernetSpec, train_x: np.ndarray, train_y: np.ndarray, settings: TrainSettings,
                   on_step: Callable[[int, int, float], None] | None = None,
                   state_dir: Path | None = None) -> Supernet:
    """Train a supernet from scratch with the sandwich rule and in-place distillation.

    ``train_x``: (N, C, H, W) float32 in [0, 1]; ``train_y``: (N,) int64 class ids.
    ``on_step(step, total_steps, loss)`` reports progress. Deterministic for a given seed
    on one machine (torch CPU kernels). With ``state_dir``, the full training state
    (weights, optimizer, RNGs) is written there after every epoch and a later call with
    the same arguments resumes from the last finished epoch, reaching the same weights as
    an uninterrupted run.
    """
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    net = Supernet(spec)
    opt = torch.optim.AdamW(net.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    x_all, y_all = torch.from_numpy(train_x), torch.from_numpy(train_y)
    steps_per_epoch = max(1, len(train_x) // settings.batch_size)
    total = settings.epochs * steps_per_epoch
    start_epoch = _load_train_state(state_dir, net, opt, rng) if state_dir else 0
    sched = one_cycle(opt, settings.lr, total, last_epoch=start_epoch * steps_per_epoch - 1)
    largest, smallest = spec.largest(), spec.smallest()
    step = start_epoch * steps_per_epoch
    net.train()
    for epoch in range(start_epoch, settings.epochs):
        order = rng.permutation(len(train_x))
        for i in range(steps_per_epoch):
            idx = torch.from_numpy(order[i * settings.batch_size:(i + 1) * settings.batch_size])
            x, y = x_all[idx], y_all[idx]
            x = _augment(x, rng)
            opt.zero_grad(set_to_none=True)
            logits = net(x, largest)
            loss = F.cross_entropy(logits, y)
            loss.backward()
            soft = F.softmax(logits.detach(), dim=1)
            for config in [smallest] + [spec.sample(rng, settings.skip_prob) for _ in range(settings.random_subnets)]:
                logits_s = net(x, config)
                kd = F.kl_div(F.log_softmax(logits_s, dim=1), soft, reduction="batchmean")
                ((1 - settings.label_weight) * kd + settings.label_weight * F.cross_entropy(logits_s, y)).backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 5.0)
            opt.step()
            sched.step()
            step += 1
            if on_step:
                on_step(step, total, loss.item())
        if state_dir and epoch + 1 < settings.epochs:
            _save_train_state(state_dir, epoch + 1, net, opt, rng)
    return net.eval()


def _save_train_state(state_dir: Path, epochs_done: int, net: Supernet, opt: torch.optim.Optimizer,
                      rng: np.random.Generator) -> None:
    """Weights, AdamW moments and torch RNG as safetensors; the rest as JSON; written atomically
    (:func:`write_atomically`, which raises :class:`ModelError`)."""
    tensors = {f"model.{k}": v.contiguous() for k, v in net.state_dict().items()}
    opt_state = opt.state_dict()
    for idx, per_param in opt_state["state"].items():
        for name, value in per_param.items():
            tensors[f"opt.{idx}.{name}"] = value.contiguous()
    tensors["torch_rng"] = torch.get_rng_state()
    meta = {"epochs_done": epochs_done, "param_groups": opt_state["param_groups"],
            "numpy_rng": rng.bit_generator.state}

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / "state.safetensors"))
        (tmp / "state.json").write_text(json.dumps(meta))

    # tensors first, then the JSON that says they are complete
    write_atomically(state_dir, ("state.safetensors", "state.json"), write, "the supernet's training state")


def _load_train_state(state_dir: Path, net: Supernet, opt: torch.optim.Optimizer,
                      rng: np.random.Generator) -> int:
    """Restore what :func:`_save_train_state` wrote; returns the epochs already done (0 if none/unusable)."""
    try:
        meta = json.loads((state_dir / "state.json").read_text())
        tensors = load_file(str(state_dir / "state.safetensors"))
        net.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
        per_param: dict[int, dict] = {}
        for key, value in tensors.items():
            if key.startswith("opt."):
                _, idx, name = key.split(".", 2)
                per_param.setdefault(int(idx), {})[name] = value
        opt.load_state_dict({"state": per_param, "param_groups": meta["param_groups"]})
        torch.set_rng_state(tensors["torch_rng"])
        rng.bit_generator.state = meta["numpy_rng"]
        return int(meta["epochs_done"])
    except Exception:  # nothing saved yet, or a state torn by a kill before its JSON: start over
        return 0


def _augment(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Random shift by up to 1 pixel (8×8) or 2 pixels (larger), zero-padded: (B, C, H, W) → same."""
    pad = 1 if x.shape[-1] <= 8 else 2
    dx, dy = rng.integers(-pad, pad + 1, size=2)
    padded = F.pad(x, (pad, pad, pad, pad))
    h, w = x.shape[-2:]
    return padded[..., pad + dy:pad + dy + h, pad + dx:pad + dx + w]


@torch.no_grad()
def recalibrate_bn(net: StaticNet, x: np.ndarray, batch_size: int = 256, max_images: int = 2000) -> StaticNet:
    """Re-estimate every batch norm's running statistics on ``x`` (N, C, H, W) float32.

    Shared statistics belong to no single subnet, so each extracted subnet gets its
    own before evaluation (Once-for-All §3.2; BigNAS §3.3). Statistics are the
    plain average over batches (``momentum=None`` while calibrating; each batch norm's own momentum is
    restored afterwards, so later training updates the statistics as usual — left at ``None``, a
    fine-tuning of thousands of steps averaged them over its whole trajectory, stale weights included).
    Uses the first ``max_images`` images; returns ``net`` in eval mode.
    """
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over all calibration batches
    net.train()
    data = torch.from_numpy(x[:max_images])
    for i in range(0, len(data), batch_size):
        net(data[i:i + batch_size])
    for bn, momentum in zip(bns, momenta):
        bn.momentum = momentum
    return net.eval()


@dataclass(frozen=True)
class FinetuneSettings:
    """Standalone fine-tuning of one extracted subnet; part of its weights' cache key."""

    epochs: int = 6
    batch_size: int = 128
    lr: float = 1e-3          # AdamW, cosine-decayed to 0 (no warm-up: the weights are trained already)
    weight_decay: float = 1e-4
    kd_weight: float = 0.5    # loss = (1 − this) × cross-entropy + this × KL(teacher ‖ subnet); 0 without a teacher
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def predict_logits(net: torch.nn.Module, x: np.ndarray, batch_size: int = 1000) -> np.ndarray:
    """``net``'s logits on ``x`` (N, C, H, W) float32 in eval mode: (N, classes) float32."""
    net.eval()
    return torch.cat([net(torch.from_numpy(x[i:i + batch_size])) for i in range(0, len(x), batch_size)]).numpy()


def finetune_subnet(net: StaticNet, train_x: np.ndarray, train_y: np.ndarray, settings: FinetuneSettings,
                    teacher_logits: np.ndarray | None = None,
                    on_step: Callable[[int, int, float], None] | None = None) -> StaticNet:
    """Fine-tune an extracted subnet on its own (weights inherited from the supernet), in place.

    Weight sharing leaves the children of a supernet short of what they reach trained alone; Once-for-All
    (Cai et al., ICLR 2020, §4) reports its specialized sub-networks also after a short fine-tuning.
    ``train_x``: (N, C, H, W) float32 in [0, 1]; ``train_y``: (N,) int64; ``teacher_logits``: (N, classes)
    float32 of the teacher on the same images (no augmentation, so they stay valid), mixed in as
    knowledge distillation with ``settings.kd_weight``. Deterministic for a seed on one machine.
    Returns ``net`` in eval mode.
    """
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    opt = torch.optim.AdamW(net.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    steps_per_epoch = max(1, len(train_x) // settings.batch_size)
    total = settings.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, total)
    x_all, y_all = torch.from_numpy(train_x), torch.from_numpy(train_y)
    soft_all = None if teacher_logits is None else F.softmax(torch.from_numpy(teacher_logits), dim=1)
    kd = settings.kd_weight if soft_all is not None else 0.0

    def batch_loss(idx: torch.Tensor) -> torch.Tensor:
        logits = net(x_all[idx])
        loss = (1 - kd) * F.cross_entropy(logits, y_all[idx])
        if kd:
            loss = loss + kd * F.kl_div(F.log_softmax(logits, dim=1), soft_all[idx], reduction="batchmean")
        return loss
    return fit_minibatches(net, len(train_x), settings.epochs, settings.batch_size, rng, batch_loss, opt, sched,
                           on_step)


def one_cycle(opt: torch.optim.Optimizer, lr: float, total_steps: int, last_epoch: int = -1):
    """PyTorch's one-cycle schedule (Smith & Topin 2019) over ``total_steps`` optimizer steps, warming up for 10 %
    of them — at least two steps, so a short run (exactly 10 steps divided by zero in ``OneCycleLR``) works."""
    total_steps = max(total_steps, 1)
    pct = min(0.5, max(0.1, 2 / total_steps)) if total_steps >= 4 else 0.1
    return torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=total_steps, pct_start=pct, last_epoch=last_epoch)


def fit_minibatches(net: torch.nn.Module, n: int, epochs: int, batch_size: int, rng: np.random.Generator,
                    batch_loss: Callable[[torch.Tensor], torch.Tensor], opt: torch.optim.Optimizer, sched,
                    on_step: Callable[[int, int, float], None] | None = None) -> torch.nn.Module:
    """The plain training loop: ``epochs`` passes over ``n`` items in minibatches of ``batch_size`` (a new
    ``rng`` permutation each epoch, the remainder dropped); per batch ``batch_loss(idx)`` (idx: int64
    tensor of item indices) → scalar loss, backward, ``opt`` and ``sched`` step, ``on_step(step, total,
    loss)``. Returns ``net`` in eval mode."""
    steps_per_epoch = max(1, n // batch_size)
    total, step = epochs * steps_per_epoch, 0
    net.train()
    for _ in range(epochs):
        order = torch.from_numpy(rng.permutation(n))
        for i in range(steps_per_epoch):
            loss = batch_loss(order[i * batch_size:(i + 1) * batch_size])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if on_step:
                on_step(step, total, loss.item())
    return net.eval()


def save_weights(net: torch.nn.Module, path: Path, meta: dict, record: dict | None = None) -> Path:
    """``net``'s state as ``path`` (safetensors, metadata = ``meta`` as JSON, and ``record``, what to remember
    of how they were made, read back by :func:`weights_record`), written atomically.
    Raises :class:`ModelError` when it cannot be written (nothing is left behind)."""
    from safetensors import SafetensorError

    tmp = path.with_name(f"{TMP_PREFIX}{path.name}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp),
                  metadata={"edgec": json.dumps(meta, sort_keys=True), "edgec_record": json.dumps(record or {})})
        os.replace(tmp, path)
    except BaseException as e:  # an interrupt included: nothing half-written is left
        tmp.unlink(missing_ok=True)
        if isinstance(e, (OSError, SafetensorError)):  # safetensors reports I/O errors as its own type
            raise ModelError(f"cannot write the fine-tuned weights {path}", getattr(e, "strerror", None) or str(e),
                             "make that folder writable or remove what is in the way, or free some space") from None
        raise
    return path


def weights_record(path: Path) -> dict:
    """The ``record`` :func:`save_weights` stored with ``path`` ({} when there is none or it is unreadable)."""
    from safetensors import safe_open

    if not path.is_file():
        return {}
    try:
        with safe_open(str(path), framework="pt") as f:
            record = json.loads((f.metadata() or {}).get("edgec_record", "{}"))
    except Exception:  # torn or foreign: nothing to remember
        return {}
    return record if isinstance(record, dict) else {}


def load_weights(net: torch.nn.Module, path: Path, meta: dict) -> bool:
    """Load what :func:`save_weights` wrote into ``net`` when its metadata equals ``meta``; False when
    the file is missing, damaged, of another shape or written with other settings (never unpickles)."""
    from safetensors import safe_open

    if not path.is_file():  # missing, or a folder / FIFO / device in its place: never opened
        return False
    try:
        with safe_open(str(path), framework="pt") as f:
            if json.loads((f.metadata() or {}).get("edgec", "null")) != json.loads(json.dumps(meta, sort_keys=True)):
                return False
        tensors = load_file(str(path))
    except Exception:  # missing, torn or foreign: fine-tune again
        return False
    own = net.state_dict()
    if set(tensors) != set(own) or any(tensors[k].shape != own[k].shape for k in own) or not all(
            torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point()):
        return False  # checked first: a failed load_state_dict can leave some tensors copied; NaN weights retrain
    net.load_state_dict(tensors)
    return True


def write_atomically(directory: Path, names: tuple[str, ...], write: Callable[[Path], None], what: str) -> None:
    """``write(tmp)`` into a fresh ``.tmp-`` folder of ``directory``, then move ``names`` into ``directory`` in
    that order (the last says the others are complete). Raises :class:`ModelError` when they cannot be written
    (a full disk, a read-only folder); no ``.tmp-`` folder is left behind, an interrupt included, nor
    ``directory`` when this call created it and it stayed empty."""
    from safetensors import SafetensorError

    created, tmp = not directory.exists(), None
    try:
        directory.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=directory, prefix=TMP_PREFIX))
        write(tmp)
        for name in names:
            os.chmod(tmp / name, 0o644)
            os.replace(tmp / name, directory / name)
        tmp.rmdir()
    except BaseException as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if created:
            try:
                directory.rmdir()
            except OSError:
                pass  # not empty (or never made): leave it
        if isinstance(e, (OSError, SafetensorError)):  # safetensors reports I/O errors as its own type
            raise ModelError(f"cannot write {what} into {directory}", getattr(e, "strerror", None) or str(e),
                             "free some space or make that folder writable (the cache: set EDGEC_CACHE_DIR)") from None
        raise


def save_checkpoint(net: Supernet, settings: TrainSettings, directory: Path, extra: dict | None = None) -> Path:
    """Write ``supernet.safetensors`` + ``supernet.json`` into ``directory`` atomically
    (:func:`write_atomically`, which raises :class:`ModelError`)."""
    def write(tmp: Path) -> None:
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp / "supernet.safetensors"))
        meta = {"format": CHECKPOINT_FORMAT, "spec": net.spec.to_dict(), "train": settings.to_dict(), **(extra or {})}
        (tmp / "supernet.json").write_text(json.dumps(meta, indent=2))

    write_atomically(directory, ("supernet.safetensors", "supernet.json"), write, "the supernet checkpoint")
    return directory


def load_checkpoint(directory: Path) -> tuple[Supernet, dict]:
    """Load a supernet written by :func:`save_checkpoint`. Raises :class:`ModelError`."""
    try:
        meta = json.loads((directory / "supernet.json").read_text())
        spec = SupernetSpec.from_dict(meta["spec"])
        net = Supernet(spec)
        net.load_state_dict(load_file(str(directory / "supernet.safetensors")))
    except Exception as e:  # a corrupt file can raise almost anything (SafetensorError, TypeError, …)
        raise ModelError(f"cannot load supernet checkpoint {directory}", f"{type(e).__name__}: {e}",
                         "delete that folder to retrain") from None
    return net.eval(), meta
