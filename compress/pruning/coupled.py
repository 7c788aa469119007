"""The coupled weights of a group's units, as rows: one place that knows how a member maps to a weight.

A unit of a channel group (a channel, a head, a tiled channel position) owns a slice of every
weight the group touches: output filters of its producers (rows of a conv/linear weight), input
columns of its mixing consumers, its BN scale. `UnitSlice` gathers one member's slice as a
[channels, entries] matrix and scatters such a matrix back, so criteria (DepGraph's group norm),
regularisers (group lasso) and optimisers (Split LBI's Γ) all see the same coupled weights.
Biases are left out, as in Torch-Pruning's GroupMagnitudeImportance.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from compress.pruning.groups import ChannelGroup, Member

_MIXING = ("conv", "linear", "gconv")


@dataclass(eq=False)
class UnitSlice:
    """One member's weight entries of the group's channels: channel `idx[i]` belongs to unit `unit[i]`.

    `kind` says where the channel sits in the weight: "rows" (dim 0: output filters, BN scales,
    depthwise filters), "cols" (dim 1: input columns of a conv/linear) or "tiled" (input channel of
    a grouped conv, whose column exists only in the output rows of its own convolution group).
    """

    param: nn.Parameter
    name: str                     # parameter name in the network, e.g. "layer1.0.conv1.weight"
    kind: str
    idx: torch.Tensor
    unit: torch.Tensor
    tiles: int = 1                # convolution groups (kind "tiled")
    _cache: dict = field(default_factory=dict, repr=False)

    def on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(idx, unit) on `device`, moved once."""
        key = str(device)
        if key not in self._cache:
            self._cache[key] = (self.idx.to(device), self.unit.to(device))
        return self._cache[key]

    def __post_init__(self):
        n = len(self.idx)
        first = int(self.idx[0]) if n else 0
        # Most members cover a contiguous run of channels (often all of them): slicing beats indexing.
        self.span = first if n and torch.equal(self.idx, torch.arange(first, first + n)) else None

    def gather(self, w: torch.Tensor) -> torch.Tensor:
        """The slice of `w` (shaped like the weight: the weight itself, its gradient, a buffer) as rows
        [channels, entries per channel]; differentiable."""
        idx, _ = self.on(w.device)
        n = len(idx)
        if self.kind == "rows":
            part = w.narrow(0, self.span, n) if self.span is not None else w.index_select(0, idx)
            return part.reshape(n, -1)
        if self.kind == "cols":
            part = w.narrow(1, self.span, n) if self.span is not None else w.index_select(1, idx)
            return part.transpose(0, 1).reshape(n, -1)
        grp, col = self._tile_index(w, idx)
        return self._tile_view(w)[grp, :, col, :].reshape(n, -1)

    def scatter_add_(self, out: torch.Tensor, rows: torch.Tensor) -> None:
        """out[slice] += rows, the inverse of `gather` (out is shaped like the weight)."""
        idx, _ = self.on(out.device)
        n = len(idx)
        if self.kind == "rows":
            rows = rows.reshape(n, *out.shape[1:])
            if self.span is not None:
                out.narrow(0, self.span, n).add_(rows)
            else:
                out.index_add_(0, idx, rows)
        elif self.kind == "cols":
            rows = rows.reshape(n, out.shape[0], *out.shape[2:]).transpose(0, 1)
            if self.span is not None:
                out.narrow(1, self.span, n).add_(rows)
            else:
                out.index_add_(1, idx, rows)
        else:
            grp, col = self._tile_index(out, idx)
            view = self._tile_view(out)
            view[grp, :, col, :] += rows.reshape(n, view.shape[1], view.shape[3])

    def unit_sums(self, rows: torch.Tensor, width: int) -> torch.Tensor:
        """Per unit of the group, the sum over its channels of `rows` summed along entries ([width])."""
        _, unit = self.on(rows.device)
        return torch.zeros(width, dtype=rows.dtype, device=rows.device).index_add(0, unit, rows.sum(1))

    def _tile_view(self, w: torch.Tensor) -> torch.Tensor:
        out_ch, per_in = w.shape[0], w.shape[1]
        return w.view(self.tiles, out_ch // self.tiles, per_in, -1)

    @staticmethod
    def _tile_index(w: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        per_in = w.shape[1]
        return idx // per_in, idx % per_in


def member_slice(mod: nn.Module, m: Member, module_name: str) -> UnitSlice | None:
    """The weight slice one member contributes to its group's units, or None (no weight: pooling,
    a bare parameter, a BN without affine)."""
    w = getattr(mod, "weight", None)
    if not isinstance(w, nn.Parameter):
        return None
    if m.layer in _MIXING and m.side == "in":
        kind = "tiled" if m.layer == "gconv" else "cols"
    elif m.layer in (*_MIXING, "dwconv", "norm"):
        kind = "rows"
    else:
        return None
    tiles = mod.groups if kind == "tiled" else 1
    return UnitSlice(param=w, name=f"{module_name}.weight", kind=kind, idx=m.idx, unit=m.unit, tiles=tiles)


def group_slices(group: ChannelGroup) -> list[UnitSlice]:
    """Every weight slice of the group's units (resolved against the network's current parameters)."""
    net = group.graph.net
    out = []
    for m in group.items:
        s = member_slice(net.get_submodule(m.name), m, m.name)
        if s is not None:
            out.append(s)
    return out


__all__ = ["UnitSlice", "group_slices", "member_slice"]
