"""Latency lookup tables measured on the target backend, and whole networks timed the same way.

`build_latency_model(module, groups, TableTarget(...))` measures, for every convolution/Linear layer
whose width pruning can change, its latency over a grid of input × output widths (compress.pruning.
latency_model.layer_shapes says which layers and widths), with the bench runners and the bench's
interleaved measurement and statistics (median of each grid point, all points of one layer
interleaved, so a drifting machine shifts them alike). A point's latency is the layer's twin minus
the layer alone (bench/layers.py): what the layer adds inside a network, without the call, output
copy and layout reorders that only a layer timed alone pays. Layers with the same signature are measured
once; every table is cached on disk (bench/lut_cache.py) and reused across runs and models. The
whole dense network is measured too, and networks with every group slimmed to a common share of
its width, down to every group at its narrowest: they calibrate the map from the tables' raw ratio
to the measured ratio (LatencyTable.calibration); each is also predicted from the others alone
(leave-one-out), the honest figure of how well the tables predict a network they were not fitted on.
"""

from __future__ import annotations

import copy
import hashlib
import math
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench.backends import RUNNERS
from bench.layers import onnx_layer, torch_layer
from bench.lut_cache import TableCache, TableTarget, check_grid
from bench.measure import Contender, Result, Settings, load_sessions, measure_interleaved, sessions_of, to_results
from bench.staircase import channel_block
from bench.targets import Target
from compress.errors import CompressError
from compress.pruning.allocation import AllowedCounts
from compress.pruning.groups import ChannelGroup, find_groups
from compress.pruning.latency_model import LatencyModel, LatencyTable, LayerNeed, LayerTable, layer_shapes
from compress.pruning.latency_stages import fit_stage_scales, stage_allocations
from compress.pruning.slim import slim

DEFAULT_POINTS = 6
MEASURE = "twin-minus-single"      # how a grid point's latency is obtained (bench/layers.py)
FLOOR = 0.05                       # a marginal cost below this share of the single layer's time is noise
# Calibration networks: every group at this share of its width; 0 is every group at its narrowest allowed
# width, so the map is measured down to the floor a target can ask for instead of extrapolated there
# (ResNet-18 at 2 threads: a 0.31 allocation measured 0.311 where the extrapolated map said 0.284), and
# the smallest reachable ratio a refusal names is a measurement.
CHECK_FRACTIONS = (0.75, 0.5, 0.35, 0.0)
ONNX_BACKENDS = ("onnxruntime", "ort-cuda", "ort-trt", "tensorrt")
LAYER_SETTINGS = {"warmup_s": 0.02, "warmup_iters": 3, "min_time_s": 0.05, "min_iters": 8, "block_s": 0.005,
                  "watch_contention": False}
NETWORK_SETTINGS = {"warmup_s": 0.1, "warmup_iters": 5, "min_time_s": 2.0, "min_iters": 10, "sessions": 3}


@dataclass
class BuildReport:
    """What building (or reusing) a table took."""

    layers: int                   # tabulated layers of the network
    signatures: int               # distinct layer signatures among them
    measured: int                 # signatures measured now (the rest came from the cache)
    points: int                   # grid points measured now
    build_s: float
    network_cached: bool
    channel_block: int = 1        # bench/staircase.py: widths inside a block cost the whole block
    step: int = 1                 # the widths tabulated and allowed: multiples of lcm(round_to, channel_block)
    block_probe: dict[str, Any] = field(default_factory=dict)   # the timings the block was decided from
    notices: list[str] = field(default_factory=list)


def check_backend(target: TableTarget) -> None:
    """One-line error when the backend is unknown or cannot run here."""
    if target.backend not in RUNNERS:
        raise CompressError(f"unknown latency backend {target.backend!r}; known: {', '.join(sorted(RUNNERS))}")
    if (reason := RUNNERS[target.backend].unavailable()) is not None:
        raise CompressError(f"latency backend {target.backend} cannot run here: {reason}")
    if target.threads < 1 or target.batch_size < 1:
        raise CompressError("--latency-threads and --latency-batch-size must be ≥ 1")
    Settings(threads=target.threads, clock=target.clock)      # refuses the cpu clock with several threads
    if target.precision != "fp32" and target.backend not in ("torch-cuda",):
        raise CompressError(f"latency tables at {target.precision} are measured on torch-cuda only "
                            f"(the {target.backend} runner times fp32)")


def build_latency_model(module: nn.Module, groups: list[ChannelGroup], target: TableTarget, *, round_to: int,
                        points: int = DEFAULT_POINTS, cache: TableCache | None = None,
                        checks: tuple[float, ...] = CHECK_FRACTIONS, say=None) -> tuple[LatencyModel, BuildReport]:
    """The latency model of `module` (a DeployableModule, not yet slimmed; `groups` found on its net)."""
    check_backend(target)
    say = say or (lambda line: None)
    notices: list[str] = []
    cache = cache or TableCache()
    cache.say = lambda line: (notices.append(line), say(line))
    started = time.perf_counter()
    env = target.environment()
    probe = channel_block(target, cache, say)
    block = probe["block"]
    step = math.lcm(round_to, block)          # widths inside a block cost the whole block: never stop there
    example = module.normalize(module.example_input(1))
    needs = layer_shapes(groups, example, step, points)
    keys = [{"kind": "layer", **env, "measure": MEASURE, "layer": n.shape.to_dict(), "cin": n.cin, "cout": n.cout}
            for n in needs]
    found: dict[str, list[list[float]]] = {}
    missing: dict[str, tuple[LayerNeed, dict]] = {}
    for need, key in zip(needs, keys, strict=True):
        sig = cache.path(key).name
        if sig in found or sig in missing:
            continue
        payload = cache.get(key, check=lambda p, n=need: check_grid(p, _rows(n), len(n.cout)))
        if payload is not None:
            found[sig] = payload["ms"]
        else:
            missing[sig] = (need, key)
    measured_points = _measure_layers(list(missing.values()), target, cache, found, say)
    layers = [LayerTable(n.layer, n.shape, [n.cout[0]] if n.shape.depthwise else n.cin, n.cout,
                         found[cache.path(k).name]) for n, k in zip(needs, keys, strict=True)]
    table = LatencyTable(target={**env, "round_to": round_to, "channel_block": block, "points": points}, layers=layers,
                         dense_ms=0.0)
    stages = stage_allocations(LatencyModel(groups, table), AllowedCounts(groups, step))
    network, network_cached = _network(module, groups, target, env, step, checks, stages, cache, say)
    table.dense_ms = network["dense_ms"]
    table.scales, table.stages = fit_stage_scales(LatencyModel(groups, table), network["stages"])
    raw = LatencyModel(groups, table)
    points = [[float(raw.raw_ratio(torch.tensor(c["kept"], dtype=torch.float64))), c["measured_ratio"]]
              for c in network["checks"]]
    table.calibration = points
    model = LatencyModel(groups, table)
    for i, check in enumerate(network["checks"]):
        kept = torch.tensor(check["kept"], dtype=torch.float64)
        others = LatencyModel(groups, replace(table, calibration=points[:i] + points[i + 1:], checks=[]))
        table.checks.append({**check, "raw_ratio": round(points[i][0], 4),
                             "predicted_ratio": round(float(model.ratio(kept)), 4),
                             "predicted_ms": round(float(model.cost(kept)), 4),
                             "held_out_ratio": round(float(others.ratio(kept)), 4)})
    report = BuildReport(layers=len(needs), signatures=len(found), measured=len(missing), points=measured_points,
                         build_s=time.perf_counter() - started, network_cached=network_cached, channel_block=block,
                         step=step, block_probe=probe, notices=notices)
    return model, report


def _rows(need: LayerNeed) -> int:
    return 1 if need.shape.depthwise else len(need.cin)


def _grid_points(need: LayerNeed) -> list[tuple[int, int]]:
    if need.shape.depthwise:
        return [(c, c) for c in need.cout]
    return [(ci, co) for ci in need.cin for co in need.cout]


def _measure_layers(todo: list[tuple[LayerNeed, dict]], target: TableTarget, cache: TableCache,
                    found: dict[str, list[list[float]]], say) -> int:
    """Measure each missing layer's grid (points interleaved), store it; returns the points measured."""
    if not todo:
        return 0
    from compress.progress import progress_bars

    settings = Settings(threads=target.threads, clock=target.clock, **LAYER_SETTINGS)
    total = 0
    with tempfile.TemporaryDirectory(prefix="compress-lut-") as scratch, progress_bars() as bars:
        task = bars.add_task("latency tables", total=len(todo), metrics="") if bars else None
        for i, (need, key) in enumerate(todo):
            grid = _grid_points(need)
            contenders = [c for copies in (1, 2) for j, (ci, co) in enumerate(grid)
                          for c in layer_contenders(need, ci, co, copies, target, Path(scratch), f"{copies}-{j}",
                                                    settings)]
            measure_interleaved(contenders, target.batch_size, settings)
            medians = [r.summary.median_ms for r in to_results(contenders, target.backend, target.batch_size)]
            single, twin = medians[:len(grid)], medians[len(grid):]
            marginal = [max(t - s, FLOOR * s) for s, t in zip(single, twin, strict=True)]
            cols = len(need.cout)

            def rows(values: list[float], cols: int = cols) -> list[list[float]]:
                return [values[r * cols:(r + 1) * cols] for r in range(len(values) // cols)]

            ms = rows(marginal)
            payload = {"ms": ms, "single_ms": rows(single), "twin_ms": rows(twin), "settings": LAYER_SETTINGS,
                       "measured_utc": _now()}
            cache.put(key, payload)
            found[cache.path(key).name] = ms
            total += len(grid)
            for f in Path(scratch).iterdir():
                f.unlink()
            if bars:
                bars.update(task, advance=1, metrics=f"{need.layer} ({len(grid)} widths)")
            else:
                say(f"latency table {i + 1}/{len(todo)}: {need.layer} ({len(grid)} widths)")
    return total


def layer_contenders(need: LayerNeed, cin: int, cout: int, copies: int, target: TableTarget, scratch: Path,
                     index: str, settings: Settings) -> list[Contender]:
    """One layer at `cin`×`cout` (`copies` of it in sequence), loaded as many times as `settings` pool."""
    label = f"{need.layer}@{cin}x{cout}" + ("-twin" if copies == 2 else "")
    if target.backend in ONNX_BACKENDS:
        path = scratch / f"layer{index}.onnx"
        path.write_bytes(onnx_layer(need.shape, cin, cout, target.batch_size, copies))
        tgt = Target(label, path, "onnx", batch_dim=target.batch_size)
    else:
        tgt = module_target(label, torch_layer(need.shape, cin, cout, copies))
    return _loads(tgt, target, scratch, settings)


def module_target(label: str, module: nn.Module) -> Target:
    """A bench target for an in-memory module (the torch runners run it; ONNX runners export it)."""
    return Target(label, Path(label), "run", _module=module)


def _loads(tgt: Target, target: TableTarget, scratch: Path, settings: Settings) -> list[Contender]:
    cls = _runner_class(target)
    return load_sessions(tgt, lambda: cls(target.threads, scratch, target.clock), sessions_of(cls, settings))


def _runner_class(target: TableTarget):
    cls = RUNNERS[target.backend]
    if target.precision == "fp32":
        return cls
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[target.precision]

    class Reduced(cls):
        """The same runner with module and inputs in reduced precision (no casts inside the timing)."""

        def _wrap(self, module):
            return super()._wrap(module).to(dtype)

        def prepare(self, batch_size: int):
            return super().prepare(batch_size).to(dtype)

    Reduced.__name__ = f"{cls.__name__}[{target.precision}]"
    return Reduced


# ------------------------------------------------------------------ whole networks


class NetworkTimer:
    """Times whole networks against one dense reference on the target, interleaved; the dense
    network is loaded (exported, for ONNX backends) once and reused for every comparison."""

    def __init__(self, dense: nn.Module, target: TableTarget, settings: dict[str, Any] | None = None):
        check_backend(target)
        self.target = target
        self.settings = Settings(threads=target.threads, clock=target.clock, **(settings or NETWORK_SETTINGS))
        self._scratch = tempfile.TemporaryDirectory(prefix="compress-latency-")
        self.scratch = Path(self._scratch.name)
        self.dense = module_target("dense", copy.deepcopy(dense).eval())

    def compare(self, modules: list[nn.Module]) -> list[Result]:
        """Dense first, then `modules`, measured interleaved; their bench Results in that order."""
        targets = [self.dense] + [module_target(f"candidate{i}", copy.deepcopy(m).eval())
                                  for i, m in enumerate(modules)]
        contenders = [c for t in targets for c in _loads(t, self.target, self.scratch, self.settings)]
        measure_interleaved(contenders, self.target.batch_size, self.settings)
        return to_results(contenders, self.target.backend, self.target.batch_size)

    def close(self) -> None:
        self._scratch.cleanup()

    def __enter__(self) -> NetworkTimer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def fingerprint(module: nn.Module) -> str:
    """Identifies a network's architecture (layer types and shapes, input size), not its weights."""
    text = repr(module) + repr(getattr(module, "input_size", None))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def uniform_variant(module: nn.Module, groups: list[ChannelGroup], kept: torch.Tensor) -> nn.Module:
    """A copy of `module` with every group slimmed to `kept` units (the first ones: latency does not
    depend on which)."""
    trial = copy.deepcopy(module)
    example = trial.normalize(trial.example_input(1))
    trial_groups = find_groups(trial.net, example)
    masks = {}
    for g, k in zip(trial_groups, kept.tolist(), strict=True):
        mask = torch.zeros(g.width, dtype=torch.bool)
        mask[: int(k)] = True
        masks[g.id] = mask
    slim(trial.net, trial_groups, masks)
    return trial


def _network(module, groups, target: TableTarget, env, round_to: int, checks, stages: list[tuple[str, torch.Tensor]],
             cache: TableCache, say) -> tuple[dict[str, Any], bool]:
    """Dense latency, the uniform check networks' measured ratios and the stage networks' savings
    (compress.pruning.latency_stages), all in one interleaved session, cached like the tables."""
    allowed = AllowedCounts(groups, round_to)
    widths = torch.tensor([g.width for g in groups], dtype=torch.float64)
    kept = [allowed.round_up(torch.ceil(widths * f - 1e-9)) for f in checks] if groups else []
    key = {"kind": "network", **env, "network": fingerprint(module), "settings": NETWORK_SETTINGS,
           "round_to": round_to, "checks": list(checks),
           "stages": [[name, k.tolist()] for name, k in stages]}

    def usable(p) -> str | None:
        ok = isinstance(p, dict) and isinstance(p.get("dense_ms"), (int, float)) and p["dense_ms"] > 0 \
            and isinstance(p.get("checks"), list) and len(p["checks"]) == len(kept) \
            and isinstance(p.get("stages"), list) and len(p["stages"]) == len(stages)
        return None if ok else "expected the dense latency and one entry per check and per stage"

    payload = cache.get(key, check=usable)
    if payload is not None:
        return payload, True
    say(f"measuring the whole network on {target.describe()} (dense, {len(kept)} uniformly slimmed, "
        f"{len(stages)} with one stage slimmed)")
    with NetworkTimer(module, target) as timer:
        variants = [uniform_variant(module, groups, k) for k in kept + [k for _name, k in stages]]
        results = timer.compare(variants)
    dense = results[0].summary.median_ms
    payload = {"dense_ms": dense, "dense_cv": results[0].summary.cv, "measured_utc": _now(),
               "checks": [{"fraction": f, "kept": k.tolist(), "measured_ms": r.summary.median_ms,
                           "measured_ratio": round(r.summary.median_ms / dense, 4)}
                          for f, k, r in zip(checks, kept, results[1:], strict=False)],
               "stages": [{"stage": name, "kept": k.tolist(), "measured_ms": r.summary.median_ms,
                           "saving_ms": dense - r.summary.median_ms}
                          for (name, k), r in zip(stages, results[1 + len(kept):], strict=True)]}
    cache.put(key, payload)
    return payload, False


def _now() -> str:
    from datetime import datetime, timezone

    return datetime.now(timezone.utc).isoformat(timespec="seconds")
