"""TensorRT engines from ONNX files (TensorRT 10 and 11), and a small runner that bench reuses.

Build path (deploy.md): Logger → Builder → create_network (strongly typed) → OnnxParser (errors
reported) → builder config (WORKSPACE pool, TF32 set explicitly) → optimisation profile for the
network's real input when the batch is dynamic → timing cache (its verification checked) →
build_serialized_network. Every network is strongly typed, the only mode TensorRT 11 has (10 has the
flag): the precision is the ONNX graph's, so fp16 means an fp16 graph with fp32 I/O (export/fp16.py)
on both majors, instead of BuilderFlag.FP16 (deprecated in 10.12, removed in 11).
Each engine runs on its own CUDA stream: `execute_async_v3` on the legacy default stream makes
TensorRT add device synchronisations. `tensorrt` is imported lazily: the package is an optional extra.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from compress.errors import CheckFailed, CompressError
from compress.files import write_atomic
from export.files import failed_path, keep_failed, print_note, temp_beside
from export.onnx import DEFAULT_OPSET, OnnxRunner, to_onnx
from export.onnx_file import onnx_input
from export.parity import (
    FP16_TOLERANCE,
    TENSORRT_FP32_TOLERANCE,
    Parity,
    check_parity,
    parity_batches,
    torch_reference,
)
from export.result import ExportResult

INSTALL_HINT = 'pip uninstall -y onnxruntime && pip install -e ".[gpu]"'
DEFAULT_WORKSPACE_GB = 4.0
DEFAULT_MAX_BATCH = 32


def require_tensorrt() -> Any:
    """Import tensorrt, or raise one CompressError line saying what is missing (exit 2)."""
    missing = []
    try:
        import tensorrt as trt
    except ImportError:
        trt = None
        missing.append("the `tensorrt` package is not installed")
    if not torch.cuda.is_available():
        missing.append("no CUDA GPU is visible (torch.cuda.is_available() is False)")
    if missing:
        raise CompressError(f"TensorRT export needs a CUDA GPU and the `tensorrt` package: {'; '.join(missing)}. "
                            f"Install the GPU extra with: {INSTALL_HINT}")
    return trt


@dataclass(frozen=True)
class Profile:
    """The optimisation profile of a dynamic batch: for the network input `name`, the (min, opt, max)
    batch sizes and the full shapes they give."""

    name: str
    batches: tuple[int, int, int]
    shapes: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]


def to_tensorrt(onnx_or_module: str | os.PathLike | torch.nn.Module, out: str | os.PathLike, *, fp16: bool = False,
                workspace_gb: float = DEFAULT_WORKSPACE_GB, timing_cache: str | os.PathLike | None = None,
                min_batch: int = 1, opt_batch: int | None = None, max_batch: int | None = None,
                check: bool = True, data=None, opset: int = DEFAULT_OPSET, tf32: bool = False,
                log: Callable[[str], None] | None = None) -> ExportResult:
    """Build a TensorRT engine at `out` from an ONNX file or a DeployableModule.

    From a module, the ONNX file is exported first (and parity-checked in ONNX Runtime), with a
    symbolic batch when `max_batch > min_batch` and a fixed batch of `min_batch` otherwise. An
    engine from a dynamic-batch ONNX file gets the profile min/opt/max (defaults 1 / max / 32).
    Parity: the engine against PyTorch (module given) or ONNX Runtime (file given), with
    per-precision tolerances; CheckFailed keeps the engine as `<out>.failed`. fp32 engines are
    built with TF32 off unless `tf32` (bench's --tf32), so "fp32" means fp32.
    """
    trt = require_tensorrt()
    log = log or print_note
    out = Path(out)
    _check_batches(min_batch, opt_batch, max_batch)
    if workspace_gb <= 0:
        raise CompressError(f"--workspace must be positive (GB), got {workspace_gb}")
    started = time.perf_counter()
    tmp = temp_beside(out)
    with tempfile.TemporaryDirectory(prefix="compress-trt-") as work:
        try:
            source = _source(onnx_or_module, Path(work), min_batch, max_batch, opset, check, data, log)
            onnx_path, notes = source.onnx_path, source.notes
            name, shape = onnx_input(onnx_path)
            opset_used = _opset(onnx_path)  # read before `work` goes
            profile = batch_profile(name, shape, min_batch, opt_batch, max_batch)
            build_from = onnx_path
            if fp16:
                build_from = _fp16_onnx(onnx_path, Path(work))
                notes.append("fp16: built strongly typed from an fp16 ONNX graph, I/O kept fp32")
            serialized = build_engine(trt, build_from, workspace_gb=workspace_gb, timing_cache=timing_cache,
                                      profile=profile, tf32=tf32)
            tmp.write_bytes(serialized)
            parity = None
            if check:
                parity = _engine_parity(tmp, source, profile, shape, fp16, data)
                if not parity.passed:
                    failed = keep_failed(tmp, out)
                    raise CheckFailed(f"parity check failed for {out.name}: {parity.summary()}; the engine is kept "
                                      f"at {failed} and nothing was written to {out}")
            else:
                notes.append("parity not checked (--no-check)")
            os.replace(tmp, out)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    failed_path(out).unlink(missing_ok=True)
    engine = TensorRTEngine.load(out)
    return ExportResult(path=out, format="tensorrt", opset=opset_used, exporter=source.exporter,
                        input_names=[engine.input_name], input_shapes=[list(engine.input_shape)],
                        output_names=[engine.output_name], output_shapes=[list(engine.output_shape)],
                        size_bytes=out.stat().st_size, parity=parity,
                        build_time_s=round(time.perf_counter() - started, 3), precision="fp16" if fp16 else "fp32",
                        notes=notes, backend_version=f"TensorRT {trt.__version__}",
                        batch_profile=list(profile.batches) if profile else None)


def build_engine(trt: Any, onnx_path: Path, *, workspace_gb: float, timing_cache: str | os.PathLike | None,
                 profile: Profile | None, tf32: bool = False) -> bytes:
    """Serialised engine bytes for `onnx_path`: strongly typed, one input, TF32 as asked."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors)) or "no details"
        raise CompressError(f"TensorRT's ONNX parser rejected {onnx_path.name}: {errors}")
    inputs = [network.get_input(i).name for i in range(network.num_inputs)]
    if len(inputs) != 1:
        raise CompressError(f"{onnx_path.name} has inputs {inputs}; TensorRT export builds single-input models")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * 1024**3))
    # TensorRT allows TF32 by default; fp32 parity (and a fair fp32 benchmark) needs it off.
    (config.set_flag if tf32 else config.clear_flag)(trt.BuilderFlag.TF32)
    if profile is not None:
        if profile.name != inputs[0]:
            raise CompressError(f"the batch profile names input {profile.name!r}, but TensorRT parsed "
                                f"{onnx_path.name}'s input as {inputs[0]!r}")
        opt_profile = builder.create_optimization_profile()
        opt_profile.set_shape(profile.name, *profile.shapes)
        config.add_optimization_profile(opt_profile)
    cache_path = Path(timing_cache) if timing_cache else None
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path and cache_path.is_file() else b"")
    # False (or no cache at all) when the file comes from another GPU or TensorRT version: say so now,
    # not as an unrelated build failure later.
    if cache is None or not config.set_timing_cache(cache, False):
        raise CompressError(f"the timing cache {cache_path} was written by another GPU or TensorRT version and "
                            "cannot be used here; delete it or give another --timing-cache file")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise CompressError(f"TensorRT could not build an engine from {onnx_path.name} (see the TensorRT log above)")
    if cache_path is not None:
        write_atomic(cache_path, bytes(memoryview(config.get_timing_cache().serialize())))
    return bytes(memoryview(serialized))


def network_flags(trt: Any) -> int:
    """create_network flags: strongly typed where the flag exists (TensorRT 10; 11 keeps it, ignored,
    as every network is strongly typed there). EXPLICIT_BATCH is not set: ignored in 10, gone in 11."""
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 1 << int(flag) if flag is not None else 0


class TensorRTEngine:
    """A deserialised engine with one input and one output, run with torch CUDA tensors as buffers.

    `infer` accepts numpy arrays or torch tensors (any device) and returns a torch CUDA tensor;
    `__call__` is numpy → numpy (for parity checks). Bench binds its buffers once with `bind` and
    times `execute` with CUDA events recorded on `stream`, the engine's own (non-default) stream.
    """

    def __init__(self, serialized: bytes, name: str = "engine"):
        self.trt = require_tensorrt()
        trt = self.trt
        self.name = name
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(serialized)
        if self.engine is None:
            raise CompressError(f"{name} is not a TensorRT engine this TensorRT ({trt.__version__}) can load")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or len(outputs) != 1:
            raise CompressError(f"{name} has inputs {inputs} and outputs {outputs}; expected one of each")
        self.input_name, self.output_name = inputs[0], outputs[0]
        self.input_dtype = _torch_dtype(trt, self.engine.get_tensor_dtype(self.input_name))
        self.output_dtype = _torch_dtype(trt, self.engine.get_tensor_dtype(self.output_name))
        self.stream = torch.cuda.Stream()

    @classmethod
    def load(cls, path: str | os.PathLike) -> TensorRTEngine:
        p = Path(path)
        if not p.is_file():
            raise CompressError(f"engine file {p} not found")
        return cls(p.read_bytes(), name=p.name)

    @property
    def input_shape(self) -> tuple[int | str, ...]:
        """Engine input shape; a dynamic batch shows as "batch"."""
        return tuple("batch" if (i == 0 and d < 0) else int(d)
                     for i, d in enumerate(self.engine.get_tensor_shape(self.input_name)))

    @property
    def output_shape(self) -> tuple[int | str, ...]:
        return tuple("batch" if (i == 0 and d < 0) else int(d)
                     for i, d in enumerate(self.engine.get_tensor_shape(self.output_name)))

    @property
    def batch_range(self) -> tuple[int, int, int]:
        """(min, opt, max) batch the engine accepts; equal for a fixed-batch engine."""
        first = self.engine.get_tensor_shape(self.input_name)[0]
        if first >= 0:
            return (int(first),) * 3
        lo, opt, hi = self.engine.get_tensor_profile_shape(self.input_name, 0)
        return int(lo[0]), int(opt[0]), int(hi[0])

    def check_batch_size(self, batch_size: int) -> None:
        lo, _, hi = self.batch_range
        if not lo <= batch_size <= hi:
            what = f"a fixed batch size of {lo}" if lo == hi else f"a batch profile of {lo}..{hi}"
            raise CompressError(f"{self.name} was built with {what} and cannot run at batch {batch_size}; "
                                "rebuild with --min-batch/--max-batch covering it")

    def bind(self, x: torch.Tensor) -> torch.Tensor:
        """Set the input shape and both buffer addresses for `x` (contiguous, CUDA, the input dtype);
        returns the output buffer. Every TensorRT call's status is checked: a wrong shape or address
        would otherwise surface later as an unrelated failure."""
        self.check_batch_size(int(x.shape[0]))
        ctx = self.context
        if not ctx.set_input_shape(self.input_name, tuple(x.shape)):
            raise CompressError(f"{self.name} rejects input shape {list(x.shape)}; it takes {list(self.input_shape)}")
        unresolved = ctx.infer_shapes()
        if unresolved:
            raise CompressError(f"{self.name}: TensorRT cannot resolve the shapes of {list(unresolved)}")
        out = torch.empty(tuple(ctx.get_tensor_shape(self.output_name)), dtype=self.output_dtype, device=x.device)
        for name, tensor in ((self.input_name, x), (self.output_name, out)):
            if not ctx.set_tensor_address(name, tensor.data_ptr()):
                raise CompressError(f"TensorRT refused the buffer of {name!r} for {self.name}")
        return out

    def execute(self) -> None:
        """Enqueue one inference on the engine's stream (returns before it completes)."""
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise CompressError(f"TensorRT failed to execute {self.name}")

    def infer(self, x: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Run one batch; returns the output as a CUDA tensor (synchronised)."""
        x = torch.as_tensor(x).to(device="cuda", dtype=self.input_dtype).contiguous()
        out = self.bind(x)
        self.stream.wait_stream(torch.cuda.current_stream())  # the copy of x was queued on the current stream
        self.execute()
        self.stream.synchronize()
        return out

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.infer(x).float().cpu().numpy()


# ------------------------------------------------------------------ helpers


@dataclass
class _Source:
    """What an engine is built from and checked against."""

    onnx_path: Path
    reference: Callable[[np.ndarray], np.ndarray] | None  # None when parity is not checked
    reference_name: str  # named in the parity text: "pytorch" or "onnxruntime"
    exporter: str | None
    notes: list[str]
    input_size: tuple[int, ...]


def _source(onnx_or_module, work: Path, min_batch: int, max_batch: int | None, opset: int, check: bool,
            data, log) -> _Source:
    """The ONNX file to build from and the reference to check against, for either kind of input."""
    if isinstance(onnx_or_module, torch.nn.Module):
        dynamic = max_batch is not None and max_batch > min_batch
        onnx_path = work / "model.onnx"
        result = to_onnx(onnx_or_module, onnx_path, opset=opset, batch_size=min_batch, dynamic_batch=dynamic,
                         check=check, data=data, log=log, token_indices=False)   # an engine has one output
        checked = f"onnxruntime parity {result.parity.summary()}" if result.parity else "onnxruntime not checked"
        notes = [f"built from an ONNX export ({result.exporter}; {checked})"]
        module = onnx_or_module.eval()
        return _Source(onnx_path, torch_reference(module), "pytorch", result.exporter, notes,
                       tuple(module.input_size))
    path = Path(onnx_or_module)
    if not path.is_file():
        raise CompressError(f"ONNX file {path} not found")
    _, shape = onnx_input(path)
    if len(shape) != 4 or not all(isinstance(d, int) for d in shape[1:]):
        raise CompressError(f"{path.name} has input shape {list(shape)}; expected [batch, C, H, W] with fixed C, H, W")
    notes = [f"built from {path}; parity against onnxruntime"] if check else []
    reference = OnnxRunner(path, spin=False) if check else None  # no session for an unchecked build (bench)
    return _Source(path, reference, "onnxruntime", None, notes, tuple(shape[1:]))


def batch_profile(name: str, shape, min_batch: int, opt_batch: int | None, max_batch: int | None) -> Profile | None:
    """The profile for input `name` of `shape` when its batch is dynamic (defaults 1 / max / 32); None
    when the batch is fixed (and then the batch flags must agree with it)."""
    if isinstance(shape[0], int) and shape[0] > 0:
        if (max_batch is not None and max_batch != shape[0]) or (min_batch != 1 and min_batch != shape[0]):
            raise CompressError(f"the ONNX file has a fixed batch size of {shape[0]}; --min/--opt/--max-batch "
                                "need a file exported with --dynamic-batch")
        return None
    hi = max_batch if max_batch is not None else max(DEFAULT_MAX_BATCH, min_batch)
    opt = opt_batch if opt_batch is not None else hi
    _check_batches(min_batch, opt, hi)
    rest = tuple(int(d) for d in shape[1:])
    lo_shape, opt_shape, hi_shape = ((b, *rest) for b in (min_batch, opt, hi))
    return Profile(name, (min_batch, opt, hi), (lo_shape, opt_shape, hi_shape))


def _check_batches(lo: int, opt: int | None, hi: int | None) -> None:
    values = [v for v in (lo, opt, hi) if v is not None]
    if any(v < 1 for v in values) or values != sorted(values):
        raise CompressError(f"batch sizes must satisfy 1 <= min <= opt <= max, got min {lo}, opt {opt}, max {hi}")


def _engine_parity(path: Path, source: _Source, profile: Profile | None, shape, fp16: bool, data) -> Parity:
    engine = TensorRTEngine.load(path)
    # Fixed batches (padded) that the engine accepts: its own batch, or 16 clipped into the profile.
    batch = int(shape[0]) if profile is None else min(max(profile.batches[0], 16), profile.batches[2])
    batches, described = parity_batches(tuple(source.input_size), batch, data)
    tolerance = FP16_TOLERANCE if fp16 else TENSORRT_FP32_TOLERANCE
    return check_parity(source.reference, engine, batches, tolerance=tolerance,
                        inputs=parity_label(described, fp16, source.reference_name))


def parity_label(described: str, fp16: bool, reference_name: str) -> str:
    """What an engine's parity compared: the inputs, the engine's precision, and its reference."""
    return f"{described}, tensorrt {'fp16' if fp16 else 'fp32'} vs {reference_name}"


def _fp16_onnx(onnx_path: Path, work: Path) -> Path:
    import onnx

    from export.fp16 import convert_to_fp16

    half = work / "model.fp16.onnx"
    onnx.save_model(convert_to_fp16(onnx.load(str(onnx_path))), str(half))
    return half


def _opset(onnx_path: Path) -> int | None:
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def _torch_dtype(trt: Any, dtype: Any) -> torch.dtype:
    mapping = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.BF16: torch.bfloat16,
               trt.DataType.INT32: torch.int32}
    if dtype not in mapping:
        raise CompressError(f"unsupported engine I/O type {dtype}")
    return mapping[dtype]
