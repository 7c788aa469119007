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
            analysis = FlopCountAnalysis(module, torch.zeros((1, *input_size)))
            analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
            return int(analysis.total())
    finally:
        module.train(was_training)


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
