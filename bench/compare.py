"""Side-by-side comparison: speedup over the baseline with a bootstrap interval, and speedup fidelity.

design.md: speedup = baseline latency ÷ target latency (same run, backend, batch size);
flops ratio = target FLOPs ÷ baseline FLOPs; fidelity = speedup ÷ (baseline FLOPs ÷ target FLOPs);
latency-target error = (target latency ÷ baseline latency) ÷ the latency ratio the run was pruned to − 1.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

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
    latency_ratio_target: float | None = None   # what the target was pruned to (same backend, batch, threads)
    latency_target_error: float | None = None   # measured latency ratio ÷ that target − 1


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


def speedups(results: list[Result], baseline: str, *, resamples: int = 2000, seed: int = 0,
             latency_targets: dict[str, dict] | None = None, threads: int | None = None) -> list[Speedup]:
    """Every target against the baseline. `latency_targets` (label → what a run was pruned to, from its
    report.json) adds the latency-target error where backend, batch size and threads are the ones it
    was pruned for; the baseline must be the dense model for that error to mean anything."""
    out = []
    for b, o in pair_with_baseline(results, baseline):
        up = speedup_of(b, o, resamples=resamples, seed=seed)
        aim = (latency_targets or {}).get(o.target)
        if aim and aim.get("backend") == o.backend and aim.get("batch_size") in (None, o.batch_size) \
                and aim.get("threads") in (None, threads):
            up = replace(up, latency_ratio_target=aim["ratio"],
                         latency_target_error=(1.0 / up.speedup) / aim["ratio"] - 1.0)
        out.append(up)
    return out
