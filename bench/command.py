"""`compress bench` end to end: measure, print the table, write JSON/plot, and apply the latency gate.

cli.py only parses flags and calls `bench_command`; everything here is callable from Python too.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from rich.console import Console

from bench.backends import parse_backends
from bench.compare import pair_with_baseline
from bench.gate import Gate, Verdict, judge_all, pairs_against_saved, verdict_line
from bench.host import busy_warning, physical_cores
from bench.measure import Result, Settings
from bench.report import load_saved, oversubscription_note, table, to_json, write_json
from bench.session import BenchRun, benchmark, check_batch_sizes
from bench.targets import Target, resolve_targets
from compress.errors import CheckFailed, CompressError


def parse_batch_sizes(spec: str) -> list[int]:
    try:
        sizes = [int(v) for v in spec.split(",") if v.strip()]
    except ValueError:
        raise CompressError(f"--batch-size takes a comma list of integers such as 1,32, got {spec!r}") from None
    if not sizes or any(b < 1 for b in sizes):
        raise CompressError(f"--batch-size values must be positive integers, got {spec!r}")
    return sizes


def bench_command(targets: Sequence[str], *, backend: str | None = None, batch_size: str | None = None,
                  threads: int | None = None, json_path: str | None = None, plot: str | None = None,
                  baseline: str | None = None, max_regression: float | None = None,
                  min_speedup: float | None = None, alpha: float = 0.01, clock: str | None = None, warmup: float = 0.2,
                  duration: float = 2.0, min_iters: int = 10, sessions: int = 3, tf32: bool = False,
                  out: Console | None = None) -> BenchRun:
    """Run one bench; raises CheckFailed (exit 1) after writing all output when the gate fails."""
    out = out or _stdout()
    if threads is not None and threads < 1:
        raise CompressError(f"--threads must be >= 1, got {threads}")
    gate = _gate(targets, baseline, max_regression, min_speedup, alpha)
    saved, saved_settings = load_saved(baseline) if baseline else (None, {})
    backends = parse_backends(backend)
    sizes = parse_batch_sizes(batch_size) if batch_size else None
    if saved is not None:  # gate against a file: measure what it measured, unless told otherwise
        backends = backends or parse_backends(",".join(dict.fromkeys(r.backend for r in saved)))
        sizes = sizes or list(dict.fromkeys(r.batch_size for r in saved))
    if warmup < 0 or duration <= 0 or min_iters < 1:
        raise CompressError("--warmup must be >= 0, --duration > 0 and --min-iters >= 1")
    if plot and Path(plot).suffix.lower() != ".png":
        raise CompressError(f"--plot writes a PNG; give a file name ending in .png, got {plot}")
    resolved = resolve_targets(list(targets))
    sizes = check_batch_sizes(sizes or [1], resolved)
    if plot and not any(t.flops for t in resolved):
        raise CompressError("--plot draws latency against FLOPs, and no target records FLOPs (ONNX files "
                            "without export metadata and engine files have none)")
    threads, clock = _threads_and_clock(threads, clock, gate, saved_settings)
    settings = Settings(threads=threads, warmup_s=warmup, min_time_s=duration, min_iters=min_iters, clock=clock,
                        tf32=tf32, sessions=sessions)

    from compress.progress import console

    if settings.clock == "wall" and (warning := busy_warning(settings.threads)):
        console.print(warning, highlight=False, markup=False, soft_wrap=True)
    run = _measure(resolved, backends, sizes, settings)
    verdicts = _judge(run, gate, saved)
    out.print(table(run))
    if note := oversubscription_note(run):
        console.print(note, highlight=False, markup=False, soft_wrap=True)
    if json_path:
        doc = to_json(run, verdicts)
        doc["settings"].update(gate=_gate_record(gate, baseline))
        out.print(f"wrote {write_json(doc, json_path)}", highlight=False)
    if plot:
        from bench.plot import plot_latency_vs_flops

        out.print(f"wrote {plot_latency_vs_flops(run.results, plot)}", highlight=False)
    if verdicts is not None:
        for v in verdicts if len(verdicts) > 1 else ():
            mark = "FAIL" if v.failed else "ok  "
            out.print(f"  {mark} {v.describe()}", highlight=False, markup=False, soft_wrap=True)
        failed, line = verdict_line(verdicts)
        if failed:
            raise CheckFailed(line)
        out.print(line, highlight=False, markup=False, soft_wrap=True)
    return run


def _stdout() -> Console:
    """Standard output; wide when it is a log file, so the table's columns are not squeezed."""
    console = Console()
    if not console.is_terminal:
        console.width = 160
    return console


def _threads_and_clock(threads: int | None, clock: str | None, gate: Gate | None,
                       saved_settings: dict) -> tuple[int, str]:
    """Flags win; then a --baseline file's settings (so the two measurements compare); then, for a
    gate, one thread timed by its CPU time: on a shared machine, multi-threaded wall-clock latency is
    decided by the scheduler, and identical models measured side by side can differ by 30%."""
    if saved_settings:
        saved_threads = saved_settings.get("threads")
        threads = threads or (saved_threads if isinstance(saved_threads, int) and saved_threads > 0 else None)
        clock = clock or saved_settings.get("clock") or "wall"
    if gate is not None and threads is None and clock is None:
        return 1, "cpu"
    clock = clock or "wall"
    return threads or (1 if clock == "cpu" else physical_cores()), clock


def _gate(targets: Sequence[str], baseline: str | None, max_regression: float | None,
          min_speedup: float | None, alpha: float) -> Gate | None:
    if max_regression is None and min_speedup is None:
        if baseline:
            raise CompressError("--baseline needs --max-regression (or --min-speedup) to say what fails")
        return None
    gate = Gate(max_regression=max_regression, min_speedup=min_speedup, alpha=alpha)
    if baseline is None and len(targets) < 2:
        raise CompressError("the latency gate needs a baseline: give BASE NEW targets, or --baseline FILE")
    return gate


def _measure(targets: list[Target], backends: list[str] | None, sizes: list[int], settings: Settings) -> BenchRun:
    from compress.progress import console, progress_bars

    with progress_bars() as bars:
        tasks: dict[str, int] = {}

        def progress(label: str, fraction: float) -> None:
            if bars is None:
                if fraction >= 1:
                    console.print(f"measured {label}", highlight=False)
                return
            if label not in tasks:
                tasks[label] = bars.add_task(label, total=100, metrics="")
            bars.update(tasks[label], completed=round(100 * fraction))

        return benchmark(targets, backends=backends, batch_sizes=sizes, settings=settings, progress=progress,
                         on_skip=lambda s: console.print(s.line(), highlight=False, markup=False))


def _judge(run: BenchRun, gate: Gate | None, saved: list[Result] | None) -> list[Verdict] | None:
    if gate is None:
        return None
    pairs = pairs_against_saved(saved, run.results) if saved is not None else pair_with_baseline(run.results,
                                                                                                   run.baseline)
    return judge_all(pairs, gate)


def _gate_record(gate: Gate | None, baseline: str | None) -> dict | None:
    if gate is None:
        return None
    return {"max_regression": gate.max_regression, "min_speedup": gate.min_speedup, "alpha": gate.alpha,
            "baseline_file": baseline}
