"""Multi-head attention with separate q/k/v/out projections, so attention heads can be pruned.

`nn.MultiheadAttention` fuses the q/k/v projections into one parameter and ties their width to the
embedding (residual-stream) width, so a head cannot be removed without also shrinking the residual
stream. `SplitAttention` computes the same function with four `nn.Linear` layers: Torch-Pruning then
sees the heads as one channel group (q/k/v outputs + out-projection inputs) that is independent of
the residual stream, and a slimmed model simply has fewer heads of the same size. Attention uses
explicit matmuls so that fvcore counts its FLOPs and ONNX export needs no special operator.

timm's ViT-family `Attention` (one fused qkv Linear, scaled_dot_product_attention) hides its heads
the same way; `SplitSelfAttention` is its split equivalent (called with one input, like timm's).
torchvision's Swin `ShiftedWindowAttention(V2)` runs a functional `shifted_window_attention` that
derives the head size from the residual width (C // num_heads), so a head cannot be removed at all;
`SplitWindowAttention(V2)` (window_attention.py) is its split equivalent, its per-head tensors (the
relative-position-bias table, V2's logit scale and bias MLP output) pruned with the heads.
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

    def heads(self, query: torch.Tensor, key: torch.Tensor | None = None,
              value: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v projected and split into heads, [batch, heads, tokens, head_dim] (self-attention when
        `key` and `value` are left out)."""
        key = query if key is None else key
        value = query if value is None else value
        return tuple(lin(t).view(t.shape[0], t.shape[1], -1, self.head_dim).transpose(1, 2)
                     for lin, t in ((self.q, query), (self.k, key), (self.v, value)))

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, need_weights: bool = False,
                attn_mask: torch.Tensor | None = None, key_padding_mask: torch.Tensor | None = None, **_):
        if attn_mask is not None or key_padding_mask is not None or need_weights:
            raise NotImplementedError("SplitAttention supports unmasked attention without returned weights")
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        b, n, _ = query.shape
        q, k, v = self.heads(query, key, value)
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
        new.load_fused(mha.in_proj_weight, mha.in_proj_bias, mha.out_proj)
        return new.train(mha.training)

    def load_fused(self, qkv_weight: torch.Tensor, qkv_bias: torch.Tensor | None, proj: nn.Linear) -> None:
        """Take the weights of a fused [q; k; v] input projection and of the output projection `proj`
        (a split projection without a bias leaves that part of `qkv_bias` out)."""
        inner = self.q.out_features
        with torch.no_grad():
            for i, lin in enumerate((self.q, self.k, self.v)):
                lin.weight.copy_(qkv_weight[i * inner:(i + 1) * inner])
                if lin.bias is not None:
                    lin.bias.copy_(qkv_bias[i * inner:(i + 1) * inner])
            self.out_proj.weight.copy_(proj.weight)
            if self.out_proj.bias is not None:
                self.out_proj.bias.copy_(proj.bias)


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
        new = cls(attn.qkv.in_features, attn.num_heads, attn.head_dim, bias=attn.qkv.bias is not None,
                  dropout=attn.attn_drop.p, out_bias=attn.proj.bias is not None)
        new.load_fused(attn.qkv.weight, attn.qkv.bias, attn.proj)
        return new.train(attn.training)


def split_attention(net: nn.Module) -> list[str]:
    """Replace every `nn.MultiheadAttention` in `net` by an equivalent `SplitAttention`, every plain
    timm `Attention` by a `SplitSelfAttention` and every torchvision `ShiftedWindowAttention(V2)` by a
    `SplitWindowAttention(V2)`, in place. Returns the names of the replaced modules."""
    from compress.pruning.window_attention import split_window_attention

    replaced = []
    for name, mod in list(net.named_modules()):
        if isinstance(mod, nn.MultiheadAttention):
            new = SplitAttention.from_mha(mod)
        elif type(mod).__name__ == "Attention" and type(mod).__module__.startswith("timm."):
            new = SplitSelfAttention.from_timm(mod)
        else:
            new = split_window_attention(mod)
        if new is None:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = net.get_submodule(parent_name) if parent_name else net
        setattr(parent, child, new)
        replaced.append(name)
    return replaced
