"""Side-by-side comparison: speedup over the baseline with a bootstrap interval, and speedup fidelity.

design.md: speedup = baseline latency ÷ target latency (same run, backend, batch size);
flops ratio = target FLOPs ÷ baseline FLOPs; fidelity = speedup ÷ (baseline FLOPs ÷ target FLOPs).
"""

from __future__ import annotations

from dataclasses import dataclass

from bench.measure import Result
from bench.stats import bootstrap_speedup_ci


@dataclass(frozen=True)
class Speedup:
    baseline: str
    target: str
    backend: str
    batch_size: int
    speedup: float
    ci_low: float
    ci_high: float
    flops_ratio: float | None
    fidelity: float | None


def pair_with_baseline(results: list[Result], baseline: str) -> list[tuple[Result, Result]]:
    """(baseline result, other result) for every other target measured on the same backend and batch."""
    base = {(r.backend, r.batch_size): r for r in results if r.target == baseline}
    return [(base[(r.backend, r.batch_size)], r) for r in results
            if r.target != baseline and (r.backend, r.batch_size) in base]


def speedup_of(base: Result, other: Result, *, resamples: int = 2000, seed: int = 0) -> Speedup:
    speedup = base.summary.median_ms / other.summary.median_ms
    lo, hi = bootstrap_speedup_ci(base.samples_ms, other.samples_ms, resamples=resamples, seed=seed)
    flops_ratio = other.flops / base.flops if other.flops and base.flops else None
    fidelity = speedup * flops_ratio if flops_ratio is not None else None
    return Speedup(baseline=base.target, target=other.target, backend=other.backend, batch_size=other.batch_size,
                   speedup=speedup, ci_low=lo, ci_high=hi, flops_ratio=flops_ratio, fidelity=fidelity)


def speedups(results: list[Result], baseline: str, *, resamples: int = 2000, seed: int = 0) -> list[Speedup]:
    return [speedup_of(b, o, resamples=resamples, seed=seed) for b, o in pair_with_baseline(results, baseline)]
