"""Self-attention under a keep policy: DynamicViT's training-time token dropping.

During training DynamicViT keeps every token in the tensor and *masks* attention instead, so the
Gumbel-softmax keep decisions stay differentiable: a key j enters query i's softmax with weight
policy_j (1 kept, 0 dropped), and every query may always attend to itself (so a dropped token's
row stays well defined). Hence a kept token's output is exactly attention over the kept tokens
only — what the inference module computes after gathering them — while dropped tokens never
influence kept ones. The weights are exp(logit) · policy normalised (as in the reference code),
not a boolean mask, because the straight-through gradient of the decisions flows through that
product into the prediction modules.

`masked_attention` takes q/k/v from the three attention layouts a ViT here can have:
`nn.MultiheadAttention` (torchvision), `SplitAttention` (the pruning engine's head-prunable
replacement) and timm's `Attention`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from compress.errors import CompressError
from compress.pruning.attention import SplitAttention


def policy_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, policy: torch.Tensor, scale: float,
                     dropout: float = 0.0, training: bool = False) -> torch.Tensor:
    """softmax(q·kᵀ·scale) · v over the keys `policy` keeps (plus each query's own key).

    q, k, v: [B, H, N, d]; policy: [B, N] with values in {0, 1} (float, may carry gradient).
    Computed in float32 whatever the input precision (exp of attention logits overflows in fp16).
    """
    n = q.shape[-2]
    logits = torch.matmul(q.float(), k.float().transpose(-2, -1)) * scale               # [B, H, N, N]
    keys = policy.float()[:, None, None, :]                                               # [B, 1, 1, N]
    eye = torch.eye(n, device=q.device, dtype=torch.float32)
    allow = keys + (1.0 - keys) * eye                                                     # [B, 1, N, N]
    # The shift (max over allowed keys) cancels in the ratio; it keeps exp() ≤ 1 on allowed keys, and the
    # clamp keeps disallowed ones finite (they are multiplied by 0, but 0 · inf would be nan).
    shift = logits.detach().masked_fill(allow.detach() <= 0, float("-inf")).amax(-1, keepdim=True)
    weights = torch.exp((logits - shift).clamp(max=0.0)) * allow
    weights = weights / weights.sum(-1, keepdim=True)
    if dropout and training:
        weights = F.dropout(weights, dropout)
    return torch.matmul(weights, v.float()).to(v.dtype)


def masked_attention(attn: nn.Module, x: torch.Tensor, policy: torch.Tensor) -> torch.Tensor:
    """Self-attention module `attn` applied to x [B, N, C] with keys restricted by `policy` [B, N]."""
    if isinstance(attn, nn.MultiheadAttention):
        return _mha(attn, x, policy)
    if isinstance(attn, SplitAttention):
        return _split(attn, x, policy)
    if hasattr(attn, "qkv") and hasattr(attn, "proj") and hasattr(attn, "num_heads"):
        return _timm(attn, x, policy)
    raise CompressError(f"token sparsification does not know the attention layer {type(attn).__name__}")


def _heads(t: torch.Tensor, head_dim: int) -> torch.Tensor:
    b, n, _ = t.shape
    return t.view(b, n, -1, head_dim).transpose(1, 2)


def _merge(t: torch.Tensor) -> torch.Tensor:
    b, _, n, _ = t.shape
    return t.transpose(1, 2).reshape(b, n, -1)


def _mha(attn: nn.MultiheadAttention, x: torch.Tensor, policy: torch.Tensor) -> torch.Tensor:
    if not attn.batch_first or not attn._qkv_same_embed_dim or attn.bias_k is not None or attn.add_zero_attn:
        raise CompressError("token sparsification needs batch-first MultiheadAttention with equal q/k/v dims")
    q, k, v = (_heads(t, attn.head_dim) for t in F.linear(x, attn.in_proj_weight, attn.in_proj_bias).chunk(3, -1))
    out = policy_attention(q, k, v, policy, attn.head_dim ** -0.5, attn.dropout, attn.training)
    return attn.out_proj(_merge(out))


def _split(attn: SplitAttention, x: torch.Tensor, policy: torch.Tensor) -> torch.Tensor:
    if not attn.batch_first:
        raise CompressError("token sparsification needs batch-first attention")
    q, k, v = (_heads(layer(x), attn.head_dim) for layer in (attn.q, attn.k, attn.v))
    out = policy_attention(q, k, v, policy, attn.scale, attn.dropout, attn.training)
    return attn.out_proj(_merge(out))


def _timm(attn: nn.Module, x: torch.Tensor, policy: torch.Tensor) -> torch.Tensor:
    """timm's Attention.forward with the softmax replaced (q/k norms, output norm and gate kept)."""
    b, n, _ = x.shape
    gate_layer = getattr(attn, "gate", None)
    gate = gate_layer(x).sigmoid() if gate_layer is not None else None
    head_dim = attn.qkv.out_features // 3 // attn.num_heads
    q, k, v = attn.qkv(x).reshape(b, n, 3, attn.num_heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    out = policy_attention(q, k, v, policy, attn.scale, attn.attn_drop.p, attn.training)
    out = _merge(out)
    out = attn.norm(out) if hasattr(attn, "norm") else out
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out))
