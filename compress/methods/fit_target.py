"""Bring keep-masks within a tolerance of a FLOPs target when coarse `--round-to` widths make the
engine's one-path targeting jump over it.

`select_masks` removes units along one global ranking and keeps the closer of the two ratios that
bracket the target. With `--round-to 8` on narrow networks (ResNet-20: groups of 16–64 channels) one
step of that path can move the ratio by 0.1 (a 16-wide group falling to 8), so its closest point
may miss the target by more than the ±0.02 a run promises. This greedy repair moves whole allowed
blocks of units: while the ratio is too high it drops the block with the lowest mean score; while
too low it adds the best-scored block that still fits under target + tolerance.
"""

from __future__ import annotations

import torch

from compress.pruning.flops_model import FlopsModel
from compress.pruning.groups import ChannelGroup


def allowed_counts(group: ChannelGroup, round_to: int) -> list[int]:
    """Kept-unit counts a group may have under round_to (the engine's rule: a multiple of round_to
    channels, or the full width)."""
    return [k for k in range(1, group.width) if (k * group.unit_channels) % round_to == 0] + [group.width]


def fit_to_target(masks: dict[str, torch.Tensor], scores: dict[str, torch.Tensor], groups: list[ChannelGroup],
                  flops_model: FlopsModel, target: float, round_to: int, tolerance: float) -> dict[str, torch.Tensor]:
    """Masks keeping each group's best-scored units, with an estimated ratio within `tolerance` of `target`
    where the allowed widths permit it (otherwise the closest found at or below target + tolerance)."""
    ratio = flops_model.ratio_of_masks(masks)
    if abs(ratio - target) <= tolerance:
        return masks
    ranked = [scores[g.id].detach().double().sort(descending=True).values for g in groups]
    allowed = [allowed_counts(g, round_to) for g in groups]
    kept = [int(masks[g.id].sum()) for g in groups]

    def with_count(i: int, count: int) -> torch.Tensor:
        k = torch.tensor(kept, dtype=torch.float64)
        k[i] = count
        return k

    for _ in range(sum(len(a) for a in allowed)):        # every move changes one group by one allowed step
        ratio = float(flops_model.ratio(torch.tensor(kept, dtype=torch.float64)))
        if abs(ratio - target) <= tolerance:
            break
        if ratio > target + tolerance:
            moves = [(float(ranked[i][lower:kept[i]].mean()), i, lower) for i in range(len(groups))
                     if (lower := max((a for a in allowed[i] if a < kept[i]), default=None)) is not None]
            if not moves:
                break
            _, i, count = min(moves)
        else:
            moves = [(float(ranked[i][kept[i]:upper].mean()), i, upper) for i in range(len(groups))
                     if (upper := min((a for a in allowed[i] if a > kept[i]), default=None)) is not None
                     and float(flops_model.ratio(with_count(i, upper))) <= target + tolerance]
            if not moves:
                break
            _, i, count = max(moves)
        kept[i] = count
    out = {}
    for g, k in zip(groups, kept, strict=True):
        mask = torch.zeros(g.width, dtype=torch.bool)
        mask[torch.argsort(scores[g.id].detach(), descending=True, stable=True)[:k]] = True
        out[g.id] = mask
    return out
