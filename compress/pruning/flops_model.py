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

import logging
import warnings
from typing import TYPE_CHECKING

import torch
from torch import nn

from compress.pruning.attention import SplitAttention
from compress.pruning.cost import CostModel, LayerWidths

if TYPE_CHECKING:
    from compress.pruning.groups import ChannelGroup


class FlopsModel(CostModel):
    """FLOPs(kept units per group); group order is the order of the `groups` list."""

    name = "flops"
    flag = "--flops-ratio"

    def __init__(self, groups: list[ChannelGroup], module_flops: dict[str, int], total_flops: int,
                 attention: dict[str, str] | None = None):
        super().__init__(groups)
        self._dense = float(total_flops)
        self.layers = LayerWidths(groups, lambda name: module_flops.get(name, 0) > 0, attention)
        self.names = self.layers.names
        self.layer_flops = torch.tensor([float(module_flops[n]) for n in self.names], dtype=torch.float64)
        self.fixed_flops = self._dense - float(self.layer_flops.sum())

    @classmethod
    def for_groups(cls, groups: list[ChannelGroup]) -> FlopsModel:
        """The model built by `find_groups` for these groups."""
        model = groups[0].graph.flops_model if groups else None
        if model is None or model.ids != [g.id for g in groups]:
            raise ValueError("these groups have no FLOPs model (pass the list find_groups returned)")
        return model

    @property
    def dense(self) -> float:
        return self._dense

    def describe(self) -> str:
        return "FLOPs (fvcore, MACs)"

    def cost(self, kept: torch.Tensor) -> torch.Tensor:
        """Estimated FLOPs for `kept` units per group ([G] or a batch [B, G]; float, may need grad)."""
        kept = kept.to(device="cpu", dtype=torch.float64)   # the model lives on the CPU
        return self.fixed_flops + (self.layer_flops * self.layers.frac_in(kept) * self.layers.frac_out(kept)).sum(-1)


def module_flops(net: nn.Module, example_input: torch.Tensor) -> tuple[dict[str, int], int]:
    """fvcore FLOPs per module (own ops only, children excluded) and the total, on `example_input`."""
    from fvcore.nn import FlopCountAnalysis

    from compress.flops import ATTENTION_HANDLES

    logging.getLogger("fvcore").setLevel(logging.ERROR)
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            analysis = FlopCountAnalysis(net, example_input[:1])
            analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
            analysis.set_op_handle(**ATTENTION_HANDLES)
            by_module = analysis.by_module()
            total = int(analysis.total())
    finally:
        net.train(was_training)
    own = {}
    for name, mod in net.named_modules():
        children = sum(by_module.get(f"{name}.{c}" if name else c, 0) for c, _ in mod.named_children())
        own[name] = int(by_module.get(name, 0)) - int(children)
    return own, total


def attention_flops(net: nn.Module, groups: list[ChannelGroup]) -> dict[str, str]:
    """SplitAttention modules whose own matmul FLOPs scale with a head group: module name -> group id."""
    out = {}
    for g in groups:
        if g.kind == "heads":
            for m in g.items:
                parent = m.name.rpartition(".")[0]
                if isinstance(net.get_submodule(parent), SplitAttention):
                    out[parent] = g.id
    return out
