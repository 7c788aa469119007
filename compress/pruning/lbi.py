"""Split Linearized Bregman Iteration over channel groups (DessiLBI: Fu et al., ICML 2020 / TPAMI 2022).

The weights W are coupled with a sparse structural parameter Γ through

    L̄(W, Γ) = L(W) + Σ_g ‖P_g W − Γ_g‖² / (2ν),

where P_g gathers every weight slice a channel group touches (output filters of its producers,
input columns of its consumers, BN scales: `compress.pruning.coupled`). One step, with learning
rate α and the gradient direction D of L (SGD with momentum, or Adam's):

    W ← W − κα (D + Σ_g P_gᵀ (P_g W − Γ_g) / ν)            (AdamW: W ← (1 − α·wd) W first)
    V_g ← V_g + (α/ν) (P_g W − Γ_g)                          (old W and Γ: a Bregman step on Γ)
    Γ_g ← κ · Prox(V_g),   Prox(V)_u = max(0, 1 − λ_g/‖V_u‖) V_u   for each unit u of the group.

A Γ group is one *unit* of a channel group (a channel, an attention head, a tiled channel
position), spanning the unit's slices in every coupled layer: channel pruning keeps or removes
exactly that. Γ starts at zero and its support grows as units' V leave the ball of radius λ_g: the inverse
scale space. The step at which each unit first enters the support orders the units (earlier =
more important); units that never enter are ordered by ‖V_u‖ (how close they came).

Differences from the authors' `slbi_opt.py`: Γ groups span coupled layers (theirs: one conv's
filters, elementwise L1 for linear layers), so a weight coupled to two groups (a conv's filter of
one group is a column of another's consumer) is pulled towards both Γs; momentum and weight decay
act on the gradient of L only (theirs fold weight decay into the momentum buffer); λ_g is by
default the group's mean unit norm at the start (theirs: 1; see `gamma_groups`); Γ is not
stored but recomputed from V (it is a function of V); entry is recorded per step, not per epoch.
The authors' `mu` is ν here (their coupling term is (W − Γ)·lr·κ/mu).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from compress.pruning.coupled import UnitSlice, group_slices
from compress.pruning.groups import ChannelGroup

INNER = ("sgd", "adamw")


THRESHOLDS = ("group-mean", "one")


@dataclass(eq=False)
class GammaGroup:
    """The Γ of one channel group: `width` units, each spanning its rows in every slice; a unit is in
    the support when ‖V_u‖ > `threshold` (the weight λ_g of its group in Σ_g λ_g Σ_u ‖Γ_u‖)."""

    id: str
    width: int
    slices: list[UnitSlice]
    threshold: float = 1.0


def gamma_groups(groups: Sequence[ChannelGroup], threshold: str = "group-mean") -> list[GammaGroup]:
    """One GammaGroup per channel group that owns weights.

    threshold "one" is the authors' (every unit thresholded at 1). "group-mean" sets λ_g to the mean
    unit norm ‖P_g W_u‖ of the starting weights: units then enter by their norm relative to their own
    group, so groups of very different sizes (a residual stream spans a dozen layers, a block's inner
    conv two) can be ranked together — the authors prune layer by layer and never compare them.
    """
    if threshold not in THRESHOLDS:
        raise ValueError(f"threshold must be one of {', '.join(THRESHOLDS)}, got {threshold!r}")
    out = []
    for g in groups:
        slices = group_slices(g)
        if not slices:
            continue
        lam = 1.0
        if threshold == "group-mean":
            with torch.no_grad():
                sq = sum(s.unit_sums(s.gather(s.param).pow(2), g.width) for s in slices)
            lam = max(float(sq.sqrt().mean()), 1e-12)
        out.append(GammaGroup(id=g.id, width=g.width, slices=slices, threshold=lam))
    return out


class SplitLBI(torch.optim.Optimizer):
    """Split LBI as a torch optimiser: `params` are every trainable parameter (W); `structure` says
    which of their slices carry a Γ. Parameters outside every Γ group take the inner step κα·D."""

    def __init__(self, params: Iterable[nn.Parameter] | Iterable[dict], structure: Sequence[GammaGroup], *,
                 lr: float, kappa: float = 1.0, nu: float = 20.0, inner: str = "sgd", momentum: float = 0.9,
                 weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        if inner not in INNER:
            raise ValueError(f"inner optimiser must be one of {', '.join(INNER)}, got {inner!r}")
        if lr <= 0 or kappa <= 0 or nu <= 0:
            raise ValueError(f"lr, kappa and nu must be positive, got {lr}, {kappa}, {nu}")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, betas=betas, eps=eps))
        self.kappa, self.nu, self.inner = float(kappa), float(nu), inner
        self.structure = list(structure)
        owned = {p for group in self.param_groups for p in group["params"]}
        for gg in self.structure:
            for s in gg.slices:
                if s.param not in owned:
                    raise ValueError(f"Γ group {gg.id} covers {s.name}, which this optimiser does not train")
        self.steps = 0
        self.V = {gg.id: [torch.zeros_like(s.gather(s.param.detach())) for s in gg.slices] for gg in self.structure}
        self.entered = {gg.id: torch.full((gg.width,), -1, dtype=torch.long, device=gg.slices[0].param.device)
                        for gg in self.structure}   # on the device: recording an entry costs no sync

    # ------------------------------------------------------------------ the iteration

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        lr_of = {p: group["lr"] for group in self.param_groups for p in group["params"]}
        directions = {p: self._direction(p, group) for group in self.param_groups for p in group["params"]
                      if p.grad is not None}
        coupling: dict[nn.Parameter, torch.Tensor] = {}
        for gg in self.structure:
            factor = self._shrink_factor(gg)
            for s, v in zip(gg.slices, self.V[gg.id], strict=True):
                _, unit = s.on(v.device)
                diff = s.gather(s.param) - factor[unit].unsqueeze(1) * v       # P_g W − Γ_g
                if s.param not in coupling:
                    coupling[s.param] = torch.zeros_like(s.param)
                s.scatter_add_(coupling[s.param], diff / self.nu)
                v.add_(diff, alpha=lr_of[s.param] / self.nu)
        for group in self.param_groups:
            lr = group["lr"]
            for p in group["params"]:
                if p not in directions:
                    continue
                if self.inner == "adamw" and group["weight_decay"]:
                    p.mul_(1.0 - lr * group["weight_decay"])
                update = directions[p] if p not in coupling else directions[p] + coupling[p]
                p.add_(update, alpha=-lr * self.kappa)
        self.steps += 1
        for gg in self.structure:
            new = (self.unit_norms(gg.id) > gg.threshold) & (self.entered[gg.id] < 0)
            self.entered[gg.id][new] = self.steps
        return loss

    def _direction(self, p: nn.Parameter, group: dict) -> torch.Tensor:
        """The inner optimiser's step direction for the gradient of L (coupling excluded)."""
        grad, state = p.grad, self.state[p]
        if self.inner == "sgd":
            if group["weight_decay"]:
                grad = grad + group["weight_decay"] * p
            if not group["momentum"]:
                return grad
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = grad.detach().clone()
            else:
                state["momentum_buffer"].mul_(group["momentum"]).add_(grad)
            return state["momentum_buffer"]
        beta1, beta2 = group["betas"]
        if "exp_avg" not in state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        state["step"] += 1
        state["exp_avg"].mul_(beta1).add_(grad, alpha=1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        m_hat = state["exp_avg"] / (1 - beta1 ** state["step"])
        v_hat = state["exp_avg_sq"] / (1 - beta2 ** state["step"])
        return m_hat / (v_hat.sqrt() + group["eps"])

    def _shrink_factor(self, gg: GammaGroup) -> torch.Tensor:
        """κ·max(0, 1 − λ_g/‖V_u‖) per unit: Γ_u = factor_u · V_u."""
        norms = self.unit_norms(gg.id)
        return self.kappa * torch.clamp(1.0 - gg.threshold / norms.clamp_min(1e-30), min=0.0)

    # ------------------------------------------------------------------ reading the path

    def unit_norms(self, gid: str) -> torch.Tensor:
        """‖V_u‖ per unit of a group (on the parameters' device)."""
        gg = self._group(gid)
        total = None
        for s, v in zip(gg.slices, self.V[gid], strict=True):
            part = s.unit_sums(v.pow(2), gg.width)
            total = part if total is None else total + part
        return total.sqrt()

    def gamma(self, gid: str) -> list[torch.Tensor]:
        """Γ of a group, as rows per slice (see UnitSlice.gather)."""
        gg = self._group(gid)
        factor = self._shrink_factor(gg)
        return [factor[s.on(v.device)[1]].unsqueeze(1) * v for s, v in zip(gg.slices, self.V[gid], strict=True)]

    def support(self) -> dict[str, torch.Tensor]:
        """Per group, the units where Γ ≠ 0 now (bool, CPU)."""
        return {gg.id: (self.unit_norms(gg.id) > gg.threshold).cpu() for gg in self.structure}

    def scores(self) -> dict[str, torch.Tensor]:
        """Per-unit importance from the path (float64, CPU; higher = keep): minus the step the unit
        entered the support (units never in it count as entering after the last step), plus
        r/(1 + r) ∈ [0, 1) with r = ‖V_u‖/λ_g, which breaks ties by r — for units in the support that
        is the order of ‖Γ_u‖ = κ(‖V_u‖ − λ_g), for the others how close they came to entering."""
        out = {}
        for gg in self.structure:
            norms = self.unit_norms(gg.id).detach().to(torch.float64).cpu() / gg.threshold
            entered = self.entered[gg.id].cpu().to(torch.float64)
            entered[entered < 0] = self.steps + 1
            out[gg.id] = -entered + norms / (1.0 + norms)
        return out

    def _group(self, gid: str) -> GammaGroup:
        return next(gg for gg in self.structure if gg.id == gid)

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["lbi"] = {"steps": self.steps, "V": {k: [v.detach().clone() for v in vs] for k, vs in self.V.items()},
                     "entered": {k: e.detach().cpu().clone() for k, e in self.entered.items()},
                     "thresholds": {gg.id: gg.threshold for gg in self.structure}}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        lbi = state_dict.pop("lbi", None)
        super().load_state_dict(state_dict)
        if lbi is None:
            return
        if set(lbi["V"]) != set(self.V):
            raise ValueError("this checkpoint's Γ groups differ from the optimiser's")
        self.steps = int(lbi["steps"])
        for gg in self.structure:            # λ_g is fixed at the start of the path, not by the weights now
            gg.threshold = float(lbi["thresholds"][gg.id])
        for k, vs in lbi["V"].items():
            for mine, saved in zip(self.V[k], vs, strict=True):
                mine.copy_(saved)
            self.entered[k].copy_(lbi["entered"][k])


def support_share(support: dict[str, torch.Tensor]) -> float:
    """Share of all units in the support."""
    total = sum(int(m.numel()) for m in support.values())
    return sum(int(m.sum()) for m in support.values()) / total if total else math.nan


__all__ = ["INNER", "THRESHOLDS", "GammaGroup", "SplitLBI", "gamma_groups", "support_share"]
