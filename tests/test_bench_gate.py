"""The latency gate's verdicts on synthetic samples: fail only on large AND significant slowdowns."""

import numpy as np
import pytest

from bench.compare import pair_with_baseline, speedup_of, speedups
from bench.gate import Gate, judge, judge_all, pairs_against_saved, verdict_line
from bench.measure import Result
from bench.stats import summarize
from compress.errors import CompressError


def result(target, samples, backend="onnxruntime", batch_size=1, flops=None):
    samples = np.asarray(samples, dtype=float)
    return Result(target=target, backend=backend, batch_size=batch_size, samples_ms=samples,
                  summary=summarize(samples, batch_size), flops=flops, params=None, device="cpu",
                  timing="test", cold_start_ms=0.0, load_ms=0.0)


def noisy(median, n, seed, spread=0.04, spikes=0.03):
    """Shared-machine-like latencies: lognormal jitter plus rare 3-10x preemption spikes."""
    rng = np.random.default_rng(seed)
    s = rng.lognormal(np.log(median), spread, n)
    hit = rng.random(n) < spikes
    s[hit] *= rng.uniform(3, 10, hit.sum())
    return s


REGRESSION = Gate(max_regression=0.10)


def test_gate_needs_exactly_one_valid_limit():
    for bad in (dict(), dict(max_regression=0.1, min_speedup=1.2), dict(max_regression=-0.1),
                dict(min_speedup=0), dict(max_regression=0.1, alpha=1.5)):
        with pytest.raises(CompressError):
            Gate(**bad)
    assert Gate(max_regression=0.1).limit == pytest.approx(1.1)
    assert Gate(min_speedup=1.25).limit == pytest.approx(0.8)


def test_same_distribution_never_fails():
    for seed in range(100):
        v = judge(result("A", noisy(2.0, 400, seed)), result("B", noisy(2.0, 400, 1000 + seed)), REGRESSION)
        assert not v.failed, v.describe()


def test_thirty_percent_slower_always_fails():
    for seed in range(50):
        v = judge(result("A", noisy(2.0, 200, seed)), result("B", noisy(2.6, 200, 1000 + seed)), REGRESSION)
        assert v.failed, v.describe()
        assert v.ratio == pytest.approx(1.3, rel=0.05)


def test_large_but_insignificant_slowdown_passes():
    """15% slower medians from five very noisy samples each: beyond the limit, not significant."""
    base = result("A", [1.0, 3.0, 1.2, 2.9, 1.1])
    new = result("B", [1.4, 1.1, 3.1, 1.38, 2.8])
    v = judge(base, new, REGRESSION)
    assert v.exceeds and not v.significant and not v.failed
    failed, line = verdict_line([v])
    assert not failed and "not significant" in line


def test_significant_but_small_slowdown_passes():
    """A real 4% slowdown measured very precisely is significant but within a 10% limit."""
    v = judge(result("A", noisy(2.0, 3000, 1, spread=0.01, spikes=0)),
              result("B", noisy(2.08, 3000, 2, spread=0.01, spikes=0)), REGRESSION)
    assert v.significant and not v.exceeds and not v.failed


def test_min_speedup_gate():
    dense = result("dense", noisy(4.0, 300, 1))
    pruned = result("pruned", noisy(2.0, 300, 2))
    assert not judge(dense, pruned, Gate(min_speedup=1.5)).failed
    v = judge(dense, pruned, Gate(min_speedup=2.5))
    assert v.failed and "required >= 2.50x" in v.describe()
    # The same pruned model, 2x faster, with a requirement of exactly 2x: noise must not fail it.
    for seed in range(30):
        v = judge(result("d", noisy(4.0, 400, seed)), result("p", noisy(2.0, 400, 100 + seed)), Gate(min_speedup=2.0))
        assert not v.failed


def test_verdict_line_names_the_worst_failure():
    base = result("base", noisy(1.0, 300, 1))
    verdicts = judge_all([(base, result("slightly", noisy(1.02, 300, 2))),
                          (base, result("much", noisy(1.6, 300, 3)))], REGRESSION)
    failed, line = verdict_line(verdicts)
    assert failed
    assert line.startswith("latency gate FAILED: much is 6") and "1 of 2 comparisons failed" in line
    passed, line = verdict_line(verdicts[:1])
    assert not passed and line.startswith("latency gate passed")


def test_judge_all_refuses_nothing_to_compare():
    with pytest.raises(CompressError, match="nothing to compare"):
        judge_all([], REGRESSION)


def test_pairs_against_saved_matches_target_backend_and_batch():
    saved = [result("runs/p", [1.0, 1.1], "onnxruntime", 1), result("runs/p", [5.0, 5.1], "onnxruntime", 32),
             result("runs/p", [2.0, 2.1], "torch", 1)]
    new = [result("runs/p", [1.0], "onnxruntime", 1), result("runs/p", [2.0], "torch", 8)]
    pairs = pairs_against_saved(saved, new)
    assert [(b.backend, b.batch_size, n.batch_size) for b, n in pairs] == [("onnxruntime", 1, 1)]
    # A saved file with a single target matches a renamed target.
    assert len(pairs_against_saved(saved, [result("elsewhere/p", [1.0], "onnxruntime", 1)])) == 1
    two = saved + [result("runs/d", [3.0], "onnxruntime", 1)]
    with pytest.raises(CompressError, match="none is x"):
        pairs_against_saved(two, [result("x", [1.0])])
    with pytest.raises(CompressError, match="no measurement matches"):
        pairs_against_saved(saved, [result("runs/p", [1.0], "torch", 64)])


def test_speedup_and_fidelity_follow_design_definitions():
    base = result("dense", noisy(4.0, 300, 1, spikes=0), flops=1000)
    pruned = result("pruned", noisy(2.0, 300, 2, spikes=0), flops=400)
    s = speedup_of(base, pruned)
    assert s.speedup == pytest.approx(base.summary.median_ms / pruned.summary.median_ms)
    assert s.flops_ratio == pytest.approx(0.4)
    assert s.fidelity == pytest.approx(s.speedup / (1000 / 400))
    assert s.ci_low < s.speedup < s.ci_high


def test_speedups_pair_by_backend_and_batch_and_tolerate_missing_flops():
    rs = [result("d", [4.0, 4.1], "torch", 1, flops=10), result("p", [2.0, 2.1], "torch", 1, flops=None),
          result("p", [2.0], "onnxruntime", 1, flops=None)]
    assert [(b.target, o.target) for b, o in pair_with_baseline(rs, "d")] == [("d", "p")]
    (s,) = speedups(rs, "d", resamples=100)
    assert s.flops_ratio is None and s.fidelity is None and s.speedup > 1.9
