"""Multi-head attention with separate q/k/v/out projections, so attention heads can be pruned.

`nn.MultiheadAttention` fuses the q/k/v projections into one parameter and ties their width to the
embedding (residual-stream) width, so a head cannot be removed without also shrinking the residual
stream. `SplitAttention` computes the same function with four `nn.Linear` layers: Torch-Pruning then
sees the heads as one channel group (q/k/v outputs + out-projection inputs) that is independent of
the residual stream, and a slimmed model simply has fewer heads of the same size. Attention uses
explicit matmuls so that fvcore counts its FLOPs and ONNX export needs no special operator.

timm's ViT-family `Attention` (one fused qkv Linear, scaled_dot_product_attention) hides its heads
the same way; `SplitSelfAttention` is its split equivalent (called with one input, like timm's).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class SplitAttention(nn.Module):
    """Drop-in replacement for `nn.MultiheadAttention` (self- or cross-attention, no masks)."""

    def __init__(self, embed_dim: int, num_heads: int, head_dim: int, bias: bool = True,
                 dropout: float = 0.0, batch_first: bool = True, out_bias: bool | None = None):
        super().__init__()
        inner = num_heads * head_dim
        self.q = nn.Linear(embed_dim, inner, bias=bias)
        self.k = nn.Linear(embed_dim, inner, bias=bias)
        self.v = nn.Linear(embed_dim, inner, bias=bias)
        self.out_proj = nn.Linear(inner, embed_dim, bias=bias if out_bias is None else out_bias)
        self.head_dim = head_dim
        self.dropout = dropout
        self.batch_first = batch_first
        # The scale stays the dense model's: heads are removed whole, never shrunk.
        self.scale = 1.0 / math.sqrt(head_dim)

    @property
    def num_heads(self) -> int:
        return self.q.out_features // self.head_dim

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, need_weights: bool = False,
                attn_mask: torch.Tensor | None = None, key_padding_mask: torch.Tensor | None = None, **_):
        if attn_mask is not None or key_padding_mask is not None or need_weights:
            raise NotImplementedError("SplitAttention supports unmasked attention without returned weights")
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        b, n, _ = query.shape
        q = self.q(query).view(b, n, -1, self.head_dim).transpose(1, 2)
        k = self.k(key).view(b, key.shape[1], -1, self.head_dim).transpose(1, 2)
        v = self.v(value).view(b, value.shape[1], -1, self.head_dim).transpose(1, 2)
        attn = torch.softmax(torch.matmul(q, k.transpose(-2, -1)) * self.scale, dim=-1)
        if self.dropout and self.training:
            attn = F.dropout(attn, self.dropout)
        out = torch.matmul(attn, v).transpose(1, 2).reshape(b, n, -1)
        out = self.out_proj(out)
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, None

    @classmethod
    def from_mha(cls, mha: nn.MultiheadAttention) -> SplitAttention:
        """An equivalent module carrying `mha`'s weights."""
        if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("only MultiheadAttention with equal q/k/v dims and no bias_k/zero_attn is supported")
        e = mha.embed_dim
        new = cls(e, mha.num_heads, mha.head_dim, bias=mha.in_proj_bias is not None,
                  dropout=mha.dropout, batch_first=mha.batch_first)
        with torch.no_grad():
            for i, lin in enumerate((new.q, new.k, new.v)):
                lin.weight.copy_(mha.in_proj_weight[i * e:(i + 1) * e])
                if lin.bias is not None:
                    lin.bias.copy_(mha.in_proj_bias[i * e:(i + 1) * e])
            new.out_proj.weight.copy_(mha.out_proj.weight)
            if new.out_proj.bias is not None:
                new.out_proj.bias.copy_(mha.out_proj.bias)
        return new.train(mha.training)


class SplitSelfAttention(SplitAttention):
    """timm's `Attention` (ViT, DeiT, …) with split projections: self-attention on one input."""

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False,
                **_) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise NotImplementedError("SplitSelfAttention supports unmasked attention")
        return super().forward(x, x, x)[0]

    @classmethod
    def from_timm(cls, attn: nn.Module) -> SplitSelfAttention | None:
        """An equivalent module carrying timm `Attention` `attn`'s weights, or None for variants it does
        not cover (q/k normalisation, output normalisation or gate, dropout after the projection)."""
        identities = (attn.q_norm, attn.k_norm, getattr(attn, "norm", nn.Identity()))
        plain = (all(isinstance(m, nn.Identity) for m in identities) and getattr(attn, "gate", None) is None
                 and attn.proj.in_features == attn.proj.out_features == attn.qkv.in_features
                 and not attn.proj_drop.p and abs(attn.scale * math.sqrt(attn.head_dim) - 1) < 1e-6)
        if not plain:
            return None
        e, inner = attn.qkv.in_features, attn.num_heads * attn.head_dim
        new = cls(e, attn.num_heads, attn.head_dim, bias=attn.qkv.bias is not None, dropout=attn.attn_drop.p,
                  out_bias=attn.proj.bias is not None)
        with torch.no_grad():
            for i, lin in enumerate((new.q, new.k, new.v)):
                lin.weight.copy_(attn.qkv.weight[i * inner:(i + 1) * inner])
                if lin.bias is not None:
                    lin.bias.copy_(attn.qkv.bias[i * inner:(i + 1) * inner])
            new.out_proj.weight.copy_(attn.proj.weight)
            if new.out_proj.bias is not None:
                new.out_proj.bias.copy_(attn.proj.bias)
        return new.train(attn.training)


def split_attention(net: nn.Module) -> list[str]:
    """Replace every `nn.MultiheadAttention` in `net` by an equivalent `SplitAttention`, and every plain
    timm `Attention` by a `SplitSelfAttention`, in place. Returns the names of the replaced modules."""
    replaced = []
    for name, mod in list(net.named_modules()):
        if isinstance(mod, nn.MultiheadAttention):
            new = SplitAttention.from_mha(mod)
        elif type(mod).__name__ == "Attention" and type(mod).__module__.startswith("timm."):
            new = SplitSelfAttention.from_timm(mod)
        else:
            continue
        if new is None:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = net.get_submodule(parent_name) if parent_name else net
        setattr(parent, child, new)
        replaced.append(name)
    return replaced
