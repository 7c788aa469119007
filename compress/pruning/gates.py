"""Gates: multiply each group's channels by one gate tensor, shared by all its coupled layers.

A gate of shape [width] (one value per unit; any float tensor, it may require grad) is applied
where channels are *mixed*: at the input channels of every non-depthwise convolution and Linear
layer of the group, through forward pre-hooks. With a binary gate this is exactly the function of
the slimmed network (see groups.py). All index tables are built once here, so a forward pass costs
one gather (plus one index_put where several groups share a layer's input) per gated layer and no
Python graph walk; gradients flow to the gate values.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn

from compress.pruning.groups import ChannelGroup


class _Site:
    """The input of one mixing layer: which channels each group's gate scales."""

    def __init__(self, size: int, channel_dim: int):
        self.size = size
        self.channel_dim = channel_dim               # 1 for convolutions (NC…), -1 for Linear
        self.parts: list[tuple[int, torch.Tensor, torch.Tensor]] = []   # (slot, channel idx, unit idx)
        self._cache: dict[torch.device, list] = {}

    def parts_on(self, device: torch.device) -> list:
        if device not in self._cache:
            self._cache[device] = [(s, i.to(device), u.to(device)) for s, i, u in self.parts]
        return self._cache[device]

    def full_single(self) -> bool:
        """One group covers every input channel in order: the scale is a plain gather."""
        return len(self.parts) == 1 and torch.equal(self.parts[0][1], torch.arange(self.size))


class Gates:
    """Removable gate hooks on `net` for `groups`.

    >>> with Gates(net, groups) as gates:
    ...     gates.set({g.id: torch.sigmoid(scores[g.id]) for g in groups})
    ...     loss = criterion(net(x), y)   # gradients reach `scores`

    Groups without a value (or after `clear()`) are not gated.
    """

    def __init__(self, net: nn.Module, groups: list[ChannelGroup]):
        self.groups = list(groups)
        self.slot = {g.id: i for i, g in enumerate(self.groups)}
        self.values: list[torch.Tensor | None] = [None] * len(self.groups)
        sites: dict[str, _Site] = {}
        parts = defaultdict(list)
        for gi, g in enumerate(self.groups):
            for m in g.items:
                if m.side == "in" and m.layer in ("conv", "gconv", "linear"):
                    parts[m.name].append((gi, m.idx, m.unit))
        self._hooks = []
        for name, plist in parts.items():
            mod = net.get_submodule(name)
            site = _Site(mod.in_features, -1) if isinstance(mod, nn.Linear) else _Site(mod.in_channels, 1)
            site.parts = plist
            sites[name] = site
            self._hooks.append(mod.register_forward_pre_hook(self._hook(site)))
        self.sites = sites

    def _hook(self, site: _Site):
        single = site.full_single()

        def pre_hook(_mod, args):
            gated = [p for p in site.parts if self.values[p[0]] is not None]
            if not gated:
                return None
            x = args[0]
            if single:
                slot, _idx, unit = site.parts_on(x.device)[0]
                scale = self.values[slot].to(device=x.device, dtype=x.dtype)[unit]
            else:
                scale = torch.ones(site.size, dtype=x.dtype, device=x.device)
                for slot, idx, unit in site.parts_on(x.device):
                    if self.values[slot] is not None:
                        scale = scale.index_put((idx,), self.values[slot].to(device=x.device, dtype=x.dtype)[unit])
            if site.channel_dim == 1:
                scale = scale.view(1, -1, *([1] * (x.dim() - 2)))
            return (x * scale, *args[1:])

        return pre_hook

    def set(self, values: dict[str, torch.Tensor] | None) -> None:
        """Gate values per group id (shape [width]); groups left out are not gated."""
        self.values = [None] * len(self.groups)
        for gid, v in (values or {}).items():
            if gid not in self.slot:
                raise KeyError(f"unknown group {gid!r}")
            g = self.groups[self.slot[gid]]
            if v.shape != (g.width,):
                raise ValueError(f"gate for group {gid} must have shape ({g.width},), got {tuple(v.shape)}")
            self.values[self.slot[gid]] = v

    def set_masks(self, masks: dict[str, torch.Tensor]) -> None:
        """Binary gates from boolean keep-masks."""
        self.set({gid: m.to(torch.float32) for gid, m in masks.items()})

    def clear(self) -> None:
        self.values = [None] * len(self.groups)

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def __enter__(self) -> Gates:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
