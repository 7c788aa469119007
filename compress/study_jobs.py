"""`compress study --jobs N`: the study's cells (method × ratio × seed) in N worker processes.

Why: a study is many small runs that do not depend on each other. On a CPU, N one-thread processes keep
N cores busier than one process with N intra-op threads (the small convolutions of these models scale
poorly across threads); on one GPU, several processes overlap each other's host work and kernels. The
workers take cells from one queue, so no cell runs twice; each cell is made exactly as the one-process
study makes it (`compress.study._prune`, same run directory and key), so the study that follows reuses
them and a later run of either kind reuses them too.
"""

from __future__ import annotations

import multiprocessing
import queue as queue_module
import resource
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from compress.errors import CompressError
from compress.progress import console

if TYPE_CHECKING:
    from compress.study import StudyConfig


class CellsRun(NamedTuple):
    made: set[str]          # the run directories the workers trained (not those they found made)
    cpu_s: float            # the workers' CPU seconds
    workers: int
    threads: int            # torch threads per worker


def run_cells(config: StudyConfig, cells: list[tuple], dense_dir: Path, work: Path) -> CellsRun:
    """Make `cells` ((MethodSpec, ratio, seed) each) in up to `config.jobs` worker processes sharing the
    cores. A cell that fails does not stop the others; the failures are raised together at the end as
    one error."""
    from compress.runtime import current

    rt = current()
    if rt.distributed:
        raise CompressError("--jobs runs its own worker processes; it does not combine with torchrun")
    if not cells:
        return CellsRun(set(), 0.0, 0, 0)
    jobs = min(config.jobs, len(cells))
    threads = max(1, torch.get_num_threads() // jobs)
    settings = {"device": str(rt.device), "precision": rt.precision, "channels_last": rt.channels_last,
                "workers": rt.workers}
    ctx = multiprocessing.get_context("spawn")      # a fresh interpreter: no forked torch thread pools
    todo, events = ctx.Queue(), ctx.Queue()
    for cell in cells:
        todo.put(cell)
    for _ in range(jobs):
        todo.put(None)
    console.rule(f"[bold]study: {len(cells)} cells in {jobs} worker processes × {threads} torch threads")
    cpu_before = _children_cpu_s()
    workers = [ctx.Process(target=_worker, args=(i, config, settings, threads, todo, events, dense_dir, work),
                           name=f"study-worker-{i}") for i in range(jobs)]
    for w in workers:
        w.start()
    made, failed = set(), []
    try:
        while any(w.is_alive() for w in workers) or not events.empty():
            try:
                kind, worker, label, detail = events.get(timeout=0.5)
            except queue_module.Empty:
                continue
            if kind == "made":
                if not detail["reused"]:
                    made.add(detail["run"])
                console.print(f"  worker {worker}: {label}: acc {detail['accuracy']:.4f}  flops ratio "
                              f"{detail['flops_ratio']:.3f}  {detail['took']}", markup=False, highlight=False)
            elif kind == "failed":
                failed.append(f"{label}: {detail}")
                console.print(f"  worker {worker}: {label}: failed ({detail})", markup=False, style="red")
            else:
                console.print(f"  worker {worker}: {label} …", markup=False, highlight=False)
    except KeyboardInterrupt as exc:
        _stop(workers)
        from compress.checkpoint import Interrupted

        err = Interrupted("interrupted; the cells made are kept and the interrupted ones resume from their "
                          "checkpoints when the same command runs again")
        err.exit_code = 128 + int(getattr(exc, "signal", signal.SIGINT))
        raise err from None
    for w in workers:
        w.join()
    crashed = [w.name for w in workers if w.exitcode not in (0, None)]
    if failed or crashed:
        raise CompressError(f"{len(failed)} of {len(cells)} study cells failed ({'; '.join(failed) or 'none'})"
                            + (f"; {', '.join(crashed)} exited abnormally" if crashed else "")
                            + " — the cells made are kept and reused by the next run")
    return CellsRun(made, _children_cpu_s() - cpu_before, jobs, threads)


def _worker(index: int, config: StudyConfig, settings: dict[str, Any], threads: int, todo, events, dense_dir: Path,
            work: Path) -> None:
    """One worker: cells from `todo` until its None, each reported on `events`; quiet otherwise (the
    parent prints one line per cell, so N workers' epoch lines do not interleave)."""
    from compress.checkpoint import Interrupted, raise_on_sigterm
    from compress.progress import quiet
    from compress.runtime import configure
    from compress.study import _prune, took

    raise_on_sigterm()
    torch.set_num_threads(threads)
    configure(**settings)
    quiet(True)
    try:
        while (cell := todo.get()) is not None:
            spec, ratio, seed = cell
            label = f"{spec.label} @ {ratio:g} seed {seed}"
            events.put(("start", index, label, None))
            try:
                r = _prune(config, spec, ratio, seed, dense_dir, work)
            except Interrupted as exc:  # this worker was stopped: no more cells
                raise SystemExit(exc.exit_code) from None
            except CompressError as exc:
                events.put(("failed", index, label, str(exc)))
                continue
            except Exception as exc:  # noqa: BLE001 - a bug in one cell: report it, keep the others going
                events.put(("failed", index, label, f"{type(exc).__name__}: {exc}"))
                continue
            events.put(("made", index, label, {"run": r["run"], "accuracy": r["accuracy"], "reused": r["reused"],
                                               "flops_ratio": r["flops_ratio"], "took": took(r)}))
    except KeyboardInterrupt:       # Ctrl-C reaches every worker; the interrupted run keeps its checkpoint
        raise SystemExit(130) from None


def _stop(workers: list) -> None:
    for w in workers:
        if w.is_alive():
            w.terminate()           # SIGTERM: the worker's run stops as on Ctrl-C, checkpoint kept
    for w in workers:
        w.join(timeout=30)
        if w.is_alive():
            w.kill()


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime
