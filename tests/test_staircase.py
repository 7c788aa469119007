"""The channel block of a latency target (bench/staircase.py): the decision on known timings, and the
real probe on ONNX Runtime CPU, measured once and then read from the cache."""

from __future__ import annotations

import random

import pytest

from bench.lut_cache import TableCache, TableTarget
from bench.staircase import CANDIDATES, PROBE_WIDTHS, block_of, channel_block

WIDTHS = list(PROBE_WIDTHS)


def _stairs(block: int, noise: float = 0.0, seed: int = 0) -> list[float]:
    """A 3×3 convolution's cost (∝ in × out width) computed in whole blocks, times random noise."""
    rng = random.Random(seed)
    return [(-(-w // block) * block) ** 2 * 1e-4 * (1 + rng.uniform(-noise, noise)) for w in WIDTHS]


@pytest.mark.parametrize("block", [8, 16, 32])
def test_a_staircase_is_found_at_its_own_block(block):
    assert block_of(WIDTHS, _stairs(block)) == block


@pytest.mark.parametrize("seed", range(5))
def test_a_noisy_staircase_is_still_found(seed):
    """±3% noise per width (a shared machine) neither hides the 16-channel steps nor doubles them."""
    assert block_of(WIDTHS, _stairs(16, noise=0.03, seed=seed)) == 16


def test_a_smooth_cost_has_no_block():
    assert block_of(WIDTHS, [w * w * 1e-4 for w in WIDTHS]) == 1
    assert block_of(WIDTHS, [1.0] * len(WIDTHS)) == 1               # flat: no step costs anything


def test_the_probe_is_measured_once_then_cached(tmp_path):
    said: list[str] = []
    target = TableTarget("onnxruntime", threads=1, clock="cpu")
    first = channel_block(target, TableCache(tmp_path), said.append)
    assert first["block"] in (1, *CANDIDATES) and len(first["probes"]) == 2
    assert all(len(p["ms"]) == len(WIDTHS) and min(p["ms"]) > 0 for p in first["probes"])
    assert len(said) == 1 and "channel block" in said[0]
    again = channel_block(target, TableCache(tmp_path), said.append)
    assert again == first and len(said) == 1
