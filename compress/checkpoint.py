"""Resumable progress of `train` and `prune`: per-epoch checkpoints beside --out, never at it.

A command's progress lives in the hidden directory `.NAME.partial` next to `--out NAME` (one file,
written atomically by rank 0 after every epoch of every stage): the command's settings (its *key*),
the state of each training-like stage reached (weights, optimisers, schedules, RNGs, counters) and
the results of finished pipeline steps. `--resume` reloads it and continues; the run directory
appears at --out only when everything is done, and the partial directory is then removed. Ctrl-C
or SIGTERM ends the command with the resume command printed, leaving nothing at --out.
"""

from __future__ import annotations

import os
import random
import shlex
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from compress.errors import CompressError
from compress.runtime import Runtime, current

FORMAT = 2          # 2: step results in files of their own
STATE_FILE = "state.pt"


class Interrupted(CompressError):
    """Ctrl-C or SIGTERM: the progress so far is kept for --resume (exit code 128 + signal)."""

    exit_code = 130


def partial_dir(out: str | os.PathLike) -> Path:
    out = Path(out)
    return out.parent / f".{out.name}.partial"


class Checkpoint:
    """The progress file of one command run (see the module docstring)."""

    def __init__(self, out: str | os.PathLike, key: dict[str, Any], *, resume: bool | str = False,
                 rt: Runtime | None = None):
        """resume=True continues the saved progress (an error if there is none or it was made with other
        settings); "auto" continues it when it exists and fits, else starts over; False starts over."""
        self.rt = rt or current()
        self.dir = partial_dir(out)
        self.key = key
        self.state: dict[str, Any] = {"format": FORMAT, "key": key, "stages": {}, "results": {}}
        if resume == "auto":
            resume = (self.dir / STATE_FILE).is_file() and _fits(self.dir, key)
        self.resumed = bool(resume)
        if resume:
            self.state = self._read()
            _check_key(self.state.get("key", {}), key, self.dir)
        elif self.dir.exists() and self.rt.is_main:
            shutil.rmtree(self.dir, ignore_errors=True)   # stale progress of a run that was not resumed
        self.rt.barrier()

    # ------------------------------------------------------------ stages and results

    def stage(self, name: str) -> dict[str, Any] | None:
        """The saved state of a training-like stage (finished or in progress), or None."""
        return self.state["stages"].get(name)

    def save_stage(self, name: str, state: dict[str, Any]) -> None:
        self.state["stages"][name] = state
        self._write()

    def result(self, name: str) -> Any:
        """The recorded result of a finished pipeline step, or None."""
        file = self.state["results"].get(name)
        return None if file is None else self._load(self.dir / file)

    def save_result(self, name: str, value: Any) -> None:
        """Record a finished step's result. It goes to a file of its own at once, so a result holding live
        tensors (the module's weights after a search) is read now and no copy of it stays in memory for
        the later checkpoints (a giant's weights would otherwise be held twice for the rest of the run)."""
        file = f"result-{name}.pt"
        self._save(value, file)
        self.state["results"][name] = file
        self._write()

    def reached(self) -> str:
        """Where the run stands, for messages: the last stage saved and its epoch."""
        stages = self.state["stages"]
        if not stages:
            return "before the first checkpoint"
        name, st = list(stages.items())[-1]
        return f"stage {name}, " + ("finished" if st["done"] else f"after epoch {st['epoch']}")

    def discard(self) -> None:
        """The run is complete: its progress is no longer needed."""
        if self.rt.is_main:
            shutil.rmtree(self.dir, ignore_errors=True)

    # ------------------------------------------------------------ files

    def _write(self) -> None:
        self._save(self.state, STATE_FILE)

    def _save(self, value: Any, name: str) -> None:
        """torch.save `value` as file `name` of the progress directory, atomically (rank 0 only)."""
        if not self.rt.is_main:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=self.dir)
        os.close(fd)
        try:
            torch.save(value, tmp)
            os.replace(tmp, self.dir / name)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _load(self, path: Path) -> Any:
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # truncated or foreign files raise many types
            raise CompressError(f"--resume: {path} is not a readable checkpoint ({type(exc).__name__}); "
                                "delete it or run without --resume") from None

    def _read(self) -> dict[str, Any]:
        path = self.dir / STATE_FILE
        if not path.is_file():
            raise CompressError(f"--resume: no progress to resume at {self.dir} (run without --resume to start)")
        state = self._load(path)
        if not isinstance(state, dict) or state.get("format") != FORMAT or "stages" not in state:
            raise CompressError(f"--resume: {path} is not a checkpoint of this version; run without --resume")
        return state


def _fits(where: Path, key: dict[str, Any]) -> bool:
    try:
        state = torch.load(where / STATE_FILE, map_location="cpu", weights_only=True)
        return isinstance(state, dict) and state.get("format") == FORMAT and state.get("key") == key
    except Exception:  # unreadable: start over
        return False


def _check_key(saved: dict[str, Any], wanted: dict[str, Any], where: Path) -> None:
    diffs = [k for k in sorted(set(saved) | set(wanted)) if saved.get(k) != wanted.get(k)]
    if diffs:
        k = diffs[0]
        raise CompressError(f"--resume: the progress at {where} was made with {k}={saved.get(k)!r}, this run asks "
                            f"for {k}={wanted.get(k)!r}; rerun with the same settings or without --resume")


def snapshot(obj: Any) -> Any:
    """A copy of `obj` with every tensor cloned to the CPU. Checkpoint records must not alias live tensors:
    `state_dict()` returns the parameters themselves, which later training would change under the record."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        out = type(obj)((k, snapshot(v)) for k, v in obj.items())
        if hasattr(obj, "_metadata"):          # state_dict version metadata some layers' loaders read
            out._metadata = obj._metadata
        return out
    if isinstance(obj, (list, tuple)):
        return type(obj)(snapshot(v) for v in obj)
    return obj


# ---------------------------------------------------------------- random state


def get_rng() -> dict[str, Any]:
    """Every global RNG's state, in a form `torch.load(weights_only=True)` reads back."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": [version, list(mt), gauss],
             "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------- interruption


def resume_command(rt: Runtime | None = None) -> str:
    """The command line that continues this run (the torchrun form under torchrun)."""
    rt = rt or current()
    args = [a for a in sys.argv[1:] if a != "--resume"] + ["--resume"]
    prog = f"torchrun --nproc_per_node {rt.local_world_size} -m compress" if rt.distributed else "compress"
    return " ".join([prog, *map(shlex.quote, args)])


@contextmanager
def interruptible(checkpoint: Checkpoint) -> Iterator[None]:
    """Turn Ctrl-C / SIGTERM into `Interrupted`, naming where the run stopped and how to resume it."""
    try:
        yield
    except KeyboardInterrupt as exc:
        code = getattr(exc, "signal", signal.SIGINT)
        message = (f"interrupted ({checkpoint.reached()}); nothing was written at the output; progress is kept in "
                   f"{checkpoint.dir}; resume with: {resume_command(checkpoint.rt)}")
        err = Interrupted(message)
        err.exit_code = 128 + int(code)
        raise err from None


def raise_on_sigterm() -> None:
    """Make SIGTERM (what schedulers and torchrun send) interrupt like Ctrl-C."""

    def handler(signum, _frame):
        exc = KeyboardInterrupt()
        exc.signal = signum
        raise exc

    signal.signal(signal.SIGTERM, handler)
