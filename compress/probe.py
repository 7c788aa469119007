"""Probes of a network in the middle of a training stage, leaving its training state as it was.

A stage that shrinks weights every step (Split LBI's coupling, an L1 proximal step) leaves the BN
running statistics behind the weights: evaluated with them, a network whose training loss is ~0 can
score chance. `accuracy_now` re-estimates the statistics first (on training images, no gradient),
optionally with some units gated off (the network a set of keep-masks would slim to), measures
validation accuracy, and puts the BN buffers back.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from compress.loop import buffers_kept, evaluate, reestimate_bn
from compress.pruning.gates import Gates


def accuracy_now(module: nn.Module, data, batch_size: int, groups: list | None = None,
                 keep: dict[str, torch.Tensor] | None = None) -> float:
    """Validation accuracy of `module` (a deployable module) with BN statistics re-estimated for it; with
    `groups` and `keep`, of the network keeping only those units (gated: exactly the slimmed network)."""
    with buffers_kept(module), contextlib.ExitStack() as stack:
        if keep is not None:
            gates = stack.enter_context(Gates(module.net, groups))
            device = next(module.parameters()).device
            gates.set_masks({gid: m.to(device) for gid, m in keep.items()})
        reestimate_bn(module, data.train, batch_size)
        return evaluate(module, data.val)


__all__ = ["accuracy_now"]
