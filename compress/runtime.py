"""Where and how training-like work runs: device, precision, data workers and the torchrun process group.

One `Runtime` per process, set by the command (`configure`) and read by the shared loop (`current`).
Under `torchrun --nproc_per_node N -m compress ...` the environment carries RANK / WORLD_SIZE /
LOCAL_RANK; `configure` then joins the process group torchrun set up the rendezvous for (gloo on CPU,
NCCL on CUDA), each rank on its own device. Nothing here launches processes or moves bytes between
them by itself: that is torchrun's and torch.distributed's job.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from compress.errors import CompressError

PRECISIONS = ("fp32", "bf16", "fp16")
_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Runtime:
    """The device, numeric precision, loader workers and the rank's place in the process group."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    precision: str = "fp32"
    channels_last: bool = False
    workers: int = 0
    sync_bn: bool = False
    rank: int = 0
    world_size: int = 1
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the only rank that writes files and prints tables and progress."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def describe(self) -> dict[str, Any]:
        """What report.json records of where a run ran."""
        return {"device": str(self.device), "precision": self.precision, "world_size": self.world_size,
                "channels_last": self.channels_last}

    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed precision for forward passes (a no-op in fp32)."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=_AMP_DTYPES[self.precision])

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """fp16 needs loss scaling so small gradients do not underflow; bf16 and fp32 do not."""
        return torch.amp.GradScaler(self.device.type) if self.precision == "fp16" else None

    def place(self, module: torch.nn.Module) -> torch.nn.Module:
        """Move a module (in place) to the device, channels-last if asked."""
        module.to(self.device)
        if self.channels_last:
            module.to(memory_format=torch.channels_last)
        return module

    def to_device(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=self.cuda)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    # ------------------------------------------------------------ collectives (no-ops in one process)

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """Element-wise sum of `values` over all ranks."""
        if not self.distributed:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def assert_same(self, what: str, tensors: dict[str, torch.Tensor]) -> list[str]:
        """Check that every rank holds bitwise the same `tensors` (e.g. keep-masks at a decision point);
        returns each rank's digest. A mismatch is a bug in the method's determinism, not bad input."""
        digest = tensor_digest(tensors)
        if not self.distributed:
            return [digest]
        gathered: list[str | None] = [None] * self.world_size
        dist.all_gather_object(gathered, digest)
        if len(set(gathered)) != 1:
            raise RuntimeError(f"ranks disagree on {what}: digests {gathered}")
        return [str(d) for d in gathered]

    def _comm_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    """A short hash of named tensors' exact bytes (order of keys does not matter)."""
    h = hashlib.sha1()
    for key in sorted(tensors):
        h.update(key.encode())
        h.update(tensors[key].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


_CURRENT = Runtime()


def current() -> Runtime:
    """The runtime `configure` set for this process (CPU, fp32, one process if none was set)."""
    return _CURRENT


def default_workers(local_world_size: int = 1) -> int:
    """Loader workers per rank: the cores this process may use, shared by the ranks of this node, at most 8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(0, min(8, cores // max(1, local_world_size)))


def configure(device: str = "auto", precision: str = "fp32", channels_last: bool = False,
              workers: int | None = None, sync_bn: bool = False) -> Runtime:
    """Set this process's runtime from the command's flags, joining torchrun's process group if launched by it."""
    global _CURRENT
    if precision not in PRECISIONS:
        raise CompressError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if workers is not None and workers < 0:
        raise CompressError(f"--workers must be ≥ 0, got {workers}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    dev = _resolve_device(device, local_rank if world > 1 else None)
    if precision == "fp16" and dev.type != "cuda":
        raise CompressError("--precision fp16 needs a CUDA device (fp16 autocast with loss scaling); "
                            "use bf16 or fp32 on the CPU")
    if sync_bn and world > 1 and dev.type != "cuda":
        raise CompressError("--sync-bn synchronises BatchNorm statistics across GPUs; PyTorch's SyncBatchNorm "
                            "does not run on the CPU (gloo)")
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    _CURRENT = Runtime(device=dev, precision=precision, channels_last=channels_last,
                       workers=default_workers(local_world) if workers is None else workers, sync_bn=sync_bn,
                       rank=rank if world > 1 else 0, world_size=world, local_world_size=local_world)
    return _CURRENT


def shutdown() -> None:
    """Leave the process group (end of a command) and fall back to the single-process CPU runtime."""
    global _CURRENT
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _CURRENT = Runtime()


@contextlib.contextmanager
def using(rt: Runtime) -> Iterator[Runtime]:
    """Temporarily make `rt` the current runtime (tests, library callers)."""
    global _CURRENT
    saved, _CURRENT = _CURRENT, rt
    try:
        yield rt
    finally:
        _CURRENT = saved


def _resolve_device(spec: str, local_rank: int | None) -> torch.device:
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cpu":
        return torch.device("cpu")
    if not spec.startswith("cuda"):
        raise CompressError(f"--device must be auto, cpu, cuda or cuda:N, got {spec!r}")
    if not torch.cuda.is_available():
        raise CompressError(f"--device {spec}: no CUDA device is available here (torch.cuda.is_available() is "
                            "False); use --device cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise CompressError(f"--device must be auto, cpu, cuda or cuda:N, got {spec!r}") from None
    if local_rank is not None:
        if dev.index is not None:
            raise CompressError("under torchrun each process uses cuda:LOCAL_RANK; pass --device cuda (or auto)")
        dev = torch.device("cuda", local_rank)
    if (dev.index or 0) >= torch.cuda.device_count():
        raise CompressError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) here")
    return dev
