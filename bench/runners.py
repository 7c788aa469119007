"""Backends, Polygraphy style: each runner loads one target and runs or times a batch on it.

The interface is deliberately small — `load(target)`, `prepare(batch_size)`, `run(batch)`,
`time(batch, iterations)` — so measurement and comparison live elsewhere and treat every backend
alike. A runner class says why it cannot run on this machine (`unavailable`) or cannot run a
kind of target (`accepts`), so missing GPUs or libraries become a printed skip, not a crash.
"""

from __future__ import annotations

import copy
import shutil
import time as _time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from bench.targets import Target
from compress.errors import CompressError

INPUT_SEED = 0
# How CPU backends are timed. "cpu" is the calling thread's CPU time: with one thread it is immune to
# preemption by other processes (the dominant noise on shared CI runners). GPU backends ignore it.
CLOCKS = {
    "wall": (_time.perf_counter_ns, "wall clock (perf_counter) per run"),
    "cpu": (_time.thread_time_ns, "CPU time of the calling thread per run (one thread; excludes preemption)"),
}


class Runner(ABC):
    """One target loaded on one backend."""

    name: ClassVar[str]
    device: ClassVar[str] = "cpu"
    accepts: ClassVar[tuple[str, ...]] = ("run",)
    default: ClassVar[bool] = True  # part of the default backend set when available

    def __init__(self, threads: int, scratch: Path, clock: str = "wall"):
        if clock not in CLOCKS:
            raise CompressError(f"unknown clock {clock!r}; use one of {', '.join(CLOCKS)}")
        self.threads = threads
        self.scratch = scratch
        self.clock = clock if self.device == "cpu" else "wall"  # GPU work is timed on the GPU or synchronously
        self.target: Target | None = None

    @classmethod
    def unavailable(cls) -> str | None:
        """Why this backend cannot run on this machine; None when it can."""
        return None

    @classmethod
    def rejects(cls, target: Target) -> str | None:
        """Why this backend cannot run `target`; None when it can."""
        if target.kind not in cls.accepts:
            return f"{cls.name} runs {' and '.join(k + ' targets' for k in cls.accepts)}, not {target.kind} files"
        return None

    @abstractmethod
    def load(self, target: Target) -> None:
        """Build whatever the backend needs (module, session, engine) once per target."""

    @abstractmethod
    def prepare(self, batch_size: int) -> Any:
        """A deterministic input batch on the backend's device; CompressError if the size is impossible."""

    @abstractmethod
    def run(self, batch: Any) -> Any:
        """One inference; returns only when the result is complete."""

    def timing(self) -> str:
        """How `time` measures, recorded with every result."""
        return CLOCKS[self.clock][1]

    def time(self, batch: Any, iterations: int) -> np.ndarray:
        """Milliseconds of each of `iterations` back-to-back runs."""
        out = np.empty(iterations)
        clock, run = CLOCKS[self.clock][0], self.run
        for i in range(iterations):
            start = clock()
            run(batch)
            out[i] = (clock() - start) / 1e6
        return out


def make_input(shape: tuple[int, ...]):
    """The same deterministic images in [0, 1] for every backend (a torch CPU tensor)."""
    import torch

    return torch.rand(shape, generator=torch.Generator().manual_seed(INPUT_SEED))


def _cuda_missing() -> str | None:
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    return None


# ----------------------------------------------------------------------------------------- PyTorch


class TorchRunner(Runner):
    """PyTorch eager on the CPU: the module exactly as trained/pruned."""

    name = "torch"

    def __init__(self, threads: int, scratch: Path, clock: str = "wall"):
        super().__init__(threads, scratch, clock)
        import torch

        torch.set_num_threads(threads)
        self.module = None
        self.input_size: tuple[int, ...] = ()

    def load(self, target: Target) -> None:
        self.target = target
        module = target.module()
        self.input_size = tuple(module.input_size)
        self.module = self._wrap(module)

    def _wrap(self, module):
        return module

    def prepare(self, batch_size: int):
        return make_input((batch_size, *self.input_size)).to(self.device)

    def run(self, batch):
        import torch

        with torch.inference_mode():
            return self.module(batch)


class TorchCompileRunner(TorchRunner):
    """`torch.compile` (inductor); compilation happens on the first run of each batch size and is
    reported as that result's cold start, never mixed into the latency samples."""

    name = "torch-compile"
    default = False  # compiling takes tens of seconds per batch size: opt-in
    compile_backend = "inductor"

    @classmethod
    def unavailable(cls) -> str | None:
        if cls.device == "cpu" and cls.compile_backend == "inductor" and not shutil.which("g++"):
            return "torch.compile (inductor) needs a C++ compiler (g++) on the CPU"
        return None

    def _wrap(self, module):
        import torch

        return torch.compile(module, backend=self.compile_backend, dynamic=False)


class _CudaTiming:
    """Per-run GPU time from CUDA events recorded around each run on the current stream."""

    device = "cuda"

    @classmethod
    def unavailable(cls) -> str | None:
        return _cuda_missing()

    def timing(self) -> str:
        return "CUDA events per run (GPU time, no host-device copies)"

    def time(self, batch, iterations: int) -> np.ndarray:
        import torch

        starts = [torch.cuda.Event(enable_timing=True) for _ in range(iterations)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(iterations)]
        for start, end in zip(starts, ends, strict=True):
            start.record()
            self.run_async(batch)
            end.record()
        torch.cuda.synchronize()
        return np.array([s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)])


class TorchCudaRunner(_CudaTiming, TorchRunner):
    """PyTorch eager on the GPU (cuDNN autotuning on, so warm-up picks the fastest kernels)."""

    name = "torch-cuda"

    def _wrap(self, module):
        import torch

        torch.backends.cudnn.benchmark = True
        return copy.deepcopy(module).cuda()  # the CPU module stays usable by other backends

    def run_async(self, batch):
        import torch

        with torch.inference_mode():
            return self.module(batch)

    def run(self, batch):
        import torch

        out = self.run_async(batch)
        torch.cuda.synchronize()
        return out


class TorchCompileCudaRunner(TorchCudaRunner):
    name = "torch-compile-cuda"
    default = False

    def _wrap(self, module):
        import torch

        return torch.compile(super()._wrap(module), dynamic=False)


# ------------------------------------------------------------------------------------ ONNX Runtime

_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


class OrtRunner(Runner):
    """ONNX Runtime on the CPU, `intra_op_num_threads` fixed to the bench's thread count.

    Thread spinning is off: with interleaved sessions on a small machine, one session's idle
    spinning threads would steal cores from the next session's run.
    """

    name = "onnxruntime"
    accepts = ("run", "onnx")
    provider = "CPUExecutionProvider"

    def __init__(self, threads: int, scratch: Path, clock: str = "wall"):
        super().__init__(threads, scratch, clock)
        self.session = None

    @classmethod
    def unavailable(cls) -> str | None:
        import onnxruntime as ort

        if cls.provider not in ort.get_available_providers():
            return f"onnxruntime {ort.__version__} has no {cls.provider} (install onnxruntime-gpu)"
        return None

    def providers(self) -> list:
        return [self.provider]

    def load(self, target: Target) -> None:
        import onnxruntime as ort

        self.target = target
        path = target.onnx_file(self.scratch)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=self.providers())
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph/... types
            raise CompressError(f"onnxruntime cannot load {target.label}: {str(exc).splitlines()[0]}") from None
        if self.provider not in self.session.get_providers():
            raise CompressError(f"onnxruntime fell back from {self.provider} for {target.label}")
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise CompressError(f"{target.label} has {len(inputs)} inputs; bench runs single-input image models")
        self.input = inputs[0]
        if self.input.type not in _ORT_DTYPES:
            raise CompressError(f"{target.label} takes {self.input.type}; bench feeds float images")

    def host_batch(self, batch_size: int) -> np.ndarray:
        dim0, *rest = self.input.shape
        if isinstance(dim0, int) and dim0 != batch_size:
            raise CompressError(f"{self.target.label} has a fixed batch size of {dim0} and cannot run batch size "
                                f"{batch_size}; export it with --dynamic-batch or bench it with --batch-size {dim0}")
        if not all(isinstance(d, int) for d in rest):
            raise CompressError(f"{self.target.label} has a symbolic image dimension ({self.input.shape}); "
                                "export it with a fixed input size")
        return make_input((batch_size, *rest)).numpy().astype(_ORT_DTYPES[self.input.type])

    def prepare(self, batch_size: int):
        return {self.input.name: self.host_batch(batch_size)}

    def run(self, batch):
        return self.session.run(None, batch)


class OrtCudaRunner(OrtRunner):
    """ONNX Runtime CUDA provider with IOBinding: input and outputs stay on the GPU, so the timing
    is of inference, not of host↔device copies. `run_with_iobinding` synchronises before returning."""

    name = "ort-cuda"
    device = "cuda"
    provider = "CUDAExecutionProvider"

    def timing(self) -> str:
        return "wall clock around synchronous run_with_iobinding (no host-device copies)"

    @classmethod
    def unavailable(cls) -> str | None:
        return super().unavailable() or _cuda_missing()

    def providers(self) -> list:
        return [self.provider, "CPUExecutionProvider"]

    def prepare(self, batch_size: int):
        import onnxruntime as ort

        value = ort.OrtValue.ortvalue_from_numpy(self.host_batch(batch_size), "cuda", 0)
        binding = self.session.io_binding()
        binding.bind_ortvalue_input(self.input.name, value)
        for out in self.session.get_outputs():
            binding.bind_output(out.name, "cuda", 0)
        return binding, value  # keep the input OrtValue alive as long as the binding

    def run(self, batch):
        self.session.run_with_iobinding(batch[0])


class OrtTensorRTRunner(OrtCudaRunner):
    """ONNX Runtime's TensorRT provider (engines built on the first run of each shape, cached in scratch)."""

    name = "ort-trt"
    provider = "TensorrtExecutionProvider"

    def providers(self) -> list:
        cache = self.scratch / "ort-trt-cache"
        cache.mkdir(exist_ok=True)
        options = {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache),
                   "trt_timing_cache_enable": True, "trt_timing_cache_path": str(cache)}
        return [(self.provider, options), "CUDAExecutionProvider", "CPUExecutionProvider"]


# -------------------------------------------------------------------------------------- TensorRT


class TensorRTRunner(_CudaTiming, Runner):
    """Native TensorRT: engine files as they are; run directories and ONNX files are built into an
    fp32 engine per batch size (profile min = opt = max, as `trtexec --shapes`), the build counted
    in the cold start. Timing excludes host-device copies: input and output stay on the GPU."""

    name = "tensorrt"
    accepts = ("engine", "run", "onnx")

    def __init__(self, threads: int, scratch: Path, clock: str = "wall"):
        super().__init__(threads, scratch, clock)
        self.engine = None
        self.onnx: Path | None = None

    @classmethod
    def unavailable(cls) -> str | None:
        try:
            import tensorrt  # noqa: F401
        except ImportError:
            return "the tensorrt package is not installed (pip install -e \".[gpu]\")"
        return _cuda_missing()

    def load(self, target: Target) -> None:
        from export.tensorrt import TensorRTEngine

        self.target = target
        if target.kind == "engine":
            self.engine = TensorRTEngine.load(target.path)
        else:
            self.onnx = target.onnx_file(self.scratch)

    def _engine_for(self, batch_size: int):
        from export.tensorrt import TensorRTEngine, to_tensorrt

        if self.target.kind == "engine":
            return self.engine
        out = self.scratch / f"{self.onnx.stem}-b{batch_size}.engine"
        if not out.exists():
            to_tensorrt(self.onnx, out, min_batch=batch_size, opt_batch=batch_size, max_batch=batch_size,
                        check=False, timing_cache=self.scratch / "trt-timing.cache")
        return TensorRTEngine.load(out)

    def prepare(self, batch_size: int):
        import torch

        self.engine = engine = self._engine_for(batch_size)
        engine.check_batch_size(batch_size)
        shape = (batch_size, *(int(d) for d in engine.input_shape[1:]))
        x = make_input(shape).to(device="cuda", dtype=engine.input_dtype).contiguous()
        ctx = engine.context
        ctx.set_input_shape(engine.input_name, shape)
        out = torch.empty(tuple(ctx.get_tensor_shape(engine.output_name)), dtype=engine.output_dtype, device="cuda")
        ctx.set_tensor_address(engine.input_name, x.data_ptr())
        ctx.set_tensor_address(engine.output_name, out.data_ptr())
        return x, out

    def run_async(self, batch):
        import torch

        if not self.engine.context.execute_async_v3(torch.cuda.current_stream().cuda_stream):
            raise CompressError(f"TensorRT failed to execute {self.target.label}")
        return batch[1]

    def run(self, batch):
        import torch

        out = self.run_async(batch)
        torch.cuda.synchronize()
        return out


# -------------------------------------------------------------------------------------- registry

RUNNERS: dict[str, type[Runner]] = {cls.name: cls for cls in (
    TorchRunner, TorchCompileRunner, TorchCudaRunner, TorchCompileCudaRunner,
    OrtRunner, OrtCudaRunner, OrtTensorRTRunner, TensorRTRunner,
)}
ALIASES = {"ort": "onnxruntime", "ort-cpu": "onnxruntime", "pytorch": "torch", "torch-cpu": "torch",
           "trt": "tensorrt"}


def parse_backends(spec: str | None) -> list[str] | None:
    """Canonical backend names from a comma list (aliases resolved); None for "not given"."""
    if spec is None or not spec.strip():
        return None
    names = []
    for raw in spec.split(","):
        name = ALIASES.get(raw.strip().lower(), raw.strip().lower())
        if name not in RUNNERS:
            known = ", ".join(sorted(RUNNERS) + sorted(ALIASES))
            raise CompressError(f"unknown backend {raw.strip()!r}; known: {known}")
        if name not in names:
            names.append(name)
    return names


def default_backends(targets: list[Target]) -> list[str]:
    """Every default backend present on this machine that can run all targets (else any of them)."""
    present = [n for n, cls in RUNNERS.items() if cls.default and cls.unavailable() is None]
    every = [n for n in present if all(RUNNERS[n].rejects(t) is None for t in targets)]
    return every or [n for n in present if any(RUNNERS[n].rejects(t) is None for t in targets)]
