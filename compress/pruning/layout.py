"""Ops that lay channels out: channel shuffles, splits and concatenations, mapped for Torch-Pruning.

Some ops compute their channel layout from the number of channels at run time, so a slimmed
network stays equal to the gated one only if the kept channels keep that layout:

- a **channel shuffle** (ShuffleNet: `x.view(b, g, c // g, h, w).transpose(1, 2).reshape(b, c, h, w)`)
  sends input channel q·(c/g) + p to output channel p·g + q. After slimming it runs with the new
  width c', so every one of the g input blocks must keep the same positions p: the g channels
  {q·(c/g) + p : q < g} are *tied* (kept or removed together).
- an **equal split** (`x.chunk(g, dim=1)`) cuts the channels into g equal blocks at run time: the
  blocks must keep the same number of channels, which tying position p across blocks guarantees.

Torch-Pruning does not know the shuffle: it reads the two views as flattens and fails (or maps
channels straight through). `mark_shuffles` finds the view → transpose → view pattern in its graph,
takes the two views out of its reshape handling and puts the permutation on the transpose's edges,
so index propagation follows channels through the shuffle. `Tie`s record where positions must be
tied; groups.py merges the units (and groups) they connect.

Torch-Pruning also maps a channel split by the *position* of each consumer in its list of the
split's consumers, which follows graph traversal, not the order of the split's outputs, and with
this torch it infers the split sizes from neighbouring layers (wrongly, for `chunk` feeding a
concat). `map_splits` maps each consumer edge to the output it actually reads (autograd records
the output number) with the sizes autograd saved; `fix_split_sizes` keeps the sizes Torch-Pruning
uses for shape inference consistent with that. It likewise places a concatenation's inputs by
sizes inferred from neighbouring layers and drops the mapping when a consistency check on them
fails (channels then pass straight through: wrong); `map_concats` maps each input by the shapes
recorded when the concatenation ran (tracing.py), and maps concatenations along other dimensions
(tokens) as the identity they are for channels.

A split attention module's per-head tensors (a relative-position-bias table: one column per head) are
indexed by head, not by channel; `map_head_tensors` maps between the two where they meet the logits.
"""

from __future__ import annotations

from dataclasses import dataclass

_VIEWS = ("ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0", "_ReshapeAliasBackward0")
_PASS = ("CloneBackward0",)


@dataclass(eq=False)
class Tie:
    """At graph node `node` (indices in its input channel space of `channels`), channel positions
    p of each of the `tiles` equal blocks are tied: i ≡ i' iff i mod (channels / tiles) = i' mod (…)."""

    node: object
    tiles: int
    channels: int
    what: str              # "channel shuffle" or "equal split"

    def position(self, idx: int) -> int:
        return idx % (self.channels // self.tiles)


class _Permutation:
    """Torch-Pruning index mapping through a channel shuffle of `channels` into `groups` blocks."""

    def __init__(self, channels: int, groups: int, reverse: bool):
        self.per_group = channels // groups
        self.groups = groups
        self.reverse = reverse

    def __call__(self, idxs):
        from torch_pruning import _helpers

        out = []
        for i in idxs:
            if self.reverse:   # output channel j = p·g + q  →  input channel q·(c/g) + p
                new = (i.idx % self.groups) * self.per_group + i.idx // self.groups
            else:              # input channel q·(c/g) + p  →  output channel p·g + q
                new = (i.idx % self.per_group) * self.groups + i.idx // self.per_group
            out.append(_helpers._HybridIndex(idx=new, root_idx=i.root_idx))
        return out


def mark_shuffles(dg) -> list[Tie]:
    """Find channel shuffles in Torch-Pruning graph `dg` (after its edges are built, before its index
    mappings are): take their views out of reshape handling and map the transpose as a permutation."""
    import torch_pruning as tp

    ties = []
    for node in list(dg.module2node.values()):
        found = _shuffle_at(node)
        if found is None:
            continue
        first, transpose, last, channels, groups = found
        for view in (first, last):
            view.type = tp.ops.OPTYPE.ELEMENTWISE      # Torch-Pruning's flatten guess would be wrong
        source = transpose.inputs[0]                    # the first view, or a copy of its output
        for dep in source.dependencies:
            if dep.target is transpose:
                dep.index_mapping[0] = _Permutation(channels, groups, reverse=False)
        for dep in transpose.dependencies:
            if dep.target is source:
                dep.index_mapping[0] = _Permutation(channels, groups, reverse=True)
        ties.append(Tie(first, groups, channels, "channel shuffle"))
    return ties


class _HeadChannels:
    """Torch-Pruning index mapping between a per-head tensor (index = head) and the channels of the
    q/k/v projections (index = head · head_dim + offset).

    Towards the head tensor, channel c becomes head c // head_dim; back, head h becomes the channel at
    the offset of its root channel (h · head_dim + root mod head_dim). Every channel of a head group
    is a root, so each channel is reached from its own root and a round trip through the head
    tensor maps indices onto themselves: Torch-Pruning sees nothing new and stops there (a flatten
    mapping would return every channel of the head once per root, head_dim-fold more indices)."""

    def __init__(self, head_dim: int, to_head: bool):
        self.head_dim = head_dim
        self.to_head = to_head

    def __call__(self, idxs):
        from torch_pruning import _helpers

        hd = self.head_dim
        if self.to_head:
            return list(dict.fromkeys(_helpers._HybridIndex(idx=i.idx // hd, root_idx=i.root_idx) for i in idxs))
        return [_helpers._HybridIndex(idx=i.idx * hd + i.root_idx % hd, root_idx=i.root_idx) for i in idxs]


def map_head_tensors(dg, net) -> None:
    """Map the per-head tensors of split attention modules (e.g. a relative-position-bias table,
    [positions, heads]) into their heads' channel numbering.

    Such a tensor reaches the attention logits through ops of its own (gather, view, permute) and
    joins them at one add or multiply; Torch-Pruning passes channel indices straight along that
    path, which would give the tensor heads·head_dim indices for its `heads` columns. On the edge into
    the join, indices change between heads and the channels of the q/k/v projections (`_HeadChannels`).
    The views on the path
    only rearrange positions, so they are taken out of Torch-Pruning's reshape guessing (which may
    read one as a flatten by head_dim where it can infer the widths around it)."""
    import torch_pruning as tp

    for mod in net.modules():
        for tensor, _dim in getattr(mod, "per_head", list)():
            node = dg.module2node.get(tensor)
            while node is not None and len(node.outputs) == 1 and len(node.outputs[0].inputs) == 1:
                node = node.outputs[0]
                if node.type == tp.ops.OPTYPE.RESHAPE:
                    node.type = tp.ops.OPTYPE.ELEMENTWISE
            if node is None or len(node.outputs) != 1:
                continue   # no single join: the group's indices stay unaligned and it is excluded (groups.py)
            join = node.outputs[0]
            for dep in node.dependencies:
                if dep.target is join:
                    dep.index_mapping[0] = _HeadChannels(mod.head_dim, to_head=False)
            for dep in join.dependencies:
                if dep.target is node:
                    dep.index_mapping[0] = _HeadChannels(mod.head_dim, to_head=True)


def map_splits(dg, chunks: set) -> dict:
    """Map every channel split of `dg` edge by edge (see the module docstring); returns {node: reason} for
    the splits a slimmed network would get wrong: a consumer reading several outputs (unmappable), or
    a cut at sizes the model code fixes (`split(k)`, `split([a, b])`: only `chunk`s, whose autograd
    nodes are in `chunks`, recompute their sizes from the slimmed width)."""
    from torch_pruning.dependency.index_mapping import _SplitIndexMapping

    unsafe = {}
    for node in dg.module2node.values():
        layout = _split_layout(node)
        if layout is None:
            continue
        pieces, reads = layout
        if node.grad_fn not in chunks:
            unsafe[node] = "a channel split at sizes fixed in the model code"
        if reads is None:
            unsafe[node] = "a split whose outputs are read together"
            continue
        node.enable_index_mapping = False      # Torch-Pruning would overwrite the edges by position
        for consumer, nr in reads.items():
            start, end = pieces[nr]
            for dep in node.dependencies:
                if dep.target is consumer:
                    dep.index_mapping[0] = _SplitIndexMapping(offset=[start, end], reverse=False)
            for dep in consumer.dependencies:
                if dep.target is node:
                    dep.index_mapping[0] = _SplitIndexMapping(offset=[start, end], reverse=True)
    return unsafe


def map_concats(dg, cats: dict) -> dict:
    """Map the inputs of every concatenation of `dg` whose input shapes were recorded (`cats`: autograd
    node -> (dim, input shapes)); returns {node: reason} for those that cannot be mapped (one producer
    at two places)."""
    import torch_pruning as tp
    from torch_pruning.dependency.index_mapping import _ConcatIndexMapping

    by_fn = {node.grad_fn: node for node in dg.module2node.values() if node.grad_fn is not None}
    unsafe = {}
    for node in dg.module2node.values():
        if type(node.module).__name__ != "_ConcatOp" or node.grad_fn not in cats:
            continue
        dim, shapes = cats[node.grad_fn]
        node.enable_index_mapping = False      # along another dim (tokens), channels pass straight through
        if dim != (len(shapes[0]) - 1 if len(shapes[0]) == 3 else 1):
            # and Torch-Pruning must not add up its inputs' widths either: where it cannot infer one it
            # fails (TypeError) while building the graph (swin_s's patch merging after 18 blocks)
            node.type = tp.ops.OPTYPE.ELEMENTWISE
            continue
        bounds = [0]
        for shape in shapes:
            bounds.append(bounds[-1] + int(shape[dim]))
        producers = [by_fn.get(f) for f, _nr in node.grad_fn.next_functions]
        if len(producers) != len(shapes) or len({id(p) for p in producers if p}) < sum(1 for p in producers if p):
            unsafe[node] = "a concatenation of one tensor at several places"
            continue
        node.module.concat_sizes = [int(shape[dim]) for shape in shapes]
        node.module.offsets = bounds
        for i, producer in enumerate(producers):
            if producer is None:
                continue
            offset = bounds[i:i + 2]
            for dep in node.dependencies:
                if dep.target is producer:
                    dep.index_mapping[1] = _ConcatIndexMapping(offset=offset, reverse=True)
            for dep in producer.dependencies:
                if dep.target is node:
                    dep.index_mapping[1] = _ConcatIndexMapping(offset=offset, reverse=False)
    return unsafe


def fix_split_sizes(dg) -> None:
    """Give each mapped split the size of the output each consumer reads (Torch-Pruning's shape inference
    indexes sizes by consumer position)."""
    for node in dg.module2node.values():
        layout = _split_layout(node)
        if layout is not None and layout[1] is not None:
            pieces, reads = layout
            node.module.split_sizes = [pieces[reads[c]][1] - pieces[reads[c]][0] for c in node.outputs]


def _split_layout(node):
    """(output pieces [(start, end)], {consumer node: output number}) of a channel split; reads is None
    when some consumer reads several outputs. None when `node` is no channel split."""
    fn = node.grad_fn
    if type(node.module).__name__ != "_SplitOp" or fn is None or getattr(fn, "_saved_dim", None) != 1:
        return None
    sizes = tuple(int(v) for v in getattr(fn, "_saved_self_sym_sizes", ()))
    if len(sizes) < 2:
        return None
    if fn.name() == "SplitBackward0":
        step = int(fn._saved_split_size)
        bounds = list(range(0, sizes[1], step)) + [sizes[1]]
    elif fn.name() == "SplitWithSizesBackward0":
        bounds = [0]
        for size in fn._saved_split_sizes:
            bounds.append(bounds[-1] + int(size))
    else:
        return None
    pieces = list(zip(bounds[:-1], bounds[1:], strict=True))
    reads = {}
    for consumer in node.outputs:
        nrs = {nr for f, nr in getattr(consumer.grad_fn, "next_functions", ()) if f is fn}
        if len(nrs) != 1 or next(iter(nrs)) >= len(pieces):
            return pieces, None
        reads[consumer] = next(iter(nrs))
    return pieces, reads


def equal_splits(dg) -> list[Tie]:
    """Channel splits into equal blocks computed at run time (`chunk`): their positions are tied (other
    splits are unsafe, see `map_splits`)."""
    import torch_pruning as tp

    ties = []
    for node in dg.module2node.values():
        fn = node.grad_fn
        if node.type != tp.ops.OPTYPE.SPLIT or fn is None or fn.name() != "SplitBackward0" or node in dg.unsafe:
            continue
        sizes = tuple(getattr(fn, "_saved_self_sym_sizes", ()))
        if getattr(fn, "_saved_dim", None) != 1 or len(sizes) < 2:
            continue
        channels, size = int(sizes[1]), int(fn._saved_split_size)
        if size and channels % size == 0 and channels // size > 1:
            ties.append(Tie(node, channels // size, channels, "equal split"))
    return ties


def _shuffle_at(node):
    """(first view, transpose, last view, channels, groups) if `node` is the last view of a shuffle."""
    fn = node.grad_fn
    if fn is None or _name(fn) not in _VIEWS:
        return None
    sizes = tuple(int(s) for s in getattr(fn, "_saved_self_sym_sizes", ()))
    if len(sizes) != 5:
        return None
    transpose = _skip_back(node)
    if transpose is None or not _swaps_dims_1_2(transpose.grad_fn):
        return None
    first = _skip_back(transpose)
    if first is None or _name(first.grad_fn) not in _VIEWS:
        return None
    before = tuple(int(s) for s in getattr(first.grad_fn, "_saved_self_sym_sizes", ()))
    per_group, groups = sizes[1], sizes[2]
    if len(before) != 4 or before[1] != per_group * groups or groups < 2 or per_group < 2:
        return None
    return first, transpose, node, before[1], groups


def _skip_back(node):
    """The single input of `node`, passing over copies (contiguous())."""
    while len(node.inputs) == 1:
        node = node.inputs[0]
        if node.grad_fn is None or _name(node.grad_fn) not in _PASS:
            return node
    return None


def _swaps_dims_1_2(fn) -> bool:
    name = _name(fn)
    if name == "TransposeBackward0":
        return {getattr(fn, "_saved_dim0", None), getattr(fn, "_saved_dim1", None)} == {1, 2}
    if name == "PermuteBackward0":
        return tuple(getattr(fn, "_saved_dims", ())) == (0, 2, 1, 3, 4)
    return False


def _name(fn) -> str:
    return fn.name() if fn is not None and hasattr(fn, "name") else ""
