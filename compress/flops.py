"""FLOPs and parameter counts as design.md defines them: fvcore, batch 1, one multiply-add = one flop."""

from __future__ import annotations

import logging
import warnings

import torch
from torch import nn


def count_flops(module: nn.Module, input_size: tuple[int, ...]) -> int:
    """fvcore FLOPs (MACs) of `module` on one input of `input_size` = (C, H, W)."""
    from fvcore.nn import FlopCountAnalysis

    logging.getLogger("fvcore").setLevel(logging.ERROR)
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # fvcore traces with the deprecated torch.jit API
            device = next((t.device for t in (*module.parameters(), *module.buffers())), torch.device("cpu"))
            analysis = FlopCountAnalysis(module, torch.zeros((1, *input_size), device=device))
            analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
            analysis.set_op_handle(**ATTENTION_HANDLES)
            return int(analysis.total())
    finally:
        module.train(was_training)


def _mha_flops(inputs, outputs) -> int:
    """`nn.MultiheadAttention`'s fused inference kernel (fvcore skips it): q/k/v/out projections + the
    two attention matmuls, the same count as the unfused linear + matmul ops."""
    from fvcore.nn.jit_handles import get_shape

    (b, lq, e), (_, lk, _), (_, lv, _) = (get_shape(v) for v in inputs[:3])
    return b * (lq + lk + lv + lq) * e * e + 2 * b * lq * lk * e


def _sdpa_flops(inputs, outputs) -> int:
    """scaled_dot_product_attention: q·kᵀ and attn·v (softmax and scaling are not counted, as elsewhere)."""
    from fvcore.nn.jit_handles import get_shape

    q, k, v = (get_shape(t) for t in inputs[:3])
    batch = 1
    for d in q[:-2]:
        batch *= d
    return batch * q[-2] * k[-2] * (q[-1] + v[-1])


ATTENTION_HANDLES = {"aten::_native_multi_head_attention": _mha_flops,
                     "aten::scaled_dot_product_attention": _sdpa_flops}


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
