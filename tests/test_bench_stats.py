"""Statistics of the bench on synthetic samples: summaries, bootstrap intervals, the rank test."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.stats import UNSTABLE_CV, bootstrap_speedup_ci, slower_p_value, summarize


def test_summary_matches_definitions():
    samples = np.arange(1.0, 101.0)  # 1 … 100 ms
    s = summarize(samples, batch_size=4)
    assert s.n == 100
    assert s.median_ms == pytest.approx(50.5)
    assert s.p90_ms == pytest.approx(90.1)  # linear interpolation, as numpy.percentile
    assert s.p99_ms == pytest.approx(99.01)
    assert s.min_ms == 1.0
    assert s.cv == pytest.approx(np.std(samples, ddof=1) / np.mean(samples))
    assert s.throughput == pytest.approx(4 * 1000 / 50.5)


def test_unstable_flag_follows_cv_threshold():
    rng = np.random.default_rng(0)
    steady = summarize(10 + rng.normal(0, 0.1, 500), 1)
    noisy = summarize(10 + rng.normal(0, 1.0, 500), 1)
    assert steady.cv < UNSTABLE_CV and not steady.unstable
    assert noisy.cv > UNSTABLE_CV and noisy.unstable


def test_single_sample_has_zero_cv_and_empty_is_refused():
    assert summarize(np.array([3.0]), 1).cv == 0.0
    with pytest.raises(ValueError):
        summarize(np.array([]), 1)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(0.01, 1e4), min_size=1, max_size=200), st.integers(1, 256))
def test_summary_orders_percentiles(samples, batch):
    s = summarize(np.array(samples), batch)
    assert s.min_ms <= s.median_ms <= s.p90_ms <= s.p99_ms <= max(samples) + 1e-9
    assert s.throughput == pytest.approx(batch * 1000 / s.median_ms)


def test_bootstrap_interval_brackets_true_speedup_and_is_reproducible():
    rng = np.random.default_rng(1)
    base = rng.lognormal(np.log(10.0), 0.05, 400)
    fast = rng.lognormal(np.log(4.0), 0.05, 400)
    lo, hi = bootstrap_speedup_ci(base, fast, seed=3)
    assert lo < 2.5 < hi
    assert hi - lo < 0.1
    assert (lo, hi) == bootstrap_speedup_ci(base, fast, seed=3)


def test_bootstrap_interval_covers_true_ratio_about_95_percent():
    """Coverage over independent synthetic experiments (true median ratio = 2)."""
    hits = 0
    for seed in range(100):
        rng = np.random.default_rng(100 + seed)
        base = rng.lognormal(np.log(2.0), 0.2, 150)
        new = rng.lognormal(np.log(1.0), 0.2, 150)
        lo, hi = bootstrap_speedup_ci(base, new, resamples=500, seed=seed)
        hits += lo <= 2.0 <= hi
    assert 85 <= hits <= 100


def test_bootstrap_interval_widens_with_fewer_samples():
    rng = np.random.default_rng(2)
    a, b = rng.lognormal(0, 0.2, 2000), rng.lognormal(0, 0.2, 2000)
    lo_many, hi_many = bootstrap_speedup_ci(a, b)
    lo_few, hi_few = bootstrap_speedup_ci(a[:20], b[:20])
    assert hi_few - lo_few > 3 * (hi_many - lo_many)
    assert lo_many < 1.0 < hi_many


def test_bootstrap_handles_large_sample_counts_in_chunks():
    rng = np.random.default_rng(3)
    lo, hi = bootstrap_speedup_ci(rng.normal(10, 0.5, 20_000), rng.normal(5, 0.25, 20_000), resamples=300)
    assert 1.98 < lo <= hi < 2.02


def test_rank_test_detects_real_slowdown_only():
    rng = np.random.default_rng(4)
    base = rng.lognormal(np.log(10), 0.05, 300)
    slower = rng.lognormal(np.log(11), 0.05, 300)
    same = rng.lognormal(np.log(10), 0.05, 300)
    assert slower_p_value(base, slower) < 1e-10
    assert slower_p_value(slower, base) > 0.99  # one-sided: faster is never "slower"
    assert slower_p_value(base, same) > 0.001


def test_rank_test_is_robust_to_outliers():
    """Ten huge preemption spikes in the baseline do not make an equal candidate look faster or slower."""
    rng = np.random.default_rng(5)
    base = rng.normal(10, 0.2, 300)
    base[:10] = 500.0
    new = rng.normal(10, 0.2, 300)
    assert slower_p_value(base, new) > 0.001


def test_rank_test_constant_samples():
    assert slower_p_value(np.full(10, 2.0), np.full(10, 2.0)) == 1.0
    assert slower_p_value(np.full(10, 2.0), np.full(10, 3.0)) < 1e-3
