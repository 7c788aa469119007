"""The backend registry: names (and aliases) on the command line → runner classes, and the default set."""

from __future__ import annotations

from bench.gpu_runners import (
    OrtCudaRunner,
    OrtTensorRTRunner,
    TensorRTRunner,
    TorchCompileCudaRunner,
    TorchCudaRunner,
)
from bench.runners import OrtRunner, Runner, TorchCompileRunner, TorchRunner
from bench.targets import Target
from compress.errors import CompressError

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
