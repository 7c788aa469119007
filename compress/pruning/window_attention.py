"""Shifted-window attention (torchvision Swin V1/V2) with split q/k/v projections, so its heads prune.

torchvision's `ShiftedWindowAttention` hands one fused qkv weight to the functional
`shifted_window_attention`, which takes the head size from the residual width (`C // num_heads`)
and writes the heads back into a tensor of that width: a head cannot be removed without breaking
the function. `SplitWindowAttention` computes the same function as a `SplitSelfAttention` (separate
q/k/v/out Linear layers, the head size fixed) run on windows, so the heads are one Torch-Pruning
group like ViT's. Its per-head tensors ride along in that group: the relative-position-bias table
(V1, [positions, heads]), and in V2 the logit scale ([heads, 1, 1]) and the output layer of the
continuous-position-bias MLP (`cpb_mlp.2`, out features = heads). Torch-Pruning reaches them through
the bias added to the attention logits (and V2's logit multiply), whose dim 1 is the head.

The bias and index tables are built by torchvision's own methods (borrowed, so they stay the
library's), the window partition and shift mask follow `shifted_window_attention` step by step.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.swin_transformer import ShiftedWindowAttention, ShiftedWindowAttentionV2

from compress.pruning.attention import SplitSelfAttention


class SplitWindowAttention(SplitSelfAttention):
    """torchvision `ShiftedWindowAttention` with split projections: input and output [B, H, W, C]."""

    define_relative_position_bias_table = ShiftedWindowAttention.define_relative_position_bias_table
    define_relative_position_index = ShiftedWindowAttention.define_relative_position_index
    get_relative_position_bias = ShiftedWindowAttention.get_relative_position_bias

    def __init__(self, embed_dim: int, num_heads: int, head_dim: int, window_size: list[int],
                 shift_size: list[int], bias: bool = True, dropout: float = 0.0, proj_dropout: float = 0.0,
                 out_bias: bool | None = None):
        super().__init__(embed_dim, num_heads, head_dim, bias=bias, dropout=dropout, out_bias=out_bias)
        self.window_size = list(window_size)
        self.shift_size = list(shift_size)
        self.proj_dropout = proj_dropout
        self.define_relative_position_bias_table()
        self.define_relative_position_index()

    def per_head(self) -> list[tuple[nn.Module | nn.Parameter, int]]:
        """The tensors besides the projections that hold one slice per head (pruned with the heads), with
        the dimension that holds the heads (a layer's output features: 0)."""
        return [(self.relative_position_bias_table, 1)]

    def logits(self, windows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention logits [windows, heads, n, n] (relative-position bias included) and the values."""
        q, k, v = self.heads(windows)
        attn = (q * self.scale).matmul(k.transpose(-2, -1))
        return attn + self.get_relative_position_bias(), v

    def forward(self, x: torch.Tensor, **_) -> torch.Tensor:
        b, h, w, c = x.shape
        wh, ww = self.window_size
        x = F.pad(x, (0, 0, 0, (ww - w % ww) % ww, 0, (wh - h % wh) % wh))
        _, ph, pw, _ = x.shape
        # no shift where one window covers the (padded) map, as in torchvision
        shift = [0 if wh >= ph else self.shift_size[0], 0 if ww >= pw else self.shift_size[1]]
        if sum(shift) > 0:
            x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
        count, n = (ph // wh) * (pw // ww), wh * ww
        windows = x.view(b, ph // wh, wh, pw // ww, ww, c).permute(0, 1, 3, 2, 4, 5).reshape(b * count, n, c)
        attn, v = self.logits(windows)
        if sum(shift) > 0:
            heads = attn.shape[1]
            mask = _shift_mask(windows, ph, pw, self.window_size, shift)
            attn = (attn.view(b, count, heads, n, n) + mask.unsqueeze(1).unsqueeze(0)).view(-1, heads, n, n)
        attn = F.dropout(F.softmax(attn, dim=-1), p=self.dropout, training=self.training)
        out = self.out_proj(attn.matmul(v).transpose(1, 2).reshape(b * count, n, -1))
        out = F.dropout(out, p=self.proj_dropout, training=self.training)
        out = out.view(b, ph // wh, pw // ww, wh, ww, -1).permute(0, 1, 3, 2, 4, 5).reshape(b, ph, pw, -1)
        if sum(shift) > 0:
            out = torch.roll(out, shifts=(shift[0], shift[1]), dims=(1, 2))
        return out[:, :h, :w, :].contiguous()

    def copy_tables(self, attn: ShiftedWindowAttention) -> None:
        """Take the position-bias parameters of torchvision module `attn` (the index buffers are rebuilt)."""
        self.relative_position_bias_table.copy_(attn.relative_position_bias_table)

    @classmethod
    def from_torchvision(cls, attn: ShiftedWindowAttention, **extra) -> SplitWindowAttention | None:
        """An equivalent module carrying `attn`'s weights, or None where the heads do not split the width."""
        e, heads = attn.qkv.in_features, attn.num_heads
        if attn.qkv.out_features != 3 * e or attn.proj.in_features != e or e % heads:
            return None
        new = cls(e, heads, e // heads, attn.window_size, attn.shift_size, bias=attn.qkv.bias is not None,
                  dropout=attn.attention_dropout, proj_dropout=attn.dropout, out_bias=attn.proj.bias is not None,
                  **extra)
        new.load_fused(attn.qkv.weight, attn.qkv.bias, attn.proj)
        with torch.no_grad():
            new.copy_tables(attn)
        return new.train(attn.training)


class SplitWindowAttentionV2(SplitWindowAttention):
    """torchvision `ShiftedWindowAttentionV2`: cosine attention with a learned per-head logit scale and a
    continuous position bias from a small MLP; the key projection has no bias (V2 zeroes it)."""

    define_relative_position_bias_table = ShiftedWindowAttentionV2.define_relative_position_bias_table
    get_relative_position_bias = ShiftedWindowAttentionV2.get_relative_position_bias

    def __init__(self, embed_dim: int, num_heads: int, head_dim: int, window_size: list[int],
                 shift_size: list[int], bias: bool = True, dropout: float = 0.0, proj_dropout: float = 0.0,
                 out_bias: bool | None = None, cpb_hidden: int = 512):
        super().__init__(embed_dim, num_heads, head_dim, window_size, shift_size, bias=bias, dropout=dropout,
                         proj_dropout=proj_dropout, out_bias=out_bias)
        self.k = nn.Linear(embed_dim, num_heads * head_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.log(10 * torch.ones((num_heads, 1, 1))))
        self.cpb_mlp = nn.Sequential(nn.Linear(2, cpb_hidden, bias=True), nn.ReLU(inplace=True),
                                     nn.Linear(cpb_hidden, num_heads, bias=False))

    def per_head(self) -> list[tuple[nn.Module | nn.Parameter, int]]:
        return [(self.logit_scale, 0), (self.cpb_mlp[2], 0)]

    def logits(self, windows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q, k, v = self.heads(windows)
        attn = F.normalize(q, dim=-1).matmul(F.normalize(k, dim=-1).transpose(-2, -1))
        attn = attn * torch.clamp(self.logit_scale, max=math.log(100.0)).exp()
        return attn + self.get_relative_position_bias(), v

    def copy_tables(self, attn: ShiftedWindowAttentionV2) -> None:
        self.logit_scale.copy_(attn.logit_scale)
        self.cpb_mlp.load_state_dict(attn.cpb_mlp.state_dict())


def _shift_mask(windows: torch.Tensor, ph: int, pw: int, window: list[int], shift: list[int]) -> torch.Tensor:
    """The additive mask [count, n, n] that keeps shifted windows from attending across the regions the
    cyclic shift brought together (−100 between regions), as `shifted_window_attention` builds it."""
    (wh, ww), (sh, sw) = window, shift
    regions = windows.new_zeros((ph, pw))
    label = 0
    for h in ((0, -wh), (-wh, -sh), (-sh, None)):
        for w in ((0, -ww), (-ww, -sw), (-sw, None)):
            regions[h[0]:h[1], w[0]:w[1]] = label
            label += 1
    regions = regions.view(ph // wh, wh, pw // ww, ww).permute(0, 2, 1, 3).reshape(-1, wh * ww)
    diff = regions.unsqueeze(1) - regions.unsqueeze(2)
    return diff.masked_fill(diff != 0, -100.0).masked_fill(diff == 0, 0.0)


def split_window_attention(mod: nn.Module) -> SplitWindowAttention | None:
    """The split equivalent of a torchvision shifted-window attention module, None for any other module."""
    if type(mod) is ShiftedWindowAttentionV2:
        return SplitWindowAttentionV2.from_torchvision(mod, cpb_hidden=mod.cpb_mlp[0].out_features)
    if type(mod) is ShiftedWindowAttention:
        return SplitWindowAttention.from_torchvision(mod)
    return None
