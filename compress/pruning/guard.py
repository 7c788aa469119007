"""A memory and time guard around dependency analysis.

Torch-Pruning's dependency graph propagates channel indices through every op of a network. Where
its index mappings do not compose into a permutation (e.g. a relative-position-bias table whose
head dimension it couples to the channels of a shifted-window transformer, through a reshape it
reads as a flatten), the propagation never converges: index lists grow without bound and a swin_t
filled the 24 GiB machine this project runs on. `bounded_mappings` stops that case precisely;
`guarded` is the safety net for everything else: a watchdog thread that watches the process's
resident memory and the wall time, and raises `AnalysisAborted` in the analysing thread (which is
running Python code: the propagation loop) as soon as a limit is crossed, long before the machine
runs out of memory.
"""

from __future__ import annotations

import ctypes
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from compress.errors import CompressError

MAX_MEMORY_GB = 6.0       # growth of resident memory during the analysis (env COMPRESS_ANALYSIS_MAX_GB)
MAX_SECONDS = 1800.0      # env COMPRESS_ANALYSIS_MAX_S
POLL_S = 0.05


class AnalysisAborted(BaseException):
    """Raised inside the analysing thread by the watchdog (a BaseException, so that a bare `except
    Exception` in traced model code or in Torch-Pruning cannot swallow it)."""


class MappingRunaway(Exception):
    """A channel-index mapping produced more indices than any layer of the network has channels."""


def resident_gb() -> float:
    """This process's resident memory in GiB (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1024**3
    except (OSError, ValueError, IndexError):
        return 0.0


@contextmanager
def guarded(what: str, max_memory_gb: float | None = None, max_seconds: float | None = None) -> Iterator[None]:
    """Run the body under the watchdog; a crossed limit becomes a one-line CompressError about `what`.

    The limits are checked on every poll and once more when the body ends, so a body that crossed a
    limit between two polls (or finished before the first) is refused all the same: the outcome does
    not depend on how fast the machine happened to be."""
    max_memory_gb = _limit("COMPRESS_ANALYSIS_MAX_GB", MAX_MEMORY_GB) if max_memory_gb is None else max_memory_gb
    max_seconds = _limit("COMPRESS_ANALYSIS_MAX_S", MAX_SECONDS) if max_seconds is None else max_seconds
    target = threading.get_ident()
    start_gb, started = resident_gb(), time.perf_counter()
    lock, state = threading.Lock(), {"active": True, "fired": None}
    stop = threading.Event()

    def crossed() -> str | None:
        if resident_gb() - start_gb > max_memory_gb:
            return f"it needed more than {max_memory_gb:g} GiB of memory ({resident_gb():.1f} GiB resident)"
        if time.perf_counter() - started > max_seconds:
            return f"it ran longer than {max_seconds:g} s"
        return None

    def watch() -> None:
        while not stop.wait(POLL_S):
            reason = crossed()
            with lock:
                if reason and state["active"]:
                    state["fired"] = state["fired"] or reason
                    _raise_in(target, AnalysisAborted)   # again on every poll: model code may catch it

    thread = threading.Thread(target=watch, name="compress-analysis-guard", daemon=True)
    thread.start()
    try:
        yield
        with lock:
            state["fired"] = state["fired"] or crossed()
        if state["fired"]:
            raise AnalysisAborted
    except AnalysisAborted:
        raise CompressError(f"{what} was stopped: {state['fired']} (limits: COMPRESS_ANALYSIS_MAX_GB, "
                            "COMPRESS_ANALYSIS_MAX_S)") from None
    finally:
        with lock:
            state["active"] = False
            if state["fired"]:
                _raise_in(target, None)   # clear an exception still pending for this thread
        stop.set()
        thread.join()


def _limit(variable: str, default: float) -> float:
    value = os.environ.get(variable)
    if value is None:
        return default
    try:
        return float(value)
    except ValueError:
        raise CompressError(f"{variable} must be a number, got {value!r}") from None


def _raise_in(thread_id: int, exc: type[BaseException] | None) -> None:
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), ctypes.py_object(exc) if exc else None)


@contextmanager
def bounded_mappings(limit: int) -> Iterator[None]:
    """While active, every index mapping of a Torch-Pruning graph raises MappingRunaway when it yields
    more than `limit` indices (a valid mapping never yields more than its target has channels).

    Torch-Pruning recomputes a graph's mappings at the start of every group query, so its update
    function is wrapped (and restored on exit) rather than the mappings of one moment.
    """
    from torch_pruning.dependency import index_mapping

    original = index_mapping.update_index_mapping

    def update_and_bound(graph) -> None:
        original(graph)
        for node in graph.module2node.values():
            for dep in node.dependencies:
                dep.index_mapping = [_bounded(m, limit) if m is not None else None for m in dep.index_mapping]

    index_mapping.update_index_mapping = update_and_bound
    try:
        yield
    finally:
        index_mapping.update_index_mapping = original


def _bounded(mapping: Callable, limit: int) -> Callable:
    if getattr(mapping, "_compress_bounded", False):
        return mapping

    def bounded(idxs):
        out = mapping(idxs)
        if len(out) > limit:
            raise MappingRunaway(f"one step turned {len(idxs)} channel indices into {len(out)}")
        return out

    bounded._compress_bounded = True
    return bounded
