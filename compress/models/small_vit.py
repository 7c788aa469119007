"""Vision transformers at this machine's scale: DeiT-Tiny width with 4 px patches, for 28–32 px images.

torchvision's `vit_b_16` at 32 px sees 4 tokens; a 224 px ViT costs gigaFLOPs per image. These are
torchvision `VisionTransformer`s (so everything that handles `vit_*` — the pruning engine's
SplitAttention, ONNX export, token sparsification — handles them unchanged) with DeiT-Tiny's width
(192, 3 heads of 64, MLP 768) and 4 px patches: 49 tokens at 28 px (Fashion-MNIST), 64 at 32 px.
The depth is in the name: `vit_tiny_p4_d6`, `…_d8`, `…_d12` (DeiT-Tiny's own depth).
"""

from __future__ import annotations

import re

from torch import nn

from compress.errors import CompressError

WIDTH, HEADS, MLP_DIM, PATCH = 192, 3, 768, 4
DEPTHS = (6, 8, 12)
_NAME = re.compile(r"vit_tiny_p4_d(\d+)")


class SmallViTFamily:
    """`vit_tiny_p4_d{6,8,12}`: torchvision VisionTransformer, patch 4, width 192, 3 heads, MLP 768."""

    def names(self) -> list[str]:
        return [f"vit_tiny_p4_d{d}" for d in DEPTHS]

    def owns(self, name: str) -> bool:
        return name in self.names()

    def default_adapt(self, name: str, image_size: int) -> str | None:
        return None

    def create(self, name: str, num_classes: int, image_size: int, adapt: str | None, weights: str | None) -> nn.Module:
        from torchvision.models import VisionTransformer

        if weights:
            raise CompressError(f"{name} has no published weights; train it with `compress train` or use --checkpoint")
        if adapt is not None:
            raise CompressError(f"unknown model adaptation {adapt!r} for {name} in model.json")
        if image_size % PATCH:
            raise CompressError(f"{name} cuts images into {PATCH} px patches; --image-size {image_size} is not a "
                                f"multiple of {PATCH}")
        depth = int(_NAME.fullmatch(name).group(1))
        return VisionTransformer(image_size=image_size, patch_size=PATCH, num_layers=depth, num_heads=HEADS,
                                 hidden_dim=WIDTH, mlp_dim=MLP_DIM, num_classes=num_classes)
