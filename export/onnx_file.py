"""What an ONNX file says about itself: its real input, its metadata, and reading it without its weights.

Kept apart from the exporter (export/onnx.py) because the runners, the TensorRT builder and the
commands read files that compress did not necessarily write.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnx
import torch

from compress.errors import CompressError


def onnx_input_shape(path: str | os.PathLike) -> tuple[int | str, ...]:
    """Shape of the first graph input, symbolic dims as their names (e.g. ("batch", 3, 32, 32))."""
    return onnx_input(path)[1]


def onnx_input(path: str | os.PathLike) -> tuple[str, tuple[int | str, ...]]:
    """(name, shape) of the first real graph input: files from other exporters name it anything
    ("input.1", "x", "pixel_values"), and old IR versions list initializers among the inputs."""
    graph = load_graph_only(path).graph
    initializers = {init.name for init in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    if not inputs:
        raise CompressError(f"{path} has no graph input")
    return inputs[0].name, tuple(shape_of(inputs[0]))


def require_batch_size(shape_or_path: Sequence[int | str] | str | os.PathLike, batch_size: int,
                       name: str | os.PathLike = "the model") -> None:
    """Raise a one-line CompressError if a fixed-batch model cannot run at `batch_size`."""
    if isinstance(shape_or_path, (str, os.PathLike)):
        name = shape_or_path
        shape = onnx_input_shape(shape_or_path)
    else:
        shape = tuple(shape_or_path)
    fixed = shape[0] if shape and isinstance(shape[0], int) and shape[0] > 0 else None
    if fixed is not None and fixed != batch_size:
        label = Path(name).name if isinstance(name, (str, os.PathLike)) else str(name)
        raise CompressError(f"{label} was exported with a fixed batch size of {fixed} and cannot run at batch "
                            f"{batch_size}; re-export with --dynamic-batch or --batch-size {batch_size}")


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata_props of an ONNX file (values are strings; lists are JSON)."""
    return {p.key: p.value for p in load_graph_only(path).metadata_props}


def load_graph_only(path: str | os.PathLike) -> onnx.ModelProto:
    try:
        return onnx.load(str(path), load_external_data=False)
    except FileNotFoundError:
        raise CompressError(f"{path} not found") from None
    except Exception as exc:
        raise CompressError(f"{path} is not an ONNX file ({one_line(exc)})") from None


def spec_metadata(module: torch.nn.Module) -> dict[str, str]:
    """Metadata known from the module itself (and its model.json spec when loaded from a run)."""
    from compress import __version__

    spec = getattr(module, "spec", None) or {}
    props: dict[str, Any] = {"compress_version": __version__, "input_size": list(input_size_of(module)),
                             "input_range": "float32 in [0, 1], NCHW; normalisation is inside the graph"}
    if spec:
        props.update(model=spec.get("model"), num_classes=spec.get("num_classes"),
                     mean=spec["normalization"]["mean"], std=spec["normalization"]["std"],
                     prompt=spec.get("prompt") is not None, data=spec.get("data"), tokens=spec.get("tokens"))
        if spec.get("classes"):
            props["classes"] = spec["classes"]
    else:
        norm = getattr(module, "normalize", None)
        if norm is not None:
            props.update(mean=norm.mean.flatten().tolist(), std=norm.std.flatten().tolist())
    return {k: prop(v) for k, v in props.items() if v is not None}


def run_metadata(report: dict[str, Any]) -> dict[str, str]:
    """Metadata from a run's report.json: method, flops ratio and the measured figures."""
    method = report.get("method") or ("dense" if report.get("command") == "train" else None)
    props = {"method": method, "flops_ratio": report.get("flops_ratio", 1.0 if method == "dense" else None),
             "flops": report.get("flops"), "params": report.get("params"), "accuracy": report.get("accuracy"),
             "run_command": report.get("command")}
    return {k: prop(v) for k, v in props.items() if v is not None}


def strip_trace_metadata(model: onnx.ModelProto) -> None:
    """Drop the exporter's per-node records (Python stack traces with local file paths, FX node text).

    They are debugging aids, not part of the model: they would ship source paths in a deployment
    artifact and add size that does not scale with parameters.
    """
    for node in model.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    for info in (*model.graph.value_info, *model.graph.input, *model.graph.output, *model.graph.initializer):
        del info.metadata_props[:]


def set_metadata(model: onnx.ModelProto, props: dict[str, str]) -> None:
    onnx.helper.set_model_props(model, {k: str(v) for k, v in props.items()})


def prop(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def input_size_of(module: torch.nn.Module) -> tuple[int, int, int]:
    size = getattr(module, "input_size", None)
    if not size or len(size) != 3:
        raise CompressError("to_onnx needs a DeployableModule (with input_size = (C, H, W)); "
                            "use compress.load(run_dir)")
    return tuple(int(v) for v in size)


def shape_of(value_info: onnx.ValueInfoProto) -> list[int | str]:
    """Dims as ints, symbolic ones by name, unknown ones as "?"."""
    return [d.dim_param or (int(d.dim_value) if d.HasField("dim_value") else "?")
            for d in value_info.type.tensor_type.shape.dim]


def one_line(exc: BaseException) -> str:
    """First line of an exception's message, without terminal colour codes (the exporter emits them)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    first = first if len(first) <= 300 else first[:297] + "..."
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__
