"""The cost-model protocol: what a pruning target is counted in.

A cost model maps how many units each channel group keeps (a float tensor [G], or a batch [B, G];
fractional counts allowed, gradients flow) to the cost of the whole network. Target selection, the
pipeline's post-slimming calibration, PASS's resource penalty and VPNs' per-step threshold only see
this interface, so a FLOPs budget (`FlopsModel`: analytic fvcore FLOPs) and a measured latency budget
(`LatencyModel`: per-layer lookup tables measured on the target backend) are interchangeable.

`LayerWidths` is what both models share: for every layer touched by a group, its input and output
channel counts as affine functions of the kept units (a layer fed by a concatenation mixes several
groups; channels outside any group stay fixed).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

if TYPE_CHECKING:
    from compress.pruning.groups import ChannelGroup

BILINEAR = ("conv", "gconv", "linear")   # layers whose cost scales with input × output width


class CostModel(ABC):
    """Cost(kept units per group); group order is the order of the `groups` list it was built for."""

    name: ClassVar[str]          # "flops" or "latency": report keys and messages
    flag: ClassVar[str]          # the CLI flag whose ratio it measures, for error messages
    # The cost steps only every this many channels (a backend's channel block, bench/staircase.py): a width
    # inside a step costs the whole step, so target selection keeps widths at multiples of it (and --round-to).
    channel_step: int = 1

    def __init__(self, groups: list[ChannelGroup]):
        self.ids = [g.id for g in groups]
        self.widths = torch.tensor([g.width for g in groups], dtype=torch.float64)
        self._shares: list[float] | None = None

    @property
    @abstractmethod
    def dense(self) -> float:
        """Cost of the unpruned network."""

    @abstractmethod
    def cost(self, kept: torch.Tensor) -> torch.Tensor:
        """Cost for `kept` units per group ([G] or [B, G]; float, may require grad)."""

    @abstractmethod
    def describe(self) -> str:
        """What the cost is, for reports: e.g. "FLOPs (fvcore)" or "latency on onnxruntime, 2 threads, batch 1"."""

    def ratio(self, kept: torch.Tensor) -> torch.Tensor:
        """Pruned ÷ dense cost for `kept` units per group."""
        return self.cost(kept) / self.dense

    def ratio_of_fractions(self, fractions: torch.Tensor) -> torch.Tensor:
        """Ratio when each group keeps `fractions` (in [0, 1], differentiable) of its units."""
        return self.ratio(fractions.to(device="cpu", dtype=torch.float64) * self.widths)

    def kept(self, masks: dict[str, torch.Tensor]) -> torch.Tensor:
        """Kept units per group for boolean masks (groups without a mask keep everything)."""
        return torch.tensor([float(masks[i].sum()) if i in masks else float(w)
                             for i, w in zip(self.ids, self.widths.tolist(), strict=True)], dtype=torch.float64)

    def ratio_of_masks(self, masks: dict[str, torch.Tensor]) -> float:
        return float(self.ratio(self.kept(masks)))

    def shares(self) -> list[float]:
        """For each group, the fraction of the dense cost that vanishes if the group kept no unit."""
        if self._shares is None:
            batch = self.widths.repeat(len(self.ids), 1)
            batch.fill_diagonal_(0.0)
            lost = (self.dense - self.cost(batch)) / self.dense if len(self.ids) else torch.zeros(0)
            self._shares = [round(float(v), 6) for v in lost]
        return self._shares

    def share(self, group_id: str) -> float:
        return self.shares()[self.ids.index(group_id)]


class LayerWidths:
    """Input and output channel counts of the layers the groups touch, as functions of kept units.

    For layer e: in_width = fixed_in[e] + Σ_g a_in[e, g] · kept[g] (a_in: channels per unit of group
    g at the layer's input), likewise for the output side. Per-channel layers (BN, depthwise conv,
    pooling, activations) and attention matmuls have only an "out" side; for them the input width is
    the output width. `include(name)` chooses the layers (e.g. those with FLOPs, or those tabulated).
    """

    def __init__(self, groups: list[ChannelGroup], include: Callable[[str], bool],
                 attention: dict[str, str] | None = None):
        index = {g.id: i for i, g in enumerate(groups)}
        graph = groups[0].graph if groups else None
        entities: dict[str, dict] = {}
        for gi, g in enumerate(groups):
            for m in g.items:
                if not include(m.name):
                    continue
                ent = entities.setdefault(m.name, {"in": {}, "out": {}, "kind": m.layer})
                side = "in" if (m.side == "in" and m.layer in BILINEAR) else "out"
                ent[side][gi] = ent[side].get(gi, 0.0) + m.per_unit
        for module_name, gid in (attention or {}).items():
            if include(module_name):
                entities[module_name] = {"in": {}, "out": {index[gid]: 1.0}, "kind": "attention",
                                         "out_total": groups[index[gid]].width}
        n_e, n_g = len(entities), len(groups)
        self.names = list(entities)
        self.kinds = [entities[n]["kind"] for n in self.names]
        self.a_in = torch.zeros(n_e, n_g, dtype=torch.float64)
        self.a_out = torch.zeros(n_e, n_g, dtype=torch.float64)
        self.fixed_in = torch.ones(n_e, dtype=torch.float64)
        self.fixed_out = torch.ones(n_e, dtype=torch.float64)
        self.tot_in = torch.ones(n_e, dtype=torch.float64)
        self.tot_out = torch.ones(n_e, dtype=torch.float64)
        self.has_in = torch.zeros(n_e, dtype=torch.bool)
        for e, name in enumerate(self.names):
            ent = entities[name]
            if ent["kind"] == "op":                 # parameter-free module (pooling): its output width
                size_in = size_out = graph.calls.channels[name]
            elif ent["kind"] == "attention":
                size_in = size_out = 1
            else:
                size_in, size_out = dim_sizes(graph.net.get_submodule(name))
            for side, a, fixed, tot, size in (("in", self.a_in, self.fixed_in, self.tot_in, size_in),
                                              ("out", self.a_out, self.fixed_out, self.tot_out, size_out)):
                if not ent[side]:
                    continue
                size = ent.get(f"{side}_total", size)
                covered = 0.0
                for gi, per_unit in ent[side].items():
                    a[e, gi] = per_unit
                    covered += per_unit * groups[gi].width
                tot[e] = float(size)
                fixed[e] = max(0.0, float(size) - covered)
            self.has_in[e] = bool(ent["in"])

    def in_width(self, kept: torch.Tensor) -> torch.Tensor:
        """Input channels of every layer ([..., E]); for one-sided layers 1 (see `frac_in`)."""
        return self.fixed_in + kept @ self.a_in.T

    def out_width(self, kept: torch.Tensor) -> torch.Tensor:
        return self.fixed_out + kept @ self.a_out.T

    def frac_in(self, kept: torch.Tensor) -> torch.Tensor:
        """Kept fraction of every layer's input channels (1 where the input is not pruned)."""
        return self.in_width(kept) / self.tot_in

    def frac_out(self, kept: torch.Tensor) -> torch.Tensor:
        return self.out_width(kept) / self.tot_out


def dim_sizes(mod: nn.Module | None) -> tuple[int, int]:
    """(input, output) size of a layer's pruned dimensions."""
    if mod is None:
        return 1, 1
    if isinstance(mod, nn.modules.conv._ConvNd):
        return mod.in_channels, mod.out_channels
    if isinstance(mod, nn.Linear):
        return mod.in_features, mod.out_features
    if isinstance(mod, nn.modules.batchnorm._BatchNorm):
        return mod.num_features, mod.num_features
    if isinstance(mod, nn.PReLU):
        return mod.num_parameters, mod.num_parameters
    raise ValueError(f"no width rule for layer type {type(mod).__name__}")
