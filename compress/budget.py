"""What a prune aims at — a FLOPs ratio or a measured latency ratio on a target — and how it is checked.

A `Budget` is the user's request (`--flops-ratio R`, or `--latency-ratio R` with `--latency-backend`,
`--latency-threads`, `--latency-batch-size`). A `Meter` turns it into the two things the prune
pipeline needs: the engine cost model that target selection, PASS's penalty and VPNs' threshold
optimise against (FLOPs: the analytic fvcore model; latency: per-layer lookup tables measured on the
target, bench/lut.py), and the ground truth the pipeline's calibration confirms a selection with
(FLOPs: real fvcore on a slimmed copy; latency: the slimmed copy timed against the dense network on
the target with the bench runners, interleaved).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from compress.errors import CompressError
from compress.pruning.cost import CostModel
from compress.pruning.groups import ChannelGroup, find_groups
from compress.pruning.slim import slim
from compress.pruning.structure import module_copy
from compress.pruning.target import check_ratio
from compress.tokens import backbone_of

KINDS = ("flops", "latency")
FLOPS_TOLERANCE = 0.02          # |achieved − target| the FLOPs calibration settles for
LATENCY_TOLERANCE = 0.03        # |measured ÷ target − 1| the latency calibration settles for


@dataclass(frozen=True)
class Budget:
    """The target of one prune."""

    kind: str                       # "flops" or "latency"
    ratio: float
    backend: str = "onnxruntime"    # latency only: where it is measured
    threads: int | None = None      # None: the machine's physical cores
    batch_size: int = 1
    clock: str = "wall"
    precision: str = "fp32"         # the target's arithmetic (fp16/bf16: torch-cuda only)
    points: int = 6                 # table widths per axis
    cache_dir: str | None = None

    @classmethod
    def from_flags(cls, flops_ratio: float | None, latency_ratio: float | None, **latency: Any) -> Budget:
        """Exactly one of the two ratios; the latency options only with --latency-ratio."""
        if (flops_ratio is None) == (latency_ratio is None):
            raise CompressError("give exactly one of --flops-ratio R or --latency-ratio R")
        given = {k: v for k, v in latency.items() if v is not None}
        if flops_ratio is not None:
            if given:
                flag = "--latency-" + next(iter(given)).replace("_", "-").replace("cache-dir", "cache")
                raise CompressError(f"{flag} goes with --latency-ratio, not with --flops-ratio")
            return cls("flops", flops_ratio)
        return cls("latency", latency_ratio, **given)

    @property
    def flag(self) -> str:
        return f"--{self.kind}-ratio"

    @property
    def allocation(self) -> str:
        """The default width allocation: importance-ranked for FLOPs (as published), the knapsack for latency."""
        return "knapsack" if self.kind == "latency" else "rank"

    def check(self) -> None:
        if self.kind not in KINDS:
            raise CompressError(f"unknown budget {self.kind!r}")
        check_ratio(self.ratio, self.flag)
        if self.kind == "latency":
            self.table_target()           # refuses unknown backends and bad threads/batch/clock

    def table_target(self):
        from bench.backends import parse_backends
        from bench.host import physical_cores
        from bench.lut import check_backend
        from bench.lut_cache import TableTarget

        names = parse_backends(self.backend) or []
        if len(names) != 1:
            raise CompressError(f"--latency-backend takes one backend, got {self.backend!r}")
        threads = self.threads or (1 if self.clock == "cpu" else physical_cores())
        target = TableTarget(backend=names[0], threads=threads, batch_size=self.batch_size, clock=self.clock,
                             precision=self.precision)
        check_backend(target)
        return target

    @property
    def calibration_rounds(self) -> int:
        """Selections confirmed at most: a latency allocation's measured ratio can jump between nearby
        aims (the knapsack drops a different layer), so it gets a few more rounds to bracket the target."""
        return 6 if self.kind == "latency" else 4

    def within(self, achieved: float) -> bool:
        """Whether a confirmed ratio is close enough to stop calibrating."""
        if self.kind == "flops":
            return abs(achieved - self.ratio) <= FLOPS_TOLERANCE / 4
        return abs(achieved / self.ratio - 1) <= LATENCY_TOLERANCE


def next_aim(rounds: list[tuple[float, float]], target: float) -> float:
    """The ratio to hand the cost model next, from the (aim, confirmed ratio) rounds so far.

    Once aims have confirmed ratios on both sides of the target, the linear interpolation between the
    closest such pair (regula falsi): latency is a staircase in width, so the confirmed ratio can jump
    between nearby aims, and a correction from the last round alone then oscillates across the jump
    (mobilenet_v2 at 224 px, 1 thread: aims 0.50 → 0.64 measured, 0.36 → 0.34, 0.52 → 0.64, …).
    Before that, the last aim moved by the last error."""
    below = [r for r in rounds if r[1] < target]
    above = [r for r in rounds if r[1] > target]
    if below and above:
        lo, hi = max(below), min(above)        # the highest aim still below, the lowest aim above
        if hi[0] > lo[0] and hi[1] > lo[1]:
            return lo[0] + (target - lo[1]) / (hi[1] - lo[1]) * (hi[0] - lo[0])
    aim, real = rounds[-1]
    return min(1.0, max(1e-6, aim + (target - real)))


class Meter:
    """The cost model of one prune and its ground truth, for a dense `module` (a DeployableModule) whose
    channel groups are `groups`. Use as a context manager: a latency meter holds a scratch directory.

    Under torchrun every rank must select the same masks: rank 0 alone measures (tables, calibration
    networks, slim models) and the others receive its table and figures (`rt.broadcast_object`)."""

    def __init__(self, budget: Budget, module: nn.Module, groups: list[ChannelGroup], round_to: int,
                 say=None, rt=None):
        from compress.runtime import current

        self.budget, self.rt = budget, rt or current()
        self.timer = None
        self.build: dict[str, Any] = {}
        self.cost_model: CostModel | None = groups[0].graph.flops_model if groups else None
        if budget.kind == "flops":
            return
        self.target = budget.table_target()     # resolved and checked once (a backend check may start a process)
        if groups:
            self._tables(module, groups, round_to, say)
        if self.rt.is_main:
            from bench.lut import NetworkTimer

            self.timer = NetworkTimer(module, self.target)

    def _tables(self, module: nn.Module, groups: list[ChannelGroup], round_to: int, say) -> None:
        from bench.lut import build_latency_model
        from bench.lut_cache import TableCache
        from compress.pruning.latency_model import LatencyModel

        built = None
        if self.rt.is_main:
            model, report = build_latency_model(module, groups, self.target, round_to=round_to,
                                                points=self.budget.points, cache=TableCache(self.budget.cache_dir),
                                                say=say)
            built = (model.table, {"table_layers": report.layers, "table_signatures": report.signatures,
                                   "table_measured": report.measured, "table_build_s": round(report.build_s, 2),
                                   "channel_block": model.channel_step,
                                   "table_checks": model.table.checks})
        table, self.build = self.rt.broadcast_object(built)
        self.cost_model = LatencyModel(groups, table)

    def measure(self, module: nn.Module) -> dict[str, float]:
        """The latency of `module` (a slimmed deployable module) against the dense one, interleaved."""
        figures = None
        if self.rt.is_main:
            dense, pruned = self.timer.compare([module])
            figures = {"latency_ratio": pruned.summary.median_ms / dense.summary.median_ms,
                       "latency_ms": pruned.summary.median_ms, "latency_dense_ms": dense.summary.median_ms}
        return self.rt.broadcast_object(figures)

    def report(self, module: nn.Module, predicted: float) -> dict[str, Any]:
        """The slim deployable module measured on the latency target against the dense one (report.json keys)."""
        target, measured = self.target, self.measure(module)
        return {"latency_ratio_target": self.budget.ratio, "latency_ratio": round(measured["latency_ratio"], 6),
                "latency_ratio_predicted": round(predicted, 6), "latency_backend": target.backend,
                "latency_threads": target.threads, "latency_batch_size": target.batch_size,
                "latency_clock": target.clock, "latency_precision": target.precision,
                "latency_ms": round(measured["latency_ms"], 4),
                "latency_dense_ms": round(measured["latency_dense_ms"], 4), "latency_table": self.build}

    def real_ratio(self, module: nn.Module, masks: dict[str, torch.Tensor]) -> float:
        """The latency ratio `masks` really reach: a slimmed copy of `module` (left untouched) timed
        against the dense network on the target. (A FLOPs target's truth is fvcore, in the pipeline.)"""
        return self.measure(slimmed_copy(module, masks) if self.rt.is_main else module)["latency_ratio"]

    def close(self) -> None:
        if self.timer is not None:
            self.timer.close()

    def __enter__(self) -> Meter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def slimmed_copy(module: nn.Module, masks: dict[str, torch.Tensor]) -> nn.Module:
    """A copy of the deployable `module` with `masks` applied by slimming (to the ViT inside a token-sparse
    network, when there is one); `module` is left as it was. The copy shares the tensors slimming does
    not replace (module_copy), so it costs the memory of the slimmed layers only."""
    trial = module_copy(module)
    example = trial.normalize(trial.example_input(1))
    net = backbone_of(trial.net)
    slim(net, find_groups(net, example), masks)
    return trial
