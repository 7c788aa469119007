"""PASS's hypernetwork: prompt encoder → LSTM over channel groups → per-channel mask logits.

What the paper confirms: a 3-layer CNN encodes the visual prompt into the LSTM's initial state; the
LSTM steps through the prunable layers reading each layer's weight statistics and the previous mask;
a linear head emits channel logits; a straight-through binary mask cuts the layer's channels.

Our choices where it is silent (docs/pass.md):
- one step per channel *group* (coupled channels), in topological order, so residual coupling holds;
- the step input is a fixed-length vector: sorted-quantile sketches of the group's per-unit L1 and L2
  norms (each divided by its mean), mean/std of the group's weights, its width, depth fraction and
  FLOPs share, plus an embedding of the previous group's mask;
- the per-group linear head gets one more term: per-unit features (normalised filter norm, consumer
  column norm, BN scale) weighted by a vector the LSTM emits. It ties logits to the channels' own
  weights rather than to channel indices — what lets a hypernetwork trained on one backbone be
  reused on another backbone of the same architecture (`--hypernet-from`);
- logits → Gumbel-sigmoid with temperature → hard 0/1 forward, sigmoid gradient backward.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from compress.errors import CompressError
from compress.pruning.groups import ChannelGroup

N_QUANTILES = 8
STAT_DIM = 2 * N_QUANTILES + 6
CHANNEL_FEATURES = 3
MASK_FEATURES = 4
_MIXING = ("conv", "linear", "gconv")


@dataclass
class GroupStats:
    """Everything the hypernetwork reads about a frozen backbone, computed once."""

    ids: list[str]
    widths: list[int]
    stats: torch.Tensor                 # [G, STAT_DIM] step inputs
    channel: list[torch.Tensor]         # per group [width, CHANNEL_FEATURES], z-scored within the group
    norm_share: list[torch.Tensor]      # per group [width]: each unit's share of the group's L2 norm


@dataclass
class HypernetConfig:
    """Shape of a hypernetwork; saved next to its weights so that `--hypernet-from` can rebuild it."""

    groups: list[list]                  # [[group id, width], ...] in step order: must match to reuse
    hidden: int = 64
    mask_embed: int = 16
    encoder_channels: list[int] = field(default_factory=lambda: [16, 32, 64])
    prompt_channels: int = 3
    use_prompt: bool = True
    backbone: str | None = None         # fingerprint of the weights it was trained on (backbone_fingerprint)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HypernetConfig:
        try:
            return cls(groups=[[str(i), int(w)] for i, w in d["groups"]], hidden=int(d["hidden"]),
                       mask_embed=int(d["mask_embed"]), encoder_channels=[int(c) for c in d["encoder_channels"]],
                       prompt_channels=int(d["prompt_channels"]), use_prompt=bool(d["use_prompt"]),
                       backbone=d.get("backbone"))
        except (KeyError, TypeError, ValueError) as exc:
            raise CompressError(f"hypernetwork config is malformed ({type(exc).__name__}: {exc})") from None


# ---------------------------------------------------------------- weight statistics


def group_statistics(net: nn.Module, groups: list[ChannelGroup]) -> GroupStats:
    """Step inputs and per-unit features of every group of `net` (weights are only read)."""
    per_group = [_unit_norms(net, g) for g in groups]
    max_width = max((g.width for g in groups), default=1)
    rows, channel, share = [], [], []
    with torch.no_grad():
        for g, n in zip(groups, per_group, strict=True):
            l1, l2 = n["l1"], n["sq"].sqrt()
            w_mean, w_std = n["sum"] / n["count"], (n["sumsq"] / n["count"] - (n["sum"] / n["count"]) ** 2).clamp_min(0)
            w_std = w_std.sqrt()
            rows.append(torch.cat([
                _quantiles(l1 / l1.mean().clamp_min(1e-12)),
                _quantiles(l2 / l2.mean().clamp_min(1e-12)),
                torch.tensor([float(w_mean / w_std.clamp_min(1e-12)), math.log10(float(w_std) + 1e-12),
                              math.log10(float(l2.mean()) + 1e-12), g.width / max_width, g.depth, g.flops_share]),
            ]))
            channel.append(torch.stack([_zscore(n["out"].sqrt()), _zscore(n["in"].sqrt()),
                                        _zscore(n["gamma"])], dim=1))
            share.append(l2 / l2.sum().clamp_min(1e-12))
    stats = torch.stack(rows).float() if rows else torch.zeros(0, STAT_DIM)
    return GroupStats([g.id for g in groups], [g.width for g in groups], stats,
                      [c.float() for c in channel], [s.float() for s in share])


def backbone_fingerprint(stats: GroupStats) -> str:
    """A short hash of the statistics a hypernetwork reads: equal exactly when it sees the same backbone."""
    h = hashlib.sha1()
    for t in (stats.stats, *stats.channel):
        h.update(t.to(torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _unit_norms(net: nn.Module, g: ChannelGroup) -> dict[str, torch.Tensor]:
    """Per-unit L1 / squared-L2 over all coupled weights, split by producer ("out") and consumer ("in")
    side, the mean |BN scale|, and running sums for the group's weight mean/std."""
    w = g.width
    acc = {k: torch.zeros(w, dtype=torch.float64) for k in ("l1", "sq", "out", "in", "gamma", "n_gamma")}
    acc["sum"], acc["sumsq"], acc["count"] = torch.zeros((), dtype=torch.float64), torch.zeros(
        (), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
    for m in g.items:
        if m.layer == "param":
            continue
        mod = net.get_submodule(m.name)
        weight = getattr(mod, "weight", None)
        if not isinstance(weight, torch.Tensor):
            continue
        weight = weight.detach().to(device="cpu", dtype=torch.float64)
        if m.layer == "norm":
            acc["gamma"].index_add_(0, m.unit, weight[m.idx].abs())
            acc["n_gamma"].index_add_(0, m.unit, torch.ones(len(m.idx), dtype=torch.float64))
            continue
        if m.layer in _MIXING and m.side == "in":
            if getattr(mod, "groups", 1) != 1:
                continue  # a grouped conv's input channel meets only part of the weight: no clean column
            rows = weight.transpose(0, 1)[m.idx].reshape(len(m.idx), -1)
            side = "in"
        else:  # producer rows (conv/linear outputs) and depthwise filters
            rows = weight[m.idx].reshape(len(m.idx), -1)
            side = "out"
        sq = rows.pow(2).sum(1)
        acc["l1"].index_add_(0, m.unit, rows.abs().sum(1))
        acc["sq"].index_add_(0, m.unit, sq)
        acc[side].index_add_(0, m.unit, sq)
        acc["sum"] += rows.sum()
        acc["sumsq"] += rows.pow(2).sum()
        acc["count"] += rows.numel()
    acc["gamma"] = acc["gamma"] / acc.pop("n_gamma").clamp_min(1)
    acc["count"] = acc["count"].clamp_min(1)
    return acc


def _quantiles(x: torch.Tensor) -> torch.Tensor:
    """Sorted-quantile sketch: N_QUANTILES evenly spaced quantiles (min … max) of any-length `x`."""
    return torch.quantile(x.to(torch.float64), torch.linspace(0, 1, N_QUANTILES, dtype=torch.float64))


def _zscore(x: torch.Tensor) -> torch.Tensor:
    """Standardised log values within the group (0 where they do not vary, e.g. no BN)."""
    v = x.clamp_min(1e-12).log()
    std = v.std(unbiased=False) if v.numel() > 1 else v.new_zeros(())
    return (v - v.mean()) / std if float(std) > 1e-6 else torch.zeros_like(v)


# ---------------------------------------------------------------- networks


class PromptEncoder(nn.Module):
    """Three stride-2 convolutions + global pooling: the prompt tensor → the LSTM's (h0, c0)."""

    def __init__(self, in_channels: int, hidden: int, channels: list[int]):
        super().__init__()
        layers, c = [], in_channels
        for width in channels:
            layers += [nn.Conv2d(c, width, 3, stride=2, padding=1), nn.ReLU()]
            c = width
        self.convs = nn.Sequential(*layers)
        self.out = nn.Linear(c, 2 * hidden)

    def forward(self, prompt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h, c = self.out(self.convs(prompt).mean((2, 3))).chunk(2, dim=-1)
        return torch.tanh(h), c


@dataclass
class MaskSample:
    """One pass of the hypernetwork: per group logits, keep probabilities and the (straight-through) mask."""

    logits: list[torch.Tensor]
    probs: list[torch.Tensor]
    masks: list[torch.Tensor]

    def fractions(self) -> torch.Tensor:
        """Kept fraction per group (hard value, soft gradient) for the FLOPs model."""
        return torch.stack([m.mean() for m in self.masks])


class MaskHypernet(nn.Module):
    """Prompt encoder (optional) + LSTMCell stepping over groups + per-group linear heads."""

    def __init__(self, config: HypernetConfig, init_keep: float = 0.5):
        super().__init__()
        self.config = config
        h = config.hidden
        self.encoder = (PromptEncoder(config.prompt_channels, h, config.encoder_channels)
                        if config.use_prompt else None)
        self.mask_embed = nn.Linear(MASK_FEATURES, config.mask_embed)
        self.lstm = nn.LSTMCell(STAT_DIM + config.mask_embed, h)
        self.heads = nn.ModuleList(nn.Linear(h, int(w)) for _gid, w in config.groups)
        self.channel_gain = nn.Linear(h, CHANNEL_FEATURES)
        gain0 = torch.tensor([2.0, 0.5, 1.0])   # start close to a magnitude ranking (filter norm, BN scale)
        offset = float(gain0[0]) * float(torch.special.ndtri(torch.tensor(min(max(init_keep, 0.02), 0.98))))
        with torch.no_grad():
            self.channel_gain.weight.mul_(0.1)
            self.channel_gain.bias.copy_(gain0)
            for head in self.heads:
                head.weight.mul_(0.1)
                head.bias.fill_(offset)

    def initial_state(self, prompt: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(h0, c0): the encoded prompt, or zeros without a prompt (the `--prompt none` ablation)."""
        if self.encoder is None or prompt is None:
            z = torch.zeros(1, self.config.hidden, device=self.mask_embed.weight.device)
            return z, z
        return self.encoder(prompt)

    def forward(self, prompt: torch.Tensor | None, stats: GroupStats, tau: float = 1.0, noise: bool = False,
                generator: torch.Generator | None = None) -> MaskSample:
        h, c = self.initial_state(prompt)
        dev = h.device
        prev = torch.zeros(1, MASK_FEATURES, device=dev)
        logits, probs, masks = [], [], []
        for i, head in enumerate(self.heads):
            x = torch.cat([stats.stats[i:i + 1].to(dev), self.mask_embed(prev)], dim=1)
            h, c = self.lstm(x, (h, c))
            feats = stats.channel[i].to(dev)
            logit = head(h)[0] + feats @ self.channel_gain(h)[0]
            soft = torch.sigmoid((logit + _logistic_noise(logit, generator) if noise else logit) / tau)
            mask = StraightThrough.apply(soft)
            share = stats.norm_share[i].to(dev)
            prev = torch.stack([mask.mean(), soft.mean(), (mask * share).sum(), soft.std(unbiased=False)])[None]
            logits.append(logit)
            probs.append(soft)
            masks.append(mask)
        return MaskSample(logits, probs, masks)

    @torch.no_grad()
    def forget_channel_identity(self) -> None:
        """Replace every head's per-unit weights and bias by their mean over the group's units.

        What a head learns per unit index is about *that* backbone's unit i; in another independently
        trained backbone unit i is an unrelated channel. The group-level part (how much of the group
        to keep, from the LSTM state) and the feature-based ranking do carry over."""
        for head in self.heads:
            head.weight.copy_(head.weight.mean(0, keepdim=True).expand_as(head.weight))
            head.bias.fill_(float(head.bias.mean()))

    @torch.no_grad()
    def scores(self, prompt: torch.Tensor | None, stats: GroupStats) -> dict[str, torch.Tensor]:
        """Deterministic channel scores (logits, no noise) per group id: the input to global ranking."""
        out = self(prompt, stats, tau=1.0, noise=False)
        return {gid: lg.detach().cpu() for gid, lg in zip(stats.ids, out.logits, strict=True)}


class StraightThrough(torch.autograd.Function):
    """Exactly binary forward (soft > 0.5), identity gradient to `soft` backward. Written as a Function
    because `hard + soft - soft.detach()` leaves float rounding (0.99999994) in the gates."""

    @staticmethod
    def forward(ctx, soft: torch.Tensor) -> torch.Tensor:
        return (soft > 0.5).to(soft.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


def _logistic_noise(like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Difference of two Gumbels = logistic noise: Gumbel-sigmoid sampling of a Bernoulli gate."""
    u = torch.rand(like.shape, generator=generator, device="cpu").clamp(1e-6, 1 - 1e-6).to(like.device)
    return u.log() - (-u).log1p()


# ---------------------------------------------------------------- prompt tensor, saving and reuse


def prompt_tensor(prompt: nn.Module | None) -> torch.Tensor | None:
    """What the encoder reads: the prompt's effective delta (a pad prompt's frame, masked)."""
    delta = getattr(prompt, "delta", None)
    if not isinstance(delta, torch.Tensor):
        return None
    mask = getattr(prompt, "mask", None)
    return delta * mask if isinstance(mask, torch.Tensor) else delta


def group_signature(groups: list[ChannelGroup]) -> list[list]:
    return [[g.id, int(g.width)] for g in groups]


def check_compatible(config: HypernetConfig, groups: list[ChannelGroup], use_prompt: bool, source: str) -> None:
    """A saved hypernetwork fits a backbone when its step sequence (group ids and widths, in order) is the
    same and it was trained with (or without) a prompt as this run is. Raises CompressError otherwise."""
    want = group_signature(groups)
    have = [list(x) for x in config.groups]
    if have != want:
        if len(have) != len(want):
            detail = f"it has {len(have)} channel groups, this model has {len(want)}"
        else:
            i = next(k for k, (a, b) in enumerate(zip(have, want, strict=True)) if a != b)
            detail = f"group {i} is {have[i][0]} ({have[i][1]} units) there, {want[i][0]} ({want[i][1]} units) here"
        raise CompressError(f"--hypernet-from {source}: hypernetwork does not fit this model's channel groups "
                            f"({detail}); use one trained on the same architecture")
    if config.use_prompt != use_prompt:
        there = "with a prompt" if config.use_prompt else "with --prompt none"
        here = "without" if not use_prompt else "with"
        raise CompressError(f"--hypernet-from {source}: hypernetwork was trained {there}, this run is {here} one; "
                            "match --prompt")
