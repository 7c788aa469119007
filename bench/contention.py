"""Did the benchmark get the CPUs it asked for? The scheduler's own account, per measurement.

Linux records, for every thread, how long it was runnable but waiting for a CPU (the second field
of /proc/<pid>/task/<tid>/schedstat, in ns). On an idle machine a benchmark's threads hardly ever
wait; when another process spins on the cores, they wait for most of each run, and multi-threaded
PyTorch falls off a cliff: each parallel region ends at a barrier that waits for the thread the
scheduler preempted (a ResNet-20 went from 2.3 ms to 650 ms per batch-1 inference). The load
average, which bench also reports, lags by a minute and counts the benchmark itself; run-queue
wait does neither, so a result measured while it was high is marked `oversubscribed`.
"""

from __future__ import annotations

import os

# Fraction of the measured time the runner's threads spent waiting for a CPU above which a
# result is marked oversubscribed (0 on an idle machine; ~0.5 when another process spins on
# every core). See docs/benchmarking.md for the figures behind it.
OVERSUBSCRIBED_WAIT = 0.2
TASKS = "/proc/self/task"


def run_queue_wait_ns() -> int | None:
    """Total time every thread of this process has waited for a CPU (ns); None where the kernel
    does not account it (no /proc/…/schedstat: not Linux, or schedstats compiled out)."""
    try:
        tasks = list(os.scandir(TASKS))
    except OSError:
        return None
    total, seen = 0, False
    for task in tasks:
        try:
            with open(os.path.join(task.path, "schedstat")) as f:
                total += int(f.read().split()[1])
            seen = True
        except (OSError, ValueError, IndexError):  # a thread that ended meanwhile, or no schedstat
            continue
    return total if seen else None


def wait_fraction(wait_ns: int, wall_ns: int, threads: int) -> float:
    """Share of the time `threads` busy threads spent waiting for a CPU over `wall_ns` of measurement."""
    if wall_ns <= 0 or threads < 1:
        return 0.0
    return max(0.0, wait_ns / (wall_ns * threads))
