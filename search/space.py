"""The FBNet-style MBConv search space and the candidate types the search speaks.

A :class:`SupernetSpec` fixes the supernet: a stem convolution, stages of
inverted-residual (MBConv) blocks, global average pooling and a linear
classifier. Per searchable block the choice is kernel ∈ {3, 5} × expansion ∈
{1, 3, 6}, or ``skip`` (identity) for every block but the first of a stage,
where the stride or width changes (FBNet, Wu et al. 2019, §3.2 and Table 2).
Per stage the output width is chosen from the stage's width choices.

A :class:`QuantPolicy` says, per quantizable layer (conv / linear), whether it
runs INT8 or FP32 (SimQ-NAS, Sridhar et al. 2023, §3). Layer names are module
paths of the static subnet (``stem``, ``stages.1.0.expand``, ``classifier``);
they survive ONNX export because the exporter names each Conv/Gemm node after
its layer.

All types are frozen dataclasses whose ``to_dict``/``from_dict`` round-trip
through JSON without mutating their input.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

from edgec.errors import ConfigError

KERNEL_CHOICES = (3, 5)
EXPANSION_CHOICES = (1, 3, 6)
PRECISIONS = ("fp32", "int8")


@dataclass(frozen=True)
class BlockConfig:
    """One MBConv block's choice: depthwise ``kernel`` size and ``expansion`` ratio,
    or ``skip`` (identity; kernel and expansion are then 0)."""

    kernel: int = 0
    expansion: int = 0

    @property
    def skip(self) -> bool:
        return self.kernel == 0

    @property
    def name(self) -> str:
        """FBNet-style op name: ``k3_e6`` or ``skip``."""
        return "skip" if self.skip else f"k{self.kernel}_e{self.expansion}"

    @classmethod
    def from_name(cls, name: str) -> "BlockConfig":
        if name == "skip":
            return cls()
        try:
            k, e = name.split("_")
            block = cls(int(k[1:]), int(e[1:]))
        except ValueError:
            raise ConfigError(f"bad block op {name!r}", "expected 'skip' or 'k<kernel>_e<expansion>'",
                              "use e.g. 'k3_e6'") from None
        if block.kernel not in KERNEL_CHOICES or block.expansion not in EXPANSION_CHOICES:
            raise ConfigError(f"bad block op {name!r}",
                              f"kernel must be in {KERNEL_CHOICES} and expansion in {EXPANSION_CHOICES}",
                              "use e.g. 'k3_e6'")
        return block


BLOCK_OPS = tuple(BlockConfig(k, e).name for k in KERNEL_CHOICES for e in EXPANSION_CHOICES)


@dataclass(frozen=True)
class StageSpec:
    """One stage: output width choices (channels), number of blocks, stride of its first block."""

    width_choices: tuple[int, ...]
    num_blocks: int
    stride: int

    def to_dict(self) -> dict[str, Any]:
        return {"width_choices": list(self.width_choices), "num_blocks": self.num_blocks, "stride": self.stride}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "StageSpec":
        return cls(tuple(int(w) for w in d["width_choices"]), int(d["num_blocks"]), int(d["stride"]))


@dataclass(frozen=True)
class SupernetSpec:
    """The supernet's fixed shape.

    Input: ``(B, in_channels, image_size, image_size)`` float32 in [0, 1].
    Output: ``(B, num_classes)`` float32 logits.
    """

    in_channels: int
    image_size: int
    num_classes: int
    stem_channels: int
    stem_stride: int
    stages: tuple[StageSpec, ...]

    def __post_init__(self) -> None:
        if not self.stages or any(s.num_blocks < 1 or not s.width_choices for s in self.stages):
            raise ConfigError("bad supernet spec", "every stage needs ≥ 1 block and ≥ 1 width choice")

    @property
    def num_blocks(self) -> int:
        return sum(s.num_blocks for s in self.stages)

    def block_positions(self) -> Iterator[tuple[int, int]]:
        """(stage index, block index within stage) for every block, in order."""
        for si, stage in enumerate(self.stages):
            for bi in range(stage.num_blocks):
                yield si, bi

    def quantizable_layers(self) -> tuple[str, ...]:
        """Every conv/linear layer name the supernet can have (a subnet has a subset)."""
        names = ["stem"]
        for si, bi in self.block_positions():
            names += [f"stages.{si}.{bi}.{part}" for part in ("expand", "dw", "project")]
        return tuple(names + ["classifier"])

    def layers_of(self, config: "SubnetConfig") -> tuple[str, ...]:
        """The quantizable layers the static subnet for ``config`` really has
        (skipped blocks have none; expansion-1 blocks have no ``expand``)."""
        names = ["stem"]
        for (si, bi), block in zip(self.block_positions(), config.blocks):
            if not block.skip:
                parts = ("dw", "project") if block.expansion == 1 else ("expand", "dw", "project")
                names += [f"stages.{si}.{bi}.{part}" for part in parts]
        return tuple(names + ["classifier"])

    def layer_costs(self, config: "SubnetConfig") -> tuple[tuple[str, int, int], ...]:
        """``(layer name, multiply-accumulates, weight parameters)`` at batch 1 for every layer of the
        static subnet, in :meth:`layers_of` order, computed from the shapes alone (convolutions pad
        ``k // 2``, so a stride-``s`` layer maps ``H`` to ``ceil(H / s)``; biases and batch norms,
        folded at export, are not counted)."""
        def out(h: int, stride: int) -> int:
            return -(-h // stride)

        h = out(self.image_size, self.stem_stride)
        costs = [("stem", h * h * self.stem_channels * self.in_channels * 9,
                  self.stem_channels * self.in_channels * 9)]
        in_c = self.stem_channels
        for (si, bi), block in zip(self.block_positions(), config.blocks):
            if block.skip:
                continue
            width, stride = config.widths[si], self.stages[si].stride if bi == 0 else 1
            mid = in_c * block.expansion
            if block.expansion > 1:
                costs.append((f"stages.{si}.{bi}.expand", h * h * mid * in_c, mid * in_c))
            h = out(h, stride)
            k2 = block.kernel * block.kernel
            costs.append((f"stages.{si}.{bi}.dw", h * h * mid * k2, mid * k2))
            costs.append((f"stages.{si}.{bi}.project", h * h * width * mid, width * mid))
            in_c = width
        costs.append(("classifier", in_c * self.num_classes, in_c * self.num_classes))
        return tuple(costs)

    def largest(self) -> "SubnetConfig":
        """Widest stages, every block k5_e6: the reference subnet."""
        blocks = tuple(BlockConfig(max(KERNEL_CHOICES), max(EXPANSION_CHOICES)) for _ in self.block_positions())
        return SubnetConfig(blocks, tuple(max(s.width_choices) for s in self.stages))

    def smallest(self) -> "SubnetConfig":
        """Narrowest stages, first block of each stage k3_e1, the rest skipped."""
        blocks = tuple(BlockConfig(min(KERNEL_CHOICES), min(EXPANSION_CHOICES)) if bi == 0 else BlockConfig()
                       for _, bi in self.block_positions())
        return SubnetConfig(blocks, tuple(min(s.width_choices) for s in self.stages))

    def growth_ladder(self) -> list["SubnetConfig"]:
        """The smallest subnet grown along one elastic dimension at a time (Once-for-All's elastic kernel,
        depth, expansion and width, Cai et al., ICLR 2020, §3.2): its kept blocks at each larger expansion,
        then at the larger kernel; every block kept (k3_e1); every stage at each larger width choice.

        These span the fast end of the space, between the smallest subnet and the usual random ones (with
        a skip 1 time in 7 per block, random subnets are rarely shallow), so a search seeded with them has
        shallow, fast architectures on its front from the start; fine-tuning (``--finetune-epochs``) often
        brings those within the accuracy drop."""
        small = self.smallest()
        kept = [bi == 0 for _, bi in self.block_positions()]
        k, e = min(KERNEL_CHOICES), min(EXPANSION_CHOICES)

        def grown(kernel: int, expansion: int) -> tuple[BlockConfig, ...]:
            return tuple(BlockConfig(kernel, expansion) if keep else BlockConfig() for keep in kept)

        ladder = [SubnetConfig(grown(k, x), small.widths) for x in sorted(EXPANSION_CHOICES) if x != e]
        ladder += [SubnetConfig(grown(x, e), small.widths) for x in sorted(KERNEL_CHOICES) if x != k]
        ladder.append(SubnetConfig(tuple(BlockConfig(k, e) for _ in kept), small.widths))
        depth = max(len(s.width_choices) for s in self.stages)
        ladder += [SubnetConfig(small.blocks, tuple(s.width_choices[min(j, len(s.width_choices) - 1)]
                                                    for s in self.stages)) for j in range(1, depth)]
        return list(dict.fromkeys(ladder))

    def sample(self, rng, skip_prob: float | None = None) -> "SubnetConfig":
        """A random subnet; ``rng`` is a ``numpy.random.Generator``.

        With ``skip_prob`` None every op of a block (skip included) is equally likely;
        otherwise each skippable block is skipped with that probability and the
        remaining ops are equally likely (supernet training uses 0.5 so that shallow
        subnets, rare under the uniform choice, are trained as often as deep ones).
        """
        blocks = []
        for _, bi in self.block_positions():
            if bi > 0 and (skip_prob is None and rng.integers(len(BLOCK_OPS) + 1) == len(BLOCK_OPS)
                           or skip_prob is not None and rng.random() < skip_prob):
                blocks.append(BlockConfig())
            else:
                blocks.append(BlockConfig.from_name(BLOCK_OPS[rng.integers(len(BLOCK_OPS))]))
        widths = tuple(int(s.width_choices[rng.integers(len(s.width_choices))]) for s in self.stages)
        return SubnetConfig(tuple(blocks), widths)

    def validate(self, config: "SubnetConfig") -> None:
        """Raise :class:`ConfigError` unless ``config`` is a subnet of this supernet."""
        if len(config.blocks) != self.num_blocks or len(config.widths) != len(self.stages):
            raise ConfigError("subnet does not fit the supernet",
                              f"expected {self.num_blocks} blocks and {len(self.stages)} widths, "
                              f"got {len(config.blocks)} and {len(config.widths)}")
        for (si, bi), block in zip(self.block_positions(), config.blocks):
            if block.skip and bi == 0:
                raise ConfigError("subnet does not fit the supernet",
                                  f"block {bi} of stage {si} changes shape and cannot be skipped")
        for si, (w, stage) in enumerate(zip(config.widths, self.stages)):
            if w not in stage.width_choices:
                raise ConfigError("subnet does not fit the supernet",
                                  f"stage {si} width {w} not in {stage.width_choices}")

    def to_dict(self) -> dict[str, Any]:
        return {"in_channels": self.in_channels, "image_size": self.image_size, "num_classes": self.num_classes,
                "stem_channels": self.stem_channels, "stem_stride": self.stem_stride,
                "stages": [s.to_dict() for s in self.stages]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SupernetSpec":
        return cls(int(d["in_channels"]), int(d["image_size"]), int(d["num_classes"]), int(d["stem_channels"]),
                   int(d["stem_stride"]), tuple(StageSpec.from_dict(s) for s in d["stages"]))


@dataclass(frozen=True)
class SubnetConfig:
    """The architecture choice: one :class:`BlockConfig` per block (in stage order)
    and one output width (channels) per stage."""

    blocks: tuple[BlockConfig, ...]
    widths: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"blocks": [b.name for b in self.blocks], "widths": list(self.widths)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SubnetConfig":
        return cls(tuple(BlockConfig.from_name(n) for n in d["blocks"]), tuple(int(w) for w in d["widths"]))


@dataclass(frozen=True)
class QuantPolicy:
    """Per quantizable layer: ``"fp32"`` or ``"int8"``. Layers not listed are FP32.

    ``layers`` is a sorted tuple of ``(layer name, precision)`` pairs so that the
    policy is hashable and its id stable.
    """

    layers: tuple[tuple[str, str], ...] = field(default=())

    def __post_init__(self) -> None:
        for name, precision in self.layers:
            if precision not in PRECISIONS:
                raise ConfigError(f"bad precision {precision!r} for layer {name!r}", f"expected one of {PRECISIONS}")
        object.__setattr__(self, "layers", tuple(sorted(self.layers)))

    @classmethod
    def uniform(cls, layer_names, precision: str) -> "QuantPolicy":
        return cls(tuple((n, precision) for n in layer_names))

    def precision(self, layer: str) -> str:
        return dict(self.layers).get(layer, "fp32")

    def restricted_to(self, layer_names) -> "QuantPolicy":
        """The same policy over only ``layer_names`` (the layers a subnet really has)."""
        keep = set(layer_names)
        return QuantPolicy(tuple((n, p) for n, p in self.layers if n in keep))

    def int8_layers(self) -> tuple[str, ...]:
        return tuple(n for n, p in self.layers if p == "int8")

    @property
    def is_fp32(self) -> bool:
        return not self.int8_layers()

    def to_dict(self) -> dict[str, str]:
        return dict(self.layers)

    @classmethod
    def from_dict(cls, d: Mapping[str, str]) -> "QuantPolicy":
        return cls(tuple((str(k), str(v)) for k, v in d.items()))


@dataclass(frozen=True)
class Candidate:
    """What the search proposes: an architecture and a quantization policy.

    ``id`` is the first 12 hex digits of the SHA-256 of the canonical JSON, so
    the same choice always has the same id across runs and machines.
    """

    subnet: SubnetConfig
    policy: QuantPolicy

    @property
    def id(self) -> str:
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def to_dict(self) -> dict[str, Any]:
        return {"subnet": self.subnet.to_dict(), "policy": self.policy.to_dict()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Candidate":
        return cls(SubnetConfig.from_dict(d["subnet"]), QuantPolicy.from_dict(d["policy"]))


def fbnet_space(in_channels: int, image_size: int, num_classes: int) -> SupernetSpec:
    """The built-in ``fbnet-supernet`` space, sized to the input.

    Three stages of 2/3/3 blocks. Small images (≤ 16 px, e.g. 8×8 digits) keep the
    stem at stride 1 (8×8 → 8 → 4 → 2); larger ones (28×28 Fashion-MNIST) use a
    stride-2 stem (28 → 14 → 14 → 7 → 4), as FBNet's stem does for its inputs.
    """
    stem_stride = 1 if image_size <= 16 else 2
    return SupernetSpec(in_channels, image_size, num_classes, stem_channels=16, stem_stride=stem_stride, stages=(
        StageSpec((16, 24, 32), 2, 1),
        StageSpec((32, 48, 64), 3, 2),
        StageSpec((64, 96, 128), 3, 2),
    ))
