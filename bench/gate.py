"""The latency-regression gate: fail only on a slowdown that is both large and statistically real.

A comparison fails when (a) the ratio of medians target ÷ baseline exceeds the allowed limit and
(b) a one-sided Mann–Whitney U test says the target's samples are significantly slower (p < alpha).
(a) keeps the ~2–5% noise of shared CI machines from failing builds; (b) keeps a few preempted
iterations or a short burst from doing so. Both are needed, as in asv (factor and p-value).

Two forms of the limit:
- `max_regression` t: the target may be at most (1 + t)× slower; the test asks "slower at all?".
- `min_speedup` s: the target must be at least s× faster; the test asks "slower than baseline ÷ s?",
  i.e. the baseline samples are scaled by 1/s before ranking.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bench.measure import Result
from bench.stats import slower_p_value
from compress.errors import CompressError


@dataclass(frozen=True)
class Gate:
    max_regression: float | None = None
    min_speedup: float | None = None
    alpha: float = 0.01

    def __post_init__(self):
        if (self.max_regression is None) == (self.min_speedup is None):
            raise CompressError("give exactly one of --max-regression and --min-speedup")
        if self.max_regression is not None and not 0 <= self.max_regression < 10:
            raise CompressError(f"--max-regression must be a fraction in [0, 10), got {self.max_regression}")
        if self.min_speedup is not None and not 0 < self.min_speedup <= 100:
            raise CompressError(f"--min-speedup must be in (0, 100], got {self.min_speedup}")
        if not 0 < self.alpha < 1:
            raise CompressError(f"--alpha must be in (0, 1), got {self.alpha}")

    @property
    def limit(self) -> float:
        """Largest allowed latency ratio target ÷ baseline."""
        return 1 + self.max_regression if self.max_regression is not None else 1 / self.min_speedup

    @property
    def reference(self) -> float:
        """Scale of the baseline samples that the significance test compares the target against."""
        return min(self.limit, 1.0)


@dataclass(frozen=True)
class Verdict:
    baseline: str
    target: str
    backend: str
    batch_size: int
    ratio: float  # target median ÷ baseline median; > 1 means the target is slower
    p_value: float
    gate: Gate

    @property
    def exceeds(self) -> bool:
        return self.ratio > self.gate.limit

    @property
    def significant(self) -> bool:
        return self.p_value < self.gate.alpha

    @property
    def failed(self) -> bool:
        return self.exceeds and self.significant

    def describe(self) -> str:
        where = f"{self.backend}, batch {self.batch_size}"
        p = f"p={self.p_value:.2g}" if self.p_value > 0 else "p<1e-300"  # 0.0 is a float underflow
        stat = f"Mann-Whitney {p} vs alpha {self.gate.alpha:g}"
        if self.gate.min_speedup is not None:
            return (f"{self.target} is {1 / self.ratio:.2f}x as fast as {self.baseline} ({where}); "
                    f"required >= {self.gate.min_speedup:.2f}x; {stat}")
        change = (self.ratio - 1) * 100
        word = "slower" if change >= 0 else "faster"
        return (f"{self.target} is {abs(change):.1f}% {word} than {self.baseline} ({where}); "
                f"limit +{self.gate.max_regression * 100:.0f}%; {stat}")


def judge(base: Result, new: Result, gate: Gate) -> Verdict:
    ratio = new.summary.median_ms / base.summary.median_ms
    p = slower_p_value(np.asarray(base.samples_ms) * gate.reference, new.samples_ms)
    return Verdict(baseline=base.target, target=new.target, backend=new.backend, batch_size=new.batch_size,
                   ratio=ratio, p_value=p, gate=gate)


def judge_all(pairs: list[tuple[Result, Result]], gate: Gate) -> list[Verdict]:
    if not pairs:
        raise CompressError("the latency gate has nothing to compare (no target measured on the same backend "
                            "and batch size as its baseline)")
    return [judge(b, n, gate) for b, n in pairs]


def verdict_line(verdicts: list[Verdict]) -> tuple[bool, str]:
    """(failed, one line): the first failure, or the comparison closest to its limit."""
    failures = [v for v in verdicts if v.failed]
    if failures:
        worst = max(failures, key=lambda v: v.ratio / v.gate.limit)
        more = f" ({len(failures)} of {len(verdicts)} comparisons failed)" if len(verdicts) > 1 else ""
        return True, f"latency gate FAILED: {worst.describe()}{more}"
    worst = max(verdicts, key=lambda v: v.ratio / v.gate.limit)
    note = ""
    if worst.exceeds:
        note = " (beyond the limit but not significant: noise)"
    return False, f"latency gate passed: {worst.describe()}{note}; {len(verdicts)} comparison(s)"


def pairs_against_saved(saved: list[Result], results: list[Result]) -> list[tuple[Result, Result]]:
    """Match each new result with the saved result of the same target (by label; a saved file with a
    single target matches any) on the same backend and batch size."""
    saved_targets = list(dict.fromkeys(r.target for r in saved))
    pairs = []
    for r in results:
        name = r.target if r.target in saved_targets else (saved_targets[0] if len(saved_targets) == 1 else None)
        if name is None:
            raise CompressError(f"the baseline file has targets {', '.join(saved_targets)}; none is {r.target}")
        match = [s for s in saved if s.target == name and s.backend == r.backend and s.batch_size == r.batch_size]
        if match:
            pairs.append((match[0], r))
    if not pairs:
        have = sorted({(s.backend, s.batch_size) for s in saved})
        raise CompressError("no measurement matches the baseline file's backends and batch sizes "
                            f"({', '.join(f'{b} batch {n}' for b, n in have)})")
    return pairs
