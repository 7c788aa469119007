"""Slimming: physically remove the masked-off channels of every group (Torch-Pruning does the surgery)."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from compress.pruning.groups import ChannelGroup


def slim(net: nn.Module, groups: list[ChannelGroup], masks: dict[str, torch.Tensor]) -> nn.Module:
    """Remove, in place, the units whose keep-mask is False; returns `net`.

    `groups` must come from `find_groups(net, …)` on this very network, which is slimmed once.
    Groups without a mask are kept whole; every group keeps at least one unit.
    """
    if not groups:
        return net
    graph = groups[0].graph
    if graph.net is not net:
        raise ValueError("groups were found on another network; call find_groups on this one")
    if graph.slimmed:
        raise ValueError("this network was already slimmed with these groups; find its groups again")
    by_id = {g.id: g for g in groups}
    for gid in masks:
        if gid not in by_id:
            raise KeyError(f"unknown group {gid!r}")
    plans = []
    for g in groups:
        mask = masks.get(g.id)
        if mask is None:
            continue
        mask = torch.as_tensor(mask, dtype=torch.bool).flatten()
        if mask.numel() != g.width:
            raise ValueError(f"mask for group {g.id} has {mask.numel()} entries, the group has {g.width} units")
        if not bool(mask.any()):
            raise ValueError(f"mask for group {g.id} removes every unit; a group keeps at least one")
        drop = (~mask)[g.units_of_channels()].nonzero().flatten().tolist()
        if drop:
            plans.append((g, drop))
    graph.slimmed = True
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for g, drop in plans:
            root, fn = graph.roots[g.id]
            graph.dg.get_pruning_group(root, fn, drop).prune()
    return net
