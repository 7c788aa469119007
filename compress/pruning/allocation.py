"""Width allocation under a cost budget: allowed widths, the knapsack solver and gap closing.

Every group keeps a count of units from its allowed set (`AllowedCounts`: multiples of --round-to
channels, or the full width). Keeping the k best-scored units of group g is worth V_g(k), the sum of
their scores; the cost of a whole allocation comes from a `CostModel` (FLOPs or measured latency).

**Knapsack** (`knapsack_counts`): maximise Σ_g V_g(k_g) subject to cost(k) ≤ budget — HALP's
latency-constrained knapsack (Shen et al. 2022) over channel groups. The cost is not separable (a
convolution's latency depends on its input *and* output groups), so it is linearised around a
reference allocation r: the cost of group g at count a is the exact cost of r with only g changed.
That separable problem is a multiple-choice knapsack, solved by its LP-relaxation greedy
(Sinha & Zoltners 1979): per group the upper concave hull of (cost, value) points, all hull
segments taken in decreasing value-per-cost order. Along that order the *exact* cost is bisected to
bracket the budget; the solution becomes the next reference (HALP re-estimates neighbour widths
the same way between pruning steps), three rounds at most. The optimality gap of the linearised
problem is bounded by the value of the first segment left out (the LP bound); it is returned so a
caller can report it.

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

RELINEARISE = 3


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
    """How the solution was found: rounds of re-linearisation, and the LP optimality gap of the last
    round (upper bound on value lost to integrality, ÷ the solution's value)."""

    rounds: int
    lp_gap: float


def knapsack_counts(vals: list[torch.Tensor], allowed: AllowedCounts, model: CostModel,
                    target: float) -> tuple[torch.Tensor, KnapsackInfo]:
    """Kept units per group maximising total value with cost ratio closest to `target` (see module doc)."""
    cum = cumulative_values(vals)
    reference = model.widths.clone()
    best, best_err, gap = None, float("inf"), 0.0
    seen: list[torch.Tensor] = []
    while len(seen) < RELINEARISE:
        path = _hull_path(cum, allowed, model, reference)
        counts, gap = _bracket(path, cum, model, target)
        err = abs(float(model.ratio(counts)) - target)
        if err < best_err - 1e-12:
            best, best_err = counts, err
        if any(torch.equal(counts, s) for s in seen):
            break
        seen.append(counts)
        reference = counts
    return best, KnapsackInfo(rounds=len(seen), lp_gap=gap)


@dataclass
class _Path:
    """The greedy's order: all groups at their cheapest hull vertex, then segments one by one."""

    start: torch.Tensor          # [G] counts
    group: torch.Tensor          # [S] group of each segment, in greedy order
    count: torch.Tensor          # [S] the group's count after the segment
    gain: torch.Tensor           # [S] value the segment adds

    def counts(self, t: int) -> torch.Tensor:
        """Allocation after the first t segments."""
        out = self.start.clone()
        if t > 0:   # later segments of a group come later in the order, so the last write wins
            out.index_put_((self.group[:t],), self.count[:t])
        return out


def _hull_path(cum: list[torch.Tensor], allowed: AllowedCounts, model: CostModel, reference: torch.Tensor) -> _Path:
    """The LP-greedy order of the multiple-choice knapsack linearised at `reference`."""
    rows, owner = [], []
    for g, counts in enumerate(allowed.rows):
        for a in counts:
            k = reference.clone()
            k[g] = a
            rows.append(k)
            owner.append(g)
    costs = model.cost(torch.stack(rows)).detach()
    start = torch.zeros(len(allowed.rows), dtype=torch.float64)
    segs: list[tuple[float, int, int, float]] = []          # (slope, group, count, gain)
    offset = 0
    for g, counts in enumerate(allowed.rows):
        c = costs[offset: offset + len(counts)].tolist()
        offset += len(counts)
        hull = _upper_hull([(c[i], float(cum[g][a]), a) for i, a in enumerate(counts)])
        start[g] = hull[0][2]
        for (w0, v0, _a0), (w1, v1, a1) in zip(hull, hull[1:], strict=False):
            segs.append(((v1 - v0) / max(w1 - w0, 1e-30), g, a1, v1 - v0))
    segs.sort(key=lambda s: -s[0])    # stable: a group's segments keep their (decreasing-slope) order
    return _Path(start=start,
                 group=torch.tensor([s[1] for s in segs], dtype=torch.long),
                 count=torch.tensor([float(s[2]) for s in segs], dtype=torch.float64),
                 gain=torch.tensor([s[3] for s in segs], dtype=torch.float64))


def _upper_hull(points: list[tuple[float, float, int]]) -> list[tuple[float, float, int]]:
    """Vertices of the upper concave envelope of (cost, value, count) points, value increasing:
    the allocations of one group worth considering (others cost more for less value)."""
    points = sorted(points, key=lambda p: (p[0], -p[1]))
    hull: list[tuple[float, float, int]] = []
    for p in points:
        if hull and p[1] <= hull[-1][1]:
            continue                                        # costs more, worth no more
        while len(hull) >= 2 and _cross(hull[-2], hull[-1], p) >= 0:
            hull.pop()                                      # hull[-1] lies under the chord
        hull.append(p)
    return hull


def _cross(o, a, b) -> float:
    return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])


def _bracket(path: _Path, cum: list[torch.Tensor], model: CostModel, target: float) -> tuple[torch.Tensor, float]:
    """The allocation along `path` whose exact cost ratio is closest to `target`, and the LP gap there."""
    lo, hi = 0, len(path.group)
    if float(model.ratio(path.counts(lo))) >= target:
        return path.counts(lo), 0.0
    if float(model.ratio(path.counts(hi))) <= target:
        return path.counts(hi), 0.0
    while hi - lo > 1:                         # ratio(counts(lo)) < target ≤ ratio(counts(hi))
        mid = (lo + hi) // 2
        if float(model.ratio(path.counts(mid))) < target:
            lo = mid
        else:
            hi = mid
    below, above = path.counts(lo), path.counts(hi)
    value = sum(float(c[int(k)]) for c, k in zip(cum, below.tolist(), strict=True))
    gap = float(path.gain[lo]) / value if value > 0 else 0.0
    return closest([below, above], model, target), gap


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
