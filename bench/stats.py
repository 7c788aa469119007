"""Statistics of latency samples: robust summaries, a bootstrap interval for speedups, a rank test.

Latency distributions are skewed and noisy (shared machines, GC, frequency scaling), so every
figure here is built on medians and percentiles, never on means alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats as sps

UNSTABLE_CV = 0.05


@dataclass(frozen=True)
class Summary:
    """What one target × backend × batch size measured (milliseconds per batch)."""

    n: int
    median_ms: float
    mean_ms: float
    min_ms: float
    p90_ms: float
    p99_ms: float
    cv: float
    throughput: float  # images per second at the median latency

    @property
    def unstable(self) -> bool:
        return self.cv > UNSTABLE_CV


def summarize(samples_ms: np.ndarray, batch_size: int) -> Summary:
    """Median, p90, p99 and coefficient of variation (sample std ÷ mean) of `samples_ms`."""
    s = np.asarray(samples_ms, dtype=np.float64)
    if s.size == 0:
        raise ValueError("no samples to summarize")
    median = float(np.median(s))
    mean = float(s.mean())
    cv = float(s.std(ddof=1) / mean) if s.size > 1 and mean > 0 else 0.0
    p90, p99 = (float(v) for v in np.percentile(s, [90, 99]))
    return Summary(n=int(s.size), median_ms=median, mean_ms=mean, min_ms=float(s.min()), p90_ms=p90,
                   p99_ms=p99, cv=cv, throughput=batch_size * 1000.0 / median)


def _bootstrap_medians(s: np.ndarray, resamples: int, rng: np.random.Generator, chunk: int) -> np.ndarray:
    out = np.empty(resamples)
    for start in range(0, resamples, chunk):
        stop = min(resamples, start + chunk)
        idx = rng.integers(0, s.size, size=(stop - start, s.size))
        out[start:stop] = np.median(s[idx], axis=1)
    return out


def bootstrap_speedup_ci(baseline_ms: np.ndarray, target_ms: np.ndarray, *, confidence: float = 0.95,
                         resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap interval of median(baseline) ÷ median(target).

    Each side is resampled independently (the samples are interleaved in time, not paired
    one-to-one), and the interval is read off the distribution of the ratio of medians.
    """
    a = np.asarray(baseline_ms, dtype=np.float64)
    b = np.asarray(target_ms, dtype=np.float64)
    if a.size == 0 or b.size == 0:
        raise ValueError("bootstrap needs samples on both sides")
    rng = np.random.default_rng(seed)
    # Bound the resample matrix to ~4M entries so 10k-sample runs stay cheap in memory.
    chunk = max(1, 4_000_000 // max(a.size, b.size))
    ratios = _bootstrap_medians(a, resamples, rng, chunk) / _bootstrap_medians(b, resamples, rng, chunk)
    tail = (1.0 - confidence) / 2.0 * 100.0
    lo, hi = np.percentile(ratios, [tail, 100.0 - tail])
    return float(lo), float(hi)


def slower_p_value(reference_ms: np.ndarray, candidate_ms: np.ndarray) -> float:
    """One-sided Mann–Whitney U p-value for "candidate latencies are stochastically larger".

    Rank-based, so a few outliers (a preempted iteration on a shared machine) cannot decide it.
    """
    a = np.asarray(reference_ms, dtype=np.float64)
    b = np.asarray(candidate_ms, dtype=np.float64)
    if a.size == 0 or b.size == 0:
        raise ValueError("Mann-Whitney U needs samples on both sides")
    if np.array_equal(np.unique(a), np.unique(b)) and np.unique(a).size == 1:
        return 1.0  # identical constant samples: no evidence either way (scipy would return nan)
    return float(sps.mannwhitneyu(b, a, alternative="greater").pvalue)
