"""Performance-aware global channel pruning (PAGCP) for multi-task models.

Ye et al., "Performance-aware Approximation of Global Channel Pruning for Multitask
CNNs", TPAMI 2023, §3 (sequential greedy layer-wise pruning under a per-task
performance oracle, §3.2–3.3):

1. Coupled channel groups (residual adds, depthwise convs, concatenations) come from
   Torch-Pruning's dependency graph (Fang et al., "DepGraph", CVPR 2023); a group is
   named by its root conv and pruned — physically — as one.
2. Groups are visited by their FLOPs contribution, largest first (the MACs of every
   layer in the group).
3. For each group the pruning ratio rises in steps; a step passes when **every**
   task's loss on the validation data stays within ``(1 + τ_l)`` of the reference
   model's loss for that task — each task checked on its own, never summed. The last
   ratio that passed is committed and the pruned model becomes the new reference.
4. The per-layer threshold tightens geometrically, ``τ_l = τ_0 · decay^l``, with
   ``τ_0`` solved so that ``Π_l (1 + τ_l) = 1 + loss_budget``: the product of the
   per-layer budgets meets the global loss budget.
5. Within a group the channels with the smallest importance go first: the group's
   L1 (or L2) filter norm summed over its coupled layers (Torch-Pruning's
   ``GroupMagnitudeImportance``), or ``taylor``: the first-order Taylor estimate of the
   loss change when the channel is removed (Molchanov et al., "Importance Estimation for
   Neural Network Pruning", CVPR 2019, §3) — per minibatch, Torch-Pruning's
   ``GroupTaylorImportance(multivariable=True)``: for each coupled conv/linear layer
   ``|Σ w·∂L/∂w|`` over the channel's weights in that layer, averaged over the group's layers
   (batch-norm parameters are not counted) — squared and summed over the minibatches; computed
   for each task on its own, normalized by its mean over the group's channels, and the largest
   over the tasks kept — a channel one task needs is important, whatever the others say (the
   per-task view of step 3).

Kept channel counts are multiples of ``round_to`` (default 8): ONNX Runtime's CPU convolutions
run in a channel-blocked layout (NCHWc, 16 channels a block with AVX-512, else 8), padding other
widths to the next multiple, and measured here (cpu-ort, AMD EPYC, 2 threads) the multi-task
model with 40% fewer channels at odd widths was 1.2× faster on 28×28 inputs and 1.75×
*slower* on 8×8 inputs, but 2.1× and 1.5× faster at multiples of 8. On this AVX-512 host
widths that are multiples of 8 but not 16 run as fast as the next multiple of 16 (the fashion
model pruned to 24/40/56-wide convs: 335 µs; rounded up to 16: 336 µs), yet ``round_to=16``
made the steps too coarse for the raw loss oracle there (17.5 % of the FLOPs removed instead of
60 %, 1.17× instead of 1.65×); with ``adapt`` (below) the same widths reached 63 % and 2.2×. A
step whose rounded width equals the previous one is skipped.

With a FLOPs target, pruning stops as soon as that share of the FLOPs is gone; when a
pass over all groups ends short of it another pass starts (up to ``max_passes``): after
a short recovery fine-tuning if the pass removed channels and a ``recover`` callable is
given (iterative pruning with retraining, Han et al., "Learning both Weights and
Connections", NeurIPS 2015, §3.3); the loss budget doubles for the next pass when a pass
removed less than ``min_pass_reduction`` of the original FLOPs, up to ``max_budget_growth``
times ``loss_budget`` — beyond that the target is reported as not reached rather than
bought with an unbounded loss. The paper's optional second step (keeping only the
layers with the best loss-per-FLOP ratio) is not implemented.

Short-term fine-tuning of each trial (``adapt``, optional). Step 3 reads the losses right after
the channels are gone. On a small network with a dense task that view is far too pessimistic:
on the Fashion-MNIST multi-task model, cutting ``dec1`` from 64 to 48 channels multiplies the
reconstruction loss by 1.66 (after BN recalibration), and 50 fine-tuning steps bring it back
to 1.07; ``dec2`` at 16 of 32 reads 11.2× raw and 1.6× after them. The raw oracle therefore
refuses steps that a fine-tuning would absorb, and takes small ones a runtime does not reward.
With ``adapt`` (a short fine-tuning, in place), each trial is fine-tuned before the oracle reads
it — NetAdapt's "short-term fine-tune" of every proposal (Yang et al., "NetAdapt:
Platform-Aware Neural Network Adaptation for Mobile Applications", ECCV 2018, §3.2) — and it is
compared with a *control*: a copy of the unpruned reference fine-tuned the same way, so the
fine-tuning's own drift (50 steps at lr 1e-3 move the classification loss by up to +15 % on a
converged model) cancels out. A committed step keeps its fine-tuned weights.

The search knows no data: the caller hands in ``evaluate(model) → {task: loss}``.
Losses must be positive and lower-is-better. FLOPs here are multiply-accumulates
(MACs) as Torch-Pruning's ``count_ops_and_params`` counts them; reductions are
fractions, which are the same for MACs and FLOPs.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator

import torch
import torch.nn as nn

from edgec.errors import ConfigError

IMPORTANCES = ("l1", "l2", "taylor")


@dataclass(frozen=True)
class PagcpSettings:
    """PAGCP settings (see the module docstring for where each enters the algorithm)."""

    step: float = 0.05                 # pruning-ratio increment per trial, fraction of the group's channels
    max_ratio: float = 0.9             # never remove more than this share of one group's channels in a pass
    loss_budget: float = 0.3           # every task's loss may rise to (1 + this) × its reference over one pass
    decay: float = 0.8                 # per-layer threshold τ_l = τ_0 · decay^l (l = visiting order)
    flops_target: float | None = None  # stop once this fraction of the FLOPs is removed
    max_passes: int = 4                # with flops_target: passes over all groups (see above)
    min_pass_reduction: float = 0.05   # a pass removing less than this share of the FLOPs doubles the loss budget
    max_budget_growth: float = 32.0    # ... up to this multiple of loss_budget; then pruning stops short of the target
    importance: str = "l1"             # l1 | l2 filter norm of the coupled group | taylor (needs gradients)
    round_to: int = 8                  # kept channels are a multiple of this (runtime-friendly widths, see above)

    def __post_init__(self) -> None:
        checks = [(0 < self.step <= 0.5, "step", "between 0 and 0.5"),
                  (0 < self.max_ratio < 1, "max_ratio", "between 0 and 1 (exclusive)"),
                  (self.loss_budget > 0, "loss_budget", "> 0"),
                  (0 < self.decay <= 1, "decay", "in (0, 1]"),
                  (self.flops_target is None or 0 < self.flops_target < 1, "flops_target", "between 0 and 1 (exclusive)"),
                  (self.max_passes >= 1, "max_passes", "≥ 1"),
                  (0 <= self.min_pass_reduction < 1, "min_pass_reduction", "in [0, 1)"),
                  (1 <= self.max_budget_growth <= 1e6, "max_budget_growth", "in [1, 1e6]"),
                  (self.importance in IMPORTANCES, "importance", f"one of {', '.join(IMPORTANCES)}"),
                  (isinstance(self.round_to, int) and 1 <= self.round_to <= 256, "round_to", "an integer in 1..256")]
        for ok, name, rule in checks:
            if not ok:
                raise ConfigError(f"bad pruning setting {name}={getattr(self, name)!r}", f"it must be {rule}",
                                  f"fix {name}")

    def to_dict(self) -> dict:
        return asdict(self)


def layer_thresholds(n_layers: int, loss_budget: float, decay: float) -> list[float]:
    """τ_l = τ_0 · decay^l for l < n_layers with Π (1 + τ_l) = 1 + loss_budget (τ_0 by bisection)."""
    lo, hi = 0.0, loss_budget
    for _ in range(100):
        mid = (lo + hi) / 2
        prod = 1.0
        for i in range(n_layers):
            prod *= 1 + mid * decay ** i
        lo, hi = (mid, hi) if prod < 1 + loss_budget else (lo, mid)
    return [lo * decay ** i for i in range(n_layers)]


@dataclass
class LayerStep:
    """What happened to one group in one pass."""

    layer: str
    pass_index: int
    channels_before: int
    channels_after: int
    ratio: float              # share of the group's channels removed in this step
    threshold: float          # τ_l: allowed relative loss rise per task
    stopped_by: str           # a task's name, "max_ratio" or "flops_target"
    losses: dict[str, float]  # task losses of the committed model
    macs_after: int
    trials: int
    budget: float = 0.0       # the pass's global loss budget
    reference: dict[str, float] = field(default_factory=dict)  # the losses the trials were held against

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class PruneResult:
    model: nn.Module
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    steps: list[LayerStep] = field(default_factory=list)
    reference_losses: dict[str, float] = field(default_factory=dict)
    passes: int = 0
    recoveries: int = 0       # fine-tunings between passes
    # why the passes ended: "one_pass" (no FLOPs target) | "flops_target" (met) | "loss_budget" (its growth cap
    # reached) | "max_passes"
    stopped_by: str = "one_pass"

    @property
    def flops_reduction(self) -> float:
        """Fraction of the FLOPs (MACs) removed, 0..1."""
        return 1 - self.macs_after / self.macs_before


def count_macs(model: nn.Module, example_input: torch.Tensor) -> tuple[int, int]:
    """(MACs, parameters) of one forward pass on ``example_input`` (Torch-Pruning's counter)."""
    import torch_pruning as tp

    macs, params = tp.utils.count_ops_and_params(model, example_input)
    return int(macs), int(params)


def _dependency_graph(model: nn.Module, example_input: torch.Tensor):
    import torch_pruning as tp

    return tp.DependencyGraph().build_dependency(model, example_inputs=example_input)


def prunable_groups(model: nn.Module, example_input: torch.Tensor,
                    ignored_layers: list[nn.Module]) -> dict[str, int]:
    """{root layer name: channels} of every coupled conv group whose output width may shrink."""
    dg = _dependency_graph(model, example_input)
    names = {m: n for n, m in model.named_modules()}
    groups = dg.get_all_groups(ignored_layers=ignored_layers, root_module_types=[nn.Conv2d])
    return {names[g[0].dep.target.module]: g[0].dep.target.module.out_channels for g in groups}


def group_macs(model: nn.Module, example_input: torch.Tensor, ignored_layers: list[nn.Module]) -> dict[str, int]:
    """{root layer name: MACs of every layer the group touches} — the group's FLOPs contribution."""
    import torch_pruning as tp

    _, _, layer_macs, _ = tp.utils.count_ops_and_params(model, example_input, layer_wise=True)
    dg = _dependency_graph(model, example_input)
    names = {m: n for n, m in model.named_modules()}
    out = {}
    for g in dg.get_all_groups(ignored_layers=ignored_layers, root_module_types=[nn.Conv2d]):
        modules = {item.dep.target.module for item in g}
        out[names[g[0].dep.target.module]] = int(sum(layer_macs.get(m) or 0 for m in modules
                                                     if isinstance(m, (nn.Conv2d, nn.Linear))))
    return out


TaskBackward = Callable[[nn.Module], Iterator[str]]
"""``backward(model)`` for Taylor importance: for each (minibatch, task) it zeroes ``model``'s gradients,
back-propagates that task's loss on that minibatch (model in eval mode) and yields the task's name."""


def _no_gradients() -> ConfigError:
    return ConfigError("taylor importance needs gradients", "the caller gave no task losses to back-propagate",
                       "pass backward=… or use importance l1")


def channel_importance(model: nn.Module, layer: str, example_input: torch.Tensor, importance: str = "l1",
                       backward: TaskBackward | None = None) -> torch.Tensor:
    """Importance of each output channel of ``layer``'s coupled group, shape (out_channels,) float32
    (higher = keep); see the module docstring, step 5. ``taylor`` needs ``backward`` (raises
    :class:`ConfigError` without it) and leaves ``model``'s gradients cleared."""
    import torch_pruning as tp

    module = dict(model.named_modules())[layer]
    dg = _dependency_graph(model, example_input)
    group = dg.get_pruning_group(module, tp.prune_conv_out_channels, idxs=list(range(module.out_channels)))
    if importance != "taylor":
        return tp.importance.GroupMagnitudeImportance(p=1 if importance == "l1" else 2)(group).float()
    if backward is None:
        raise _no_gradients()
    taylor = tp.importance.GroupTaylorImportance(multivariable=True, normalizer=None)
    per_task: dict[str, torch.Tensor] = {}
    try:
        for task in backward(model):
            for p in model.parameters():  # a layer off this task's path (another task's head) has no gradient
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            score = taylor(group).detach().double() ** 2
            per_task[task] = per_task.get(task, 0) + score
    finally:
        model.zero_grad(set_to_none=True)
    if not per_task:
        raise ConfigError("taylor importance got no gradients", "backward(model) yielded no task", "check backward")
    normalized = [torch.where(s.mean() > 0, s / s.mean(), torch.zeros_like(s)) for s in per_task.values()]
    return torch.stack(normalized).max(0).values.float()


def prune_group(model: nn.Module, layer: str, n_remove: int, example_input: torch.Tensor,
                importance: str = "l1", order: list[int] | None = None) -> nn.Module:
    """Remove ``n_remove`` output channels of ``layer``'s group from ``model`` in place, physically.

    The first ``n_remove`` of ``order`` (channel indices, least important first) go; without it,
    the channels with the smallest L1/L2 group norm (:func:`channel_importance`). Returns ``model``.
    """
    import torch_pruning as tp

    if n_remove <= 0:
        return model
    if order is None:
        order = torch.argsort(channel_importance(model, layer, example_input, importance)).tolist()
    module = dict(model.named_modules())[layer]
    group = _dependency_graph(model, example_input).get_pruning_group(module, tp.prune_conv_out_channels,
                                                                     idxs=list(order[:n_remove]))
    group.prune()
    return model


def _removable(channels: int, ratio: float, settings: PagcpSettings) -> int:
    """Channels to remove for ``ratio`` of ``channels``, within ``max_ratio``; for layers at least
    ``round_to`` wide the kept count is a multiple of ``round_to`` (at least ``round_to``)."""
    r = settings.round_to
    min_keep = max(1, channels - int(settings.max_ratio * channels))
    keep = max(min_keep, channels - int(round(ratio * channels)))
    if channels >= r:
        keep = min(channels, max(r, keep // r * r, -(-min_keep // r) * r))
    return channels - keep


def output_layer_names(model: nn.Module, example_input: torch.Tensor) -> set[str]:
    """Names of the group roots whose output width is a model output's width: pruning one channel of their
    group would change an output's shape (found by trying it on a copy), or they have one channel."""
    from edgec.search.multitask import as_outputs

    def shapes(m: nn.Module) -> list:
        with torch.no_grad():
            out = m(example_input)
        return [o.shape for o in as_outputs(out)]

    reference = shapes(model)
    return {name for name, channels in prunable_groups(model, example_input, []).items()
            if channels < 2 or shapes(prune_group(copy.deepcopy(model), name, 1, example_input)) != reference}


def layers_named(names: set[str]) -> Callable[[nn.Module], list[nn.Module]]:
    """An ``ignored_layers`` callable for :func:`pagcp`: the modules of a (pruned) model with these names."""
    return lambda m: [module for name, module in m.named_modules() if name in names]


def pagcp(model: nn.Module, example_input: torch.Tensor, evaluate: Callable[[nn.Module], dict[str, float]],
          ignored_layers: Callable[[nn.Module], list[nn.Module]], settings: PagcpSettings,
          on_trial: Callable[[str, float, dict[str, float]], None] | None = None,
          recover: Callable[[nn.Module], None] | None = None, backward: TaskBackward | None = None,
          adapt: Callable[[nn.Module], None] | None = None) -> PruneResult:
    """Prune ``model`` (left untouched; a copy is pruned) with PAGCP; see the module docstring.

    ``example_input``: one batch-1 input, e.g. (1, 1, 28, 28) float32. ``evaluate(m)``:
    {task name: validation loss > 0} of model ``m`` (eval mode). ``ignored_layers(m)``: the
    layers of ``m`` whose output width must stay (the task heads' last layers).
    ``on_trial(layer, ratio, losses)`` sees every trial. ``recover(m)``, when given, trains
    ``m`` in place between passes (a short fine-tuning) before the next pass measures its
    reference losses anew. ``backward``: the tasks' gradients for ``importance="taylor"``
    (:data:`TaskBackward`). ``adapt(m)``, when given, fine-tunes ``m`` in place for a few steps; every
    trial and a control copy of the reference get it before the oracle reads them (see the module
    docstring). Raises :class:`ConfigError` for a model with nothing to prune, or for Taylor importance
    without ``backward``.
    """
    if settings.importance == "taylor" and backward is None:
        raise _no_gradients()
    current = copy.deepcopy(model).eval()
    macs0, params0 = count_macs(current, example_input)
    reference = evaluate(current)
    # stopped_by: what ends the passes unless a reason below comes first
    result = PruneResult(current, macs0, macs0, params0, params0, reference_losses=dict(reference),
                         stopped_by="max_passes" if settings.flops_target else "one_pass")
    target_macs = macs0 * (1 - settings.flops_target) if settings.flops_target else None
    budget, macs = settings.loss_budget, macs0
    for pass_index in range(settings.max_passes if settings.flops_target else 1):
        contributions = group_macs(current, example_input, ignored_layers(current))
        if not contributions:
            raise ConfigError("nothing to prune", "the model has no conv layer whose output width may shrink",
                              "pass a model with prunable conv layers")
        order = sorted(contributions, key=lambda n: -contributions[n])
        thresholds = layer_thresholds(len(order), budget, settings.decay)
        result.passes = pass_index + 1
        pruned_any, macs_at_start = False, macs
        for layer, tau in zip(order, thresholds):
            step, pruned, reached = _prune_layer(current, macs, layer, tau, example_input, evaluate, reference,
                                                 settings, target_macs, pass_index, on_trial, backward, adapt)
            step.budget = budget
            result.steps.append(step)
            if pruned is not None:  # commit: the pruned model is the new reference
                current, reference, pruned_any, macs = pruned, step.losses, True, step.macs_after
            if reached:
                break
        if target_macs is None:
            break
        if macs <= target_macs:
            result.stopped_by = "flops_target"
            break
        if macs_at_start - macs < settings.min_pass_reduction * macs0:
            if budget * 2 > settings.loss_budget * settings.max_budget_growth:
                result.stopped_by = "loss_budget"
                break  # the loss budget may not grow further: the FLOPs target is out of reach
            budget *= 2  # (almost) nothing passed at this budget: allow more loss next pass
        if pruned_any and recover is not None:
            recover(current)
            current.eval()
            reference = evaluate(current)
            result.recoveries += 1
    result.model = current
    result.macs_after, result.params_after = count_macs(current, example_input)
    return result


def _prune_layer(current: nn.Module, current_macs: int, layer: str, tau: float, example_input: torch.Tensor,
                 evaluate: Callable[[nn.Module], dict[str, float]], reference: dict[str, float],
                 settings: PagcpSettings, target_macs: float | None, pass_index: int,
                 on_trial, backward: TaskBackward | None = None,
                 adapt: Callable[[nn.Module], None] | None = None) -> tuple[LayerStep, nn.Module | None, bool]:
    """Raise ``layer``'s ratio step by step under the per-task oracle (channels ranked once, on ``current``).
    With ``adapt``, trials are fine-tuned and held against a fine-tuned control (made before the first trial).

    Returns the step's record, the pruned model to commit (None when no step passed) and
    whether the FLOPs target was reached."""
    channels = dict(current.named_modules())[layer].out_channels
    order: list[int] | None = None  # ranked on the first trial, so a layer with no step left costs nothing
    best_model, best_losses, best_n, stopped_by, reached, trials = None, dict(reference), 0, "max_ratio", False, 0
    held_against = dict(reference)
    k = 1
    while True:
        n_remove = _removable(channels, k * settings.step, settings)
        if n_remove <= best_n:
            if k * settings.step < settings.max_ratio:  # rounding made this step equal to the last: take a bigger one
                k += 1
                continue
            break  # no further step possible within max_ratio
        if order is None:
            order = torch.argsort(channel_importance(current, layer, example_input, settings.importance,
                                                     backward)).tolist()
            if adapt is not None:  # the control: the reference fine-tuned as the trials will be
                control = copy.deepcopy(current)
                adapt(control)
                held_against = evaluate(control)
        trial = prune_group(copy.deepcopy(current), layer, n_remove, example_input, order=order)
        if adapt is not None:
            adapt(trial)
        losses = evaluate(trial)
        trials += 1
        if on_trial:
            on_trial(layer, n_remove / channels, losses)
        failed = [t for t, v in losses.items() if v > (1 + tau) * held_against[t]]
        if failed:
            stopped_by = max(failed, key=lambda t: losses[t] / reference[t])
            break
        best_model, best_losses, best_n = trial, losses, n_remove
        current_macs = count_macs(trial, example_input)[0]
        if target_macs is not None and current_macs <= target_macs:
            stopped_by, reached = "flops_target", True
            break
        k += 1
    step = LayerStep(layer, pass_index, channels, channels - best_n, best_n / channels, tau, stopped_by,
                     best_losses, current_macs, trials, reference=held_against)
    return step, best_model, reached
