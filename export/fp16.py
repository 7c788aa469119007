"""fp32 → fp16 conversion of an ONNX graph, keeping fp32 inputs and outputs.

TensorRT 11 builds every network strongly typed and dropped BuilderFlag.FP16 (deploy.md): fp16
there means an fp16 graph. Inputs and outputs stay fp32 (a Cast after each input and before each
output) so callers, parity checks and benchmarks feed the same arrays to every build.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from compress.errors import CompressError

FP16_MAX = float(np.finfo(np.float16).max)

# (op_type, input index) whose type the ONNX spec fixes to float32 regardless of the data type.
FLOAT32_ONLY_INPUTS = {("Resize", 1), ("Resize", 2), ("Upsample", 1)}


def convert_to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` computing in fp16, with its fp32 graph inputs/outputs preserved."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in graph.node for a in n.attribute):
        raise CompressError("fp16 conversion does not handle ONNX control flow (If/Loop/Scan) graphs")
    keep_fp32 = {n.input[i] for n in graph.node for i in range(len(n.input)) if (n.op_type, i) in FLOAT32_ONLY_INPUTS}
    for init in graph.initializer:
        if init.data_type == TensorProto.FLOAT and init.name not in keep_fp32:
            init.CopyFrom(_to_fp16(init))
    for node in graph.node:
        if not (node.op_type == "Constant" and node.output[0] in keep_fp32):
            _convert_node(node)
    prologue = _cast_inputs(graph)
    epilogue = _cast_outputs(graph)
    nodes = prologue + list(graph.node) + epilogue
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.value_info[:]  # stale fp32 intermediate types; shape inference recomputes them
    return onnx.shape_inference.infer_shapes(model)


def _to_fp16(tensor: TensorProto) -> TensorProto:
    array = numpy_helper.to_array(tensor)
    return numpy_helper.from_array(np.clip(array, -FP16_MAX, FP16_MAX).astype(np.float16), tensor.name)


def _convert_node(node: onnx.NodeProto) -> None:
    for attr in node.attribute:
        if node.op_type == "Cast" and attr.name == "to" and attr.i == TensorProto.FLOAT:
            attr.i = TensorProto.FLOAT16
        elif node.op_type in ("Constant", "ConstantOfShape") and attr.name == "value" \
                and attr.t.data_type == TensorProto.FLOAT:
            attr.t.CopyFrom(_to_fp16(attr.t))
        elif node.op_type == "Constant" and attr.name in ("value_float", "value_floats"):
            values = [attr.f] if attr.name == "value_float" else list(attr.floats)
            array = np.array(values, dtype=np.float16)
            tensor = numpy_helper.from_array(array if attr.name == "value_floats" else array.reshape(()))
            node.attribute.remove(attr)
            node.attribute.append(helper.make_attribute("value", tensor))
            break


def _cast_inputs(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """Insert `x → Cast(fp16)` after every fp32 graph input and rewire its consumers."""
    casts = []
    for inp in _fp32(graph.input):
        half = _rename(graph, inp.name, f"{inp.name}_fp16", producers=False)
        casts.append(helper.make_node("Cast", [inp.name], [half], to=TensorProto.FLOAT16, name=f"{half}_cast"))
    return casts


def _cast_outputs(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """Rename each fp32 graph output's producer to `<name>_fp16` and Cast it back to fp32."""
    casts = []
    for out in _fp32(graph.output):
        half = _rename(graph, out.name, f"{out.name}_fp16", producers=True)
        casts.append(helper.make_node("Cast", [half], [out.name], to=TensorProto.FLOAT, name=f"{out.name}_cast"))
    return casts


def _fp32(values) -> list[onnx.ValueInfoProto]:
    return [v for v in values if v.type.tensor_type.elem_type == TensorProto.FLOAT]


def _rename(graph: onnx.GraphProto, old: str, new: str, producers: bool) -> str:
    """Point every consumer (and with `producers`, the producer) of tensor `old` at `new`."""
    for node in graph.node:
        fields = (node.input, node.output) if producers else (node.input,)
        for names in fields:
            for i, name in enumerate(names):
                if name == old:
                    names[i] = new
    return new
