"""What `compress bench` measures: run directories, ONNX files and TensorRT engine files.

A target knows its FLOPs and parameter count (for speedup fidelity) and can hand each backend the
form it runs: the deployable module (PyTorch backends) or an ONNX file (ONNX Runtime backends;
a run directory is exported once, on first use, into the session's scratch directory).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from compress.deploy import DeployableModule
from compress.errors import CompressError

ENGINE_SUFFIXES = (".engine", ".plan", ".trt")
KINDS = ("run", "onnx", "engine")


@dataclass
class Target:
    """One thing to benchmark; `label` is how tables and JSON name it (the path as given)."""

    label: str
    path: Path
    kind: str
    flops: int | None = None
    params: int | None = None
    batch_dim: int | None = None  # fixed batch size of an ONNX file; None when dynamic or unknown
    latency_target: dict | None = None  # a run pruned to a latency ratio: ratio, backend, threads, batch_size
    _module: DeployableModule | None = field(default=None, repr=False)
    _onnx: Path | None = field(default=None, repr=False)

    def module(self) -> DeployableModule:
        """The deployable module of a run directory (loaded once)."""
        if self.kind != "run":
            raise CompressError(f"{self.label} is a {self.kind} file, not a run directory")
        if self._module is None:
            from compress.runs import load

            self._module = load(self.path)
        return self._module

    def onnx_file(self, scratch: Path) -> Path:
        """An ONNX file of this target; a run directory is exported (dynamic batch) into `scratch` once."""
        if self.kind == "onnx":
            return self.path
        if self.kind != "run":
            raise CompressError(f"{self.label} is a TensorRT engine; only the tensorrt backend runs it")
        if self._onnx is None:
            from export import to_onnx

            out = scratch / f"{len(list(scratch.iterdir()))}-{self.path.name or 'run'}.onnx"
            to_onnx(self.module(), out, dynamic_batch=True, check=False)
            self._onnx = out
        return self._onnx


def resolve_targets(paths: list[str | os.PathLike]) -> list[Target]:
    """Targets for `paths` in order (the first is the baseline); labels made unique with #2, #3."""
    if not paths:
        raise CompressError("give at least one target (a run directory, .onnx file or engine file)")
    targets, seen = [], {}
    for raw in paths:
        label = str(raw)
        seen[label] = seen.get(label, 0) + 1
        if seen[label] > 1:
            label = f"{label}#{seen[label]}"
        targets.append(_resolve(Path(raw), label))
    return targets


def _resolve(path: Path, label: str) -> Target:
    if not path.exists():
        raise CompressError(f"target {path} does not exist")
    if path.is_dir():
        from compress.runs import read_spec

        read_spec(path)  # one-line error when it is not a run directory
        flops, params = _run_counts(path)
        return Target(label, path, "run", flops, params, latency_target=_latency_target(path))
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        return Target(label, path, "onnx", *_onnx_facts(path))
    if suffix in ENGINE_SUFFIXES:
        return Target(label, path, "engine")
    raise CompressError(f"target {path} is not a run directory, an .onnx file or a TensorRT engine "
                        f"({', '.join(ENGINE_SUFFIXES)})")


def _run_counts(path: Path) -> tuple[int | None, int | None]:
    """FLOPs and params from report.json (what train/prune measured); counted when it lacks them."""
    from compress.runs import read_report

    report = read_report(path) if (path / "report.json").is_file() else {}
    flops, params = report.get("flops"), report.get("params")
    if flops is None or params is None:
        from compress.flops import count_flops, count_params
        from compress.runs import load

        module = load(path)
        flops, params = count_flops(module, module.input_size), count_params(module)
    return int(flops), int(params)


def _latency_target(path: Path) -> dict | None:
    """What `compress prune --latency-ratio` aimed at, from report.json (None for other runs)."""
    from compress.runs import read_report

    report = read_report(path) if (path / "report.json").is_file() else {}
    if report.get("latency_ratio_target") is None:
        return None
    return {"ratio": report["latency_ratio_target"], "backend": report.get("latency_backend"),
            "threads": report.get("latency_threads"), "batch_size": report.get("latency_batch_size")}


def _onnx_facts(path: Path) -> tuple[int | None, int | None, int | None]:
    """FLOPs and params that `compress export` records in the file's metadata (None when absent),
    and the fixed batch size of its first input (None when dynamic)."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and others for corrupt files
        raise CompressError(f"{path} is not a readable ONNX file ({type(exc).__name__})") from None
    meta = {p.key: p.value for p in model.metadata_props}
    initializers = {init.name for init in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    dims = inputs[0].type.tensor_type.shape.dim if inputs else []
    batch = dims[0].dim_value if dims and dims[0].HasField("dim_value") else None
    return _int_or_none(meta.get("flops")), _int_or_none(meta.get("params")), batch


def _int_or_none(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None
