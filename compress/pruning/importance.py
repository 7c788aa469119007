"""Importance criteria: per-unit scores of each group, independent of how masks are applied.

- `l1_scores` (Li et al., 2017): L1 norm of each output filter of the group's root layer.
- `group_l2_scores` (DepGraph, Fang et al., 2023): the sum of squared L2 norms of every coupled
  weight slice of a unit (output filters, input columns of consumers, BN scales), over all layers of
  the group; `normalize` divides by the group mean (N·Imp / Σ Imp, the seed report's eq. 12).
  Biases are left out, as in Torch-Pruning's GroupMagnitudeImportance.
- `random_scores`: a seeded sanity floor.
- `group_lasso`: DepGraph's sparse-training regulariser Σ_k γ_k · Imp_k with
  γ_k = 2^{α (Imp_max − Imp_k) / (Imp_max − Imp_min)}: less important units are pushed harder to zero.
"""

from __future__ import annotations

from collections.abc import Callable

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
    out = {}
    with torch.no_grad():
        for g in groups:
            imp = group_sq_norms(g).float().cpu()
            out[g.id] = imp / (imp.mean() + 1e-12) if normalize else imp
    return out


def l1_scores(groups: list[ChannelGroup]) -> dict[str, torch.Tensor]:
    out = {}
    with torch.no_grad():
        for g in groups:
            root = next(m for m in g.items if m.name == g.id and m.side in ("out", "local"))
            w = g.graph.net.get_submodule(root.name).weight
            per = w.abs().flatten(1).sum(1).float().cpu()
            out[g.id] = torch.zeros(g.width).index_add(0, root.unit, per[root.idx])
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
