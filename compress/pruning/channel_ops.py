"""Which autograd ops keep a group's channels apart, so that zeroing a channel (gating) equals removing it
(slimming). A group with any other op inside is excluded from pruning (groups.py); the reason is recorded.

Channel-wise ops (activations, BatchNorm, adds, pooling, per-channel reductions) and ops that only move
whole channels (views, permutes, concatenations, equal splits, whose layout layout.py follows) are safe;
attention's matmuls and softmax are safe only in attention-head groups, where whole heads go; a cut of the
channel dimension at fixed sizes is not, because the slimmed code would still cut at the dense sizes.
"""

from __future__ import annotations

# Autograd ops that act on each channel separately (or only move whole channels around, which
# Torch-Pruning maps): they may sit inside a group. A group with anything else inside is excluded.
CHANNEL_SAFE_OPS = {
    "AddBackward0", "SubBackward0", "MulBackward0", "DivBackward0", "NegBackward0", "CloneBackward0",
    "ReluBackward0", "HardtanhBackward0", "SigmoidBackward0", "HardsigmoidBackward0", "HardswishBackward0",
    "SiluBackward0", "GeluBackward0", "TanhBackward0", "LeakyReluBackward0", "EluBackward0", "MishBackward0",
    "ExpBackward0", "ClampBackward1", "ClampMinBackward0", "PreluKernelBackward0",
    "MaxPool2DWithIndicesBackward0", "AvgPool2DBackward0", "AdaptiveAvgPool2DBackward0",
    "AdaptiveMaxPool2DBackward0", "MeanBackward1", "SumBackward1", "UpsampleNearest2DBackward0",
    "UpsampleBilinear2DBackward0", "CatBackward0", "ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0",
    "PermuteBackward0", "TransposeBackward0", "TBackward0", "SqueezeBackward0", "SqueezeBackward1",
    "UnsqueezeBackward0", "ExpandBackward0", "SelectBackward0", "SliceBackward0", "AsStridedBackward0",
    "AsStridedBackward1", "AddmmBackward0", "MmBackward0", "DropoutBackward0", "NativeDropoutBackward0",
    "NativeBatchNormBackward0", "CudnnBatchNormBackward0",
}
# Ops allowed only inside attention-head groups, where whole heads are removed: attention matmuls and
# softmax, norms over head_dim (cosine attention), the gather of a position-bias table's rows.
HEAD_SAFE_OPS = {"BmmBackward0", "SoftmaxBackward0", "SafeSoftmaxBackward0", "LinalgVectorNormBackward0",
                 "IndexBackward0"}
# Reductions over these dims of an NCHW tensor would mix channels.
_REDUCTIONS = {"MeanBackward1", "SumBackward1"}
# Constant padding keeps channels separate when it pads only H and W (4 amounts; e.g. TF "SAME" padding).
_PADS = {"ConstantPadNdBackward0"}


def unsafe_op(ops, is_heads: bool, unsafe: dict) -> str | None:
    """The first op of a group that may mix its channels (so gating ≠ slimming), or None."""
    for node in ops:
        fn = node.grad_fn
        op = fn.name() if fn is not None and hasattr(fn, "name") else type(node.module).__name__
        kind = node.module.__class__.__name__
        if node in unsafe:
            return f"{op} ({unsafe[node]}: the slimmed code would not follow the removed channels)"
        if kind in ("_SplitOp", "_SliceOp"):
            fixed = _fixed_channel_cut(fn)
            if fixed:
                return f"{op} ({fixed}: the slimmed code would still cut at the dense sizes)"
            continue
        if kind in ("_ConcatOp", "_ReshapeOp", "_ExpandOp", "_OutputOp", "_UnbindOp"):
            continue
        allowed = op in CHANNEL_SAFE_OPS or (is_heads and op in HEAD_SAFE_OPS)
        if op in _PADS:
            allowed = len(getattr(fn, "_saved_pad", ())) == 4
        if allowed and op in _REDUCTIONS:
            dims = getattr(fn, "_saved_dim", ())
            sizes = getattr(fn, "_saved_self_sym_sizes", ())
            allowed = not (len(sizes) == 4 and any(int(d) % 4 == 1 for d in dims))
        if not allowed:
            return op
    return None


def _fixed_channel_cut(fn) -> str | None:
    """For a split or slice along the channel dimension that a slimmed network would still cut at its dense
    sizes (explicit split sizes, slice bounds inside the tensor), what it is; None for equal splits along
    dim 1 (layout.py decides those) and for other dims."""
    sizes = tuple(int(v) for v in getattr(fn, "_saved_self_sym_sizes", ()))
    dim = getattr(fn, "_saved_dim", None)
    if not sizes or dim is None:
        return None
    channel_dim = len(sizes) - 1 if len(sizes) == 3 else 1
    if dim % len(sizes) != channel_dim:
        return None
    name = fn.name()
    if name == "SplitBackward0":        # chunks along dim 1 are tied (layout.py); cuts at fixed sizes are unsafe there
        if channel_dim != 1:
            return "a split of the channel dimension of a token tensor"
        return None if sizes[dim] % int(fn._saved_split_size) == 0 else "an uneven channel split"
    if name == "SplitWithSizesBackward0":
        return "a channel split into fixed sizes"
    if name == "SliceBackward0":
        start, end, step = int(fn._saved_start), min(int(fn._saved_end), sizes[dim]), int(fn._saved_step)
        return None if (start, end, step) == (0, sizes[dim], 1) else f"a fixed channel slice [{start}:{end}]"
    return None
