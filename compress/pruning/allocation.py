"""Width allocation under a cost budget: allowed widths, the knapsack solver and gap closing.

Every group keeps a count of units from its allowed set (`AllowedCounts`: multiples of --round-to
channels, or the full width); the cost of an allocation comes from a `CostModel` (FLOPs or measured
latency) and its worth from a `Worth` (what the kept units are worth to the method: `additive`, the sum
of their scores, or `WeightedFlops`, the network's FLOPs with every unit weighted by its score).

**Knapsack** (`knapsack_counts`): maximise the worth subject to cost(k) ≤ budget — HALP's
latency-constrained knapsack (Shen et al. 2022) over channel groups. Neither the cost nor the weighted
FLOPs are separable (a convolution's latency and its FLOPs depend on its input *and* output groups),
so the classic value-per-weight greedy is run on the exact functions: from the dense network, one
move at a time, the group narrowing (by one to LOOKAHEAD allowed steps) that loses the least worth
per unit of cost saved is taken (NetAdapt-style, with every candidate re-costed after each move). A
linearised multiple-choice-knapsack solver (LP greedy on per-group hulls, re-linearised) was tried
first and oscillated between very different allocations on ResNet-18 latency tables, because one
group's narrowing changes what its neighbours cost. The greedy's optimality gap against exhaustive
search is measured in tests and docs/latency.md.

**Gap closing** (`close_gap`): coarse --round-to steps can leave the bracket far from the target
(one step of a 16-wide group is a large share of a small network). Whole allowed blocks are then
moved: while the cost is too high the cheapest block (least worth per unit, or per cost saved for
the knapsack) is dropped; while too low the best block that still fits is added back.
"""

from __future__ import annotations

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


# ------------------------------------------------------------------ worth


class Worth:
    """What an allocation is worth: `Worth(vals)(kept)` is Σ_g V_g(k_g), the sum of every group's k_g
    best values (kept: [G] or [B, G] of whole counts; returns a scalar or [B])."""

    def __init__(self, vals: list[torch.Tensor]):
        cum = cumulative_values(vals)
        longest = max((len(c) for c in cum), default=1)
        # padded with each group's total, so a count is looked up by one gather
        self.cum = torch.stack([torch.cat([c, c[-1:].expand(longest - len(c))]) for c in cum]) if cum else \
            torch.zeros(0, 1, dtype=torch.float64)
        self.total = self.cum[:, -1]

    def per_group(self, kept: torch.Tensor) -> torch.Tensor:
        """V_g(k_g) for every group ([..., G])."""
        flat = kept.reshape(-1, kept.shape[-1]).round().long().clamp(min=0, max=self.cum.shape[1] - 1)
        return self.cum.gather(1, flat.T).T.reshape(kept.shape)

    def __call__(self, kept: torch.Tensor) -> torch.Tensor:
        return self.per_group(kept).sum(-1)


class WeightedFlops(Worth):
    """The network's FLOPs (÷ dense) with each group's kept width replaced by its *score-weighted*
    width: W_g × V_g(k_g) ÷ V_g(W_g), the share of the group's importance that is kept. A layer's worth
    is then its FLOPs × the importance kept at its input × at its output — bilinear, as its compute is.
    With equal scores this is exactly the FLOPs ratio; a sum of per-unit values cannot be (halving two
    neighbouring groups keeps a quarter of the layer between them), and at a latency budget that sum
    preferred allocations that keep fewer FLOPs than uniform pruning (ResNet-18: 0.255 vs 0.261)."""

    def __init__(self, vals: list[torch.Tensor], flops: CostModel):
        super().__init__(vals)
        self.flops = flops

    def __call__(self, kept: torch.Tensor) -> torch.Tensor:
        share = self.per_group(kept) / self.total.clamp_min(1e-12)
        return self.flops.ratio(share * self.flops.widths)


# ------------------------------------------------------------------ knapsack


def knapsack_counts(worth: Worth, allowed: AllowedCounts, model: CostModel,
                    target: float) -> tuple[torch.Tensor, int]:
    """Kept units per group with high worth and cost ratio closest to `target` (see module doc): from
    the dense network, repeatedly take the narrowing (one group down by one to LOOKAHEAD allowed
    counts) that loses the least worth per unit of cost saved — every candidate costed exactly, so
    the coupling of groups through shared layers is always current — until the ratio reaches the target."""
    kept = model.widths.clone()
    ratio, value = float(model.ratio(kept)), float(worth(kept))
    previous, steps = kept, 0
    while ratio > target:
        moves = [(g, c) for g, row in enumerate(allowed.rows) for c in [a for a in row if a < kept[g]][-LOOKAHEAD:]]
        if not moves:
            break
        trials = kept.repeat(len(moves), 1)
        trials[torch.arange(len(moves)), torch.tensor([g for g, _ in moves])] = torch.tensor(
            [float(c) for _, c in moves], dtype=trials.dtype)
        ratios = model.ratio(trials).detach()
        values = worth(trials).detach()
        lost = (value - values).clamp_min(0.0)
        saved = ratio - ratios
        key = torch.where(saved > 1e-12, lost / saved.clamp_min(1e-12), torch.full_like(lost, float("inf")))
        if not bool(torch.isfinite(key).any()):
            key = lost                                       # nothing saves: lose the least
        best = int(torch.argmin(key))
        previous, kept = kept, trials[best]
        ratio, value = float(ratios[best]), float(values[best])
        steps += 1
    return closest([previous, kept], model, target), steps


def best_within(candidates: list[torch.Tensor], worth: Worth, model: CostModel, target: float,
                tolerance: float) -> int:
    """Index of the candidate worth the most among those that cost at most `tolerance` above the
    target (else the closest): one that lands lower only gives worth away, and is still taken where it
    is worth more (coarse channel blocks can leave a good allocation below the target)."""
    batch = torch.stack(candidates)
    ratios = model.ratio(batch).detach()
    fits = ratios <= target + tolerance + 1e-12
    if not bool(fits.any()):
        return int(torch.argmin((ratios - target).abs()))
    values = torch.where(fits, worth(batch).detach(), torch.full_like(ratios, -float("inf")))
    return int(torch.argmax(values))


def exchange(kept: torch.Tensor, worth: Worth, allowed: AllowedCounts, model: CostModel, budget: float,
             rounds: int = 200) -> tuple[torch.Tensor, int]:
    """Local search after the greedy: while some pair of moves — one group one allowed step wider,
    another one step narrower — raises the worth and keeps the cost ratio within `budget`, take the best
    such pair. The greedy commits to its early narrowings (cheap latency near the dense widths) and
    cannot undo them; on ResNet-18 at 0.31 of the latency its allocation was worth 0.21 of the dense
    network where uniform widths were worth 0.28. Returns the allocation and the exchanges made."""
    kept = kept.clone()
    value = float(worth(kept))
    for done in range(rounds):
        ups, downs = _moves(kept, allowed, down=False), _moves(kept, allowed, down=True)
        if not ups or not downs:
            return kept, done
        up_g = torch.tensor([g for g, _ in ups])
        down_g = torch.tensor([g for g, _ in downs])
        pairs = torch.cartesian_prod(torch.arange(len(ups)), torch.arange(len(downs)))
        pairs = pairs[up_g[pairs[:, 0]] != down_g[pairs[:, 1]]]
        trials = kept.repeat(len(pairs), 1)
        rows = torch.arange(len(pairs))
        trials[rows, up_g[pairs[:, 0]]] = torch.tensor([float(c) for _, c in ups], dtype=trials.dtype)[pairs[:, 0]]
        trials[rows, down_g[pairs[:, 1]]] = torch.tensor([float(c) for _, c in downs], dtype=trials.dtype)[pairs[:, 1]]
        fits = model.ratio(trials).detach() <= budget + 1e-12
        gains = torch.where(fits, worth(trials).detach() - value, torch.full((len(pairs),), -float("inf"),
                                                                                dtype=torch.float64))
        best = int(torch.argmax(gains))
        if not float(gains[best]) > 1e-9:
            return kept, done
        kept, value = trials[best], value + float(gains[best])
    return kept, rounds


# ------------------------------------------------------------------ gap closing


def close_gap(kept: torch.Tensor, worth: Worth, allowed: AllowedCounts, model: CostModel,
              target: float, tolerance: float, per_cost: bool) -> torch.Tensor:
    """Move whole allowed blocks until the cost ratio is within `tolerance` of `target` (see module doc).

    `per_cost=False` ranks blocks by their worth per unit (cost-blind, as the ranking is);
    `per_cost=True` by worth per unit of cost (as the knapsack is)."""
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
        changes = (worth(trials).detach() - float(worth(kept))).abs()
        best, best_key = None, None
        for (g, count), r, change in zip(moves, ratios.tolist(), changes.tolist(), strict=True):
            if not too_high and r > target + tolerance:
                continue                                     # adding this block would overshoot
            key = change / max(abs(ratio - r), 1e-12) if per_cost else change / abs(count - int(kept[g]))
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
