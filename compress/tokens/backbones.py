"""How to walk a ViT one block at a time: torchvision's VisionTransformer and timm's ViT/DeiT.

Token sparsification has to act *between* blocks, so it needs a ViT in parts: the embedding
(patches + prefix tokens + position embedding), the blocks, the final norm and the head. Each
implementation gets a small stateless adapter with those parts; `masked_block` re-states the
block's own forward with attention restricted by a keep policy (training), while inference calls
the block itself on the gathered tokens — so the deployed module runs the library's code. Tests
check that a masked block with an all-ones policy equals the block.
"""

from __future__ import annotations

import torch
from torch import nn

from compress.errors import CompressError
from compress.tokens.attention import masked_attention


class TorchvisionViT:
    """torchvision.models.VisionTransformer (vit_b_16…, and the small vit_tiny_p4_* family)."""

    kind = "torchvision"

    @staticmethod
    def matches(net: nn.Module) -> bool:
        from torchvision.models import VisionTransformer

        return isinstance(net, VisionTransformer)

    def prefix_tokens(self, net) -> int:
        return 1

    def num_patches(self, net) -> int:
        return (net.image_size // net.patch_size) ** 2

    def embed_dim(self, net) -> int:
        return net.hidden_dim

    def patch_grid(self, net) -> tuple[int, int, int]:
        """(rows, columns, patch size in px) of the patch tokens."""
        side = net.image_size // net.patch_size
        return side, side, net.patch_size

    def blocks(self, net) -> list[nn.Module]:
        return list(net.encoder.layers)

    def embed(self, net, x: torch.Tensor) -> torch.Tensor:
        x = net._process_input(x)
        x = torch.cat([net.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        return net.encoder.dropout(x + net.encoder.pos_embedding)

    def masked_block(self, block: nn.Module, x: torch.Tensor, policy: torch.Tensor) -> torch.Tensor:
        h = block.dropout(masked_attention(block.self_attention, block.ln_1(x), policy))
        x = x + h
        return x + block.mlp(block.ln_2(x))

    def final_norm(self, net, x: torch.Tensor) -> torch.Tensor:
        return net.encoder.ln(x)

    def head(self, net, x: torch.Tensor, policy: torch.Tensor | None) -> torch.Tensor:
        return net.heads(x[:, 0])


class TimmViT:
    """timm's VisionTransformer (vit_*, deit_*; class-token or average pooling, any prefix tokens)."""

    kind = "timm"

    @staticmethod
    def matches(net: nn.Module) -> bool:
        return all(hasattr(net, a) for a in ("patch_embed", "_pos_embed", "blocks", "norm", "forward_head"))

    def prefix_tokens(self, net) -> int:
        return int(getattr(net, "num_prefix_tokens", 1))

    def num_patches(self, net) -> int:
        return int(net.patch_embed.num_patches)

    def embed_dim(self, net) -> int:
        return int(net.embed_dim)

    def patch_grid(self, net) -> tuple[int, int, int]:
        rows, cols = net.patch_embed.grid_size
        return int(rows), int(cols), int(net.patch_embed.patch_size[0])

    def blocks(self, net) -> list[nn.Module]:
        return list(net.blocks)

    def embed(self, net, x: torch.Tensor) -> torch.Tensor:
        x = net._pos_embed(net.patch_embed(x))
        return net.norm_pre(net.patch_drop(x))

    def masked_block(self, block: nn.Module, x: torch.Tensor, policy: torch.Tensor) -> torch.Tensor:
        needed = ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")
        if not all(hasattr(block, a) for a in needed):
            raise CompressError(f"token sparsification supports timm's Block, not {type(block).__name__}")
        x = x + block.drop_path1(block.ls1(masked_attention(block.attn, block.norm1(x), policy)))
        return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))

    def final_norm(self, net, x: torch.Tensor) -> torch.Tensor:
        return net.norm(x)

    def head(self, net, x: torch.Tensor, policy: torch.Tensor | None) -> torch.Tensor:
        if policy is None or net.global_pool == "token":
            return net.forward_head(x)
        # Average pooling during masked training: the mean over kept patch tokens, as inference computes it.
        p = self.prefix_tokens(net)
        keep = policy[:, p:, None].to(x.dtype)
        pooled = (x[:, p:] * keep).sum(1) / keep.sum(1).clamp_min(1.0)
        return net.head(net.head_drop(net.fc_norm(pooled)))


ADAPTERS = {a.kind: a for a in (TorchvisionViT(), TimmViT())}


def adapter_for(net: nn.Module):
    """The adapter that walks `net`; CompressError when it is not a supported ViT."""
    for adapter in ADAPTERS.values():
        if adapter.matches(net):
            if adapter.kind == "timm":
                _check_timm(net)
            return adapter
    raise CompressError(f"token sparsification needs a vision transformer (torchvision VisionTransformer or timm "
                        f"ViT/DeiT); {type(net).__name__} is not one")


def _check_timm(net: nn.Module) -> None:
    if getattr(net, "global_pool", "token") not in ("token", "avg"):
        raise CompressError(f"token sparsification supports class-token or average pooling, not timm's "
                            f"global_pool={net.global_pool!r}")
    if getattr(net, "dynamic_img_size", False):
        raise CompressError("token sparsification needs a fixed input size (timm dynamic_img_size=False)")
