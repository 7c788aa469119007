"""One layer of a network as a stand-alone thing to time: an ONNX graph or a PyTorch module.

A latency lookup table times a convolution/Linear layer (with the BatchNorm and activation that follow
it in the network) at many widths. Exporting a PyTorch module to ONNX costs ~0.3 s, more than timing
the layer, so ONNX backends get a graph written directly with `onnx.helper` — what the exporter
writes for the same layer after BatchNorm folding: Conv (or MatMul + Add) and the activation — and
PyTorch backends get the modules themselves (BatchNorm unfolded, as eager PyTorch runs it).

`copies=2` builds the *twin*: two such layers with different weights on the same input, their outputs
added. A layer timed alone also pays what it never pays inside a network: the session call, the copy
of its output, and on ONNX Runtime's CPU provider the reorders of its input and output into and out
of the blocked NCHWc layout (measured there: 25–40% of a 1×1 convolution at 56×56 px). Those costs
appear once in the single graph and once in the twin, so twin − single is the layer's cost inside a
network (plus one fused element-wise add, which residual layers pay in the network too). The
weights differ so that graph optimisers cannot merge the copies.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from compress.pruning.latency_model import LayerShape

OPSET = 18
INPUT = "images"      # the name export/ gives a network input (the TensorRT profile code expects it)


def layer_input_shape(shape: LayerShape, cin: int, batch_size: int) -> tuple[int, ...]:
    dims = list(shape.input_shape)
    dims[shape.channel_dim] = cin
    return (batch_size, *dims)


def conv_groups(shape: LayerShape, cin: int) -> int:
    return cin if shape.depthwise else shape.groups


def onnx_layer(shape: LayerShape, cin: int, cout: int, batch_size: int, copies: int = 1) -> bytes:
    """A serialised ONNX model of the layer (or its twin, `copies=2`) at these widths, fixed batch size."""
    from onnx import TensorProto, helper

    nodes, inits, outs = [], [], []
    for copy in range(copies):
        branch_nodes, branch_inits, out = _onnx_branch(shape, cin, cout, f"c{copy}_", seed=copy)
        nodes += branch_nodes
        inits += branch_inits
        outs.append(out)
    out = outs[0]
    if copies == 2:
        nodes.append(helper.make_node("Add", outs, ["twin"]))
        out = "twin"
    x = helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, list(layer_input_shape(shape, cin, batch_size)))
    y = helper.make_tensor_value_info(out, TensorProto.FLOAT, None)
    graph = helper.make_graph(nodes, "layer", [x], [y], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="compress-lut")
    model.ir_version = 10
    return model.SerializeToString()


def _onnx_branch(shape: LayerShape, cin: int, cout: int, p: str, seed: int):
    """One copy of the layer on the graph input, every name prefixed with `p`; (nodes, initializers, output)."""
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(seed)
    bias = numpy_helper.from_array(np.zeros(cout, np.float32), p + "b")
    if shape.op == "conv":
        groups = conv_groups(shape, cin)
        w = rng.standard_normal((cout, cin // groups, *shape.kernel), dtype=np.float32) * 0.05
        nodes = [helper.make_node("Conv", [INPUT, p + "w", p + "b"], [p + "y"], kernel_shape=list(shape.kernel),
                                  strides=list(shape.stride), pads=list(shape.padding) * 2,
                                  dilations=list(shape.dilation), group=groups)]
    else:
        w = rng.standard_normal((cin, cout), dtype=np.float32) * 0.05
        nodes = [helper.make_node("MatMul", [INPUT, p + "w"], [p + "m"]),
                 helper.make_node("Add", [p + "m", p + "b"], [p + "y"])]
    inits = [numpy_helper.from_array(w, p + "w"), bias]
    if shape.act is None:
        return nodes, inits, p + "y"
    act_nodes, act_inits = _onnx_activation(shape.act, p + "y", p)
    return nodes + act_nodes, inits + act_inits, p + "a"


def _onnx_activation(act: str, x: str, p: str):
    """Nodes computing the activation of `x` into `p`+"a", as the exporter writes it; (nodes, initializers)."""
    from onnx import helper, numpy_helper

    def const(name: str, value: float):
        return numpy_helper.from_array(np.array(value, dtype=np.float32), p + name)

    def node(op: str, inputs: list[str], out: str, **attrs):
        return helper.make_node(op, inputs, [p + out], **attrs)

    if act == "relu":
        return [node("Relu", [x], "a")], []
    if act == "relu6":
        return [node("Clip", [x, p + "lo", p + "hi"], "a")], [const("lo", 0.0), const("hi", 6.0)]
    if act == "hardswish":
        return [node("HardSwish", [x], "a")], []
    if act == "hardsigmoid":
        return [node("HardSigmoid", [x], "a", alpha=1 / 6, beta=0.5)], []
    if act == "sigmoid":
        return [node("Sigmoid", [x], "a")], []
    if act == "silu":
        return [node("Sigmoid", [x], "sig"), node("Mul", [x, p + "sig"], "a")], []
    if act == "gelu":   # 0.5·x·(1 + erf(x/√2)): what opset-18 export writes, fused back by ORT
        nodes = [node("Div", [x, p + "sqrt2"], "div"), node("Erf", [p + "div"], "erf"),
                 node("Add", [p + "erf", p + "one"], "add"), node("Mul", [x, p + "add"], "mul"),
                 node("Mul", [p + "mul", p + "half"], "a")]
        return nodes, [const("sqrt2", 2 ** 0.5), const("one", 1.0), const("half", 0.5)]
    raise ValueError(f"no ONNX form for activation {act!r}")


_TORCH_ACTIVATIONS = {"relu": nn.ReLU, "relu6": nn.ReLU6, "hardswish": nn.Hardswish, "silu": nn.SiLU, "gelu": nn.GELU,
                      "sigmoid": nn.Sigmoid, "hardsigmoid": nn.Hardsigmoid}


def _torch_branch(shape: LayerShape, cin: int, cout: int) -> nn.Sequential:
    if shape.op == "conv":
        layer = nn.Conv2d(cin, cout, shape.kernel, shape.stride, shape.padding, shape.dilation,
                          groups=conv_groups(shape, cin), bias=shape.bias)
    else:
        layer = nn.Linear(cin, cout, bias=shape.bias)
    parts = [layer]
    if shape.bn:
        parts.append(nn.BatchNorm2d(cout) if shape.op == "conv" else nn.BatchNorm1d(cout))
    if shape.act is not None:
        parts.append(_TORCH_ACTIVATIONS[shape.act]())
    return nn.Sequential(*parts)


class LayerModule(nn.Module):
    """The layer (+ BN + activation), or its twin, as a module the torch runners accept (they read
    `input_size`)."""

    def __init__(self, shape: LayerShape, cin: int, cout: int, copies: int = 1):
        super().__init__()
        self.branches = nn.ModuleList(_torch_branch(shape, cin, cout) for _ in range(copies))
        self.input_size = layer_input_shape(shape, cin, 1)[1:]
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.branches[0](x)
        for branch in self.branches[1:]:
            out = out + branch(x)
        return out


def torch_layer(shape: LayerShape, cin: int, cout: int, copies: int = 1) -> nn.Module:
    torch.manual_seed(0)
    return LayerModule(shape, cin, cout, copies)
