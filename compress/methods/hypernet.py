"""PASS's hypernetwork: prompt encoder → LSTM over channel groups → per-channel mask logits.

What the paper confirms: a 3-layer CNN encodes the visual prompt into the LSTM's initial state; the
LSTM steps through the prunable layers reading each layer's weight statistics and the previous mask;
a linear head emits channel logits; a straight-through binary mask cuts the layer's channels.

Our choices where it is silent (docs/pass.md):
- one step per channel *group* (coupled channels), in topological order, so residual coupling holds;
- the step input is a fixed-length vector of the group's weight statistics restricted to the input
  channels its producing groups keep — M(i−1) ⊗ W(i) (compress/methods/pass_stats.py) — plus an
  embedding of those producers' masks (the graph's real producers, not the previous step);
- the per-group linear head gets one more term: per-unit features (normalised filter norm, consumer
  column norm, BN scale) weighted by a vector the LSTM emits. It ties logits to the channels' own
  weights rather than to channel indices — what lets a hypernetwork trained on one backbone be
  reused on another backbone of the same architecture (`--hypernet-from`);
- logits → Gumbel-sigmoid with temperature → hard 0/1 forward, sigmoid gradient backward.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from compress.errors import CompressError
from compress.methods.pass_stats import CHANNEL_FEATURES, STAT_DIM, GroupStats
from compress.pruning.groups import ChannelGroup

MASK_FEATURES = 4
# 2: step inputs restricted to the producing groups' masks. Version 1 (list-order previous mask, dense
# statistics) read different inputs with the same shapes, so its weights cannot be reused.
HYPERNET_VERSION = 2


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
    version: int = HYPERNET_VERSION     # what the step inputs mean (HYPERNET_VERSION)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HypernetConfig:
        try:
            return cls(groups=[[str(i), int(w)] for i, w in d["groups"]], hidden=int(d["hidden"]),
                       mask_embed=int(d["mask_embed"]), encoder_channels=[int(c) for c in d["encoder_channels"]],
                       prompt_channels=int(d["prompt_channels"]), use_prompt=bool(d["use_prompt"]),
                       backbone=d.get("backbone"), version=int(d.get("version", 1)))
        except (KeyError, TypeError, ValueError) as exc:
            raise CompressError(f"hypernetwork config is malformed ({type(exc).__name__}: {exc})") from None


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
        logits, probs, masks, summaries = [], [], [], []
        for i, head in enumerate(self.heads):
            step = stats.step(i, masks, dev)
            x = torch.cat([step.row[None], self.mask_embed(_producer_summary(stats, i, summaries, dev))], dim=1)
            h, c = self.lstm(x, (h, c))
            logit = head(h)[0] + step.channel @ self.channel_gain(h)[0]
            soft = torch.sigmoid((logit + _logistic_noise(logit, generator) if noise else logit) / tau)
            mask = StraightThrough.apply(soft)
            summaries.append(torch.stack([mask.mean(), soft.mean(), (mask * step.share).sum(),
                                          soft.std(unbiased=False)]))
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


def _producer_summary(stats: GroupStats, i: int, summaries: list[torch.Tensor], dev) -> torch.Tensor:
    """[1, MASK_FEATURES]: the masks of the groups that feed step `i` (kept share, mean keep probability,
    kept share of L2 norm, spread), averaged by their share of the linked weights; zeros for a group fed
    by no earlier group (e.g. the stem, which reads the image)."""
    out = torch.zeros(MASK_FEATURES, device=dev)
    for source, weight in stats.producers(i):
        out = out + weight * summaries[source]
    return out[None]


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
    if config.version != HYPERNET_VERSION:
        raise CompressError(f"--hypernet-from {source}: hypernetwork version {config.version} reads other step inputs "
                            f"than this version ({HYPERNET_VERSION}: producer-restricted statistics); train a new one")
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
