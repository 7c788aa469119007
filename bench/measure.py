"""Interleaved latency measurement (trtexec-style warm-up and duration, asv-style interleaving).

For one backend and batch size, every target is warmed up, then measured in rounds: each round
gives each target a block of runs of one length, alternating the order (A B, B A, A B, …). A machine
that drifts or a neighbour that starts a job slows every target alike, so their ratio stays honest.
A target stops once it has both the minimum duration and the minimum iteration count.
Around every block the scheduler's run-queue wait of this process is read (bench/contention.py):
a result whose threads waited for a CPU much of the time is marked oversubscribed.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from bench.contention import OVERSUBSCRIBED_WAIT, run_queue_wait_ns, wait_fraction
from bench.runners import Runner
from bench.stats import Summary, summarize
from bench.targets import Target
from compress.errors import CompressError


@dataclass(frozen=True)
class Settings:
    """How long and how often to measure; recorded in the JSON so a result can be reproduced."""

    threads: int
    warmup_s: float = 0.2
    warmup_iters: int = 5
    min_time_s: float = 2.0
    min_iters: int = 10
    max_iters: int = 20_000
    block_s: float = 0.01
    clock: str = "wall"  # or "cpu": thread CPU time, one thread only (bench.runners.CLOCKS)
    tf32: bool = False  # let fp32 math round to TF32 on the CUDA backends that offer the choice
    # Account each block's run-queue wait (bench.contention) to flag oversubscribed results. Latency tables
    # turn it off: they report no per-point flag, and with ~70 ONNX Runtime sessions alive (each with its
    # thread pool) one account reads hundreds of /proc files, ~1 ms against 5 ms blocks.
    watch_contention: bool = True
    # Loads of each target (sessions, modules), measured interleaved and pooled, the target's time split
    # between them. One ONNX Runtime CPU session's median moves by up to ~6% with where its buffers land
    # (docs/benchmarking.md), so one session can misstate a ratio between models that much.
    # Runners whose loads share one module, compile, build engines or hold device memory load once
    # (Runner.pools_sessions).
    sessions: int = 1

    def __post_init__(self):
        if self.threads < 1:
            raise CompressError(f"--threads must be >= 1, got {self.threads}")
        if self.sessions < 1:
            raise CompressError(f"--sessions must be >= 1, got {self.sessions}")
        if self.min_iters < 1 or self.max_iters < self.min_iters:
            raise CompressError("need 1 <= --min-iters <= max iterations")
        if self.clock not in ("wall", "cpu"):
            raise CompressError(f"--clock must be wall or cpu, got {self.clock!r}")
        if self.clock == "cpu" and self.threads != 1:
            raise CompressError("--clock cpu measures the calling thread's CPU time, so it needs --threads 1 "
                                f"(got {self.threads})")


@dataclass
class Result:
    """One target × backend × batch size."""

    target: str
    backend: str
    batch_size: int
    samples_ms: np.ndarray
    summary: Summary
    flops: int | None
    params: int | None
    device: str
    timing: str
    cold_start_ms: float  # preparing this batch size + first run (compilation, autotuning, engine build)
    load_ms: float  # building the session / module / engine for this target
    tf32: bool | None = None  # fp32 math allowed to round to TF32; None: no such thing (CPU) or unknown
    cpu_wait: float | None = None  # share of the time the runner's threads waited for a CPU; None: unknown
    # Measured while other work kept this run's threads waiting for CPUs, on a clock that counts the
    # waiting (not --clock cpu): the figure is the machine's load as much as the model's latency.
    oversubscribed: bool = False
    sessions: int = 1  # loads whose samples were pooled (Settings.sessions)


@dataclass
class Contender:
    """A loaded runner and what is known of it while it is being measured."""

    target: Target
    runner: Runner
    load_ms: float
    batch: object = None
    cold_start_ms: float = 0.0
    block: int = 1
    per_run_s: float = 0.0  # median warm run
    samples: list[np.ndarray] = field(default_factory=list)
    wait_ns: int | None = 0  # run-queue wait of this process during the measured blocks (None: unknown)
    measured_ns: int = 0  # wall time of those blocks
    share: float = 1.0  # this load's share of its target's duration and counts (1 / its number of sessions)

    @property
    def count(self) -> int:
        return sum(len(s) for s in self.samples)

    @property
    def total_ms(self) -> float:
        return float(sum(s.sum() for s in self.samples))


def warm_up(c: Contender, batch_size: int, settings: Settings) -> None:
    """Cold start (preparing the batch size and its first run), then warm-up by time and count; the
    warm runs' median sizes the interleaving blocks."""
    start = time.perf_counter()
    c.batch = c.runner.prepare(batch_size)
    c.runner.run(c.batch)
    c.cold_start_ms = (time.perf_counter() - start) * 1000
    warm: list[float] = []
    deadline = time.perf_counter() + settings.warmup_s
    while len(warm) < settings.warmup_iters or time.perf_counter() < deadline:
        warm.extend(c.runner.time(c.batch, 1))
    c.per_run_s = _per_run_s(warm[-settings.warmup_iters:])


def sessions_of(runner_class: type[Runner], settings: Settings) -> int:
    """How many times a target is loaded on this runner: settings.sessions where reloading is cheap."""
    return settings.sessions if runner_class.pools_sessions else 1


def load_sessions(target: Target, make_runner: Callable[[], Runner], count: int) -> list[Contender]:
    """`count` loads of `target`, each a contender with its share of the target's measurement."""
    out = []
    for _ in range(count):
        runner = make_runner()
        start = time.perf_counter()
        runner.load(target)
        out.append(Contender(target, runner, load_ms=(time.perf_counter() - start) * 1000, share=1 / count))
    return out


def _max_iters(c: Contender, settings: Settings) -> int:
    return max(1, math.ceil(settings.max_iters * c.share))


def _progress(c: Contender, settings: Settings) -> float:
    """How much of its minimum (iterations and time, its share of both) a contender has; 1.0 once it has
    both or has reached its iteration cap."""
    if c.count >= _max_iters(c, settings):
        return 1.0
    need_n, need_ms = math.ceil(settings.min_iters * c.share), settings.min_time_s * 1000 * c.share
    return min(1.0, c.count / need_n if need_n else 1.0, c.total_ms / need_ms if need_ms else 1.0)


def _done(c: Contender, settings: Settings) -> bool:
    return _progress(c, settings) >= 1.0


def measure_interleaved(contenders: list[Contender], batch_size: int, settings: Settings,
                        progress: Callable[[float], None] | None = None) -> None:
    """Fill each contender's samples, in alternating-order rounds, until all have enough."""
    for c in contenders:
        c.samples, c.wait_ns, c.measured_ns = [], 0, 0
        warm_up(c, batch_size, settings)
    # Blocks of one length for everyone (at least block_s, at least the slowest single run): every round
    # gives each contender about the same time, so all reach their minimum within a round or two of
    # each other and stop; the interleaving covers (nearly) the whole measurement of every contender.
    # Sized again after every round from the latest block: a few warm runs misjudge microsecond runs.
    _size_blocks(contenders, settings)
    order = list(contenders)
    while not all(_done(c, settings) for c in contenders):
        for c in order:  # a contender with its minimum stops; with blocks of one length the rest are close
            if not _done(c, settings):
                _measure_block(c, min(c.block, _max_iters(c, settings) - c.count), settings.watch_contention)
                c.per_run_s = _per_run_s(c.samples[-1])
        _size_blocks(contenders, settings)
        order.reverse()
        if progress:
            progress(min(_progress(c, settings) for c in contenders))


def _per_run_s(times_ms) -> float:
    """The median run of `times_ms` in seconds, never zero (blocks are sized by dividing by it)."""
    return max(float(np.median(times_ms)) / 1000, 1e-7)


def _size_blocks(contenders: list[Contender], settings: Settings) -> None:
    span = max([settings.block_s] + [c.per_run_s for c in contenders])
    for c in contenders:
        c.block = max(1, min(_max_iters(c, settings), round(span / c.per_run_s)))


def _measure_block(c: Contender, iterations: int, watch: bool = True) -> None:
    waited, started = run_queue_wait_ns() if watch else None, time.perf_counter_ns()
    c.samples.append(c.runner.time(c.batch, iterations))
    elapsed, waited_after = time.perf_counter_ns() - started, run_queue_wait_ns() if watch else None
    c.measured_ns += elapsed
    if waited is None or waited_after is None or c.wait_ns is None:
        c.wait_ns = None
    else:
        c.wait_ns += max(0, waited_after - waited)


def to_results(contenders: list[Contender], backend: str, batch_size: int) -> list[Result]:
    """One Result per target (in first-load order), its sessions' samples pooled."""
    by_target: dict[int, list[Contender]] = {}
    for c in contenders:
        by_target.setdefault(id(c.target), []).append(c)
    return [_pooled(cs, backend, batch_size) for cs in by_target.values()]


def _pooled(sessions: list[Contender], backend: str, batch_size: int) -> Result:
    first = sessions[0]
    samples = np.concatenate([s for c in sessions for s in c.samples])
    waits = [c.wait_ns for c in sessions]
    wait = None if None in waits else round(wait_fraction(sum(waits), sum(c.measured_ns for c in sessions),
                                                          first.runner.cpu_threads), 4)
    # thread CPU time leaves out the time spent waiting, so a --clock cpu figure is not inflated by it
    oversubscribed = wait is not None and wait > OVERSUBSCRIBED_WAIT and first.runner.clock != "cpu"
    return Result(target=first.target.label, backend=backend, batch_size=batch_size, samples_ms=samples,
                  summary=summarize(samples, batch_size), flops=first.target.flops, params=first.target.params,
                  device=first.runner.device, timing=first.runner.timing(),
                  cold_start_ms=float(np.mean([c.cold_start_ms for c in sessions])),
                  load_ms=float(np.mean([c.load_ms for c in sessions])), tf32=first.runner.uses_tf32(),
                  cpu_wait=wait, oversubscribed=oversubscribed, sessions=len(sessions))
