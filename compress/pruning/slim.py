"""Slimming: physically remove the masked-off channels of every group (Torch-Pruning does the surgery).

Every group carries the pruning steps Torch-Pruning derived for it during analysis (which channels of
which layer carry which unit). Slimming selects, for every layer, the channels of removed units over
*all* groups at once, in the dense numbering, and hands them to Torch-Pruning's own pruning functions
in one pass. Pruning group after group through fresh dependency queries would instead renumber
channels between queries, which is wrong where one tie (a channel shuffle, an equal split) spans
several groups: halfway, the shuffle's blocks would have different widths.
"""

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
    plan: dict[tuple[int, object], tuple[object, set[int]]] = {}
    for g in groups:
        mask = masks.get(g.id)
        if mask is None:
            continue
        mask = torch.as_tensor(mask, dtype=torch.bool).flatten()
        if mask.numel() != g.width:
            raise ValueError(f"mask for group {g.id} has {mask.numel()} entries, the group has {g.width} units")
        if not bool(mask.any()):
            raise ValueError(f"mask for group {g.id} removes every unit; a group keeps at least one")
        for dep, idx, unit in graph.actions[g.id]:
            drop = idx[~mask[unit]].tolist()
            if drop:
                key = (id(dep.target), dep.handler)
                plan.setdefault(key, (dep, set()))[1].update(drop)
    graph.slimmed = True
    _prune(graph.dg, [(dep, sorted(idxs)) for dep, idxs in plan.values()])
    return net


def _prune(dg, steps) -> None:
    """Apply Torch-Pruning pruning steps [(dependency, channel indices in dense numbering)] as one group."""
    from torch_pruning.dependency.group import Group

    group = Group()
    group._DG = dg
    for dep, idxs in steps:
        group.add_dep(dep, idxs)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        group.prune(record_history=False)
