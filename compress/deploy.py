"""The deployable module: what is exported, benchmarked and reported (design.md).

Order is prompt → normalise → network: a visual prompt lives in pixel space and is clamped to
[0, 1] (as in the VPNs reference code), so it must act before normalisation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class Normalize(nn.Module):
    """Per-channel (x - mean) / std with the statistics stored as buffers, so they travel in model.pt."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class DeployableModule(nn.Module):
    """Float images in [0, 1], NCHW, at `input_size` → class logits."""

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float],
                 prompt: nn.Module | None = None, input_size: Sequence[int] = (3, 32, 32)):
        super().__init__()
        self.prompt = prompt if prompt is not None else nn.Identity()
        self.normalize = Normalize(mean, std)
        self.net = net
        self.input_size = tuple(int(v) for v in input_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(self.prompt(x)))

    def example_input(self, batch_size: int = 1) -> torch.Tensor:
        """A deterministic input of the recorded size, on the module's device (tracing, FLOPs, parity checks)."""
        g = torch.Generator().manual_seed(0)
        return torch.rand((batch_size, *self.input_size), generator=g).to(self.normalize.mean.device)
