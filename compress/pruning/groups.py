"""Channel groups: the sets of coupled channels that must be kept or removed together.

Torch-Pruning's `DependencyGraph` traces the network and couples channels through residual adds,
concatenations, depthwise/grouped convolutions, SE multiplies, flatten → Linear and attention. Each
of its groups becomes one `ChannelGroup`, with

- a stable id (the name of its root layer, the first layer whose output channels it holds),
- its *units*: the things a mask keeps or removes. Usually a unit is a channel; in attention-head
  groups a unit is a whole head (head_dim channels), and in groups that pass through a grouped
  convolution a unit is one channel position taken in every convolution group (so each group of
  the convolution keeps the same width),
- ties (ties.py): a channel shuffle or an equal split computes its channel layout at run time, so
  it ties channel positions together; tied units are merged, across Torch-Pruning groups if need
  be, into one unit of one group,
- gate sites: the input channels of the *mixing* consumers (non-depthwise convolutions, Linear
  layers). Zeroing a channel at every mixing consumer is exactly equivalent to removing it,
  because everything else on the way (BN, activations, adds, depthwise convs, pooling, SE
  multiplies) acts on each channel separately.

Groups whose channels pass through LayerNorm/GroupNorm (e.g. the ViT and ConvNeXt residual
streams) are excluded: normalisation statistics are taken over all channels, so a zeroed channel
and a removed one give different outputs, and gate ↔ slim equivalence would be lost. Their layers
keep their full width; ViT/ConvNeXt stay prunable through their MLP hidden dims and (ViT) heads.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from compress.errors import CompressError
from compress.pruning.attention import SplitAttention, split_attention
from compress.pruning.channel_ops import unsafe_op
from compress.pruning.guard import bounded_mappings, guarded
from compress.pruning.layout import Tie, equal_splits
from compress.pruning.tracing import CallRecord, mapping_limit, record_calls, tp_groups, trace

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Member:
    """One coupled layer of a group: which of its channels (`idx`) carry which group unit (`unit`)."""

    name: str                 # module (or parameter) name inside the network
    side: str                 # "in" (input channels of a mixing layer), "out" (its outputs), "local"
    layer: str                # "conv", "dwconv", "gconv", "linear", "norm", "param", "op" (parameter-free)
    idx: torch.Tensor         # channel indices in the layer's pruned dimension
    unit: torch.Tensor        # for each of them, the group unit it belongs to
    units: int = 0            # the group's width

    @property
    def per_unit(self) -> float:
        """How many of this layer's channels one unit spans on average (e.g. H·W for a Linear after flatten)."""
        return len(self.idx) / self.units if self.units else 0.0


@dataclass(eq=False)
class ChannelGroup:
    """A set of coupled channels; masks and gates are per group, of length `width`."""

    id: str                   # name of the root layer (stable across runs of the same architecture)
    width: int                # number of units (the gate/mask length)
    channels: int             # output channels of the root layer
    members: list[str]        # names of the coupled layers
    depth: float              # execution position of the root layer among the groups: 0 (first) … 1 (last)
    kind: str = "channels"    # "channels", "heads" (unit = one attention head), "tiled" (grouped conv) or
                              # "tied" (positions tied by a shuffle/split, possibly over several root layers)
    unit_channels: int = 1    # root channels per unit
    items: list[Member] = field(default_factory=list, repr=False)
    graph: GroupGraph | None = field(default=None, repr=False)
    roots: list[str] = field(default_factory=list)   # the root layers of the Torch-Pruning groups it merges

    def tp_roots(self) -> list[tuple[nn.Module, object, torch.Tensor]]:
        """Torch-Pruning's view of the group: per root layer, (module, its pruning function, the unit of each
        of its output channels); one root, or several where ties merged Torch-Pruning groups."""
        return self.graph.tp_roots[self.id]

    @property
    def flops_share(self) -> float:
        """Fraction of dense FLOPs that scales with this group's width (vanishes if it kept nothing);
        shares overlap, since a layer scales with both its input and its output group."""
        return self.graph.flops_model.share(self.id)


class GroupGraph:
    """What the groups of one network share: the traced dependency graph and the dense FLOPs."""

    def __init__(self, net: nn.Module, dg, example_input: torch.Tensor):
        self.net = net
        self.dg = dg
        self.example_input = example_input
        self.excluded: list[tuple[str, str]] = []               # (root layer, reason)
        self.groups: list[ChannelGroup] = []
        # group id -> the Torch-Pruning pruning steps of its layers: (dependency, channel idx, unit of each)
        self.actions: dict[str, list[tuple[object, torch.Tensor, torch.Tensor]]] = {}
        self.tp_roots: dict[str, list[tuple[nn.Module, object, torch.Tensor]]] = {}   # see ChannelGroup.tp_roots
        self.calls = CallRecord()
        self.slimmed = False
        self._flops_model = None

    @property
    def flops_model(self):
        """The FlopsModel of the dense network (fvcore runs on first use, which must precede slimming)."""
        from compress.pruning.flops_model import FlopsModel, attention_flops, module_flops

        if self._flops_model is None:
            if self.slimmed:
                raise ValueError("the FLOPs model must be built before the network is slimmed")
            own, total = module_flops(self.net, self.example_input)
            self._flops_model = FlopsModel(self.groups, own, total, attention_flops(self.net, self.groups))
        return self._flops_model


def find_groups(net: nn.Module, example_input: torch.Tensor, *, max_memory_gb: float | None = None,
                max_seconds: float | None = None) -> list[ChannelGroup]:
    """The prunable channel groups of `net`, in execution order of their root layers.

    `nn.MultiheadAttention` modules are first replaced in place by the equivalent `SplitAttention`
    (same function and weights) so that attention heads become prunable groups. The classifier (every
    layer whose output is the network output) is never pruned. A group that cannot be pruned exactly
    (an op on its path that may mix channels, a normalisation over all channels, a channel mapping
    the dependency graph cannot derive) is left at full width and recorded in `graph.excluded`.
    The analysis runs under a memory and time guard (guard.py; the limits default to
    COMPRESS_ANALYSIS_MAX_GB of growth and COMPRESS_ANALYSIS_MAX_S). Raises `CompressError` naming
    the layer or op when the network cannot be traced, when the guard stops the analysis, or when
    every group had to be excluded.
    """
    split_attention(net)
    was_training = net.training
    with guarded("dependency analysis of this network", max_memory_gb, max_seconds), \
            bounded_mappings(mapping_limit(net)):
        with record_calls(net) as calls:
            dg = trace(net, example_input, calls)
        net.train(was_training)
        graph = GroupGraph(net, dg, example_input)
        graph.calls = calls
        raws = [_read(graph, tp_group) for tp_group in tp_groups(dg, graph.excluded)]
        groups = _assemble(graph, raws, [*getattr(dg, "ties", []), *equal_splits(dg)])
    positions = [calls.order.get(g.id, 0) for g in groups]
    first, span = min(positions, default=0), max(1, max(positions, default=1) - min(positions, default=0))
    for g, pos in zip(groups, positions, strict=True):
        g.depth = round((pos - first) / span, 4)
    groups.sort(key=lambda g: (g.depth, g.id))
    graph.groups = groups
    graph.excluded.sort(key=lambda e: calls.order.get(e[0], 0))
    for root, reason in graph.excluded:
        log.info("group at %s not prunable: %s", root, reason)
    if not groups and graph.excluded:
        reasons = "; ".join(f"{root}: {why}" for root, why in graph.excluded[:3])
        more = f" (and {len(graph.excluded) - 3} more)" if len(graph.excluded) > 3 else ""
        raise CompressError(f"no channel group of this network can be pruned exactly — {reasons}{more}")
    return groups


@dataclass(eq=False)
class _Raw:
    """One Torch-Pruning group as read: its layers and ops with their indices and root indices."""

    root: str
    root_dep: object                                                    # TP dependency of the root layer
    channels: int
    layers: list[tuple[str, nn.Module, str, list[int], list[int]]]      # (name, module, side, idxs, root idxs)
    kinds: dict[str, str]
    actions: list[tuple[object, list[int], list[int]]]                  # (TP dependency, idxs, root idxs)
    at: dict[object, list[tuple[int, int]]]                             # op node -> [(idx, root idx)]
    reason: str | None = None
    kind: str = "channels"


def _read(graph: GroupGraph, tp_group) -> _Raw:
    """Read one Torch-Pruning group; `reason` says why it cannot be pruned exactly (None if it can)."""
    dg = graph.dg
    root_name = dg._module2name[tp_group[0].dep.target.module]
    layers, ops, actions, at = [], [], [], {}
    for item in tp_group:
        node, handler = item.dep.target, item.dep.handler
        idxs, root_idxs = list(item.idxs), list(item.root_idxs)
        actions.append((item.dep, idxs, root_idxs))
        mod = node.module
        name = dg._param_to_name.get(mod) if isinstance(mod, nn.Parameter) else dg._module2name.get(mod)
        if name is None:
            ops.append(node)
            at[node] = list(zip(idxs, root_idxs, strict=True))
            owner = graph.calls.by_grad_fn.get(node.grad_fn)
            if owner is not None and not isinstance(mod, nn.Parameter):   # a parameter-free module (pooling…)
                layers.append((owner, graph.net.get_submodule(owner), "local", idxs, root_idxs))
            continue
        is_out, is_in = dg.is_out_channel_pruning_fn(handler), dg.is_in_channel_pruning_fn(handler)
        side = "local" if (is_out and is_in) or isinstance(mod, nn.Parameter) else ("out" if is_out else "in")
        layers.append((name, mod, side, idxs, root_idxs))
    kinds = {n: _layer_kind(m) for n, m, *_ in layers}
    raw = _Raw(root_name, tp_group[0].dep, len(tp_group[0].idxs), layers, kinds, actions, at)
    raw.reason = _why_not(graph, raw, ops)
    return raw


def _why_not(graph: GroupGraph, raw: _Raw, ops) -> str | None:
    """Why a group cannot be gated (and slimmed) exactly, or None; sets raw.kind."""
    kinds = raw.kinds
    norm = next((n for n, k in kinds.items() if k == "statnorm"), None)
    if norm:
        return f"its channels are normalised together by {norm} (LayerNorm/GroupNorm)"
    bad = next((n for n, k in kinds.items() if k in ("mha", "other")), None)
    if bad:
        return f"layer {bad} ({type(graph.net.get_submodule(bad)).__name__}) cannot be gated exactly"
    identity = all(idxs == root_idxs for _n, _m, _s, idxs, root_idxs in raw.layers)
    head_dim = _head_dim(graph.net, raw.layers)
    tiles = {mod.groups for name, mod, *_ in raw.layers if kinds[name] == "gconv"}
    if head_dim is not None:
        if not _head_aligned(raw.layers, head_dim) or raw.channels % head_dim:
            return "attention projections are not aligned with whole heads"
        raw.kind = "heads"
    elif tiles:
        if len(tiles) > 1 or not identity or raw.channels % next(iter(tiles)):
            return f"grouped convolutions with different group counts {sorted(tiles)} share it"
        raw.kind = "tiled"
    unsafe = unsafe_op(ops, is_heads=raw.kind == "heads", unsafe=getattr(graph.dg, "unsafe", {}))
    if unsafe:
        return f"operation {unsafe} on its path is not known to keep channels separate"
    return None


class _Union:
    """Union-find over integers."""

    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, a: int) -> int:
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def _assemble(graph: GroupGraph, raws: list[_Raw], ties: list[Tie]) -> list[ChannelGroup]:
    """Units from union-find over (group, root channel): heads and grouped-conv positions within a
    group, tie positions across groups; groups whose units meet become one ChannelGroup."""
    offset = [0]
    for raw in raws:
        offset.append(offset[-1] + raw.channels)
    units, linked = _Union(offset[-1]), _Union(len(raws))
    for r, raw in enumerate(raws):
        ch = range(raw.channels)
        if raw.kind == "heads":
            head_dim = _head_dim(graph.net, raw.layers)
            for c in ch:
                units.union(offset[r] + c, offset[r] + c - c % head_dim)
        elif raw.kind == "tiled":
            per_tile = raw.channels // next(mod.groups for name, mod, *_ in raw.layers if raw.kinds[name] == "gconv")
            for c in ch:
                units.union(offset[r] + c, offset[r] + c % per_tile)
    tied = set()
    for tie in ties:
        holders = [(r, idx, root) for r, raw in enumerate(raws) for idx, root in raw.at.get(tie.node, ())]
        if not holders:
            continue
        covered = {idx for _r, idx, _root in holders}
        if len(covered) < tie.channels:   # some tied channels belong to no prunable group
            for r in {r for r, *_ in holders}:
                raws[r].reason = raws[r].reason or (f"a {tie.what} ties its channels to channels that cannot be "
                                                    "pruned")
        first_at: dict[int, tuple[int, int]] = {}
        for r, idx, root in holders:
            tied.add(r)
            r0, root0 = first_at.setdefault(tie.position(idx), (r, root))
            units.union(offset[r0] + root0, offset[r] + root)
            linked.union(r0, r)
    components: dict[int, list[int]] = {}
    for r in range(len(raws)):
        components.setdefault(linked.find(r), []).append(r)
    groups = []
    for members in components.values():
        if bool(tied & set(members)) and len({units.find(offset[r] + c) for r in members
                                              for c in range(raws[r].channels)}) == 1:
            raws[members[0]].reason = raws[members[0]].reason or (
                "channel shuffles or equal splits tie all its channels together (nothing can be removed "
                "without breaking their layout)")
        bad = next((raws[r] for r in members if raws[r].reason), None)
        if bad is not None:
            for r in members:
                why = bad.reason if raws[r] is bad else f"tied to the channels of {bad.root}: {bad.reason}"
                graph.excluded.append((raws[r].root, why))
            continue
        groups.append(_group(graph, [raws[r] for r in members], [offset[r] for r in members], units,
                             tied=bool(tied & set(members))))
    return groups


def _group(graph: GroupGraph, raws: list[_Raw], offsets: list[int], units: _Union, tied: bool) -> ChannelGroup:
    """One ChannelGroup from the Torch-Pruning groups `raws` whose units are classes of `units`."""
    order = graph.calls.order
    primary = min(range(len(raws)), key=lambda i: order.get(raws[i].root, 0))
    ranked = [primary] + [i for i in range(len(raws)) if i != primary]
    unit_id: dict[int, int] = {}
    for i in ranked:
        for c in range(raws[i].channels):
            unit_id.setdefault(units.find(offsets[i] + c), len(unit_id))
    width = len(unit_id)

    def unit_of(i: int, root_idxs: list[int]) -> torch.Tensor:
        return torch.tensor([unit_id[units.find(offsets[i] + c)] for c in root_idxs], dtype=torch.long)

    def channels(i: int, idxs: list[int], root_idxs: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(channel, unit) of each channel, once: a per-head tensor is reached from every channel of its head."""
        pairs = dict.fromkeys(zip(idxs, unit_of(i, root_idxs).tolist(), strict=True))
        return (torch.tensor([c for c, _u in pairs], dtype=torch.long),
                torch.tensor([u for _c, u in pairs], dtype=torch.long))

    items, actions = [], []
    for i in ranked:
        raw = raws[i]
        for name, _mod, side, idxs, root_idxs in raw.layers:
            if idxs:
                idx, unit = channels(i, idxs, root_idxs)
                items.append(Member(name=name, side=side, layer=raw.kinds[name], idx=idx, unit=unit, units=width))
        actions += [(dep, *channels(i, idxs, root_idxs)) for dep, idxs, root_idxs in raw.actions if idxs]
    head = raws[primary]
    kind = "tied" if tied or len(raws) > 1 else head.kind
    unit_channels = head.channels // width if head.channels % width == 0 and kind != "tied" else 1
    graph.actions[head.root] = actions
    graph.tp_roots[head.root] = [(raws[i].root_dep.target.module, raws[i].root_dep.handler,
                                  unit_of(i, list(range(raws[i].channels)))) for i in ranked]
    return ChannelGroup(id=head.root, width=width, channels=head.channels,
                        members=list(dict.fromkeys(m.name for m in items)), depth=0.0, kind=kind,
                        unit_channels=max(1, unit_channels), items=items, graph=graph, roots=[r.root for r in raws])


def _layer_kind(mod) -> str:
    if isinstance(mod, nn.Parameter):
        return "param"
    if isinstance(mod, nn.modules.conv._ConvNd):
        if mod.groups == 1:
            return "conv"
        if mod.groups == mod.in_channels == mod.out_channels:
            return "dwconv"
        return "gconv"
    if isinstance(mod, nn.Linear):
        return "linear"
    if isinstance(mod, (nn.modules.batchnorm._BatchNorm, nn.PReLU)):
        return "norm"
    if isinstance(mod, (nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)):
        return "statnorm"
    if isinstance(mod, nn.MultiheadAttention):
        return "mha"
    if not any(True for _ in mod.parameters()):
        return "op"
    return "other"


def _head_dim(net: nn.Module, raw) -> int | None:
    """head_dim if the group holds the q/k/v outputs of a SplitAttention (an attention-head group)."""
    for name, _mod, side, *_ in raw:
        parent, _, child = name.rpartition(".")
        owner = net.get_submodule(parent) if parent else net
        if isinstance(owner, SplitAttention) and child in ("q", "k", "v") and side == "out":
            return owner.head_dim
    return None


def _head_aligned(layers, head_dim: int) -> bool:
    """Every member of a head group maps each root channel into that channel's head: a projection to
    a channel of the same head, a per-head tensor (layout.map_head_tensors) to the head's number.
    Only whole heads are removed, so where inside its head a channel lands does not matter."""
    return all(all(i // head_dim == r // head_dim for i, r in zip(idxs, roots, strict=True))
               or all(i == r // head_dim for i, r in zip(idxs, roots, strict=True))
               for _name, _mod, _side, idxs, roots in layers)
