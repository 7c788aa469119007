"""Sparse training before ranking: the L1 proximal step, and what sparse training changed.

L1 regularisation (seed report §2.3.1: λ‖W‖₁ added to the loss) is applied here as a proximal
step after each optimiser step, w ← S_τ(w) = sign(w)·max(|w| − τ, 0) with τ = lr·λ: the exact
proximal operator of lr·λ‖w‖₁. A subgradient λ·sign(w) in the loss only makes weights oscillate
around zero; the soft threshold sets them to exactly zero, which is what "sparse" should mean
when the share of zeros is reported. Group lasso (DepGraph's regulariser) stays a loss term
(`compress.pruning.importance.group_lasso`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from compress.pruning.coupled import group_slices
from compress.pruning.groups import ChannelGroup


@torch.no_grad()
def soft_threshold_(w: torch.Tensor, tau: float) -> torch.Tensor:
    """In place: w ← sign(w)·max(|w| − τ, 0), the proximal operator of τ‖w‖₁."""
    return w.copy_(torch.sign(w) * torch.clamp(w.abs() - tau, min=0.0))


class ProximalSGD(torch.optim.SGD):
    """SGD, then the L1 proximal step on the parameter groups that carry `l1` = λ (τ = the group's
    current lr × λ, so schedules shrink the threshold with the step).

    >>> opt = ProximalSGD.split(model.parameters(), l1_params=prunable_weights(groups), l1=1e-3, lr=0.05)
    """

    @classmethod
    def split(cls, params: Iterable[nn.Parameter], *, l1_params: Iterable[nn.Parameter], l1: float, lr: float,
              momentum: float = 0.9, weight_decay: float = 0.0, nesterov: bool = False) -> ProximalSGD:
        """One param group with the L1 step (the parameters in `l1_params`), one without."""
        chosen = {id(p) for p in l1_params}
        params = [p for p in params if p.requires_grad]
        groups = [{"params": [p for p in params if id(p) in chosen], "l1": float(l1)},
                  {"params": [p for p in params if id(p) not in chosen], "l1": 0.0}]
        return cls([g for g in groups if g["params"]], lr=lr, momentum=momentum, weight_decay=weight_decay,
                   nesterov=nesterov)

    @torch.no_grad()
    def step(self, closure=None):
        loss = super().step(closure)
        for group in self.param_groups:
            if group.get("l1", 0.0) > 0:
                for p in group["params"]:
                    soft_threshold_(p, group["lr"] * group["l1"])
        return loss


def prunable_weights(groups: Sequence[ChannelGroup]) -> list[nn.Parameter]:
    """The conv/linear weights the groups' units span (BN scales left out: L1 on them alone is a
    different method, Network Slimming)."""
    out: dict[int, nn.Parameter] = {}
    for g in groups:
        for s in group_slices(g):
            if s.param.dim() >= 2:
                out.setdefault(id(s.param), s.param)
    return list(out.values())


def zero_share(params: Iterable[torch.Tensor]) -> float:
    """Share of entries that are exactly zero."""
    zeros = total = 0
    for p in params:
        zeros += int((p == 0).sum())
        total += p.numel()
    return zeros / total if total else 0.0


def ranking_change(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor],
                   kept_before: dict[str, torch.Tensor], kept_after: dict[str, torch.Tensor]) -> dict[str, float]:
    """How sparse training moved a ranking: Kendall τ between the per-unit scores before and after
    (per group, averaged with the groups' widths as weights; 1 = same order, −1 = reversed) and the
    share of the units kept after that were also kept before (masks for the same target)."""
    from scipy.stats import kendalltau

    taus, weights = [], []
    for gid, b in before.items():
        a = after[gid]
        if b.numel() < 2:
            continue
        tau = kendalltau(b.detach().cpu().double().numpy(), a.detach().cpu().double().numpy()).statistic
        if tau == tau:          # NaN when a group's scores are all equal
            taus.append(float(tau))
            weights.append(b.numel())
    both = sum(int((kept_before[g] & kept_after[g]).sum()) for g in kept_after)
    kept = sum(int(kept_after[g].sum()) for g in kept_after)
    return {"kendall_tau": round(sum(t * w for t, w in zip(taus, weights, strict=True)) / sum(weights), 4)
            if weights else None,
            "kept_overlap": round(both / kept, 4) if kept else None}


__all__ = ["ProximalSGD", "prunable_weights", "ranking_change", "soft_threshold_", "zero_share"]
