"""The machine a benchmark ran on, recorded so figures from different hosts are never compared blindly."""

from __future__ import annotations

import os
import platform
import socket
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path


def _affinity() -> set[int]:
    try:
        return set(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return set(range(os.cpu_count() or 1))


def _cpuinfo() -> list[dict[str, str]]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    blocks = []
    for block in text.strip().split("\n\n"):
        entry = {}
        for line in block.splitlines():
            key, _, value = line.partition(":")
            entry[key.strip()] = value.strip()
        blocks.append(entry)
    return blocks


def physical_cores() -> int:
    """Physical cores this process may run on (hyper-threads counted once): the default thread count."""
    cpus = _affinity()
    cores = {(b.get("physical id"), b.get("core id")) for b in _cpuinfo()
             if b.get("processor", "").isdigit() and int(b["processor"]) in cpus and "core id" in b}
    return len(cores) if cores else len(cpus)


def cpu_name() -> str:
    for block in _cpuinfo():
        if "model name" in block:
            return block["model name"]
    return platform.processor() or platform.machine()


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def load_average() -> float | None:
    """1-minute load average (None where the OS has none): above the CPU count, runs wait for a core."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def busy_warning(threads: int) -> str | None:
    """A line to print when other processes compete for the cores, else None."""
    load, cpus = load_average(), len(_affinity())
    if load is None or load <= cpus:
        return None
    hint = "prefer --threads 1 --clock cpu for comparisons" if threads > 1 else "prefer --clock cpu for comparisons"
    return (f"warning: load average {load:.1f} on {cpus} CPU(s): other processes compete for the cores, so "
            f"wall-clock latency is inflated and multimodal; {hint}")


def _onnxruntime() -> tuple[str | None, str | None]:
    """Version and build ("CPU" or "GPU") of the onnxruntime module that imports: the CPU and GPU
    wheels are the same module, so package metadata alone can name the wrong one."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None, None
    return ort.__version__, ort.get_device()


def _tensorrt_version() -> str | None:
    """The importable TensorRT's version (its wheels are named tensorrt, tensorrt-cu12, tensorrt-cu13 …)."""
    names = ("tensorrt", "tensorrt-cu13", "tensorrt-cu12", "tensorrt-cu13-bindings", "tensorrt-cu12-bindings")
    return next((v for v in map(_version, names) if v), None)


def host_info() -> dict:
    """CPU, core counts, GPU and library versions of this machine, and when the run happened."""
    import torch

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] \
        if torch.cuda.is_available() else []
    ort_version, ort_device = _onnxruntime()
    return {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "physical_cores": physical_cores(),
        "logical_cores": os.cpu_count(),
        "usable_cpus": len(_affinity()),
        "load_average_1m": load_average(),
        "gpus": gpus,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": ort_version,
        "onnxruntime_device": ort_device,
        "tensorrt": _tensorrt_version(),
        "time_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
