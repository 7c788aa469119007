"""The CUDA backends: PyTorch eager and compiled, ONNX Runtime's CUDA and TensorRT providers, native TensorRT.

Their timing and precision are set explicitly, because the defaults disagree and would make the
backends compare different arithmetic: PyTorch convolutions default to TF32 on Ampere and newer,
ONNX Runtime's CUDA provider too (`use_tf32`), TensorRT allows TF32 unless told not to, and
compress's own engines switch it off. Here every backend follows bench's `--tf32` (off by default,
so fp32 means fp32), except ONNX Runtime's TensorRT provider, which has no option for it and keeps
TensorRT's default; each result records which (`uses_tf32`).
"""

from __future__ import annotations

import copy
import functools
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench.runners import OrtRunner, Runner, TorchRunner, import_onnxruntime, make_input
from bench.targets import Target

TENSORRT_FOR_ORT = 'pip install "tensorrt-cu13>=10.13,<11"'  # the major ONNX Runtime's TensorRT provider links


def cuda_missing() -> str | None:
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    return None


def cuda_event_times(launch: Callable[[], Any], iterations: int, stream=None) -> np.ndarray:
    """GPU milliseconds of each of `iterations` calls of `launch`, from CUDA events recorded on
    `stream` (default: the current one) around each call. The calls queue back to back and the host
    synchronises once at the end, so host overhead that the GPU hides is not counted."""
    import torch

    stream = stream if stream is not None else torch.cuda.current_stream()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iterations)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iterations)]
    for start, end in zip(starts, ends, strict=True):
        start.record(stream)
        launch()
        end.record(stream)
    stream.synchronize()
    return np.array([s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)])


def set_torch_tf32(enabled: bool) -> None:
    """TF32 for PyTorch's CUDA matmuls and cuDNN convolutions (cuDNN's default is on), with the
    `fp32_precision` API of PyTorch >= 2.9: mixing it with the legacy `allow_tf32` flags makes
    PyTorch raise, so only this one is used where it exists."""
    import torch

    if not hasattr(torch.backends.cuda.matmul, "fp32_precision"):  # PyTorch < 2.9: only the legacy flags exist
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
        return
    precision = "tf32" if enabled else "ieee"
    torch.backends.cuda.matmul.fp32_precision = precision
    torch.backends.cudnn.conv.fp32_precision = precision


@functools.cache
def provider_problem(provider: str) -> str | None:
    """Why ONNX Runtime cannot use `provider` here; None when it can.

    `get_available_providers()` lists every provider the wheel was built with, even when the CUDA,
    cuDNN or TensorRT libraries it links are missing; a session then falls back to the CPU. So a
    child process (torch imported first, for the CUDA runtime its wheel ships, as ONNX Runtime's
    docs advise; tensorrt too, whose wheel loads libnvinfer) creates a one-node session on the
    provider alone and reports ONNX Runtime's own error: for onnxruntime-gpu 1.31's TensorRT
    provider without TensorRT 10, "libnvinfer.so.10: cannot open shared object file". A child,
    because a provider library that fails half-way can take its process down, and loading one by
    hand before ONNX Runtime has set up its bridge crashes its static initialisers."""
    ort = import_onnxruntime()
    problem = session_problem(provider)
    if problem is None:
        return None
    hint = f"; install the TensorRT major it links: {TENSORRT_FOR_ORT}" if "libnvinfer" in problem else ""
    return f"onnxruntime {ort.__version__} cannot use its {provider} ({problem}){hint}"


_SESSION_PROBE = """
import importlib, sys
for name in ("torch", "tensorrt"):
    try:
        importlib.import_module(name)
    except ImportError:
        pass
import onnxruntime as ort
from onnx import TensorProto, helper
provider = sys.argv[1]
tensor = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 4])
graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "probe", [tensor("x")], [tensor("y")])
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
model.ir_version = 8
try:
    session = ort.InferenceSession(model.SerializeToString(), providers=[provider])
except Exception as exc:
    print("ERROR", str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
    sys.exit()
print("OK" if provider in session.get_providers() else "FELLBACK " + ",".join(session.get_providers()))
"""
# How ONNX Runtime words a provider library that does not load, then the probe's own verdicts.
_PROBLEM_PATTERNS = (r"with error: ([^\n]+)", r"^ERROR ([^\n]+)", r"EP Error ([^\n]+)", r"^FELLBACK ([^\n]+)")


def session_problem(provider: str, timeout_s: float = 300) -> str | None:
    """ONNX Runtime's complaint when a child process cannot create a session on `provider` alone;
    None when the session uses it."""
    try:
        child = subprocess.run([sys.executable, "-c", _SESSION_PROBE, provider], capture_output=True, text=True,
                               timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return f"creating a session on it took over {timeout_s:.0f} s"
    lines = child.stdout.strip().splitlines()
    if child.returncode == 0 and lines and lines[-1] == "OK":
        return None
    text = child.stdout + "\n" + child.stderr
    for pattern in _PROBLEM_PATTERNS:
        if found := re.search(pattern, text, re.MULTILINE):
            what = found.group(1).strip()
            return f"a session on it fell back to {what}" if pattern.startswith("^FELLBACK") else what[:300]
    return f"the probe process exited with {child.returncode}"


class _CudaTiming:
    """Per-run GPU time from CUDA events recorded around each run on the runner's stream."""

    device = "cuda"

    @classmethod
    def unavailable(cls) -> str | None:
        return cuda_missing()

    def timing(self) -> str:
        return "CUDA events per run (GPU time, no host-device copies)"

    def stream(self):
        """The stream the runner's work is queued on (None: the current stream)."""
        return None

    def time(self, batch, iterations: int) -> np.ndarray:
        return cuda_event_times(lambda: self.run_async(batch), iterations, self.stream())


# ----------------------------------------------------------------------------------------- PyTorch


class TorchCudaRunner(_CudaTiming, TorchRunner):
    """PyTorch eager on the GPU (cuDNN autotuning on, so warm-up picks the fastest kernels)."""

    name = "torch-cuda"

    def _wrap(self, module):
        import torch

        torch.backends.cudnn.benchmark = True
        set_torch_tf32(self.tf32)
        return copy.deepcopy(module).cuda()  # the CPU module stays usable by other backends

    def uses_tf32(self) -> bool:
        return self.tf32

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


class OrtCudaRunner(OrtRunner):
    """ONNX Runtime CUDA provider with IOBinding: input and outputs stay on the GPU, so the timing
    is of inference, not of host↔device copies. `run_with_iobinding` synchronises before returning."""

    name = "ort-cuda"
    device = "cuda"
    pools_sessions = False
    provider = "CUDAExecutionProvider"

    def timing(self) -> str:
        return "wall clock around synchronous run_with_iobinding (no host-device copies)"

    @classmethod
    def unavailable(cls) -> str | None:
        return super().unavailable() or cuda_missing() or provider_problem(cls.provider)

    def cuda_options(self) -> dict:
        return {"use_tf32": int(self.tf32)}

    def uses_tf32(self) -> bool | None:
        return self.tf32

    def providers(self) -> list:
        return [(self.provider, self.cuda_options()), "CPUExecutionProvider"]

    def prepare(self, batch_size: int):
        ort = import_onnxruntime()
        value = ort.OrtValue.ortvalue_from_numpy(self.host_batch(batch_size), "cuda", 0)
        binding = self.session.io_binding()
        binding.bind_ortvalue_input(self.input.name, value)
        for out in self.session.get_outputs():
            binding.bind_output(out.name, "cuda", 0)
        return binding, value  # keep the input OrtValue alive as long as the binding

    def run(self, batch):
        self.session.run_with_iobinding(batch[0])


class OrtTensorRTRunner(OrtCudaRunner):
    """ONNX Runtime's TensorRT provider (engines built on the first run of each shape, cached in
    scratch). Offered only where its library loads (onnxruntime-gpu 1.31 links TensorRT 10)."""

    name = "ort-trt"
    provider = "TensorrtExecutionProvider"

    def uses_tf32(self) -> bool:
        return True  # the provider has no TF32 option: TensorRT's default (allowed) applies

    def providers(self) -> list:
        cache = self.scratch / "ort-trt-cache"
        cache.mkdir(exist_ok=True)
        options = {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache),
                   "trt_timing_cache_enable": True, "trt_timing_cache_path": str(cache)}
        return [(self.provider, options), ("CUDAExecutionProvider", self.cuda_options()), "CPUExecutionProvider"]


# -------------------------------------------------------------------------------------- TensorRT


class TensorRTRunner(_CudaTiming, Runner):
    """Native TensorRT: engine files as they are; run directories and ONNX files are built into an
    fp32 engine per batch size (profile min = opt = max, as `trtexec --shapes`), the build counted
    in the cold start. Timing excludes host-device copies: input and output stay on the GPU, and
    CUDA events are recorded on the engine's own stream (no CUDA graphs)."""

    name = "tensorrt"
    accepts = ("engine", "run", "onnx")

    def __init__(self, threads: int, scratch: Path, clock: str = "wall", tf32: bool = False):
        super().__init__(threads, scratch, clock, tf32)
        self.engine = None
        self.onnx: Path | None = None

    @classmethod
    def unavailable(cls) -> str | None:
        try:
            import tensorrt  # noqa: F401
        except ImportError:
            return "the tensorrt package is not installed (pip install -e \".[gpu]\")"
        return cuda_missing()

    def load(self, target: Target) -> None:
        from export.tensorrt import TensorRTEngine

        self.target = target
        if target.kind == "engine":
            self.engine = TensorRTEngine.load(target.path)
        else:
            self.onnx = target.onnx_file(self.scratch)

    def uses_tf32(self) -> bool | None:
        return None if self.target is not None and self.target.kind == "engine" else self.tf32  # fixed at build

    def _engine_for(self, batch_size: int):
        from export.tensorrt import TensorRTEngine, to_tensorrt

        if self.target.kind == "engine":
            return self.engine
        out = self.scratch / f"{self.onnx.stem}-b{batch_size}.engine"
        if not out.exists():
            to_tensorrt(self.onnx, out, min_batch=batch_size, opt_batch=batch_size, max_batch=batch_size,
                        check=False, timing_cache=self.scratch / "trt-timing.cache", tf32=self.tf32)
        return TensorRTEngine.load(out)

    def stream(self):
        return self.engine.stream

    def prepare(self, batch_size: int):
        import torch

        self.engine = engine = self._engine_for(batch_size)
        engine.check_batch_size(batch_size)
        shape = (batch_size, *(int(d) for d in engine.input_shape[1:]))
        x = make_input(shape).to(device="cuda", dtype=engine.input_dtype).contiguous()
        out = engine.bind(x)
        engine.stream.wait_stream(torch.cuda.current_stream())  # the copy of x was queued on the current stream
        return x, out

    def run_async(self, batch):
        self.engine.execute()
        return batch[1]

    def run(self, batch):
        out = self.run_async(batch)
        self.engine.stream.synchronize()
        return out
