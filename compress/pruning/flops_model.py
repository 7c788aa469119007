"""An analytic, differentiable model of fvcore FLOPs as a function of how many units each group keeps.

Every layer's dense fvcore FLOPs (per-module counts from `FlopCountAnalysis.by_module()`) are scaled
by the kept fraction of its input channels × the kept fraction of its output channels (layers that
act per channel — BN, depthwise convs — and attention matmuls scale with one fraction only). A
fraction mixes every group feeding the layer, weighted by how many of its channels each covers
(e.g. a DenseNet concat). FLOPs outside any group stay fixed. The estimate is used to choose masks
quickly and inside training loops (soft fractions give a Tensor with a gradient); the final ratio
is always confirmed with real fvcore on the slimmed deployable module.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from compress.pruning.groups import ChannelGroup

_BILINEAR = ("conv", "gconv", "linear")


class FlopsModel:
    """FLOPs(kept units per group); group order is the order of the `groups` list."""

    def __init__(self, groups: list[ChannelGroup], module_flops: dict[str, int], total_flops: int,
                 attention: dict[str, str] | None = None):
        self.ids = [g.id for g in groups]
        self.widths = torch.tensor([g.width for g in groups], dtype=torch.float64)
        self.dense = float(total_flops)
        index = {g.id: i for i, g in enumerate(groups)}
        net = groups[0].graph.net if groups else None
        entities: dict[str, dict] = {}
        for gi, g in enumerate(groups):
            for m in g.items:
                if module_flops.get(m.name, 0) <= 0:
                    continue
                ent = entities.setdefault(m.name, {"in": {}, "out": {}, "kind": m.layer})
                side = "in" if (m.side == "in" and m.layer in _BILINEAR) else "out"
                ent[side][gi] = ent[side].get(gi, 0.0) + m.per_unit
        for module_name, gid in (attention or {}).items():
            if module_flops.get(module_name, 0) > 0:
                entities[module_name] = {"in": {}, "out": {index[gid]: 1.0}, "kind": "attention",
                                         "out_total": groups[index[gid]].width}
        n_e, n_g = len(entities), len(groups)
        self.names = list(entities)
        self.layer_flops = torch.tensor([float(module_flops[n]) for n in self.names], dtype=torch.float64)
        self.a_in = torch.zeros(n_e, n_g, dtype=torch.float64)
        self.a_out = torch.zeros(n_e, n_g, dtype=torch.float64)
        self.fixed_in = torch.ones(n_e, dtype=torch.float64)
        self.fixed_out = torch.ones(n_e, dtype=torch.float64)
        self.tot_in = torch.ones(n_e, dtype=torch.float64)
        self.tot_out = torch.ones(n_e, dtype=torch.float64)
        for e, name in enumerate(self.names):
            ent = entities[name]
            if ent["kind"] == "op":                 # parameter-free module (pooling): its output width
                size_in = size_out = groups[0].graph.calls.channels[name]
            else:
                size_in, size_out = _dim_sizes(net.get_submodule(name) if ent["kind"] != "attention" else None)
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
        self.fixed_flops = self.dense - float(self.layer_flops.sum())
        self._shares: list[float] | None = None

    @classmethod
    def for_groups(cls, groups: list[ChannelGroup]) -> FlopsModel:
        """The model built by `find_groups` for these groups."""
        model = groups[0].graph.flops_model if groups else None
        if model is None or model.ids != [g.id for g in groups]:
            raise ValueError("these groups have no FLOPs model (pass the list find_groups returned)")
        return model

    def flops(self, kept: torch.Tensor) -> torch.Tensor:
        """Estimated FLOPs for `kept` units per group ([G] or a batch [B, G]; float, may need grad)."""
        kept = kept.to(torch.float64)
        frac_in = (self.fixed_in + kept @ self.a_in.T) / self.tot_in
        frac_out = (self.fixed_out + kept @ self.a_out.T) / self.tot_out
        return self.fixed_flops + (self.layer_flops * frac_in * frac_out).sum(-1)

    def ratio(self, kept: torch.Tensor) -> torch.Tensor:
        """Estimated pruned ÷ dense FLOPs for `kept` units per group."""
        return self.flops(kept) / self.dense

    def ratio_of_fractions(self, fractions: torch.Tensor) -> torch.Tensor:
        """Estimated ratio when each group keeps `fractions` (in [0, 1], differentiable) of its units."""
        return self.ratio(fractions.to(torch.float64) * self.widths)

    def kept(self, masks: dict[str, torch.Tensor]) -> torch.Tensor:
        """Kept units per group for boolean masks (groups without a mask keep everything)."""
        return torch.tensor([float(masks[i].sum()) if i in masks else float(w)
                             for i, w in zip(self.ids, self.widths.tolist(), strict=True)], dtype=torch.float64)

    def ratio_of_masks(self, masks: dict[str, torch.Tensor]) -> float:
        return float(self.ratio(self.kept(masks)))

    def shares(self) -> list[float]:
        """For each group, the fraction of dense FLOPs that vanishes if the group kept no unit."""
        if self._shares is None:
            batch = self.widths.repeat(len(self.ids), 1)
            batch.fill_diagonal_(0.0)
            lost = (self.dense - self.flops(batch)) / self.dense if len(self.ids) else torch.zeros(0)
            self._shares = [round(float(v), 6) for v in lost]
        return self._shares

    def share(self, group_id: str) -> float:
        return self.shares()[self.ids.index(group_id)]


def _dim_sizes(mod: nn.Module | None) -> tuple[int, int]:
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
    raise ValueError(f"no FLOPs scaling rule for layer type {type(mod).__name__}")
