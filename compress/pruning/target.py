"""Target selection: from per-unit scores, the keep-masks whose cost ratio (any `CostModel`: FLOPs,
measured latency) is closest to R.

- `scope="global"`, `allocation="rank"`: all units of all groups are ranked together by their score
  divided by the mean |score| of their group (so groups are comparable), and the lowest are removed
  until the ratio is hit — blind to what a unit costs (Torch-Pruning's global pruning).
- `scope="global"`, `allocation="knapsack"`: the kept widths maximise the network's score-weighted
  FLOPs (`knapsack_worth`) under the cost budget (allocation.py: HALP's knapsack, solved greedily),
  every group keeping at least a quarter of its units where the target allows (`knapsack_floor`);
  where uniform pruning to the same cost is worth more, uniform pruning is taken.
- `scope="local"`: every group keeps the same fraction of its units, solved so the total hits R.
- `round_to=K`: every group keeps a number of channels that is a multiple of K, or its full width; and
  of the cost model's `channel_step` too (a latency target's channel block: `allowed_counts`).

For the ranking the ratio is monotone in the number of removed units, so a bisection over the
ranking (global) or the kept fraction (local) finds the two configurations bracketing R; the closer
one wins. Each step is one vectorised cost-model evaluation, so selecting masks costs milliseconds
(cheap enough for every training step of a learned method). When round-to steps leave the result
more than `tolerance` from R, whole allowed blocks are moved until within a fifth of it
(allocation.close_gap), whichever method produced the scores and in either scope (a local result
then departs from the common fraction by those blocks).
"""

from __future__ import annotations

import math

import torch

from compress.errors import CompressError
from compress.pruning.allocation import (
    AllowedCounts,
    WeightedFlops,
    Worth,
    best_within,
    close_gap,
    closest,
    exchange,
    knapsack_counts,
)
from compress.pruning.cost import CostModel
from compress.pruning.groups import ChannelGroup

SCOPES = ("global", "local")
ALLOCATIONS = ("rank", "knapsack")
TOLERANCE = 0.005   # global bracket this far from the target: close the gap by moving whole blocks
MIN_KEEP = 0.25     # knapsack: every group keeps at least this share of its units (if the target allows)


def smallest_ratio(groups: list[ChannelGroup], cost_model: CostModel, round_to: int = 8) -> float:
    """The estimated cost ratio with every group at its smallest allowed width."""
    return float(cost_model.ratio(allowed_counts(groups, cost_model, round_to).minimum)) if groups else 1.0


def allowed_counts(groups: list[ChannelGroup], cost_model: CostModel, round_to: int) -> AllowedCounts:
    """The widths a group may keep: multiples of --round-to and of the cost model's channel step (a width
    inside a backend's channel block costs the whole block, so stopping there only loses channels)."""
    return AllowedCounts(groups, math.lcm(round_to, cost_model.channel_step) if round_to >= 1 else round_to)


def step_note(cost_model: CostModel, round_to: int) -> str:
    """How the allowed widths step, for messages: "--round-to 8", or with the backend's channel block."""
    step = math.lcm(round_to, cost_model.channel_step)
    return f"--round-to {round_to}" + (f" (widths in steps of {step}: the target's channel block is "
                                       f"{cost_model.channel_step})" if step != round_to else "")


def check_ratio(ratio: float, flag: str = "--flops-ratio") -> None:
    if not 0.0 < ratio <= 1.0:
        what = "latency" if "latency" in flag else "FLOPs"
        raise CompressError(f"{flag} must be in (0, 1] (pruned {what} ÷ dense {what}), got {ratio}")


def select_masks(scores: dict[str, torch.Tensor], groups: list[ChannelGroup], cost_model: CostModel,
                 ratio: float, scope: str = "global", round_to: int = 8, normalize: bool = True,
                 allocation: str = "rank", tolerance: float = TOLERANCE) -> dict[str, torch.Tensor]:
    """Boolean keep-masks (per group id, shape [width]) whose estimated cost ratio is closest to
    `ratio`. Higher score = more important. `normalize=False` ranks raw scores globally (for
    methods whose scores are already comparable across groups)."""
    kept = select_counts(scores, groups, cost_model, ratio, scope=scope, round_to=round_to, normalize=normalize,
                         allocation=allocation, tolerance=tolerance)
    return masks_of_counts(scores, groups, kept)


def masks_of_counts(scores: dict[str, torch.Tensor], groups: list[ChannelGroup],
                    kept: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per group, keep its `kept[g]` highest-scored units."""
    masks = {}
    for g, k in zip(groups, kept.tolist(), strict=True):
        mask = torch.zeros(g.width, dtype=torch.bool)
        order = torch.argsort(scores[g.id].detach().cpu().flatten(), descending=True, stable=True)
        mask[order[: int(round(k))]] = True
        masks[g.id] = mask
    return masks


def select_counts(scores: dict[str, torch.Tensor], groups: list[ChannelGroup], cost_model: CostModel,
                  ratio: float, scope: str = "global", round_to: int = 8, normalize: bool = True,
                  allocation: str = "rank", tolerance: float = TOLERANCE,
                  report: dict | None = None) -> torch.Tensor:
    """Kept units per group ([G], float) of `select_masks`. `report`, if given, receives how the
    knapsack solved it (greedy moves, the allocation chosen, the worth of each candidate ÷ dense)."""
    flag = cost_model.flag
    check_ratio(ratio, flag)
    if scope not in SCOPES:
        raise CompressError(f"--scope must be one of {', '.join(SCOPES)}, got {scope!r}")
    if allocation not in ALLOCATIONS:
        raise CompressError(f"--allocation must be one of {', '.join(ALLOCATIONS)}, got {allocation!r}")
    if allocation == "knapsack" and scope != "global":
        raise CompressError("--allocation knapsack chooses every group's width itself; it needs --scope global")
    if not groups:
        if ratio < 1.0:
            raise CompressError(f"this model has no prunable channel groups; the only reachable {flag} is 1")
        return torch.zeros(0, dtype=torch.float64)
    allowed = allowed_counts(groups, cost_model, round_to)
    lowest = float(cost_model.ratio(allowed.minimum))
    if ratio < lowest - 1e-9:
        raise CompressError(f"{flag} {ratio} is unreachable for this model with {step_note(cost_model, round_to)}: "
                            f"the smallest "
                            f"reachable is {lowest:.4f} (every group at its minimum width; {cost_model.describe()})")
    vals = [scores[g.id].detach().to(device="cpu", dtype=torch.float64).flatten() for g in groups]
    for g, v in zip(groups, vals, strict=True):
        if v.numel() != g.width:
            raise ValueError(f"scores for group {g.id} have {v.numel()} entries, the group has {g.width} units")
    if normalize:
        vals = [v / (v.abs().mean() + 1e-12) for v in vals]
    if allocation == "knapsack":
        return _knapsack(vals, groups, allowed, cost_model, ratio, tolerance, report)
    if scope == "local":
        kept = _local_counts(groups, allowed, cost_model, ratio)
    else:
        kept = _global_counts(vals, groups, allowed, cost_model, ratio)
    return _polished(kept, Worth(vals), allowed, cost_model, ratio, tolerance, per_cost=False)


def _polished(kept: torch.Tensor, worth: Worth, allowed: AllowedCounts, cost_model: CostModel, ratio: float,
              tolerance: float, per_cost: bool) -> torch.Tensor:
    """`kept`, or where it is more than `tolerance` from the target, the gap-closed allocation if closer."""
    if abs(float(cost_model.ratio(kept)) - ratio) <= tolerance:
        return kept
    return closest([kept, close_gap(kept, worth, allowed, cost_model, ratio, tolerance / 5, per_cost)],
                   cost_model, ratio)


def _knapsack(vals: list[torch.Tensor], groups: list[ChannelGroup], allowed: AllowedCounts, cost_model: CostModel,
              ratio: float, tolerance: float, report: dict | None) -> torch.Tensor:
    """The knapsack's allocation: two starts — the greedy's allocation and uniform pruning to the same
    cost — each improved by exchanges (allocation.exchange); the one worth more is taken. The greedy is
    not optimal: on ResNets at a low latency budget uniform widths were worth more than its result."""
    worth = knapsack_worth(vals, groups)
    floored = allowed.at_least(knapsack_floor(groups, allowed, cost_model, ratio))
    greedy, steps = knapsack_counts(worth, floored, cost_model, ratio)
    starts = {"knapsack": _polished(greedy, worth, floored, cost_model, ratio, tolerance, per_cost=True),
              "uniform": _polished(_local_counts(groups, allowed, cost_model, ratio), worth, allowed, cost_model,
                                   ratio, tolerance, per_cost=True)}
    improved = {name: exchange(kept, worth, floored, cost_model, max(float(cost_model.ratio(kept)), ratio))
                for name, kept in starts.items()}
    names = list(improved)
    choice = names[best_within([kept for kept, _ in improved.values()], worth, cost_model, ratio, tolerance)]
    if report is not None:
        dense = float(worth(cost_model.widths)) or 1.0
        report.update(knapsack_steps=steps, knapsack_choice=choice, knapsack_exchanges=improved[choice][1],
                      **{f"knapsack_worth_{n}_start": round(float(worth(k)) / dense, 6) for n, k in starts.items()},
                      **{f"knapsack_worth_{n}": round(float(worth(k)) / dense, 6) for n, (k, _) in improved.items()})
    return improved[choice][0]


def knapsack_worth(vals: list[torch.Tensor], groups: list[ChannelGroup]) -> Worth:
    """What an allocation is worth to the knapsack: the network's FLOPs with every unit weighted by its
    score (shifted to be ≥ 0; allocation.WeightedFlops). Scores rank units within a group; across
    groups, a unit of a 56×56-px layer holds more of the network than one at 7×7 px, and a layer
    between two halved groups keeps a quarter of its compute, so at equal latency the knapsack keeps
    the most important *compute*, not the most units."""
    floor = min(float(v.min()) for v in vals)
    return WeightedFlops([v - min(floor, 0.0) for v in vals], groups[0].graph.flops_model)


def knapsack_floor(groups: list[ChannelGroup], allowed: AllowedCounts, cost_model: CostModel,
                   target: float) -> torch.Tensor:
    """The fewest units each group may keep in a knapsack allocation: MIN_KEEP of its width (a knapsack
    with near-flat scores otherwise empties whole layers), lowered where the target needs it (to
    where every group at the floor costs at most 0.8 × the target)."""
    widths = torch.tensor([g.width for g in groups], dtype=torch.float64)
    keep = MIN_KEEP
    for _ in range(20):
        floor = allowed.round_up(torch.ceil(widths * keep - 1e-9))
        if float(cost_model.ratio(floor)) <= 0.8 * target or keep < 1e-3:
            return floor
        keep /= 2
    return allowed.minimum


def _global_counts(vals, groups, allowed: AllowedCounts, cost_model: CostModel, target: float) -> torch.Tensor:
    """Kept units per group when the `t` globally lowest-ranked units are removed, t bisected."""
    flat = torch.cat(vals)
    owner = torch.cat([torch.full((g.width,), i, dtype=torch.long) for i, g in enumerate(groups)])
    owner = owner[torch.argsort(flat, stable=True)]
    widths = cost_model.widths

    def counts(t: int) -> torch.Tensor:
        removed = torch.bincount(owner[:t], minlength=len(groups)).to(torch.float64)
        return allowed.round_up(widths - removed)

    lo, hi = 0, len(owner)            # ratio(counts(lo)) ≥ target; find the last t that keeps it so
    if float(cost_model.ratio(counts(hi))) >= target:
        return counts(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if float(cost_model.ratio(counts(mid))) >= target:
            lo = mid
        else:
            hi = mid
    return closest([counts(lo), counts(hi)], cost_model, target)


def _local_counts(groups, allowed: AllowedCounts, cost_model: CostModel, target: float) -> torch.Tensor:
    """Kept units per group when every group keeps the same fraction f of its units, bisected over the
    breakpoints of f. A count f·W rarely is an allowed width, so each group may take the allowed width
    just below or just above it; the mix closest to the target is built greedily (smallest cost
    steps first), which keeps every group within one round-to step of the common fraction."""
    widths = cost_model.widths
    fractions = torch.unique(torch.cat([torch.arange(1, int(w) + 1, dtype=torch.float64) / w for w in widths]))

    def up(f):
        return allowed.round_up(torch.ceil(widths * f - 1e-9))

    lo, hi = 0, len(fractions) - 1              # ratio(up(fractions[hi])) ≥ target
    if float(cost_model.ratio(up(fractions[lo]))) >= target:
        return up(fractions[lo])
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if float(cost_model.ratio(up(fractions[mid]))) >= target:
            hi = mid
        else:
            lo = mid
    candidates = [up(fractions[lo]), up(fractions[hi])]
    for f in (fractions[lo], fractions[hi]):
        candidates += _mixed_rounding(allowed.round_down(widths * f), up(f), cost_model, target)
    return closest(candidates, cost_model, target)


def _mixed_rounding(low: torch.Tensor, high: torch.Tensor, cost_model: CostModel, target: float
                    ) -> list[torch.Tensor]:
    """From all groups at `low`, raise groups to `high` one at a time, cheapest first, and return the
    configurations bracketing the target."""
    current = low.clone()
    if float(cost_model.ratio(current)) >= target:
        return [current]
    steps = []
    for g in (high > low).nonzero().flatten().tolist():
        trial = current.clone()
        trial[g] = high[g]
        steps.append((float(cost_model.ratio(trial)), g))
    for _gain, g in sorted(steps):
        trial = current.clone()
        trial[g] = high[g]
        if float(cost_model.ratio(trial)) >= target:
            return [current, trial]
        current = trial
    return [current]


def mask_overlap(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> dict[str, float | int]:
    """How far a search moved the masks: Jaccard index of the kept units (|A ∩ B| / |A ∪ B| over the units of
    every group), the same for the removed units, and how many units changed side. 1, 1, 0: the search
    kept exactly what its starting scores would have kept."""
    kept_both = kept_any = removed_both = removed_any = changed = 0
    for gid, b in before.items():
        b, a = torch.as_tensor(b, dtype=torch.bool).cpu(), torch.as_tensor(after[gid], dtype=torch.bool).cpu()
        kept_both += int((a & b).sum())
        kept_any += int((a | b).sum())
        removed_both += int((~a & ~b).sum())
        removed_any += int((~a | ~b).sum())
        changed += int((a ^ b).sum())
    return {"jaccard_kept": round(kept_both / kept_any, 4) if kept_any else 1.0,
            "jaccard_removed": round(removed_both / removed_any, 4) if removed_any else 1.0,
            "units_changed": changed}
