"""One layer of a network as a stand-alone thing to time: an ONNX graph or a PyTorch module.

A latency lookup table times a convolution/Linear layer (with the BatchNorm and activation that follow
it in the network) at many widths. Exporting a PyTorch module to ONNX costs ~0.3 s, more than timing
the layer, so ONNX backends get a graph written directly with `onnx.helper` — what the exporter
writes for the same layer after BatchNorm folding: Conv (or MatMul + Add) and the activation — and
PyTorch backends get the modules themselves (BatchNorm unfolded, as eager PyTorch runs it).
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


def onnx_layer(shape: LayerShape, cin: int, cout: int, batch_size: int) -> bytes:
    """A serialised ONNX model of the layer at these widths, fixed batch size."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inits = [], []
    if shape.op == "conv":
        groups = conv_groups(shape, cin)
        w = rng.standard_normal((cout, cin // groups, *shape.kernel), dtype=np.float32) * 0.05
        inits += [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.zeros(cout, np.float32), "b")]
        pads = list(shape.padding) * 2
        nodes.append(helper.make_node("Conv", [INPUT, "w", "b"], ["y0"], kernel_shape=list(shape.kernel),
                                      strides=list(shape.stride), pads=pads, dilations=list(shape.dilation),
                                      group=groups))
    else:
        w = rng.standard_normal((cin, cout), dtype=np.float32) * 0.05
        inits += [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.zeros(cout, np.float32), "b")]
        nodes += [helper.make_node("MatMul", [INPUT, "w"], ["m"]), helper.make_node("Add", ["m", "b"], ["y0"])]
    out = "y0"
    if shape.act is not None:
        act_nodes, act_inits, out = _onnx_activation(shape.act, out)
        nodes += act_nodes
        inits += act_inits
    x = helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, list(layer_input_shape(shape, cin, batch_size)))
    y = helper.make_tensor_value_info(out, TensorProto.FLOAT, None)
    graph = helper.make_graph(nodes, "layer", [x], [y], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="compress-lut")
    model.ir_version = 10
    return model.SerializeToString()


def _onnx_activation(act: str, x: str):
    """Nodes computing the activation of `x` as the exporter writes it; (nodes, initializers, output)."""
    from onnx import helper, numpy_helper

    def const(name: str, value: float):
        return numpy_helper.from_array(np.array(value, dtype=np.float32), name)

    if act == "relu":
        return [helper.make_node("Relu", [x], ["a"])], [], "a"
    if act == "relu6":
        return [helper.make_node("Clip", [x, "lo", "hi"], ["a"])], [const("lo", 0.0), const("hi", 6.0)], "a"
    if act == "hardswish":
        return [helper.make_node("HardSwish", [x], ["a"])], [], "a"
    if act == "hardsigmoid":
        return [helper.make_node("HardSigmoid", [x], ["a"], alpha=1 / 6, beta=0.5)], [], "a"
    if act == "sigmoid":
        return [helper.make_node("Sigmoid", [x], ["a"])], [], "a"
    if act == "silu":
        return [helper.make_node("Sigmoid", [x], ["a_sig"]), helper.make_node("Mul", [x, "a_sig"], ["a"])], [], "a"
    if act == "gelu":   # 0.5·x·(1 + erf(x/√2)): what opset-18 export writes, fused back by ORT
        nodes = [helper.make_node("Div", [x, "sqrt2"], ["a_div"]), helper.make_node("Erf", ["a_div"], ["a_erf"]),
                 helper.make_node("Add", ["a_erf", "one"], ["a_add"]), helper.make_node("Mul", [x, "a_add"], ["a_mul"]),
                 helper.make_node("Mul", ["a_mul", "half"], ["a"])]
        return nodes, [const("sqrt2", 2 ** 0.5), const("one", 1.0), const("half", 0.5)], "a"
    raise ValueError(f"no ONNX form for activation {act!r}")


_TORCH_ACTIVATIONS = {"relu": nn.ReLU, "relu6": nn.ReLU6, "hardswish": nn.Hardswish, "silu": nn.SiLU, "gelu": nn.GELU,
                      "sigmoid": nn.Sigmoid, "hardsigmoid": nn.Hardsigmoid}


class LayerModule(nn.Sequential):
    """The layer (+ BN + activation) as a module the torch runners accept (they read `input_size`)."""

    def __init__(self, shape: LayerShape, cin: int, cout: int):
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
        super().__init__(*parts)
        self.input_size = layer_input_shape(shape, cin, 1)[1:]
        self.eval()


def torch_layer(shape: LayerShape, cin: int, cout: int) -> nn.Module:
    torch.manual_seed(0)
    return LayerModule(shape, cin, cout)
