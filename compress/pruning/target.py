"""FLOPs targeting: from per-unit scores, the keep-masks whose estimated FLOPs ratio is closest to R.

- `scope="global"`: all units of all groups are ranked together by their score divided by the mean
  |score| of their group (so groups are comparable), and the lowest are removed until the ratio is hit.
- `scope="local"`: every group keeps the same fraction of its units, solved so the total hits R.
- `round_to=K`: every group keeps a number of channels that is a multiple of K, or its full width.

The ratio is monotone in the number of removed units, so a bisection over the ranking (global) or
the kept fraction (local) finds the two configurations bracketing R; the closer one wins. Each step
is one vectorised FLOPs-model evaluation, so selecting masks costs milliseconds (cheap enough for
every training step of a learned method). When round-to steps leave the global bracket far from R,
the ranking is continued past the overshooting group (see `_skip_greedy`).
"""

from __future__ import annotations

import torch

from compress.errors import CompressError
from compress.pruning.flops_model import FlopsModel
from compress.pruning.groups import ChannelGroup

SCOPES = ("global", "local")
POLISH_ABOVE = 0.005   # bracket this far from the target: try to close the gap (global scope)


class _Allowed:
    """Per group, the allowed kept-unit counts under round_to, padded into one matrix."""

    def __init__(self, groups: list[ChannelGroup], round_to: int):
        if round_to < 1:
            raise CompressError(f"--round-to must be at least 1, got {round_to}")
        rows = []
        for g in groups:
            counts = [k for k in range(1, g.width) if (k * g.unit_channels) % round_to == 0] + [g.width]
            rows.append(counts)
        longest = max((len(r) for r in rows), default=1)
        big = max((g.width for g in groups), default=1) + 1
        self.table = torch.tensor([r + [big] * (longest - len(r)) for r in rows], dtype=torch.float64)
        self.minimum = torch.tensor([r[0] for r in rows], dtype=torch.float64)

    def round_up(self, kept: torch.Tensor) -> torch.Tensor:
        """The smallest allowed count ≥ kept (and ≥ the group's minimum), per group; kept is [G] or [B, G]."""
        flat = kept.reshape(-1, kept.shape[-1]).T.contiguous()          # [G, B]
        pos = torch.searchsorted(self.table, flat - 1e-9)
        pos = pos.clamp(max=self.table.shape[1] - 1)
        out = torch.gather(self.table, 1, pos).T.reshape(kept.shape)
        return torch.maximum(out, self.minimum)

    def round_down(self, kept: torch.Tensor) -> torch.Tensor:
        """The largest allowed count ≤ kept (at least the group's minimum), per group; kept is [G]."""
        pos = torch.searchsorted(self.table, (kept + 1e-9).unsqueeze(1), right=True).squeeze(1).clamp(min=1) - 1
        return torch.maximum(self.table.gather(1, pos.unsqueeze(1)).squeeze(1), self.minimum)


def smallest_ratio(groups: list[ChannelGroup], flops_model: FlopsModel, round_to: int = 8) -> float:
    """The estimated FLOPs ratio with every group at its smallest allowed width."""
    return float(flops_model.ratio(_Allowed(groups, round_to).minimum)) if groups else 1.0


def check_ratio(flops_ratio: float) -> None:
    if not 0.0 < flops_ratio <= 1.0:
        raise CompressError(f"--flops-ratio must be in (0, 1] (pruned FLOPs ÷ dense FLOPs), got {flops_ratio}")


def select_masks(scores: dict[str, torch.Tensor], groups: list[ChannelGroup], flops_model: FlopsModel,
                 flops_ratio: float, scope: str = "global", round_to: int = 8,
                 normalize: bool = True) -> dict[str, torch.Tensor]:
    """Boolean keep-masks (per group id, shape [width]) whose estimated FLOPs ratio is closest to
    `flops_ratio`. Higher score = more important. `normalize=False` ranks raw scores globally (for
    methods whose scores are already comparable across groups)."""
    check_ratio(flops_ratio)
    if scope not in SCOPES:
        raise CompressError(f"--scope must be one of {', '.join(SCOPES)}, got {scope!r}")
    if not groups:
        if flops_ratio < 1.0:
            raise CompressError("this model has no prunable channel groups; the only reachable --flops-ratio is 1")
        return {}
    allowed = _Allowed(groups, round_to)
    lowest = float(flops_model.ratio(allowed.minimum))
    if flops_ratio < lowest - 1e-9:
        raise CompressError(f"--flops-ratio {flops_ratio} is unreachable for this model with --round-to {round_to}: "
                            f"the smallest reachable is {lowest:.4f} (every group at its minimum width)")
    vals = [scores[g.id].detach().to(torch.float64).flatten() for g in groups]
    for g, v in zip(groups, vals, strict=True):
        if v.numel() != g.width:
            raise ValueError(f"scores for group {g.id} have {v.numel()} entries, the group has {g.width} units")
    kept = _global_counts(vals, groups, allowed, flops_model, flops_ratio, normalize) if scope == "global" \
        else _local_counts(groups, allowed, flops_model, flops_ratio)
    masks = {}
    for g, v, k in zip(groups, vals, kept.tolist(), strict=True):
        mask = torch.zeros(g.width, dtype=torch.bool)
        order = torch.argsort(v, descending=True, stable=True)
        mask[order[: int(round(k))]] = True
        masks[g.id] = mask
    return masks


def _closest(candidates: list[torch.Tensor], flops_model: FlopsModel, target: float) -> torch.Tensor:
    ratios = [abs(float(flops_model.ratio(c)) - target) for c in candidates]
    return candidates[min(range(len(candidates)), key=ratios.__getitem__)]


def _global_counts(vals, groups, allowed: _Allowed, flops_model: FlopsModel, target: float,
                   normalize: bool) -> torch.Tensor:
    """Kept units per group when the `t` globally lowest-ranked units are removed, t bisected."""
    if normalize:
        vals = [v / (v.abs().mean() + 1e-12) for v in vals]
    flat = torch.cat(vals)
    owner = torch.cat([torch.full((g.width,), i, dtype=torch.long) for i, g in enumerate(groups)])
    owner = owner[torch.argsort(flat, stable=True)]
    widths = flops_model.widths

    def counts(t: int) -> torch.Tensor:
        removed = torch.bincount(owner[:t], minlength=len(groups)).to(torch.float64)
        return allowed.round_up(widths - removed)

    lo, hi = 0, len(owner)            # ratio(counts(lo)) ≥ target; find the last t that keeps it so
    if float(flops_model.ratio(counts(hi))) >= target:
        return counts(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if float(flops_model.ratio(counts(mid))) >= target:
            lo = mid
        else:
            hi = mid
    best = _closest([counts(lo), counts(hi)], flops_model, target)
    if abs(float(flops_model.ratio(best)) - target) <= POLISH_ABOVE:
        return best
    return _closest([best, _skip_greedy(owner, lo, allowed, flops_model, target)], flops_model, target)


def _skip_greedy(owner: torch.Tensor, start: int, allowed: _Allowed, flops_model: FlopsModel,
                 target: float) -> torch.Tensor:
    """Continue down the ranking past the first unit that would overshoot the target: a unit whose
    removal would take the ratio below it freezes its group (its better units stay too), and lower
    ranked units of other groups are removed instead. Narrows the gap that coarse round-to steps leave."""
    widths = flops_model.widths
    removed = torch.bincount(owner[:start], minlength=len(widths)).to(torch.float64)
    current = allowed.round_up(widths - removed)
    frozen = torch.zeros(len(widths), dtype=torch.bool)
    for g in owner[start:].tolist():
        if frozen[g]:
            continue
        removed[g] += 1
        trial = current.clone()
        trial[g] = allowed.round_up(widths - removed)[g]
        if trial[g] == current[g]:
            continue
        if float(flops_model.ratio(trial)) >= target:
            current = trial
        else:
            frozen[g] = True
    return current


def _local_counts(groups, allowed: _Allowed, flops_model: FlopsModel, target: float) -> torch.Tensor:
    """Kept units per group when every group keeps the same fraction f of its units, bisected over the
    breakpoints of f. A count f·W rarely is an allowed width, so each group may take the allowed width
    just below or just above it; the mix closest to the target is built greedily (smallest FLOPs
    steps first), which keeps every group within one round-to step of the common fraction."""
    widths = flops_model.widths
    fractions = torch.unique(torch.cat([torch.arange(1, int(w) + 1, dtype=torch.float64) / w for w in widths]))

    def up(f):
        return allowed.round_up(torch.ceil(widths * f - 1e-9))

    lo, hi = 0, len(fractions) - 1              # ratio(up(fractions[hi])) ≥ target
    if float(flops_model.ratio(up(fractions[lo]))) >= target:
        return up(fractions[lo])
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if float(flops_model.ratio(up(fractions[mid]))) >= target:
            hi = mid
        else:
            lo = mid
    candidates = [up(fractions[lo]), up(fractions[hi])]
    for f in (fractions[lo], fractions[hi]):
        candidates += _mixed_rounding(allowed.round_down(widths * f), up(f), flops_model, target)
    return _closest(candidates, flops_model, target)


def _mixed_rounding(low: torch.Tensor, high: torch.Tensor, flops_model: FlopsModel, target: float
                    ) -> list[torch.Tensor]:
    """From all groups at `low`, raise groups to `high` one at a time, cheapest first, and return the
    configurations bracketing the target."""
    current = low.clone()
    if float(flops_model.ratio(current)) >= target:
        return [current]
    steps = []
    for g in (high > low).nonzero().flatten().tolist():
        trial = current.clone()
        trial[g] = high[g]
        steps.append((float(flops_model.ratio(trial)), g))
    for _gain, g in sorted(steps):
        trial = current.clone()
        trial[g] = high[g]
        if float(flops_model.ratio(trial)) >= target:
            return [current, trial]
        current = trial
    return [current]
