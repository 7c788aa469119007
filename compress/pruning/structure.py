"""The shape record of a slimmed network (model.json "layers" and "widths").

`layer_spec` lists, for every layer that differs from the dense architecture, the constructor
arguments that rebuild it; `apply_layer_spec` replaces those layers of a freshly built dense network
with new modules of exactly those shapes (weights then come from model.pt). Layers of other types
(subclasses such as timm's BatchNormAct2d, modules holding their own parameters such as a layer
scale) are recorded as "Resized": the integer attributes and tensor shapes in which they differ
from the dense layer, which is resized in place on rebuild, as Torch-Pruning resized it. Nothing is
pickled, so `compress.load` rebuilds a pruned model in any process from JSON + a weights-only
state_dict.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from compress.errors import CompressError
from compress.pruning.attention import SplitAttention, SplitSelfAttention
from compress.pruning.window_attention import SplitWindowAttention, SplitWindowAttentionV2


def _conv(m: nn.modules.conv._ConvNd) -> dict[str, Any]:
    return {"in_channels": m.in_channels, "out_channels": m.out_channels, "kernel_size": list(m.kernel_size),
            "stride": list(m.stride), "padding": m.padding if isinstance(m.padding, str) else list(m.padding),
            "dilation": list(m.dilation), "groups": m.groups, "bias": m.bias is not None,
            "padding_mode": m.padding_mode}


def _bn(m: nn.modules.batchnorm._BatchNorm) -> dict[str, Any]:
    return {"num_features": m.num_features, "eps": m.eps, "momentum": m.momentum, "affine": m.affine,
            "track_running_stats": m.track_running_stats}


def _layernorm(m: nn.LayerNorm) -> dict[str, Any]:
    return {"normalized_shape": list(m.normalized_shape), "eps": m.eps, "elementwise_affine": m.elementwise_affine,
            "bias": m.bias is not None}


def _split_attention(m: SplitAttention) -> dict[str, Any]:
    attrs = {"embed_dim": m.q.in_features, "num_heads": m.num_heads, "head_dim": m.head_dim,
             "bias": m.q.bias is not None, "dropout": m.dropout, "batch_first": m.batch_first}
    if (m.out_proj.bias is not None) != attrs["bias"]:
        attrs["out_bias"] = m.out_proj.bias is not None
    return attrs


def _window_attention(m: SplitWindowAttention) -> dict[str, Any]:
    attrs = {k: v for k, v in _split_attention(m).items() if k != "batch_first"}
    attrs.update(window_size=list(m.window_size), shift_size=list(m.shift_size), proj_dropout=m.proj_dropout)
    if isinstance(m, SplitWindowAttentionV2):
        attrs["cpb_hidden"] = m.cpb_mlp[0].out_features
    return attrs


def _layer_types() -> dict[str, tuple[type, Any]]:
    """Recordable layer types: name → (class, attributes of an instance)."""
    from torchvision.models.convnext import LayerNorm2d

    return {
        "Conv1d": (nn.Conv1d, _conv), "Conv2d": (nn.Conv2d, _conv), "Conv3d": (nn.Conv3d, _conv),
        "BatchNorm1d": (nn.BatchNorm1d, _bn), "BatchNorm2d": (nn.BatchNorm2d, _bn),
        "BatchNorm3d": (nn.BatchNorm3d, _bn),
        "Linear": (nn.Linear, lambda m: {"in_features": m.in_features, "out_features": m.out_features,
                                         "bias": m.bias is not None}),
        "LayerNorm": (nn.LayerNorm, _layernorm), "LayerNorm2d": (LayerNorm2d, _layernorm),
        "GroupNorm": (nn.GroupNorm, lambda m: {"num_groups": m.num_groups, "num_channels": m.num_channels,
                                               "eps": m.eps, "affine": m.affine}),
        "PReLU": (nn.PReLU, lambda m: {"num_parameters": m.num_parameters}),
        "SplitAttention": (SplitAttention, _split_attention),
        "SplitSelfAttention": (SplitSelfAttention, _split_attention),
        "SplitWindowAttention": (SplitWindowAttention, _window_attention),
        "SplitWindowAttentionV2": (SplitWindowAttentionV2, _window_attention),
    }


def _own_shapes(m: nn.Module) -> dict[str, tuple[int, ...]]:
    tensors = {**dict(m.named_parameters(recurse=False)), **dict(m.named_buffers(recurse=False))}
    return {k: tuple(v.shape) for k, v in tensors.items() if v is not None}


def layer_spec(net: nn.Module, reference: nn.Module | None = None) -> dict[str, dict[str, Any]]:
    """JSON-able constructor attributes of the layers of `net` that differ from `reference` (the dense
    network built by `create_model`) in type or in parameter/buffer shapes; every recordable layer if
    `reference` is None. Parameters held directly by other modules (e.g. a class token) are recorded
    by shape."""
    types = _layer_types()
    by_class = {cls: name for name, (cls, _attrs) in types.items()}
    ref_modules = dict(reference.named_modules()) if reference is not None else {}
    spec: dict[str, dict[str, Any]] = {}
    recorded: list[str] = []
    for name, mod in net.named_modules():
        if not name or any(name.startswith(r + ".") for r in recorded):
            continue
        ref = ref_modules.get(name)
        changed = reference is None or ref is None or type(ref) is not type(mod) or _own_shapes(ref) != _own_shapes(mod)
        if not changed:
            continue
        type_name = by_class.get(type(mod))
        if type_name is not None:
            spec[name] = {"type": type_name, **types[type_name][1](mod)}
            recorded.append(name)
            continue
        if reference is None:
            continue
        if ref is None or type(ref) is not type(mod):
            raise CompressError(f"cannot record layer {name} of type {type(mod).__name__} in model.json")
        spec[name] = _resized(mod, ref)
    return spec


def _resized(mod: nn.Module, ref: nn.Module) -> dict[str, Any]:
    """How `mod` differs from `ref`, a layer of the same type: integer attributes and tensor shapes."""
    ref_shapes = _own_shapes(ref)
    tensors = {k: list(v) for k, v in _own_shapes(mod).items() if ref_shapes.get(k) != v}
    attrs = {k: list(v) if isinstance(v, tuple) else v for k, v in vars(mod).items()
             if not k.startswith("_") and _is_size(v) and vars(ref).get(k) != v}
    return {"type": "Resized", "class": type(mod).__name__, "attrs": attrs, "tensors": tensors}


def _is_size(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, (tuple, list)) and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value))


def _resize(mod: nn.Module, name: str, entry: dict[str, Any]) -> None:
    """Resize `mod` in place as a "Resized" entry records (tensor contents come from model.pt)."""
    if type(mod).__name__ != entry.get("class"):
        raise CompressError(f"model.json: layer {name} is a {entry.get('class')}, this model has a "
                            f"{type(mod).__name__}")
    for key, value in entry.get("attrs", {}).items():
        current = getattr(mod, key, None)
        if not _is_size(current):
            raise CompressError(f"model.json: layer {name} has no size attribute {key!r}")
        setattr(mod, key, tuple(value) if isinstance(current, tuple) else value)
    for key, shape in entry.get("tensors", {}).items():
        if key in mod._parameters and mod._parameters[key] is not None:
            old = mod._parameters[key]
            mod._parameters[key] = nn.Parameter(torch.zeros(shape, dtype=old.dtype), requires_grad=old.requires_grad)
        elif key in mod._buffers and mod._buffers[key] is not None:
            mod._buffers[key] = torch.zeros(shape, dtype=mod._buffers[key].dtype)
        else:
            raise CompressError(f"model.json: layer {name} has no tensor {key!r}")


def apply_layer_spec(net: nn.Module, spec: dict[str, dict[str, Any]]) -> nn.Module:
    """Reshape a freshly built dense `net` in place to the layers recorded by `layer_spec`."""
    types = _layer_types()
    for name in sorted(spec, key=lambda n: n.count(".")):
        entry = dict(spec[name])
        kind = entry.pop("type", None)
        parent_name, _, child = name.rpartition(".")
        try:
            parent = net.get_submodule(parent_name) if parent_name else net
        except AttributeError:
            raise CompressError(f"model.json names layer {name}, which this model does not have") from None
        if kind == "Resized":
            layer = getattr(parent, child, None)
            if not isinstance(layer, nn.Module):
                raise CompressError(f"model.json names layer {name}, which this model does not have")
            _resize(layer, name, entry)
            continue
        if kind == "Parameter":
            if not isinstance(getattr(parent, child, None), nn.Parameter):
                raise CompressError(f"model.json names parameter {name}, which this model does not have")
            setattr(parent, child, nn.Parameter(torch.zeros(entry["shape"])))
            continue
        if kind not in types:
            raise CompressError(f"model.json: unknown layer type {kind!r} for layer {name}")
        if not hasattr(parent, child):
            raise CompressError(f"model.json names layer {name}, which this model does not have")
        try:
            layer = types[kind][0](**entry)
        except (TypeError, ValueError) as exc:
            raise CompressError(f"model.json: bad attributes for layer {name}: {exc}") from None
        setattr(parent, child, layer.train(parent.training))
    return net


def module_copy(net: nn.Module, *, meta: bool = False) -> nn.Module:
    """A copy of `net`'s modules that shares its parameters and buffers instead of copying them, or with
    `meta`, holds shape-only (meta) tensors in their place.

    Slimming a shared copy replaces its layers' tensors with new, smaller ones and never writes into
    the shared ones, so it costs only the slimmed tensors; a meta copy costs nothing and is all that
    `layer_spec` compares against or a structure check rebuilds onto. (A deep copy of a 630 M-parameter
    network is 2.5 GB each time.)"""
    memo: dict[int, torch.Tensor] = {}
    for t in (*net.parameters(), *net.buffers()):
        if meta:
            new = t.to("meta")
            memo[id(t)] = nn.Parameter(new, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else new
        else:
            memo[id(t)] = t
    return copy.deepcopy(net, memo)


def widths(net: nn.Module) -> dict[str, int]:
    """Output width of every convolution and Linear layer, by name (report.json/model.json "widths")."""
    out = {}
    for name, mod in net.named_modules():
        if isinstance(mod, nn.modules.conv._ConvNd):
            out[name] = mod.out_channels
        elif isinstance(mod, nn.Linear):
            out[name] = mod.out_features
    return out
