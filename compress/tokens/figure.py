"""Which patches survive each stage (the seed report's Figures 8–9): images with dropped patches greyed out.

Reads the kept-patch indices the inference module itself computes (`returning_indices`), so the
picture shows exactly what the deployed model keeps.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from torch import nn

from compress.files import write_atomic
from compress.tokens.model import TokenSparseViT, returning_indices

DROPPED_GREY = 0.35    # dropped patches are drawn as this flat grey, kept ones as they are


@torch.no_grad()
def kept_pixel_masks(module: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """For each stage, a bool [B, H, W] mask of the pixels whose patch token is still kept."""
    net = getattr(module, "net", module)
    if not isinstance(net, TokenSparseViT):
        raise ValueError("kept_pixel_masks needs a token-sparse module")
    rows, cols, patch = net.adapter.patch_grid(net.backbone)
    was_training = module.training
    module.eval()
    with returning_indices(module):
        kept = module(images)[1:]
    module.train(was_training)
    masks = []
    for idx in kept:
        grid = torch.zeros(images.shape[0], rows * cols, dtype=torch.bool, device=idx.device)
        grid.scatter_(1, idx, True)
        grid = grid.view(-1, rows, cols).repeat_interleave(patch, 1).repeat_interleave(patch, 2)
        masks.append(grid[:, :images.shape[-2], :images.shape[-1]].cpu())
    return masks


def plot_kept_patches(module: nn.Module, images: torch.Tensor, path: str | Path, titles: list[str] | None = None,
                      ) -> Path:
    """A grid: one row per image, the input then each stage's kept patches; written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    masks = kept_pixel_masks(module, images)
    net = getattr(module, "net", module)
    n, stages = images.shape[0], len(masks)
    fig, axes = plt.subplots(n, stages + 1, figsize=(1.6 * (stages + 1), 1.6 * n + 0.3), squeeze=False)
    pictures = images.clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    for i in range(n):
        shown = pictures[i]
        axes[i][0].imshow(shown, interpolation="nearest")
        axes[i][0].set_ylabel(titles[i] if titles else "", fontsize=7)
        for s, mask in enumerate(masks):
            m = mask[i].numpy()[..., None]
            axes[i][s + 1].imshow(np.where(m, shown, DROPPED_GREY), interpolation="nearest")
        for ax in axes[i]:
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0][0].set_title("input", fontsize=8)
    for s in range(stages):
        axes[0][s + 1].set_title(f"block {net.stages[s]}: {net.keep[s]}/{net.patches}", fontsize=8)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    plt.close(fig)
    write_atomic(Path(path), png.getvalue())
    return Path(path)
