"""Visual prompts: learnable input transformations that are part of the deployable module.

`pad` is the VPNs reference's `PadVisualPrompt` with its defaults (input size = output size, so no padding
happens): a learnable frame of width `size` (a full-size tensor times a fixed border mask, starting at zero) is
added over the border of the full-resolution image, and the result is clamped to [0, 1]. A zero prompt leaves
the image bit for bit unchanged. `resize-pad` is the reference's shrinking ablation (input size < output size):
the image is resized to the inner size, zero-padded back, and the frame added there. `additive` learns a
full-frame delta. Prompts act in pixel space, before normalisation.

Spec versions (model.json "prompt"): before version 2, `{"kind": "pad"}` meant the shrinking variant. A pad
spec without `"version": 2` is therefore read as `resize-pad`, so run directories written before the change
rebuild exactly what they trained; new pad specs carry `"version": 2`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from compress.errors import CompressError

PROMPT_KINDS = ("pad", "resize-pad", "additive", "none")
PAD_SPEC_VERSION = 2   # "pad" specs before this version meant the shrinking prompt, now "resize-pad"


def clamp_unit(x: torch.Tensor, training: bool) -> torch.Tensor:
    """Clamp to [0, 1]. In training the gradient passes on the closed interval: torch's clamp has zero
    gradient *at* the bounds, which would freeze a zero-initialised frame over zero padding forever."""
    y = x.clamp(0.0, 1.0)
    if not training:
        return y
    inside = ((x >= 0) & (x <= 1)).to(x.dtype)
    return y.detach() + (x - x.detach()) * inside


def default_prompt_size(image_size: int) -> int:
    """The reference frame is 16 px at 224 px; keep the same share of the image, at least 1 px."""
    return max(1, round(image_size * 16 / 224))


class FramePrompt(nn.Module):
    """A learnable frame of width `size` (zero at the start) over the border of a square image."""

    def __init__(self, image_size: int, size: int, channels: int = 3):
        super().__init__()
        if not 1 <= size < image_size // 2:
            raise CompressError(f"--prompt-size {size} must be between 1 and {image_size // 2 - 1} at {image_size} px")
        self.image_size, self.size = image_size, size
        self.delta = nn.Parameter(torch.zeros(1, channels, image_size, image_size))
        mask = torch.ones(1, 1, image_size, image_size)
        mask[..., size:image_size - size, size:image_size - size] = 0
        self.register_buffer("mask", mask)

    def frame(self, x: torch.Tensor) -> torch.Tensor:
        return clamp_unit(x + self.delta * self.mask, self.training)


class PadPrompt(FramePrompt):
    """The reference `PadVisualPrompt` at input size = output size: the frame is added over the image itself."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.frame(x)

    def spec(self) -> dict[str, Any]:
        return {"kind": "pad", "version": PAD_SPEC_VERSION, "image_size": self.image_size, "size": self.size}


class ResizePadPrompt(FramePrompt):
    """The image shrunk to the inner size and zero-padded back, the frame added around it (the reference's
    input size < output size ablation; `compress`'s `pad` before spec version 2)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inner = self.image_size - 2 * self.size
        x = F.interpolate(x, size=(inner, inner), mode="bilinear", align_corners=False)
        return self.frame(F.pad(x, (self.size,) * 4))

    def spec(self) -> dict[str, Any]:
        return {"kind": "resize-pad", "image_size": self.image_size, "size": self.size}


class AdditivePrompt(nn.Module):
    def __init__(self, image_size: int, channels: int = 3):
        super().__init__()
        self.image_size = image_size
        self.delta = nn.Parameter(torch.zeros(1, channels, image_size, image_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return clamp_unit(x + self.delta, self.training)

    def spec(self) -> dict[str, Any]:
        return {"kind": "additive", "image_size": self.image_size}


def make_prompt(kind: str, image_size: int, size: int | None = None) -> nn.Module | None:
    """A fresh (zero) prompt of `kind` for square inputs of `image_size` px; None for "none"."""
    if kind == "none":
        return None
    if kind in ("pad", "resize-pad"):
        frame = PadPrompt if kind == "pad" else ResizePadPrompt
        return frame(image_size, size if size is not None else default_prompt_size(image_size))
    if kind == "additive":
        return AdditivePrompt(image_size)
    raise CompressError(f"unknown prompt kind {kind!r}; use one of {', '.join(PROMPT_KINDS)}")


def install_prompt(module: nn.Module, kind: str, size: int | None = None) -> nn.Module | None:
    """The prompt a prompted method trains (the one installer every method uses): the module's own if it
    already deploys one (a prompted source run keeps training it), else a fresh zero prompt of `kind`
    put in front of its network, on the network's device. Returns it; None for kind "none"."""
    if not isinstance(module.prompt, nn.Identity):
        return module.prompt
    _, h, w = module.input_size
    if h != w:
        raise CompressError(f"visual prompts need square inputs, the model takes {h}×{w}")
    prompt = make_prompt(kind, h, size)
    if prompt is not None:
        module.prompt = prompt.to(module.normalize.mean.device)
    return prompt


def build_prompt(spec: dict[str, Any]) -> nn.Module:
    """Rebuild a prompt from its model.json spec (weights come from model.pt); a pad spec older than
    PAD_SPEC_VERSION is the shrinking prompt it meant then."""
    try:
        kind = spec["kind"]
        if kind == "pad" and spec.get("version", 1) < PAD_SPEC_VERSION:
            kind = "resize-pad"
        return make_prompt(kind, int(spec["image_size"]), spec.get("size"))
    except KeyError as exc:
        raise CompressError(f"prompt spec in model.json lacks {exc}") from None


def prompt_spec(prompt: nn.Module | None) -> dict[str, Any] | None:
    return prompt.spec() if prompt is not None and hasattr(prompt, "spec") else None
