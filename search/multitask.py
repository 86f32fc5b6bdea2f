"""A multi-task CNN (shared encoder, classification head, dense reconstruction head) and its tasks.

The model PAGCP prunes when one backbone serves two tasks (issue: channel pruning for
multi-task CNNs). One input ``x: (B, 1, H, W) float32 in [0, 1]`` (H, W multiples of
4), two outputs:

- ``logits (B, classes)`` — 10-class classification (cross-entropy; accuracy);
- ``reconstruction (B, 1, H, W)`` in [0, 1] — the input image rebuilt from the
  encoder's (H/4, W/4) features by a small decoder (MSE; PSNR in dB with peak 1).

Encoder: stem conv → stride-2 conv → residual block (two 3×3 convs + identity) →
stride-2 conv → MBConv (1×1 expand, 3×3 depthwise, 1×1 project + identity).
Decoder: 2× nearest upsampling + conv, twice, then a 3×3 conv to one channel and
a sigmoid. The residual adds and the depthwise conv couple channels, which is what
the pruning has to respect (Torch-Pruning's dependency graph does).

Every conv's output width lives in :attr:`MultiTaskNet.channels`, so a pruned model
is rebuilt from its channel dict and a safetensors file — never from a pickle.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from edgec.errors import ModelError
from edgec.search.train import fit_minibatches, one_cycle, write_atomically

# Output width of every conv whose width is free to prune. Residual partners take
# their width from the layer they add to (res.conv2 = down1, mbconv.project = down2).
DEFAULT_CHANNELS = {"stem": 32, "down1": 64, "res.conv1": 64, "down2": 128, "mbconv.expand": 256,
                    "dec1": 64, "dec2": 32}
RECON_WEIGHT = 10.0  # training loss = cross-entropy + this × reconstruction MSE (MSE is ~0.01 on these images)


def _conv_bn(cin: int, cout: int, stride: int = 1, groups: int = 1, kernel: int = 3, act: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
                               nn.BatchNorm2d(cout)]
    if act:
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class ResidualBlock(nn.Module):
    """3×3 conv → BN → ReLU → 3×3 conv → BN, plus the input, then ReLU: (B, C, H, W) → same."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.conv1 = _conv_bn(channels, hidden)
        self.conv2 = _conv_bn(hidden, channels, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.conv2(self.conv1(x)))


class MBConv(nn.Module):
    """Inverted residual (MobileNetV2, Sandler et al. 2018, §3.3): 1×1 expand → 3×3 depthwise → 1×1 project, + input."""

    def __init__(self, channels: int, expanded: int) -> None:
        super().__init__()
        self.expand = _conv_bn(channels, expanded, kernel=1)
        self.depthwise = _conv_bn(expanded, expanded, groups=expanded)
        self.project = _conv_bn(expanded, channels, kernel=1, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.project(self.depthwise(self.expand(x)))


class Encoder(nn.Module):
    def __init__(self, ch: dict[str, int]) -> None:
        super().__init__()
        self.stem = _conv_bn(1, ch["stem"])
        self.down1 = _conv_bn(ch["stem"], ch["down1"], stride=2)
        self.res = ResidualBlock(ch["down1"], ch["res.conv1"])
        self.down2 = _conv_bn(ch["down1"], ch["down2"], stride=2)
        self.mbconv = MBConv(ch["down2"], ch["mbconv.expand"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mbconv(self.down2(self.res(self.down1(self.stem(x)))))


class Decoder(nn.Module):
    """(B, C, H/4, W/4) features → (B, 1, H, W) image in [0, 1]."""

    def __init__(self, ch: dict[str, int]) -> None:
        super().__init__()
        self.dec1 = _conv_bn(ch["down2"], ch["dec1"])
        self.dec2 = _conv_bn(ch["dec1"], ch["dec2"])
        self.out = nn.Conv2d(ch["dec2"], 1, 3, 1, 1)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        f = self.dec1(F.interpolate(f, scale_factor=2.0, mode="nearest"))
        f = self.dec2(F.interpolate(f, scale_factor=2.0, mode="nearest"))
        return torch.sigmoid(self.out(f))


class MultiTaskNet(nn.Module):
    """Shared encoder + classification head + reconstruction decoder.

    ``forward(x (B, 1, H, W) float32) → (logits (B, num_classes), reconstruction (B, 1, H, W))``.
    ``channels`` overrides :data:`DEFAULT_CHANNELS` per layer (a pruned model's widths).
    """

    OUTPUT_NAMES = ("logits", "reconstruction")

    def __init__(self, num_classes: int = 10, channels: dict[str, int] | None = None) -> None:
        super().__init__()
        ch = {**DEFAULT_CHANNELS, **(channels or {})}
        self.num_classes = num_classes
        self.encoder = Encoder(ch)
        self.classifier = nn.Linear(ch["down2"], num_classes)
        self.decoder = Decoder(ch)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.encoder(x)
        return self.classifier(f.mean(dim=(2, 3))), self.decoder(f)

    @property
    def channels(self) -> dict[str, int]:
        """Output width per free layer, read off the (possibly pruned) convs."""
        e, d = self.encoder, self.decoder
        return {"stem": e.stem[0].out_channels, "down1": e.down1[0].out_channels,
                "res.conv1": e.res.conv1[0].out_channels, "down2": e.down2[0].out_channels,
                "mbconv.expand": e.mbconv.expand[0].out_channels, "dec1": d.dec1[0].out_channels,
                "dec2": d.dec2[0].out_channels}

    def output_layers(self) -> list[nn.Module]:
        """Layers whose outputs are the tasks' outputs; their output width is fixed."""
        return [self.classifier, self.decoder.out]


@dataclass(frozen=True)
class Task:
    """One task of a multi-task model: which output it reads and how it is scored.

    ``kind``: ``classification`` (integer labels; loss cross-entropy, metric accuracy in %)
    or ``dense`` (float targets shaped like the output; loss MSE, metric PSNR in dB, peak 1).
    """

    name: str
    kind: str
    output: int

    @property
    def metric(self) -> str:
        return "accuracy_pct" if self.kind == "classification" else "psnr_db"


METRIC_LABELS = {"accuracy_pct": "acc %", "psnr_db": "PSNR dB"}  # column labels of Task.metric
BUILTIN_TASKS = (Task("classification", "classification", 0), Task("reconstruction", "dense", 1))


def as_outputs(out) -> tuple:
    """A model's forward result as a tuple of its outputs (a lone tensor becomes a 1-tuple), so
    ``Task.output`` indexes it."""
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def task_loss(task: Task, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample loss (B,): cross-entropy, or the sample's mean squared error."""
    if task.kind == "classification":
        return F.cross_entropy(out, target, reduction="none")
    return F.mse_loss(out, target, reduction="none").flatten(1).mean(1)


@torch.no_grad()
def evaluate_tasks(model: nn.Module, x: np.ndarray, targets: dict[str, np.ndarray], tasks: tuple[Task, ...],
                   batch_size: int = 500) -> dict[str, dict[str, float]]:
    """Per task: mean ``loss`` and its ``metric`` (accuracy % or PSNR dB) on ``x`` (N, C, H, W) float32.

    ``targets[task.name]``: (N,) int64 labels or (N, ...) float32 images. PSNR is
    10·log10(1 / MSE) over the whole split (peak value 1).
    """
    model.eval()
    sums = {t.name: 0.0 for t in tasks}
    correct = {t.name: 0 for t in tasks}
    for i in range(0, len(x), batch_size):
        xb = torch.from_numpy(x[i:i + batch_size])
        outs = as_outputs(model(xb))
        for t in tasks:
            tb = torch.from_numpy(targets[t.name][i:i + batch_size])
            sums[t.name] += float(task_loss(t, outs[t.output], tb).sum())
            if t.kind == "classification":
                correct[t.name] += int((outs[t.output].argmax(1) == tb).sum())
    result = {}
    for t in tasks:
        loss = sums[t.name] / len(x)
        metric = (100.0 * correct[t.name] / len(x) if t.kind == "classification"
                  else 10 * math.log10(1.0 / max(loss, 1e-12)))
        result[t.name] = {"loss": loss, t.metric: metric}
    return result


def loss_weights(tasks: tuple[Task, ...], overrides: dict[str, float] | None = None) -> dict[str, float]:
    """{task: weight of its loss in training}: 1, :data:`RECON_WEIGHT` for a dense task, then ``overrides``."""
    return {t.name: (RECON_WEIGHT if t.kind == "dense" else 1.0) for t in tasks} | (overrides or {})


def train_multitask(model: nn.Module, x: np.ndarray, targets: dict[str, np.ndarray], tasks: tuple[Task, ...],
                    epochs: int, lr: float = 3e-3, batch_size: int = 128, seed: int = 0,
                    weights: dict[str, float] | None = None,
                    on_step: Callable[[int, int, float], None] | None = None,
                    teacher_logits: dict[str, np.ndarray] | None = None, kd_weight: float = 0.0) -> nn.Module:
    """Train (or fine-tune) on the sum of the tasks' losses: AdamW, one-cycle cosine schedule.

    ``x``: (N, C, H, W) float32; ``weights[task]`` scales a task's loss (default 1, and
    :data:`RECON_WEIGHT` for a dense task). ``teacher_logits[task]``: (N, classes) float32 of a
    teacher (the unpruned model) on the same images, for classification tasks: their loss becomes
    ``(1 − kd_weight) × cross-entropy + kd_weight × KL(teacher ‖ model)`` (knowledge distillation,
    Hinton et al., "Distilling the Knowledge in a Neural Network", 2015, §2, at temperature 1).
    Deterministic for a seed on one machine. ``on_step(step, total_steps, loss)`` reports progress.
    Returns ``model`` in eval mode.
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    w = loss_weights(tasks, weights)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps_per_epoch = max(1, len(x) // batch_size)
    total = epochs * steps_per_epoch
    sched = one_cycle(opt, lr, total)
    x_all = torch.from_numpy(x)
    t_all = {name: torch.from_numpy(v) for name, v in targets.items()}
    soft = {name: F.softmax(torch.from_numpy(v), dim=1) for name, v in (teacher_logits or {}).items()}

    def one(t: Task, out: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        loss = task_loss(t, out, t_all[t.name][idx]).mean()
        if kd_weight and t.name in soft:
            kl = F.kl_div(F.log_softmax(out, dim=1), soft[t.name][idx], reduction="batchmean")
            loss = (1 - kd_weight) * loss + kd_weight * kl
        return loss

    def batch_loss(idx: torch.Tensor) -> torch.Tensor:
        outs = as_outputs(model(x_all[idx]))
        return sum(w[t.name] * one(t, outs[t.output], idx) for t in tasks)
    return fit_minibatches(model, len(x), epochs, batch_size, rng, batch_loss, opt, sched, on_step)


def builtin_targets(x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
    """The built-in tasks' targets for images ``x`` (N, 1, H, W) and labels ``y`` (N,)."""
    return {"classification": y, "reconstruction": x}


CHECKPOINT_FORMAT = 1


def save_multitask(model: MultiTaskNet, directory: Path, meta: dict) -> Path:
    """Write ``model.safetensors`` + ``model.json`` (channels, classes, ``meta``) into ``directory`` atomically
    (:func:`edgec.search.train.write_atomically`, which raises :class:`ModelError`)."""
    def write(tmp: Path) -> None:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
        info = {"format": CHECKPOINT_FORMAT, "channels": model.channels, "num_classes": model.num_classes, **meta}
        (tmp / "model.json").write_text(json.dumps(info, indent=2))

    # weights first, then the JSON that says they are complete
    write_atomically(directory, ("model.safetensors", "model.json"), write, "the multi-task model")
    return directory


def load_multitask(directory: str | Path) -> tuple[MultiTaskNet, dict]:
    """Rebuild a (possibly pruned) model written by :func:`save_multitask` in ``directory`` (``model.json`` +
    ``model.safetensors``; a path or a string). Raises :class:`ModelError` when they are missing or damaged."""
    directory = Path(directory)
    try:
        meta = json.loads((directory / "model.json").read_text())
        if meta.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"checkpoint format {meta.get('format')!r}, expected {CHECKPOINT_FORMAT}")
        channels = {k: int(v) for k, v in meta["channels"].items()}
        if set(channels) != set(DEFAULT_CHANNELS) or not all(0 < v <= 4096 for v in channels.values()):
            raise ValueError(f"bad channel widths {channels}")
        model = MultiTaskNet(int(meta["num_classes"]), channels)
        model.load_state_dict(load_file(str(directory / "model.safetensors")))
    except Exception as e:  # a damaged file can raise almost anything
        raise ModelError(f"cannot load multi-task checkpoint {directory}", f"{type(e).__name__}: {e}",
                         "check that the folder holds model.json and model.safetensors written by edgec") from None
    return model.eval(), meta


def cache_key(settings: dict, x: np.ndarray, y: np.ndarray) -> str:
    """SHA-256 (16 hex digits) of the architecture, the training settings and the training data."""
    h = hashlib.sha256()
    h.update(json.dumps({"channels": DEFAULT_CHANNELS, "train": settings, "recon_weight": RECON_WEIGHT,
                         "format": CHECKPOINT_FORMAT}, sort_keys=True).encode())
    h.update(np.ascontiguousarray(x).tobytes())
    h.update(np.ascontiguousarray(y).tobytes())
    return h.hexdigest()[:16]
