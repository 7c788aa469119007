"""Width allocation under a cost budget: allowed widths, the knapsack solver and gap closing.

Every group keeps a count of units from its allowed set (`AllowedCounts`: multiples of --round-to
channels, or the full width). Keeping the k best-scored units of group g is worth V_g(k), the sum of
their scores; the cost of a whole allocation comes from a `CostModel` (FLOPs or measured latency).

**Knapsack** (`knapsack_counts`): maximise Σ_g V_g(k_g) subject to cost(k) ≤ budget — HALP's
latency-constrained knapsack (Shen et al. 2022) over channel groups. The cost is not separable (a
convolution's latency depends on its input *and* output groups), so the classic value-per-weight
greedy is run on the exact cost: from the dense network, one move at a time, the group
narrowing (by one to LOOKAHEAD allowed steps) that loses the least value per unit of cost saved is
taken (NetAdapt-style, with every candidate re-costed after each move). A linearised
multiple-choice-knapsack solver (LP greedy on per-group hulls, re-linearised) was tried first and
oscillated between very different allocations on ResNet-18 latency tables, because one group's
narrowing changes what its neighbours cost. The greedy's optimality gap against exhaustive search
is measured in tests and docs/latency.md.

**Gap closing** (`close_gap`): coarse --round-to steps can leave the bracket far from the target
(one step of a 16-wide group is a large share of a small network). Whole allowed blocks are then
moved: while the cost is too high the cheapest block (lowest mean score, or lowest score per cost
saved for the knapsack) is dropped; while too low the best block that still fits is added back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compress.errors import CompressError
from compress.pruning.cost import CostModel
from compress.pruning.groups import ChannelGroup

# A greedy move may narrow a group by up to this many allowed steps at once. Measured latency is not
# convex in width: near a layer's dense width one step often saves nothing (ONNX Runtime CPU at
# 2 threads: 512 → 496 channels splits 31 blocks of 16 over 2 threads, as slow as 32), and a
# one-step greedy then never narrows that group at all (ResNet-18 kept its 7×7 stage whole).
LOOKAHEAD = 8


class AllowedCounts:
    """Per group, the allowed kept-unit counts under round_to, padded into one matrix."""

    def __init__(self, groups: list[ChannelGroup], round_to: int):
        if round_to < 1:
            raise CompressError(f"--round-to must be at least 1, got {round_to}")
        self.rows = [[k for k in range(1, g.width) if (k * g.unit_channels) % round_to == 0] + [g.width]
                     for g in groups]
        longest = max((len(r) for r in self.rows), default=1)
        big = max((g.width for g in groups), default=1) + 1
        self.table = torch.tensor([r + [big] * (longest - len(r)) for r in self.rows], dtype=torch.float64)
        self.minimum = torch.tensor([r[0] for r in self.rows], dtype=torch.float64)

    def at_least(self, floor: torch.Tensor) -> AllowedCounts:
        """The same counts without those below `floor` (per group; each group keeps its full width)."""
        out = object.__new__(AllowedCounts)
        out.rows = [[k for k in row if k >= f - 1e-9] or row[-1:] for row, f in zip(self.rows, floor.tolist(),
                                                                                      strict=True)]
        longest = max((len(r) for r in out.rows), default=1)
        big = float(self.table.max()) if self.table.numel() else 1.0
        out.table = torch.tensor([r + [big] * (longest - len(r)) for r in out.rows], dtype=torch.float64)
        out.minimum = torch.tensor([r[0] for r in out.rows], dtype=torch.float64)
        return out

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


def closest(candidates: list[torch.Tensor], model: CostModel, target: float) -> torch.Tensor:
    """The candidate allocation whose cost ratio is closest to `target` (the first on ties)."""
    ratios = model.ratio(torch.stack(candidates))
    return candidates[int(torch.argmin((ratios - target).abs()))]


def cumulative_values(vals: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per group, V(k) for k = 0..width: the sum of its k highest values."""
    return [torch.cat([torch.zeros(1, dtype=torch.float64), v.sort(descending=True).values.cumsum(0)]) for v in vals]


# ------------------------------------------------------------------ knapsack


@dataclass
class KnapsackInfo:
    """How the solution was found: greedy steps taken, and the value given up on the way."""

    steps: int
    value_kept: float            # Σ V_g(k_g) ÷ Σ V_g(width_g)


def knapsack_counts(vals: list[torch.Tensor], allowed: AllowedCounts, model: CostModel,
                    target: float) -> tuple[torch.Tensor, KnapsackInfo]:
    """Kept units per group with high total value and cost ratio closest to `target` (see module doc):
    from the dense network, repeatedly take the one-step narrowing (one group down to its next allowed
    count) that loses the least value per unit of cost saved — every candidate costed exactly, so the
    coupling of groups through shared layers is always current — until the ratio reaches the target."""
    cum = cumulative_values(vals)
    kept = model.widths.clone()
    ratio = float(model.ratio(kept))
    previous, steps = kept, 0
    while ratio > target:
        moves = [(g, c) for g, row in enumerate(allowed.rows) for c in [a for a in row if a < kept[g]][-LOOKAHEAD:]]
        if not moves:
            break
        trials = kept.repeat(len(moves), 1)
        trials[torch.arange(len(moves)), torch.tensor([g for g, _ in moves])] = torch.tensor(
            [float(c) for _, c in moves], dtype=trials.dtype)
        ratios = model.ratio(trials).detach()
        lost = torch.tensor([float(cum[g][int(kept[g])] - cum[g][c]) for g, c in moves], dtype=torch.float64)
        saved = ratio - ratios
        key = torch.where(saved > 1e-12, lost / saved.clamp_min(1e-12), torch.full_like(lost, float("inf")))
        if not bool(torch.isfinite(key).any()):
            key = lost                                       # nothing saves: lose the least
        best = int(torch.argmin(key))
        previous, kept = kept, trials[best]
        ratio = float(ratios[best])
        steps += 1
    total = sum(float(c[-1]) for c in cum) or 1.0
    chosen = closest([previous, kept], model, target)
    value = sum(float(c[int(k)]) for c, k in zip(cum, chosen.tolist(), strict=True))
    return chosen, KnapsackInfo(steps=steps, value_kept=value / total)


# ------------------------------------------------------------------ gap closing


def close_gap(kept: torch.Tensor, vals: list[torch.Tensor], allowed: AllowedCounts, model: CostModel,
              target: float, tolerance: float, per_cost: bool) -> torch.Tensor:
    """Move whole allowed blocks until the cost ratio is within `tolerance` of `target` (see module doc).

    `per_cost=False` ranks blocks by their mean value (cost-blind, as the ranking is); `per_cost=True`
    by value per unit of cost (as the knapsack is)."""
    cum = cumulative_values(vals)
    kept = kept.clone()
    for _ in range(sum(len(r) for r in allowed.rows)):       # each move changes one group by one step
        ratio = float(model.ratio(kept))
        if abs(ratio - target) <= tolerance:
            break
        too_high = ratio > target + tolerance
        moves = _moves(kept, allowed, down=too_high)
        if not moves:
            break
        trials = torch.stack([_with(kept, g, c) for g, c in moves])
        ratios = model.ratio(trials).detach()
        best, best_key = None, None
        for (g, count), r in zip(moves, ratios.tolist(), strict=True):
            if not too_high and r > target + tolerance:
                continue                                     # adding this block would overshoot
            lo, hi = sorted((int(kept[g]), count))
            value = float(cum[g][hi] - cum[g][lo])
            key = value / (hi - lo)
            if per_cost:
                key = value / max(abs(ratio - r), 1e-12)
            key = key if too_high else -key                   # drop the least, add the most valuable
            if best_key is None or key < best_key:
                best, best_key = (g, count), key
        if best is None:
            break
        kept[best[0]] = best[1]
    return kept


def _moves(kept: torch.Tensor, allowed: AllowedCounts, down: bool) -> list[tuple[int, int]]:
    """(group, neighbouring allowed count) for every group that can move one step down (or up)."""
    out = []
    for g, counts in enumerate(allowed.rows):
        k = int(kept[g])
        options = [a for a in counts if a < k] if down else [a for a in counts if a > k]
        if options:
            out.append((g, max(options) if down else min(options)))
    return out


def _with(kept: torch.Tensor, group: int, count: int) -> torch.Tensor:
    out = kept.clone()
    out[group] = count
    return out
