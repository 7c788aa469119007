"""A measured latency model: per-layer lookup tables of latency against kept input/output widths.

HALP (Shen et al., NeurIPS 2022) and NetAdapt (Yang et al., 2018) budget pruning by latency measured
on the target instead of FLOPs: grouped and depthwise convolutions, memory-bound layers and threading
make latency a staircase in width. Here every convolution/Linear layer a group touches has a table of
its latency (with the BatchNorm and activation right after it, as the deployed graph fuses them) at
a grid of input × output widths; between grid points the table is interpolated bilinearly, which
also makes the model differentiable for PASS's resource penalty.

The tables' sum over layers gives a *raw* latency for any allocation; its ratio to the dense sum
ranks allocations, but a network is not the sum of its layers timed one by one (per-op overheads,
memory traffic of activations, cache effects). So whole pruned networks are measured too (every
group at a common share of its width), and a monotone piecewise-linear map from the raw ratio to the
measured ratio, through those points and (1, 1), turns the tables into a prediction. Being
monotone, it never changes which of two allocations is cheaper — it only says how much cheaper the
network really is. The tables are measured above the engine (bench/lut.py, with the bench
runners); this module only holds the numbers and the arithmetic, and `layer_shapes` says which
layers a network needs tables for.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from compress.pruning.allocation import AllowedCounts
from compress.pruning.cost import CostModel, LayerWidths
from compress.pruning.groups import ChannelGroup

TABULATED = ("conv", "gconv", "dwconv", "linear")
ACTIVATIONS = {nn.ReLU: "relu", nn.ReLU6: "relu6", nn.Hardswish: "hardswish", nn.SiLU: "silu", nn.GELU: "gelu",
               nn.Sigmoid: "sigmoid", nn.Hardsigmoid: "hardsigmoid"}


@dataclass(frozen=True)
class LayerShape:
    """Everything a layer's latency depends on besides its widths: the table's signature."""

    op: str                          # "conv" or "linear"
    input_shape: tuple[int, ...]     # at batch 1, batch dim excluded; the channel entry is the dense width
    channel_dim: int                 # index of the channel entry in input_shape (conv: 0, linear: last)
    cin: int                         # dense widths
    cout: int
    kernel: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1                  # fixed convolution groups (tiled groups); depthwise: see `depthwise`
    depthwise: bool = False          # groups = in = out channels: one width axis
    bias: bool = False
    bn: bool = False                 # a BatchNorm right after it
    act: str | None = None           # the activation right after it (after the BN)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LayerShape:
        tuples = ("input_shape", "kernel", "stride", "padding", "dilation")
        return cls(**{k: tuple(v) if k in tuples else v for k, v in d.items()})


@dataclass
class LayerTable:
    """Measured latency (ms, median) of one layer at cin × cout grid widths."""

    layer: str                        # module name in the network
    shape: LayerShape
    cin: list[int]                    # one entry when the input width cannot change (or is tied to cout)
    cout: list[int]
    ms: list[list[float]]             # [len(cin)][len(cout)]

    def dense_ms(self) -> float:
        return self.ms[-1][-1]


@dataclass
class LatencyTable:
    """The tables of one network on one target, and the whole dense network measured there."""

    target: dict[str, Any]            # backend, threads, batch size, host, library versions
    layers: list[LayerTable]
    dense_ms: float                   # the whole dense network, measured
    calibration: list[list[float]] = field(default_factory=list)   # [raw ratio, measured ratio] of pruned networks
    checks: list[dict[str, Any]] = field(default_factory=list)   # predicted vs measured whole networks
    scales: dict[str, float] = field(default_factory=dict)       # layer -> stage correction (latency_stages.py)
    stages: list[dict[str, Any]] = field(default_factory=list)   # how each stage's correction was measured


@dataclass
class LayerNeed:
    """A layer that needs a table, and the widths to measure it at."""

    layer: str
    shape: LayerShape
    cin: list[int]
    cout: list[int]


def layer_shapes(groups: list[ChannelGroup], example_input: torch.Tensor, round_to: int,
                 points: int) -> list[LayerNeed]:
    """The layers whose latency changes with pruning, their signatures and grid widths.

    Each axis gets up to `points` widths that are multiples of `round_to` (and of the convolution
    groups), from the narrowest the allowed widths permit to the dense width, evenly spread; every
    multiple when there are no more than `points`.
    """
    if not groups:
        return []
    net = groups[0].graph.net
    layers = LayerWidths(groups, lambda name: _is_tabulated(net, name))
    allowed = AllowedCounts(groups, round_to)
    low_in, low_out = layers.in_width(allowed.minimum), layers.out_width(allowed.minimum)
    shapes = _trace_shapes(net, example_input, set(layers.names))
    needs = []
    for e, name in enumerate(layers.names):
        shape = shapes[name]
        step = math.lcm(round_to, shape.groups)
        variable_in = bool(layers.has_in[e]) and not shape.depthwise
        cout = _grid(int(low_out[e]), shape.cout, step, points) if layers.a_out[e].any() else [shape.cout]
        cin = _grid(int(low_in[e]), shape.cin, step, points) if variable_in else [shape.cin]
        if len(cin) == 1 and len(cout) == 1:
            continue                                   # nothing about this layer changes
        needs.append(LayerNeed(name, shape, cin, cout))
    return needs


def _is_tabulated(net: nn.Module, name: str) -> bool:
    try:
        mod = net.get_submodule(name)
    except AttributeError:
        return False
    return isinstance(mod, (nn.Conv2d, nn.Linear))


def _grid(low: int, dense: int, step: int, points: int) -> list[int]:
    """Up to `points` widths in [low, dense], multiples of `step` (dense and the lowest included)."""
    first = max(step, -(-low // step) * step)
    multiples = list(range(first, dense, step)) + [dense]
    if len(multiples) <= points:
        return multiples
    picks = {round(i * (len(multiples) - 1) / (points - 1)) for i in range(points)}
    return [multiples[i] for i in sorted(picks)]


def _trace_shapes(net: nn.Module, example_input: torch.Tensor, names: set[str]) -> dict[str, LayerShape]:
    """One forward pass at batch 1: each layer's input shape, and the BN/activation right after it."""
    modules = dict(net.named_modules())
    produced: dict[int, str] = {}          # output tensor id -> leaf module that produced it
    consumer: dict[str, str] = {}          # module -> the first leaf module reading its output
    inputs: dict[str, tuple[int, ...]] = {}
    keep: list[torch.Tensor] = []          # holds every tensor so that ids stay unique during the pass

    def pre(name):
        def hook(_mod, args):
            x = args[0] if args and isinstance(args[0], torch.Tensor) else None
            if x is None:
                return
            keep.append(x)
            producer = produced.get(id(x))
            if producer is not None:
                consumer.setdefault(producer, name)
            if name in names:
                inputs.setdefault(name, tuple(x.shape[1:]))
        return hook

    def post(name):
        def hook(_mod, _args, out):
            if isinstance(out, torch.Tensor):
                keep.append(out)
                produced[id(out)] = name
        return hook

    leaves = [(n, m) for n, m in modules.items() if n and not list(m.children())]
    hooks = [m.register_forward_pre_hook(pre(n)) for n, m in leaves]
    hooks += [m.register_forward_hook(post(n)) for n, m in leaves]
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            net(example_input[:1])
    finally:
        net.train(was_training)
        for h in hooks:
            h.remove()
    return {name: _shape(modules, name, inputs[name], consumer) for name in names if name in inputs}


def _shape(modules: dict[str, nn.Module], name: str, input_shape: tuple[int, ...],
           consumer: dict[str, str]) -> LayerShape:
    mod = modules[name]
    after = consumer.get(name)
    bn = after is not None and isinstance(modules[after], nn.modules.batchnorm._BatchNorm)
    if bn:
        after = consumer.get(after)
    act = ACTIVATIONS.get(type(modules[after])) if after is not None else None
    if isinstance(mod, nn.Linear):
        return LayerShape(op="linear", input_shape=input_shape, channel_dim=len(input_shape) - 1,
                          cin=mod.in_features, cout=mod.out_features, bias=mod.bias is not None, bn=bn, act=act)
    depthwise = mod.groups > 1 and mod.groups == mod.in_channels == mod.out_channels
    padding = mod.padding if not isinstance(mod.padding, str) else tuple(k // 2 for k in mod.kernel_size)
    return LayerShape(op="conv", input_shape=input_shape, channel_dim=0, cin=mod.in_channels, cout=mod.out_channels,
                      kernel=tuple(mod.kernel_size), stride=tuple(mod.stride), padding=tuple(padding),
                      dilation=tuple(mod.dilation), groups=1 if depthwise else mod.groups, depthwise=depthwise,
                      bias=mod.bias is not None, bn=bn, act=act)


class LatencyModel(CostModel):
    """Latency (ms) of the network for kept units per group, from a `LatencyTable`."""

    name = "latency"
    flag = "--latency-ratio"

    def __init__(self, groups: list[ChannelGroup], table: LatencyTable):
        super().__init__(groups)
        self.table = table
        self.channel_step = int(table.target.get("channel_block", 1))
        by_name = {t.layer: t for t in table.layers}
        self.layers = LayerWidths(groups, lambda name: name in by_name)
        tables = [by_name[n] for n in self.layers.names]
        self.tied = torch.tensor([t.shape.depthwise for t in tables], dtype=torch.bool)
        longest = max((max(len(t.cin), len(t.cout)) for t in tables), default=1)
        self.xs = _padded([t.cin for t in tables], longest)              # [E, P]
        self.ys = _padded([t.cout for t in tables], longest)
        self.z = torch.zeros(len(tables), longest, longest, dtype=torch.float64)
        for e, t in enumerate(tables):
            grid = torch.tensor(t.ms, dtype=torch.float64)
            grid = torch.cat([grid, grid[-1:].expand(longest - grid.shape[0], -1)], 0)
            self.z[e] = torch.cat([grid, grid[:, -1:].expand(-1, longest - grid.shape[1])], 1)
        self.z = monotone_envelope(self.z)
        self.scale = torch.tensor([table.scales.get(n, 1.0) for n in self.layers.names], dtype=torch.float64)
        self.stage = [layer_stage(t.shape) for t in tables]
        self.covered = float(self.tables_ms(self.widths))
        self._dense = float(table.dense_ms)
        self.knots_x, self.knots_y = calibration_knots(table.calibration)

    @property
    def dense(self) -> float:
        return self._dense

    def describe(self) -> str:
        t = self.table.target
        return f"latency on {t.get('backend')}, {t.get('threads')} thread(s), batch {t.get('batch_size')}"

    def cost(self, kept: torch.Tensor) -> torch.Tensor:
        """Predicted latency (ms): the dense network's measured latency × the calibrated raw ratio."""
        return self._dense * _piecewise(self.knots_x, self.knots_y, self.raw_ratio(kept))

    def raw_ratio(self, kept: torch.Tensor) -> torch.Tensor:
        """Σ table latencies ÷ their dense sum: the uncalibrated ratio."""
        return self.tables_ms(kept) / self.covered

    def tables_ms(self, kept: torch.Tensor) -> torch.Tensor:
        """Σ over tabulated layers of their interpolated latency, each times its stage's correction
        ([..., ] like kept without the G dim)."""
        return (self.layer_ms(kept) * self.scale).sum(-1)

    def layer_ms(self, kept: torch.Tensor) -> torch.Tensor:
        """Every tabulated layer's interpolated latency as measured alone, uncorrected ([..., E])."""
        kept = kept.to(device="cpu", dtype=torch.float64)   # the model lives on the CPU
        cout = self.layers.out_width(kept)
        cin = torch.where(self.tied, cout, self.layers.in_width(kept))
        return _bilinear(self.xs, self.ys, self.z, cin, cout)


def monotone_envelope(z: torch.Tensor) -> torch.Tensor:
    """Grids [E, cin, cout] made non-decreasing in both widths: each point becomes the least latency at
    that width or any wider one. A narrower layer can always run as the wider one with zero channels,
    so a measured point above a wider one is noise or a kernel's bad size, and an allocation that
    believed it would see a saving in widening a layer (ResNet-18 at 7×7 px, 2 threads: 0.947 ms
    measured at 512×512 channels, 1.023 ms at 416×512)."""
    for dim in (1, 2):
        z = torch.flip(torch.cummin(torch.flip(z, (dim,)), dim).values, (dim,))
    return z


def layer_stage(shape: LayerShape) -> str:
    """The stage a layer belongs to: its output resolution ("28x28"; a Linear layer's token grid, e.g. "197")."""
    if shape.op == "linear":
        return "x".join(map(str, shape.input_shape[:-1])) or "1"
    size = []
    for i, n in enumerate(shape.input_shape[1:]):
        k, st, pad, dil = shape.kernel[i], shape.stride[i], shape.padding[i], shape.dilation[i]
        size.append((n + 2 * pad - dil * (k - 1) - 1) // st + 1)
    return "x".join(map(str, size))


def calibration_knots(points: list[list[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Knots of the monotone map raw ratio → measured ratio: the measured points sorted by raw ratio,
    made non-decreasing (pool-adjacent-violators), with (1, 1); below the lowest point the map
    continues its last slope down to a raw ratio of 0 (floored at 1% of the dense latency)."""
    pts = sorted((float(x), float(y)) for x, y in points if 0 < float(x) < 1)
    xs, ys, counts = [], [], []
    for x, y in pts + [(1.0, 1.0)]:
        xs.append(x)
        ys.append(y)
        counts.append(1)
        while len(ys) > 1 and ys[-2] > ys[-1]:            # pool adjacent violators
            n = counts[-2] + counts[-1]
            merged = (ys[-2] * counts[-2] + ys[-1] * counts[-1]) / n
            xs[-2:], ys[-2:], counts[-2:] = [xs[-1]], [merged], [n]
    if len(xs) >= 2:
        slope = (ys[1] - ys[0]) / max(xs[1] - xs[0], 1e-9)
        xs.insert(0, 0.0)
        ys.insert(0, max(0.01, ys[0] - slope * xs[1]))
    else:
        xs, ys = [0.0, 1.0], [0.0, 1.0]                    # no calibration: the raw ratio itself
    return torch.tensor(xs, dtype=torch.float64), torch.tensor(ys, dtype=torch.float64)


def _piecewise(xs: torch.Tensor, ys: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Linear interpolation through (xs, ys), extended linearly beyond the ends (differentiable in x)."""
    x = x.to(torch.float64)
    i = torch.searchsorted(xs, x.detach().contiguous()).clamp(1, len(xs) - 1)
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0).clamp_min(1e-12)


def _padded(rows: list[list[int]], length: int) -> torch.Tensor:
    """Grids padded by repeating their last value (a flat extension interpolation never crosses)."""
    return torch.tensor([r + [r[-1]] * (length - len(r)) for r in rows], dtype=torch.float64)


def _interp_weights(grid: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For x [..., E] on per-layer grids [E, P]: lower index, upper index and the upper weight (clamped)."""
    flat = x.reshape(-1, x.shape[-1]).T.contiguous()                 # [E, B]
    top = grid[:, -1:].expand_as(flat)
    flat = torch.minimum(torch.maximum(flat, grid[:, :1]), top)
    hi = torch.searchsorted(grid, flat.detach()).clamp(1, grid.shape[1] - 1) if grid.shape[1] > 1 else \
        torch.zeros_like(flat, dtype=torch.long)
    lo = (hi - 1).clamp(min=0)
    x0, x1 = grid.gather(1, lo), grid.gather(1, hi)
    span = x1 - x0
    w = torch.where(span > 0, (flat - x0) / torch.where(span > 0, span, torch.ones_like(span)), torch.zeros_like(flat))
    return lo, hi, w


def _bilinear(xs: torch.Tensor, ys: torch.Tensor, z: torch.Tensor, cin: torch.Tensor, cout: torch.Tensor
              ) -> torch.Tensor:
    """Per-layer bilinear interpolation of z [E, P, P] at (cin, cout) [..., E]; returns [..., E]."""
    xl, xh, wx = _interp_weights(xs, cin)
    yl, yh, wy = _interp_weights(ys, cout)
    p = z.shape[1]
    flat_z = z.reshape(z.shape[0], -1)

    def at(i, j):
        return flat_z.gather(1, i * p + j)

    out = (at(xl, yl) * (1 - wx) * (1 - wy) + at(xl, yh) * (1 - wx) * wy
           + at(xh, yl) * wx * (1 - wy) + at(xh, yh) * wx * wy)             # [E, B]
    return out.T.reshape(cin.shape)
