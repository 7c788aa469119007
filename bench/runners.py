"""Backends, Polygraphy style: each runner loads one target and runs or times a batch on it.

The interface is deliberately small — `load(target)`, `prepare(batch_size)`, `run(batch)`,
`time(batch, iterations)` — so measurement and comparison live elsewhere and treat every backend
alike. A runner class says why it cannot run on this machine (`unavailable`) or cannot run a
kind of target (`rejects`), so missing GPUs or libraries become a printed skip, not a crash; one
that turns out unable to run only once it loads (an ONNX Runtime provider falling back to the CPU)
raises BackendUnavailable, which bench also turns into a skip. This module holds the CPU runners;
bench/gpu_runners.py the CUDA ones, bench/backends.py the registry.
"""

from __future__ import annotations

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


class BackendUnavailable(CompressError):
    """A backend found unable to run only while loading a target: bench skips it with this reason."""


class Runner(ABC):
    """One target loaded on one backend.

    `tf32`: whether fp32 convolutions and matmuls may use TF32 on backends where that is a choice
    (CUDA ones); `uses_tf32()` reports what the runner actually did, recorded with every result.
    """

    name: ClassVar[str]
    device: ClassVar[str] = "cpu"
    accepts: ClassVar[tuple[str, ...]] = ("run",)
    default: ClassVar[bool] = True  # part of the default backend set when available
    # Whether a target is loaded several times and its samples pooled (Settings.sessions): where each load
    # places the model's buffers anew in host memory and is cheap (ONNX Runtime CPU sessions); not one
    # shared module (torch), compiles, engine builds or device memory.
    pools_sessions: ClassVar[bool] = False

    def __init__(self, threads: int, scratch: Path, clock: str = "wall", tf32: bool = False):
        if clock not in CLOCKS:
            raise CompressError(f"unknown clock {clock!r}; use one of {', '.join(CLOCKS)}")
        self.threads = threads
        self.scratch = scratch
        self.clock = clock if self.device == "cpu" else "wall"  # GPU work is timed on the GPU or synchronously
        self.tf32 = tf32
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

    def uses_tf32(self) -> bool | None:
        """Whether fp32 math may round to TF32 here; None where TF32 does not exist (CPUs) or is unknown."""
        return None

    @property
    def cpu_threads(self) -> int:
        """Threads of this process that a run keeps busy (the host thread alone for GPU backends)."""
        return self.threads if self.device == "cpu" else 1

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


def import_onnxruntime():
    """onnxruntime, or a one-line CompressError naming the extra that installs it."""
    from export.onnx import import_onnxruntime as imported

    return imported()


# ----------------------------------------------------------------------------------------- PyTorch


class TorchRunner(Runner):
    """PyTorch eager on the CPU: the module exactly as trained/pruned."""

    name = "torch"

    def __init__(self, threads: int, scratch: Path, clock: str = "wall", tf32: bool = False):
        super().__init__(threads, scratch, clock, tf32)
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
    pools_sessions = True

    def __init__(self, threads: int, scratch: Path, clock: str = "wall", tf32: bool = False):
        super().__init__(threads, scratch, clock, tf32)
        self.session = None

    @classmethod
    def unavailable(cls) -> str | None:
        try:
            ort = import_onnxruntime()
        except CompressError as exc:
            return str(exc)
        if cls.provider not in ort.get_available_providers():
            return f"onnxruntime {ort.__version__} has no {cls.provider} (install onnxruntime-gpu)"
        return None

    def providers(self) -> list:
        return [self.provider]

    def load(self, target: Target) -> None:
        ort = import_onnxruntime()
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
            raise BackendUnavailable(f"onnxruntime could not use {self.provider} for {target.label} (it fell back "
                                     f"to {', '.join(self.session.get_providers())})")
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


