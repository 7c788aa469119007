"""One `compress bench` invocation as a library call: resolve targets, pick backends, measure, compare."""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

from bench.backends import RUNNERS, default_backends
from bench.compare import Speedup, speedups
from bench.host import host_info, load_average
from bench.measure import Result, Settings, load_sessions, measure_interleaved, sessions_of, to_results
from bench.runners import BackendUnavailable
from bench.targets import Target
from compress.errors import CompressError


@dataclass(frozen=True)
class Skip:
    """A backend (or backend × target) that was not measured, and why."""

    backend: str
    target: str | None
    reason: str

    def line(self) -> str:
        what = f"{self.backend} on {self.target}" if self.target else self.backend
        return f"skipped {what}: {self.reason}"


@dataclass
class BenchRun:
    host: dict
    settings: dict
    targets: list[Target]
    results: list[Result]
    speedups: list[Speedup]
    skips: list[Skip]

    @property
    def baseline(self) -> str:
        return self.targets[0].label


# progress(description, fraction done of that part); called as measurement advances.
Progress = Callable[[str, float], None]


def benchmark(targets: list[Target], *, backends: list[str] | None = None,
              batch_sizes: Sequence[int] = (1,), settings: Settings, progress: Progress | None = None,
              on_skip: Callable[[Skip], None] | None = None, resamples: int = 2000) -> BenchRun:
    """Measure every target (from `resolve_targets`; the first is the baseline) on every backend and
    batch size, interleaved per backend × batch size."""
    if not targets:
        raise CompressError("nothing to benchmark: no targets")
    batch_sizes = check_batch_sizes(batch_sizes, targets)
    chosen = backends if backends is not None else default_backends(targets)
    skips: list[Skip] = []

    def skip(backend: str, target: str | None, reason: str) -> None:
        skips.append(Skip(backend, target, reason))
        if on_skip:
            on_skip(skips[-1])

    load_before = load_average()
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="compress-bench-") as scratch:
        for backend in chosen:
            cls = RUNNERS[backend]
            if (reason := cls.unavailable()) is not None:
                skip(backend, None, reason)
                continue
            contenders = []
            for target in targets:
                if (reason := cls.rejects(target)) is not None:
                    skip(backend, target.label, reason)
                    continue
                try:
                    make = partial(cls, settings.threads, Path(scratch), settings.clock, settings.tf32)
                    contenders += load_sessions(target, make, sessions_of(cls, settings))
                except BackendUnavailable as exc:  # e.g. an ONNX Runtime provider that fell back to the CPU
                    skip(backend, target.label, str(exc))
                    continue
            for bs in batch_sizes if contenders else ():
                label = f"{backend} · batch {bs}"
                measure_interleaved(contenders, bs, settings,
                                    progress=(lambda f, label=label: progress(label, f)) if progress else None)
                results.extend(to_results(contenders, backend, bs))
            del contenders  # free sessions/modules before the next backend loads its own
    if not results:
        raise CompressError("nothing was measured: " + "; ".join(s.line() for s in skips))
    record = {**asdict(settings), "backends": chosen, "batch_sizes": list(batch_sizes), "resamples": resamples}
    host = {**host_info(), "load_average_1m_before": load_before}
    return BenchRun(host=host, settings=record, targets=targets, results=results,
                    speedups=speedups(results, targets[0].label, resamples=resamples, threads=settings.threads,
                                      latency_targets={t.label: t.latency_target for t in targets
                                                       if t.latency_target}), skips=skips)


def check_batch_sizes(batch_sizes: Sequence[int], targets: list[Target]) -> list[int]:
    """The distinct batch sizes, or a one-line error when one is impossible (e.g. a fixed-batch ONNX file)."""
    sizes = [int(b) for b in batch_sizes]
    if not sizes or any(b < 1 for b in sizes):
        raise CompressError(f"batch sizes must be positive integers, got {list(batch_sizes)}")
    for t in targets:
        wrong = [b for b in sizes if t.batch_dim is not None and b != t.batch_dim]
        if wrong:
            raise CompressError(f"{t.label} was exported with a fixed batch size of {t.batch_dim} and cannot run "
                                f"batch size {wrong[0]}; re-export it with --dynamic-batch or use "
                                f"--batch-size {t.batch_dim}")
    return list(dict.fromkeys(sizes))
