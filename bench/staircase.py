"""The channel block of a latency target: how many channels its convolution kernels work on at once.

Backends compute channels in blocks: ONNX Runtime's CPU kernels (MLAS) keep activations in a blocked
NCHWc layout, 8 channels per block with AVX2 and 16 with AVX-512; GPU tensor cores take channel
multiples of 8 or more. A width inside a block costs what the whole block costs: measured here
(ONNX Runtime CPU, AVX-512, 1 thread, 3×3 convolution at 28×28 px, in = out width) 104 channels take
1.047 ms and 112 take 1.048 ms, 120 take 1.342 ms and 128 take 1.336 ms. A pruner that knows this
keeps every group at a block multiple, where the last channels are free; the latency tables, measured
on a coarse grid of widths and interpolated in between, cannot see steps that fine by themselves.

`channel_block` finds the block by measuring, on the target itself, a 3×3 and a 1×1 convolution at
every multiple of `PROBE_STEP` channels across a few blocks (`block_of` decides); the answer is cached
with the tables (bench/lut_cache.py). 1 means no step was found: widths then move in --round-to steps
as before.
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path
from typing import Any

from bench.lut_cache import TableCache, TableTarget
from compress.pruning.latency_model import LayerNeed, LayerShape

PROBE_STEP = 4                          # channels between probed widths
PROBE_WIDTHS = tuple(range(96, 161, PROBE_STEP))
CANDIDATES = (64, 32, 16, 8)            # blocks tried, largest first
SAVES_AT_MOST = 0.3                     # a block: widths inside it save < 30% of what a straight line would
PROBE_LAYERS = (                        # (kernel, spatial size): the two kinds of layer most FLOPs sit in
    (3, 28),
    (1, 14),
)
# Three pooled sessions per width: one session's median of a 60-µs layer can sit 20% off (where its
# buffers land), enough to hide a step or invent one (docs/benchmarking.md, "Sessions").
PROBE_SETTINGS = {"warmup_s": 0.02, "warmup_iters": 3, "min_time_s": 0.15, "min_iters": 8, "block_s": 0.005,
                  "watch_contention": False, "sessions": 3}
PROBE_VERSION = 2


def block_of(widths: list[int], ms: list[float], candidates: tuple[int, ...] = CANDIDATES) -> int:
    """The largest candidate block that the timings `ms` at `widths` show as a staircase, or 1.

    For a block P, a width w between two multiples f < w < c = f + P saves, against c, the share
    s = (t(c) − t(w)) / (t(c) − t(f)) of a whole block's cost. A straight line in width predicts
    s = (c − w) / P; a staircase predicts s = 0. P is accepted when, over all such widths probed, the
    mean s is below SAVES_AT_MOST × the straight line's mean and whole blocks do cost more
    (t(c) > t(f) on average). (Twice the true block shows s ≈ 0.57 × the line, so 0.3 keeps a margin.)"""
    t = dict(zip(widths, ms, strict=True))
    for p in candidates:
        saved, line, steps = [], [], []
        for w in widths:
            f, c = (w // p) * p, (w // p + 1) * p
            if w % p == 0 or f not in t or c not in t:
                continue
            step = t[c] - t[f]
            steps.append(step)
            if step > 0:
                saved.append((t[c] - t[w]) / step)
                line.append((c - w) / p)
        if len(saved) >= 2 and statistics.mean(steps) > 0 \
                and statistics.mean(saved) < SAVES_AT_MOST * statistics.mean(line):
            return p
    return 1


def probe_shape(kernel: int, size: int, width: int) -> LayerShape:
    """A convolution with BatchNorm and ReLU, `width` channels in and out, at `size`² pixels."""
    return LayerShape(op="conv", input_shape=(width, size, size), channel_dim=0, cin=width, cout=width,
                      kernel=(kernel, kernel), stride=(1, 1), padding=(kernel // 2, kernel // 2), dilation=(1, 1),
                      bn=True, act="relu")


def channel_block(target: TableTarget, cache: TableCache, say=None) -> dict[str, Any]:
    """{"block": channels, "probes": the timings it was decided from}, measured once per target and cached."""
    key = {"kind": "channel-block", **target.environment(), "version": PROBE_VERSION, "widths": list(PROBE_WIDTHS),
           "layers": [list(p) for p in PROBE_LAYERS], "candidates": list(CANDIDATES)}

    def usable(p) -> str | None:
        ok = isinstance(p, dict) and p.get("block") in (1, *CANDIDATES) and isinstance(p.get("probes"), list)
        return None if ok else "expected a block and its probe timings"

    payload = cache.get(key, check=usable)
    if payload is not None:
        return payload
    if say:
        say(f"finding the channel block of {target.describe()} ({len(PROBE_LAYERS)} layers × "
            f"{len(PROBE_WIDTHS)} widths)")
    probes = [_probe(target, kernel, size) for kernel, size in PROBE_LAYERS]
    blocks = [block_of(list(PROBE_WIDTHS), p["ms"]) for p in probes]
    payload = {"block": min(blocks), "probes": [{**p, "block": b} for p, b in zip(probes, blocks, strict=True)]}
    cache.put(key, payload)
    return payload


def _probe(target: TableTarget, kernel: int, size: int) -> dict[str, Any]:
    """Median latency of the probe layer at every probed width, all widths interleaved."""
    from bench.lut import layer_contenders
    from bench.measure import Settings, measure_interleaved, to_results

    settings = Settings(threads=target.threads, clock=target.clock, **PROBE_SETTINGS)
    with tempfile.TemporaryDirectory(prefix="compress-block-") as scratch:
        contenders = [c for w in PROBE_WIDTHS for c in layer_contenders(
            LayerNeed(f"probe{kernel}x{kernel}", probe_shape(kernel, size, w), [w], [w]), w, w, 1, target,
            Path(scratch), str(w), settings)]
        measure_interleaved(contenders, target.batch_size, settings)
        ms = [r.summary.median_ms for r in to_results(contenders, target.backend, target.batch_size)]
    return {"kernel": kernel, "size": size, "widths": list(PROBE_WIDTHS), "ms": [round(m, 5) for m in ms]}
