"""Importance criteria: per-unit scores of each group, independent of how masks are applied.

- `l1_scores` (Li et al., 2017): L1 norm of each output filter of the group's root layer (summed over
  the root layers of a group that ties several, e.g. the branches a channel shuffle interleaves).
- `group_l2_scores` (DepGraph, Fang et al., 2023), computed by Torch-Pruning itself
  (`GroupMagnitudeImportance(p=2)`): per channel, the squared L2 norms of its coupled conv/Linear output
  filters and input columns and BN scales, averaged over the group's layers (Torch-Pruning counts no
  depthwise filter and no bias); summed per unit; `normalize` divides by the group mean (N·Imp / Σ Imp,
  the seed report's eq. 12).
- `group_sq_norms`: the sum of squared L2 norms of *every* coupled weight slice of a unit, depthwise
  filters included, differentiable: what regularisers and learned methods use.
- `random_scores`: a seeded sanity floor.
- `units_removed`: a context in which the weights of removed units are zeroed, so any criterion scores
  the network those masks would slim (progressive pruning re-scores between steps this way).
- `group_lasso`: DepGraph's sparse-training regulariser Σ_k γ_k · Imp_k with
  γ_k = 2^{α (Imp_max − Imp_k) / (Imp_max − Imp_min)}: less important units are pushed harder to zero.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from compress.pruning.coupled import group_slices
from compress.pruning.groups import ChannelGroup


def group_sq_norms(group: ChannelGroup) -> torch.Tensor:
    """Σ over the group's coupled weights of the squared L2 norm of each unit (differentiable)."""
    total = None
    for s in group_slices(group):
        contrib = s.unit_sums(s.gather(s.param).pow(2), group.width)
        total = contrib if total is None else total + contrib
    if total is None:
        raise ValueError(f"group {group.id} has no weights to score")
    return total


def group_l2_scores(groups: list[ChannelGroup], normalize: bool = True) -> dict[str, torch.Tensor]:
    import torch_pruning as tp

    criterion = tp.importance.GroupMagnitudeImportance(p=2, normalizer=None)
    out = {}
    for g in groups:
        imp = torch.zeros(g.width)
        for root, fn, unit_of in g.tp_roots():
            tp_group = g.graph.dg.get_pruning_group(root, fn, list(range(len(unit_of))))
            imp.index_add_(0, unit_of, criterion(tp_group).float().cpu())
        out[g.id] = imp / (imp.mean() + 1e-12) if normalize else imp
    return out


@contextmanager
def units_removed(groups: list[ChannelGroup], masks: dict[str, torch.Tensor]) -> Iterator[None]:
    """Zero, in place, every coupled weight slice of the units `masks` removes; restored on exit.

    A kept unit's coupled weights then lack exactly the entries that slimming would cut from them (the
    input columns of removed producer channels, the output rows of removed consumer channels), so a
    criterion computed inside equals the criterion on the slimmed network, as Torch-Pruning's iterative
    pruning re-scores the pruned model at each step."""
    params, saved = {}, {}
    with torch.no_grad():
        for g in groups:
            mask = masks.get(g.id)
            if mask is None or bool(torch.as_tensor(mask).all()):
                continue
            removed_units = ~torch.as_tensor(mask, dtype=torch.bool).cpu()
            for s in group_slices(g):
                if s.kind == "tiled":
                    continue      # a grouped conv's input position: its weight block goes with its row
                idx = s.idx[removed_units[s.unit]]
                if not len(idx):
                    continue
                if s.name not in saved:
                    params[s.name], saved[s.name] = s.param, s.param.detach().clone()
                s.param.index_fill_(0 if s.kind == "rows" else 1, idx.to(s.param.device), 0.0)
    try:
        yield
    finally:
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(saved[name])


def l1_scores(groups: list[ChannelGroup]) -> dict[str, torch.Tensor]:
    out = {}
    with torch.no_grad():
        for g in groups:
            score = torch.zeros(g.width)
            for root in (m for m in g.items if m.name in (g.roots or [g.id]) and m.side in ("out", "local")):
                per = g.graph.net.get_submodule(root.name).weight.abs().flatten(1).sum(1).float().cpu()
                score.index_add_(0, root.unit, per[root.idx])
            out[g.id] = score
    return out


def random_scores(groups: list[ChannelGroup], seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {g.id: torch.rand(g.width, generator=gen) for g in groups}


def group_lasso(groups: list[ChannelGroup], alpha: float = 4.0, reg: float = 5e-4) -> Callable[..., torch.Tensor]:
    """DepGraph's sparsity regulariser as a loss term: call it (any arguments are ignored) each step.

    reg/2 · Σ_groups Σ_k γ_k · Imp_k, with γ recomputed from the current (detached) importances.
    The factor 1/2 makes its gradient reg · γ_k · w, Torch-Pruning's GroupNormPruner update.
    """

    def loss(*_args) -> torch.Tensor:
        terms = []
        for g in groups:
            imp = group_sq_norms(g)
            with torch.no_grad():
                lo, hi = imp.min(), imp.max()
                gamma = torch.pow(2.0, alpha * (hi - imp) / (hi - lo + 1e-12))
            terms.append((gamma * imp).sum())
        return 0.5 * reg * torch.stack(terms).sum()

    return loss
