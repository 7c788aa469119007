"""What PASS's hypernetwork reads at each step: the weight statistics of a channel group, given the masks of
the groups that produce its inputs — the paper's M(i−1) ⊗ W(i).

A group's units are output channels of its *producer layers* (the convolutions/Linear layers whose rows it
owns). Those layers read input channels that belong to other groups: the graph's real producers of this group,
which in a residual or branching network are often not the previous entry of the step order. The statistics
of a unit are norms of all its coupled weights; the part that lies in a producer layer's rows is counted only
over the input channels the producing group's mask keeps. So for every (group, producing group) pair the
per-unit squared norms and L1 norms are stored as matrices [units, producer units]; at the step they are
multiplied by the producer's (straight-through) mask, which also carries gradient back to that mask.

What is not restricted (our choices): a producer not yet stepped (later in step order, e.g. the blocks that
feed a residual stream whose root is the stem) counts as fully kept; so do inputs that are no prunable group
(the image, excluded groups), input columns of a grouped convolution, consumer columns (their mask comes later)
and depthwise filters (their input is the unit's own channel). With every producer fully kept the statistics
are exactly the dense ones (`GroupStats.stats`, which also fingerprints the backbone).

Per step: sorted-quantile sketches of the per-unit L1 and L2 norms (each divided by its mean), mean/std of the
group's weights, log mean L2, the group's width, depth fraction and FLOPs share; per unit: z-scored producer
norm, consumer norm and BN scale (the heads' channel features); and each unit's share of the group's L2 norm.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from compress.pruning.groups import ChannelGroup

N_QUANTILES = 8
STAT_DIM = 2 * N_QUANTILES + 6
CHANNEL_FEATURES = 3
_MIXING = ("conv", "linear", "gconv")


@dataclass
class ProducerLink:
    """Weights of a group's producer rows that read the channels of group `source` (an earlier step)."""

    source: int                  # index of the producing group in step order
    sq: torch.Tensor             # [units, source units]: squared weights, summed per (unit, input unit)
    l1: torch.Tensor             # [units, source units]: absolute weights, likewise


@dataclass
class StepParts:
    """One group's statistics, split into what the producers' masks do not change and the links they do."""

    l1: torch.Tensor             # [units] L1 over every coupled weight outside the links
    sq: torch.Tensor             # [units] squared L2, likewise
    out: torch.Tensor            # [units] squared L2 of producer rows and depthwise filters outside the links
    in_z: torch.Tensor           # [units] z-scored consumer-column norm (fixed)
    gamma_z: torch.Tensor        # [units] z-scored BN scale (fixed)
    moments: torch.Tensor        # [2] mean/std of the group's weights, log10 std (dense)
    tail: torch.Tensor           # [3] width share, depth fraction, FLOPs share
    links: list[ProducerLink] = field(default_factory=list)


@dataclass
class StepInputs:
    row: torch.Tensor            # [STAT_DIM] the LSTM's weight-statistics input
    channel: torch.Tensor        # [units, CHANNEL_FEATURES] per-unit features of the head
    share: torch.Tensor          # [units] each unit's share of the group's L2 norm


@dataclass
class GroupStats:
    """Everything the hypernetwork reads about a frozen backbone, computed once."""

    ids: list[str]
    widths: list[int]
    stats: torch.Tensor                 # [G, STAT_DIM] dense step inputs (every producer channel kept)
    channel: list[torch.Tensor]         # dense per-unit features, per group [width, CHANNEL_FEATURES]
    norm_share: list[torch.Tensor]      # dense per-unit share of the group's L2 norm
    parts: list[StepParts] = field(default_factory=list)

    def step(self, i: int, masks: list[torch.Tensor], dev: torch.device | str = "cpu") -> StepInputs:
        """Step inputs of group `i` given the masks of the groups stepped so far (`masks[j]`, j < i)."""
        p = self.parts[i]
        sq, l1, out = p.sq.to(dev), p.l1.to(dev), p.out.to(dev)
        for link in p.links:
            kept = masks[link.source]
            restricted = link.sq.to(dev) @ kept
            sq, out = sq + restricted, out + restricted
            l1 = l1 + link.l1.to(dev) @ kept
        l2 = sq.clamp_min(1e-24).sqrt()
        row = torch.cat([_quantiles(l1 / l1.mean().clamp_min(1e-12)), _quantiles(l2 / l2.mean().clamp_min(1e-12)),
                         p.moments.to(dev), torch.log10(l2.mean() + 1e-12)[None], p.tail.to(dev)])
        channel = torch.stack([_zscore(out.clamp_min(1e-24).sqrt()), p.in_z.to(dev), p.gamma_z.to(dev)], dim=1)
        return StepInputs(row, channel, l2 / l2.sum().clamp_min(1e-12))

    def producers(self, i: int) -> list[tuple[int, float]]:
        """The groups whose masks feed step `i`, with each one's share of the linked weight mass."""
        links = self.parts[i].links
        mass = [float(link.sq.sum()) for link in links]
        total = sum(mass) or 1.0
        return [(link.source, m / total) for link, m in zip(links, mass, strict=True)]


def group_statistics(net: nn.Module, groups: list[ChannelGroup]) -> GroupStats:
    """Step inputs and per-unit features of every group of `net` (weights are only read)."""
    max_width = max((g.width for g in groups), default=1)
    readers = _input_readers(groups)
    parts = []
    with torch.no_grad():
        for i, g in enumerate(groups):
            n = _unit_norms(net, g)
            w_mean = n["sum"] / n["count"]
            w_std = (n["sumsq"] / n["count"] - w_mean ** 2).clamp_min(0).sqrt()
            links = _producer_links(net, g, i, readers)
            for link in links:        # the linked weights are added back under the producer's mask
                n["sq"] -= link.sq.sum(1).double()
                n["out"] -= link.sq.sum(1).double()
                n["l1"] -= link.l1.sum(1).double()
            parts.append(StepParts(
                l1=n["l1"].clamp_min(0).float(), sq=n["sq"].clamp_min(0).float(), out=n["out"].clamp_min(0).float(),
                in_z=_zscore(n["in"].sqrt()).float(), gamma_z=_zscore(n["gamma"]).float(),
                moments=torch.tensor([float(w_mean / w_std.clamp_min(1e-12)), math.log10(float(w_std) + 1e-12)]),
                tail=torch.tensor([g.width / max_width, g.depth, g.flops_share]), links=links))
    stats = GroupStats([g.id for g in groups], [g.width for g in groups], torch.zeros(0, STAT_DIM), [], [], parts)
    with torch.no_grad():
        everything = [torch.ones(g.width) for g in groups]
        dense = [stats.step(i, everything) for i in range(len(groups))]
    if dense:
        stats.stats = torch.stack([d.row for d in dense])
    stats.channel = [d.channel for d in dense]
    stats.norm_share = [d.share for d in dense]
    return stats


def backbone_fingerprint(stats: GroupStats) -> str:
    """A short hash of the statistics a hypernetwork reads: equal exactly when it sees the same backbone."""
    h = hashlib.sha1()
    for t in (stats.stats, *stats.channel):
        h.update(t.to(torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _input_readers(groups: list[ChannelGroup]) -> dict[str, list[tuple[int, int, torch.Tensor, torch.Tensor]]]:
    """For each mixing layer (groups=1), the groups whose channels it reads: (group index, its width,
    channel idx, unit)."""
    readers: dict[str, list] = {}
    for i, g in enumerate(groups):
        for m in g.items:
            if m.layer in ("conv", "linear") and m.side == "in":
                readers.setdefault(m.name, []).append((i, g.width, m.idx, m.unit))
    return readers


def _producer_links(net: nn.Module, g: ChannelGroup, i: int, readers: dict) -> list[ProducerLink]:
    """The weights of `g`'s producer rows over the input channels of earlier groups, per producing group."""
    acc: dict[int, list[torch.Tensor]] = {}
    for m in g.items:
        if m.layer not in ("conv", "linear") or m.side != "out":
            continue
        weight = net.get_submodule(m.name).weight.detach().to(device="cpu", dtype=torch.float64)
        rows = weight[m.idx].reshape(len(m.idx), weight.shape[1], -1)        # [channels, inputs, kernel]
        for source, src_width, idx, unit in readers.get(m.name, []):
            if source >= i:
                continue      # a producer stepped later (or this group itself) counts as fully kept
            cols = rows[:, idx]                                              # [channels, its channels, kernel]
            sq = _per_unit(cols.pow(2).sum(2), m.unit, unit, g.width, src_width)
            l1 = _per_unit(cols.abs().sum(2), m.unit, unit, g.width, src_width)
            if source in acc:
                acc[source][0] += sq
                acc[source][1] += l1
            else:
                acc[source] = [sq, l1]
    return [ProducerLink(s, sq.float(), l1.float()) for s, (sq, l1) in sorted(acc.items())]


def _per_unit(values: torch.Tensor, row_unit: torch.Tensor, col_unit: torch.Tensor, rows: int,
              cols: int) -> torch.Tensor:
    """Sum a [channels, input channels] matrix into [units, producer units]."""
    by_row = torch.zeros(rows, values.shape[1], dtype=values.dtype).index_add_(0, row_unit, values)
    return torch.zeros(rows, cols, dtype=values.dtype).index_add_(1, col_unit, by_row)


def _unit_norms(net: nn.Module, g: ChannelGroup) -> dict[str, torch.Tensor]:
    """Per-unit L1 / squared-L2 over all coupled weights, split by producer ("out") and consumer ("in")
    side, the mean |BN scale|, and running sums for the group's weight mean/std."""
    w = g.width
    acc = {k: torch.zeros(w, dtype=torch.float64) for k in ("l1", "sq", "out", "in", "gamma", "n_gamma")}
    acc["sum"], acc["sumsq"], acc["count"] = (torch.zeros((), dtype=torch.float64) for _ in range(3))
    for m in g.items:
        if m.layer == "param":
            continue
        mod = net.get_submodule(m.name)
        weight = getattr(mod, "weight", None)
        if not isinstance(weight, torch.Tensor):
            continue
        weight = weight.detach().to(device="cpu", dtype=torch.float64)
        if m.layer == "norm":
            acc["gamma"].index_add_(0, m.unit, weight[m.idx].abs())
            acc["n_gamma"].index_add_(0, m.unit, torch.ones(len(m.idx), dtype=torch.float64))
            continue
        if m.layer in _MIXING and m.side == "in":
            if getattr(mod, "groups", 1) != 1:
                continue  # a grouped conv's input channel meets only part of the weight: no clean column
            rows = weight.transpose(0, 1)[m.idx].reshape(len(m.idx), -1)
            side = "in"
        else:  # producer rows (conv/linear outputs) and depthwise filters
            rows = weight[m.idx].reshape(len(m.idx), -1)
            side = "out"
        sq = rows.pow(2).sum(1)
        acc["l1"].index_add_(0, m.unit, rows.abs().sum(1))
        acc["sq"].index_add_(0, m.unit, sq)
        acc[side].index_add_(0, m.unit, sq)
        acc["sum"] += rows.sum()
        acc["sumsq"] += rows.pow(2).sum()
        acc["count"] += rows.numel()
    acc["gamma"] = acc["gamma"] / acc.pop("n_gamma").clamp_min(1)
    acc["count"] = acc["count"].clamp_min(1)
    return acc


def _quantiles(x: torch.Tensor) -> torch.Tensor:
    """Sorted-quantile sketch: N_QUANTILES evenly spaced quantiles (min … max) of any-length `x`."""
    return torch.quantile(x, torch.linspace(0, 1, N_QUANTILES, dtype=x.dtype, device=x.device))


def _zscore(x: torch.Tensor) -> torch.Tensor:
    """Standardised log values within the group (0 where they do not vary, e.g. no BN)."""
    v = x.clamp_min(1e-12).log()
    std = v.std(unbiased=False) if v.numel() > 1 else v.new_zeros(())
    return (v - v.mean()) / std if float(std.detach()) > 1e-6 else torch.zeros_like(v)
