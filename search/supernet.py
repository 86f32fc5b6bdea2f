"""A weight-sharing MBConv supernet and the extraction of static subnets.

Elastic layers own the largest weights and slice them for the active choice
(Once-for-All, Cai et al. 2020, §3.2): output channels take the first ``c``
filters, input channels the first ``c`` inputs, and a smaller depthwise kernel is
the centre crop of the largest. Batch-norm layers slice their affine parameters
and running statistics the same way.

:func:`extract_subnet` copies the active slices into an ordinary static
``nn.Module`` (Conv2d/BatchNorm2d/Linear), so an exported subnet carries no dead
channels; in eval mode its outputs equal the supernet's for the same config.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from edgec.search.space import BlockConfig, SubnetConfig, SupernetSpec


class ConvBNAct(nn.Module):
    """Static conv → batch norm → optional ReLU; :meth:`fuse` folds the BN into the conv."""

    def __init__(self, conv: nn.Conv2d, bn: nn.Module, act: bool) -> None:
        super().__init__()
        self.conv, self.bn = conv, bn
        self.act = nn.ReLU() if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))

    def fuse(self) -> None:
        """Fold batch norm into the conv (eval-mode statistics); idempotent."""
        if isinstance(self.bn, nn.BatchNorm2d):
            self.conv = torch.nn.utils.fusion.fuse_conv_bn_eval(self.conv.eval(), self.bn.eval())
            self.bn = nn.Identity()


class ElasticConvBN(nn.Module):
    """Conv + BN holding the largest weights ``(max_out, max_in, max_k, max_k)``.

    ``forward(x, out_channels, kernel)`` takes ``x: (B, C_in, H, W)`` with any
    ``C_in ≤ max_in``; a depthwise layer's output width equals its input's.
    """

    def __init__(self, max_in: int, max_out: int, max_kernel: int, stride: int,
                 depthwise: bool = False, act: bool = True) -> None:
        super().__init__()
        self.max_kernel, self.stride, self.depthwise, self.act = max_kernel, stride, depthwise, act
        in_per_group = 1 if depthwise else max_in
        self.weight = nn.Parameter(torch.empty(max_out, in_per_group, max_kernel, max_kernel))
        nn.init.kaiming_normal_(self.weight, mode="fan_out", nonlinearity="relu")
        self.bn = nn.BatchNorm2d(max_out)

    def active_weight(self, in_channels: int, out_channels: int, kernel: int) -> torch.Tensor:
        start = (self.max_kernel - kernel) // 2
        crop = slice(start, start + kernel)
        if self.depthwise:
            return self.weight[:in_channels, :, crop, crop]
        return self.weight[:out_channels, :in_channels, crop, crop]

    def forward(self, x: torch.Tensor, out_channels: int | None = None, kernel: int | None = None) -> torch.Tensor:
        in_c = x.shape[1]
        out_c = in_c if self.depthwise else out_channels
        kernel = kernel or self.max_kernel
        w = self.active_weight(in_c, out_c, kernel)
        y = F.conv2d(x, w, None, self.stride, kernel // 2, 1, in_c if self.depthwise else 1)
        bn = self.bn
        y = F.batch_norm(y, bn.running_mean[:out_c], bn.running_var[:out_c], bn.weight[:out_c], bn.bias[:out_c],
                         self.training or not bn.track_running_stats, bn.momentum if bn.momentum is not None else 0.1,
                         bn.eps)
        return F.relu(y) if self.act else y

    def static(self, in_channels: int, out_channels: int | None = None, kernel: int | None = None) -> ConvBNAct:
        """An ordinary ``ConvBNAct`` with copies of the active slices."""
        out_c = in_channels if self.depthwise else out_channels
        kernel = kernel or self.max_kernel
        conv = nn.Conv2d(in_channels, out_c, kernel, self.stride, kernel // 2, bias=False,
                         groups=in_channels if self.depthwise else 1)
        bn = nn.BatchNorm2d(out_c, eps=self.bn.eps, momentum=self.bn.momentum)
        with torch.no_grad():
            conv.weight.copy_(self.active_weight(in_channels, out_c, kernel))
            for name in ("weight", "bias", "running_mean", "running_var"):
                getattr(bn, name).copy_(getattr(self.bn, name)[:out_c])
        return ConvBNAct(conv, bn, self.act)


class StaticMBConv(nn.Module):
    """Inverted residual: [1×1 expand] → k×k depthwise → 1×1 project (+ identity when shapes match)."""

    def __init__(self, expand: ConvBNAct | None, dw: ConvBNAct, project: ConvBNAct, residual: bool) -> None:
        super().__init__()
        self.expand, self.dw, self.project, self.residual = expand, dw, project, residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.expand(x) if self.expand is not None else x
        h = self.project(self.dw(h))
        return h + x if self.residual else h


class ElasticMBConv(nn.Module):
    """An MBConv block whose kernel, expansion and widths are chosen at forward time."""

    def __init__(self, max_in: int, max_out: int, stride: int, max_kernel: int, max_expansion: int) -> None:
        super().__init__()
        max_mid = max_in * max_expansion
        self.stride = stride
        self.expand = ElasticConvBN(max_in, max_mid, 1, 1)
        self.dw = ElasticConvBN(max_mid, max_mid, max_kernel, stride, depthwise=True)
        self.project = ElasticConvBN(max_mid, max_out, 1, 1, act=False)

    def forward(self, x: torch.Tensor, block: BlockConfig, out_channels: int) -> torch.Tensor:
        if block.skip:
            return x
        in_c = x.shape[1]
        h = self.expand(x, in_c * block.expansion) if block.expansion > 1 else x
        h = self.project(self.dw(h, kernel=block.kernel), out_channels)
        return h + x if self.stride == 1 and in_c == out_channels else h

    def static(self, in_channels: int, block: BlockConfig, out_channels: int) -> StaticMBConv:
        mid = in_channels * block.expansion
        expand = self.expand.static(in_channels, mid) if block.expansion > 1 else None
        return StaticMBConv(expand, self.dw.static(mid, kernel=block.kernel), self.project.static(mid, out_channels),
                            residual=self.stride == 1 and in_channels == out_channels)


class StaticNet(nn.Module):
    """An extracted subnet: ``(B, C, H, W) float32 → (B, num_classes) float32 logits``.

    Module paths are the stable layer names of :class:`~edgec.search.space.QuantPolicy`
    (``stem``, ``stages.<s>.<b>.expand|dw|project``, ``classifier``).
    """

    def __init__(self, stem: ConvBNAct, stages: nn.ModuleList, classifier: nn.Linear) -> None:
        super().__init__()
        self.stem, self.stages, self.classifier = stem, stages, classifier
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for stage in self.stages:
            for block in stage.values():
                x = block(x)
        return self.classifier(torch.flatten(self.pool(x), 1))

    def fused(self) -> "StaticNet":
        """A copy in eval mode with every batch norm folded into its conv (what is exported)."""
        net = copy.deepcopy(self).eval()
        for m in net.modules():
            if isinstance(m, ConvBNAct):
                m.fuse()
        return net


class Supernet(nn.Module):
    """The weight-sharing supernet of a :class:`SupernetSpec`.

    ``forward(x, config)``: ``x (B, in_channels, image_size, image_size) float32 → (B, num_classes)``.
    """

    def __init__(self, spec: SupernetSpec) -> None:
        super().__init__()
        self.spec = spec
        self.stem = ElasticConvBN(spec.in_channels, spec.stem_channels, 3, spec.stem_stride)
        self.stages = nn.ModuleList()
        in_c = spec.stem_channels
        for stage in spec.stages:
            max_out = max(stage.width_choices)
            blocks = nn.ModuleList()
            for bi in range(stage.num_blocks):
                blocks.append(ElasticMBConv(in_c, max_out, stage.stride if bi == 0 else 1, 5, 6))
                in_c = max_out
            self.stages.append(blocks)
        self.classifier = nn.Linear(in_c, spec.num_classes)

    def forward(self, x: torch.Tensor, config: SubnetConfig) -> torch.Tensor:
        x = self.stem(x, self.spec.stem_channels)
        blocks = iter(config.blocks)
        for stage, width in zip(self.stages, config.widths):
            for block in stage:
                x = block(x, next(blocks), width)
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        c = x.shape[1]
        return F.linear(x, self.classifier.weight[:, :c], self.classifier.bias)


def extract_subnet(supernet: Supernet, config: SubnetConfig) -> StaticNet:
    """Copy the weights ``config`` uses into an ordinary static :class:`StaticNet`.

    Raises :class:`~edgec.errors.ConfigError` when ``config`` does not fit the supernet.
    The result is in eval mode; call :func:`~edgec.search.train.recalibrate_bn` before
    evaluating it (the shared running statistics belong to no single subnet).
    """
    spec = supernet.spec
    spec.validate(config)
    stem = supernet.stem.static(spec.in_channels, spec.stem_channels)
    stages = nn.ModuleList()
    blocks = iter(config.blocks)
    in_c = spec.stem_channels
    for stage, width in zip(supernet.stages, config.widths):
        kept = nn.ModuleDict()
        for bi, elastic in enumerate(stage):
            block = next(blocks)
            if not block.skip:
                kept[str(bi)] = elastic.static(in_c, block, width)
                in_c = width
        stages.append(kept)
    classifier = nn.Linear(in_c, spec.num_classes)
    with torch.no_grad():
        classifier.weight.copy_(supernet.classifier.weight[:, :in_c])
        classifier.bias.copy_(supernet.classifier.bias)
    return StaticNet(stem, stages, classifier).eval()
