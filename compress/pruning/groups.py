"""Channel groups: the sets of coupled channels that must be kept or removed together.

Torch-Pruning's `DependencyGraph` traces the network and couples channels through residual adds,
concatenations, depthwise/grouped convolutions, SE multiplies, flatten → Linear and attention. Each
of its groups becomes one `ChannelGroup`, with

- a stable id (the name of its root layer, the first layer whose output channels it holds),
- its *units*: the things a mask keeps or removes. Usually a unit is a channel; in attention-head
  groups a unit is a whole head (head_dim channels), and in groups that pass through a grouped
  convolution a unit is one channel position taken in every convolution group (so each group of
  the convolution keeps the same width),
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
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from compress.errors import CompressError
from compress.pruning.attention import SplitAttention, split_attention

log = logging.getLogger(__name__)

# Autograd ops that act on each channel separately (or only move whole channels around, which
# Torch-Pruning maps): they may sit inside a group. Anything else inside a group is refused.
CHANNEL_SAFE_OPS = {
    "AddBackward0", "SubBackward0", "MulBackward0", "DivBackward0", "NegBackward0", "CloneBackward0",
    "ReluBackward0", "HardtanhBackward0", "SigmoidBackward0", "HardsigmoidBackward0", "HardswishBackward0",
    "SiluBackward0", "GeluBackward0", "TanhBackward0", "LeakyReluBackward0", "EluBackward0", "MishBackward0",
    "ClampBackward1", "ClampMinBackward0", "PreluKernelBackward0",
    "MaxPool2DWithIndicesBackward0", "AvgPool2DBackward0", "AdaptiveAvgPool2DBackward0",
    "AdaptiveMaxPool2DBackward0", "MeanBackward1", "SumBackward1", "UpsampleNearest2DBackward0",
    "UpsampleBilinear2DBackward0", "CatBackward0", "ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0",
    "PermuteBackward0", "TransposeBackward0", "TBackward0", "SqueezeBackward0", "SqueezeBackward1",
    "UnsqueezeBackward0", "ExpandBackward0", "SelectBackward0", "SliceBackward0", "AsStridedBackward0",
    "AsStridedBackward1", "AddmmBackward0", "MmBackward0", "DropoutBackward0", "NativeDropoutBackward0",
    "NativeBatchNormBackward0", "CudnnBatchNormBackward0",
}
# Ops allowed only inside attention-head groups, where whole heads are removed.
HEAD_SAFE_OPS = {"BmmBackward0", "SoftmaxBackward0", "SafeSoftmaxBackward0"}
# Reductions over these dims of an NCHW tensor would mix channels.
_REDUCTIONS = {"MeanBackward1", "SumBackward1"}
# Constant padding keeps channels separate when it pads only H and W (4 amounts; e.g. TF "SAME" padding).
_PADS = {"ConstantPadNdBackward0"}


@dataclass(eq=False)
class Member:
    """One coupled layer of a group: which of its channels (`idx`) carry which group unit (`unit`)."""

    name: str                 # module (or parameter) name inside the network
    side: str                 # "in" (input channels of a mixing layer), "out" (its outputs), "local"
    layer: str                # "conv", "dwconv", "gconv", "linear", "norm", "param", "op" (parameter-free)
    idx: torch.Tensor         # channel indices in the layer's pruned dimension
    unit: torch.Tensor        # for each of them, the group unit it belongs to

    @property
    def per_unit(self) -> float:
        """How many of this layer's channels one unit spans (e.g. H·W for a Linear after flatten)."""
        return len(self.idx) / max(1, int(self.unit.max()) + 1) if len(self.idx) else 0.0


@dataclass(eq=False)
class ChannelGroup:
    """A set of coupled channels; masks and gates are per group, of length `width`."""

    id: str                   # name of the root layer (stable across runs of the same architecture)
    width: int                # number of units (the gate/mask length)
    channels: int             # output channels of the root layer (= width × unit_channels)
    members: list[str]        # names of the coupled layers
    depth: float              # execution position of the root layer among the groups: 0 (first) … 1 (last)
    kind: str = "channels"    # "channels", "heads" (unit = one attention head) or "tiled" (grouped conv)
    unit_channels: int = 1    # root channels per unit
    items: list[Member] = field(default_factory=list, repr=False)
    graph: GroupGraph | None = field(default=None, repr=False)

    def units_of_channels(self) -> torch.Tensor:
        """For each root channel, its unit (LongTensor [channels])."""
        return self.graph.unit_of[self.id]

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
        self.roots: dict[str, tuple[nn.Module, object]] = {}   # group id -> (root module, TP pruning fn)
        self.unit_of: dict[str, torch.Tensor] = {}
        self.excluded: list[tuple[str, str]] = []               # (root layer, reason)
        self.groups: list[ChannelGroup] = []
        self.calls = _CallRecord()
        self.slimmed = False
        self._flops_model = None

    @property
    def flops_model(self):
        """The FlopsModel of the dense network (fvcore runs on first use, which must precede slimming)."""
        from compress.pruning.flops_model import FlopsModel

        if self._flops_model is None:
            if self.slimmed:
                raise ValueError("the FLOPs model must be built before the network is slimmed")
            module_flops, total = _module_flops(self.net, self.example_input)
            self._flops_model = FlopsModel(self.groups, module_flops, total, _attention_flops(self.net, self.groups))
        return self._flops_model


def find_groups(net: nn.Module, example_input: torch.Tensor) -> list[ChannelGroup]:
    """The prunable channel groups of `net`, in execution order of their root layers.

    `nn.MultiheadAttention` modules are first replaced in place by the equivalent `SplitAttention`
    (same function and weights) so that attention heads become prunable groups. The classifier (every
    layer whose output is the network output) is never pruned. Raises `CompressError` naming the
    layer or op when the network cannot be traced or grouped.
    """
    split_attention(net)
    was_training = net.training
    with _record_calls(net) as calls:
        dg = _trace(net, example_input)
    net.train(was_training)
    graph = GroupGraph(net, dg, example_input)
    graph.calls = calls
    outputs = _output_layers(dg)
    groups = []
    for tp_group in dg.get_all_groups(ignored_layers=outputs):
        group = _make_group(graph, tp_group)
        if group is not None:
            groups.append(group)
    positions = [calls.order.get(g.id, 0) for g in groups]
    first, span = min(positions, default=0), max(1, max(positions, default=1) - min(positions, default=0))
    for g, pos in zip(groups, positions, strict=True):
        g.depth = round((pos - first) / span, 4)
    groups.sort(key=lambda g: (g.depth, g.id))
    graph.groups = groups
    for root, reason in graph.excluded:
        log.info("group at %s not prunable: %s", root, reason)
    return groups


def _trace(net: nn.Module, example_input: torch.Tensor):
    import torch_pruning as tp

    dg = tp.DependencyGraph()
    try:
        with torch.enable_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return dg.build_dependency(net, example_inputs=example_input, verbose=False)
    except Exception as exc:  # tracing runs arbitrary model code
        where = _locate_failure(dg)
        detail = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        if where:
            raise CompressError(f"cannot group the channels of this network: {where} ({detail})") from None
        raise CompressError(f"cannot trace the network for pruning: {detail}") from None


def _locate_failure(dg) -> str | None:
    """After a failed build, the reshape/concat/split op whose channel mapping cannot be derived."""
    import torch_pruning as tp
    from torch_pruning.dependency import index_mapping as im

    updates = {tp.ops.OPTYPE.RESHAPE: im.update_reshape_index_mapping,
               tp.ops.OPTYPE.CONCAT: im.update_concat_index_mapping,
               tp.ops.OPTYPE.SPLIT: im.update_split_index_mapping}
    for node in getattr(dg, "module2node", {}).values():
        update = updates.get(node.type)
        if update is None:
            continue
        try:
            update(dg, node)
        except Exception:
            op = node.grad_fn.name() if hasattr(node.grad_fn, "name") else type(node.module).__name__
            return (f"operation {op} after layer {_nearest_layer(dg, node)} rearranges channels in a way "
                    "the pruner cannot map")
    return None


def _nearest_layer(dg, node) -> str:
    stack, seen = list(node.inputs), set()
    while stack:
        n = stack.pop(0)
        if n in seen:
            continue
        seen.add(n)
        name = dg._module2name.get(n.module) if isinstance(n.module, nn.Module) else None
        if name:
            return name
        stack.extend(n.inputs)
    return "(network input)"


class _CallRecord:
    """What one forward pass shows about the modules: call order, and which module produced which
    autograd node (so parameter-free modules such as pooling can be found inside groups)."""

    def __init__(self):
        self.order: dict[str, int] = {}
        self.by_grad_fn: dict[object, str] = {}
        self.channels: dict[str, int] = {}


@contextmanager
def _record_calls(net: nn.Module):
    """Records, while active, module call order and output autograd nodes."""
    rec = _CallRecord()
    names = {m: n for n, m in net.named_modules()}

    def before(mod, _inputs):
        rec.order.setdefault(names[mod], len(rec.order))

    def after(mod, _inputs, out):
        if isinstance(out, torch.Tensor) and out.grad_fn is not None and out.dim() >= 2:
            rec.by_grad_fn.setdefault(out.grad_fn, names[mod])
            rec.channels.setdefault(names[mod], out.shape[1] if out.dim() == 4 else out.shape[-1])

    hooks = [m.register_forward_pre_hook(before) for m in net.modules()]
    hooks += [m.register_forward_hook(after) for m in net.modules() if not list(m.children())]
    try:
        yield rec
    finally:
        for h in hooks:
            h.remove()


def _output_layers(dg) -> list[nn.Module]:
    """Layers whose outputs reach the network output through parameter-free ops only."""
    import torch_pruning as tp

    found, seen = [], set()
    stack = [n for n in dg.module2node.values() if n.type == tp.ops.OPTYPE.OUTPUT or not n.outputs]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if isinstance(node.module, nn.Module) and node.module in dg._module2name and node.type not in (
                tp.ops.OPTYPE.ELEMENTWISE, tp.ops.OPTYPE.OUTPUT):
            found.append(node.module)
            if not isinstance(node.module, (nn.modules.conv._ConvNd, nn.Linear)):
                stack.extend(node.inputs)   # a norm layer after the classifier: keep walking back
            continue
        stack.extend(node.inputs)
    return found


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


def _make_group(graph: GroupGraph, tp_group) -> ChannelGroup | None:
    """Turn one Torch-Pruning group into a ChannelGroup, or None (recorded in graph.excluded)."""
    dg = graph.dg
    root_dep = tp_group[0].dep
    root_mod = root_dep.target.module
    root_name = dg._module2name[root_mod]
    channels = len(tp_group[0].idxs)
    raw, ops = [], []
    for item in tp_group:
        node, handler = item.dep.target, item.dep.handler
        mod = node.module
        name = dg._param_to_name.get(mod) if isinstance(mod, nn.Parameter) else dg._module2name.get(mod)
        if name is None:
            ops.append(node)
            owner = graph.calls.by_grad_fn.get(node.grad_fn)
            if owner is not None and not isinstance(mod, nn.Parameter):   # a parameter-free module (pooling…)
                raw.append((owner, graph.net.get_submodule(owner), "local", list(item.idxs), list(item.root_idxs)))
            continue
        is_out, is_in = dg.is_out_channel_pruning_fn(handler), dg.is_in_channel_pruning_fn(handler)
        side = "local" if (is_out and is_in) or isinstance(mod, nn.Parameter) else ("out" if is_out else "in")
        raw.append((name, mod, side, list(item.idxs), list(item.root_idxs)))

    kinds = {name: _layer_kind(mod) for name, mod, *_ in raw}
    if any(k == "statnorm" for k in kinds.values()):
        norm = next(n for n, k in kinds.items() if k == "statnorm")
        graph.excluded.append((root_name, f"its channels are normalised together by {norm} (LayerNorm/GroupNorm)"))
        return None
    if any(k in ("mha", "other") for k in kinds.values()):
        bad = next(n for n, k in kinds.items() if k in ("mha", "other"))
        graph.excluded.append((root_name, f"layer {bad} ({type(graph.net.get_submodule(bad)).__name__}) "
                                          "cannot be gated exactly"))
        return None

    heads = _head_dim(graph.net, raw)
    unit_of, kind, unit_channels = _unit_structure(graph, root_name, channels, raw, kinds, heads)
    if unit_of is None:
        return None
    _check_ops(ops, root_name, is_heads=kind == "heads")

    items = []
    for name, _mod, side, idxs, root_idxs in raw:
        if not idxs:
            continue
        items.append(Member(name=name, side=side, layer=kinds[name], idx=torch.tensor(idxs, dtype=torch.long),
                            unit=unit_of[torch.tensor(root_idxs, dtype=torch.long)]))
    graph.roots[root_name] = (root_mod, root_dep.handler)
    graph.unit_of[root_name] = unit_of
    width = int(unit_of.max()) + 1
    members = list(dict.fromkeys(m.name for m in items))
    return ChannelGroup(id=root_name, width=width, channels=channels, members=members, depth=0.0,
                        kind=kind, unit_channels=unit_channels, items=items, graph=graph)


def _head_dim(net: nn.Module, raw) -> int | None:
    """head_dim if the group holds the q/k/v outputs of a SplitAttention (an attention-head group)."""
    for name, _mod, side, *_ in raw:
        parent, _, child = name.rpartition(".")
        owner = net.get_submodule(parent) if parent else net
        if isinstance(owner, SplitAttention) and child in ("q", "k", "v") and side == "out":
            return owner.head_dim
    return None


def _unit_structure(graph: GroupGraph, root: str, channels: int, raw, kinds, head_dim):
    """unit_of[channel] for the group, its kind and channels per unit; None if it cannot be pruned exactly."""
    ch = torch.arange(channels)
    identity = all(idxs == root_idxs for _n, _m, _s, idxs, root_idxs in raw)
    if head_dim is not None:
        if not identity or channels % head_dim:
            graph.excluded.append((root, "attention projections are not aligned with whole heads"))
            return None, None, None
        return ch // head_dim, "heads", head_dim
    tiles = {mod.groups for name, mod, *_ in raw if kinds[name] == "gconv"}
    if not tiles:
        return ch, "channels", 1
    if len(tiles) > 1 or not identity or channels % next(iter(tiles)):
        graph.excluded.append((root, f"grouped convolutions with different group counts {sorted(tiles)} share it"))
        return None, None, None
    n_tiles = next(iter(tiles))
    return ch % (channels // n_tiles), "tiled", n_tiles


def _check_ops(ops, root: str, is_heads: bool) -> None:
    for node in ops:
        fn = node.grad_fn
        op = fn.name() if fn is not None and hasattr(fn, "name") else type(node.module).__name__
        if node.module.__class__.__name__ in ("_ConcatOp", "_SplitOp", "_ReshapeOp", "_ExpandOp", "_SliceOp",
                                              "_OutputOp", "_UnbindOp"):
            continue
        allowed = op in CHANNEL_SAFE_OPS or (is_heads and op in HEAD_SAFE_OPS)
        if op in _PADS:
            allowed = len(getattr(fn, "_saved_pad", ())) == 4
        if allowed and op in _REDUCTIONS:
            dims = getattr(fn, "_saved_dim", ())
            sizes = getattr(fn, "_saved_self_sym_sizes", ())
            allowed = not (len(sizes) == 4 and any(int(d) % 4 == 1 for d in dims))
        if not allowed:
            raise CompressError(f"cannot group the channels of layer {root}: operation {op} on its path is not "
                                "known to keep channels separate (architecture not supported by the pruner)")


def _module_flops(net: nn.Module, example_input: torch.Tensor) -> tuple[dict[str, int], int]:
    """fvcore FLOPs per module (own ops only, children excluded) and the total, on `example_input`."""
    from fvcore.nn import FlopCountAnalysis

    from compress.flops import ATTENTION_HANDLES

    logging.getLogger("fvcore").setLevel(logging.ERROR)
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            analysis = FlopCountAnalysis(net, example_input[:1])
            analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
            analysis.set_op_handle(**ATTENTION_HANDLES)
            by_module = analysis.by_module()
            total = int(analysis.total())
    finally:
        net.train(was_training)
    own = {}
    for name, mod in net.named_modules():
        children = sum(by_module.get(f"{name}.{c}" if name else c, 0) for c, _ in mod.named_children())
        own[name] = int(by_module.get(name, 0)) - int(children)
    return own, total


def _attention_flops(net: nn.Module, groups: list[ChannelGroup]) -> dict[str, str]:
    """SplitAttention modules whose own matmul FLOPs scale with a head group: module name -> group id."""
    out = {}
    for g in groups:
        if g.kind == "heads":
            for m in g.items:
                parent = m.name.rpartition(".")[0]
                if isinstance(net.get_submodule(parent), SplitAttention):
                    out[parent] = g.id
    return out
