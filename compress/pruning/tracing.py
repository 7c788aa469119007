"""Tracing a network into Torch-Pruning's dependency graph, and the graph's raw channel groups.

`trace` builds the graph (with channel shuffles taught to it, ties.py) and turns tracing failures
into one-line errors naming the op; `record_calls` watches one forward pass for module order and
which module produced which autograd node; `tp_groups` lists Torch-Pruning's groups one root layer
at a time, so that one root whose index propagation runs away (guard.py) is excluded instead of
ending the search.
"""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from compress.errors import CompressError
from compress.pruning.guard import MappingRunaway

log = logging.getLogger(__name__)

_CATS = (torch.cat, torch.concat, torch.concatenate)
_CHUNKS = (torch.chunk, torch.Tensor.chunk)   # sizes computed from the width at run time


def _graph_class():
    import torch_pruning as tp

    from compress.pruning.layout import fix_split_sizes, map_concats, map_head_tensors, map_splits, mark_shuffles

    class LayoutAwareGraph(tp.DependencyGraph):
        """Torch-Pruning's graph, with channel shuffles mapped as permutations (their ties in `.ties`),
        splits mapped by the output each consumer reads and concatenations by their recorded input
        shapes (layout.py); `.unsafe` holds the ones that cannot be mapped or that cut at fixed sizes. Set
        `.calls` (the CallRecord of the traced forward pass) before building."""

        calls: CallRecord | None = None

        def _build_dependency(self, module2node):
            super()._build_dependency(module2node)
            self.ties = mark_shuffles(self)
            map_head_tensors(self, self.model)
            self.unsafe = {**map_splits(self, self.calls.chunks), **map_concats(self, self.calls.cats)}

        def get_pruning_group(self, module, pruning_fn, idxs):
            fix_split_sizes(self)
            return super().get_pruning_group(module, pruning_fn, idxs)

    return LayoutAwareGraph


def trace(net: nn.Module, example_input: torch.Tensor, calls: CallRecord):
    """Torch-Pruning's dependency graph of `net` (a one-line CompressError when tracing fails); run it
    inside `record_calls`, whose record `calls` supplies the concatenation shapes."""
    dg = _graph_class()()
    dg.calls = calls
    try:
        with torch.enable_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return dg.build_dependency(net, example_inputs=example_input, verbose=False,
                                       unwrapped_parameters=head_parameters(net))
    except Exception as exc:  # tracing runs arbitrary model code
        where = _locate_failure(dg)
        detail = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        if where:   # the op says what; Torch-Pruning's own exception text would only confuse a user
            log.info("tracing failed at %s: %s", where, detail)
            raise CompressError(f"cannot group the channels of this network: {where}") from None
        raise CompressError(f"cannot trace the network for pruning: {detail}") from None


def head_parameters(net: nn.Module) -> list[tuple[nn.Parameter, int]]:
    """Per-head parameters of split attention modules with their head dimension: Torch-Pruning's default
    (the last dimension longer than 1) is wrong for a [heads, 1, 1] scale, and for any table once a
    single head is left."""
    return [(t, dim) for mod in net.modules() for t, dim in getattr(mod, "per_head", list)()
            if isinstance(t, nn.Parameter)]


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


class CallRecord:
    """What one forward pass shows about the modules: call order, and which module produced which
    autograd node (so parameter-free modules such as pooling can be found inside groups)."""

    def __init__(self):
        self.order: dict[str, int] = {}
        self.by_grad_fn: dict[object, str] = {}
        self.channels: dict[str, int] = {}
        self.cats: dict[object, tuple[int, list[tuple[int, ...]]]] = {}   # cat's autograd node -> (dim, shapes)
        self.chunks: set = set()      # autograd nodes of splits made by chunk() (the others cut at fixed sizes)


class _LayoutCalls(TorchFunctionMode):
    """Records the dim and input shapes of every concatenation that builds an autograd node, and which
    splits are chunks (equal parts of whatever width there is) rather than cuts at given sizes."""

    def __init__(self, rec: CallRecord):
        super().__init__()
        self.rec = rec

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in _CATS and isinstance(out, torch.Tensor) and out.grad_fn is not None:
            tensors = args[0] if args else kwargs["tensors"]
            dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
            self.rec.cats[out.grad_fn] = (dim % out.dim(), [tuple(t.shape) for t in tensors])
        elif func in _CHUNKS and isinstance(out, tuple) and out and getattr(out[0], "grad_fn", None) is not None:
            self.rec.chunks.add(out[0].grad_fn)
        return out


@contextmanager
def record_calls(net: nn.Module):
    """Records, while active, module call order and output autograd nodes."""
    rec = CallRecord()
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
        with _LayoutCalls(rec):
            yield rec
    finally:
        for h in hooks:
            h.remove()


def output_layers(dg) -> list[nn.Module]:
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


def tp_groups(dg, excluded: list[tuple[str, str]]):
    """Torch-Pruning's groups, one per root layer (a Conv or Linear not already covered by an earlier
    group), as `DependencyGraph.get_all_groups` finds them, except that a root whose index propagation
    runs away is recorded as excluded instead of ending the search. Groups holding an output layer
    are skipped: the classifier keeps its width."""
    import torch_pruning as tp

    outputs = set(output_layers(dg))
    covered: set[nn.Module] = set()
    for mod in list(dg.module2node):
        if mod in outputs or mod in covered or not isinstance(mod, (tp.ops.TORCH_CONV, tp.ops.TORCH_LINEAR)):
            continue
        pruner = dg.get_pruner_of_module(mod)
        if pruner is None or pruner.get_out_channels(mod) is None:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")   # Torch-Pruning's shape inference warns on deep recursion
                group = dg.get_pruning_group(mod, pruner.prune_out_channels, list(range(pruner.get_out_channels(mod))))
        except MappingRunaway as exc:
            covered.add(mod)
            excluded.append((dg._module2name[mod], f"the channel mapping through its ops does not converge "
                                                   f"({exc}); typically attention internals or a reshape "
                                                   "the dependency graph misreads"))
            continue
        holds_output = False
        for item in group:
            if dg.is_out_channel_pruning_fn(item.dep.handler):
                covered.add(item.dep.target.module)
                holds_output |= item.dep.target.module in outputs
        if not holds_output:
            yield group


def mapping_limit(net: nn.Module) -> int:
    """Twice the widest dimension of any layer: no valid channel-index mapping yields more indices."""
    widest = 1
    for mod in net.modules():
        for attr in ("in_channels", "out_channels", "in_features", "out_features", "num_features"):
            widest = max(widest, int(getattr(mod, attr, 0) or 0))
    for p in net.parameters():
        widest = max(widest, max(p.shape, default=1))
    return 2 * widest


