"""Masks that meet a prune's target on the real network, not only in the cost model's estimate.

The cost model (FLOPs model or latency tables) estimates; the truth confirms: fvcore FLOPs of the
slimmed network (with its real token counts under token sparsification), or the slimmed deployable
module timed against the dense one on the latency target (compress/budget.py). Where they disagree,
the target handed to the cost model is corrected and the masks re-selected (the post-slimming
calibration every method goes through).
"""

from __future__ import annotations

import gc
from typing import Any

import torch

from compress.budget import Meter, next_aim, slimmed_copy
from compress.deploy import DeployableModule
from compress.errors import CompressError
from compress.flops import count_flops
from compress.methods.base import SearchResult
from compress.pruning.groups import ChannelGroup
from compress.pruning.target import masks_of_counts, select_counts, smallest_ratio
from compress.tokens import TokenSparseViT, sparsify
from compress.tokens.training import TokenOptions


def real_ratio(module: DeployableModule, masks: dict[str, torch.Tensor], dense_flops: int,
               tokens: TokenOptions | None = None) -> float:
    """fvcore FLOPs ratio of `module` slimmed by `masks`, measured on a copy (module is untouched); with
    `tokens`, at the token counts the module will have (prediction modules added if not there yet)."""
    trial = slimmed_copy(module, masks)
    if tokens is not None and not isinstance(trial.net, TokenSparseViT):
        trial.net = sparsify(trial.net, tokens.keep_ratio, tokens.stages)
    ratio = count_flops(trial, tuple(trial.input_size)) / dense_flops
    del trial
    gc.collect()   # the copy's group graph holds its layers in reference cycles: free them before the next round
    return ratio


def confirmed(meter: Meter, module: DeployableModule, masks: dict[str, torch.Tensor], dense_flops: int,
               tokens: TokenOptions | None) -> float:
    """The ratio `masks` really reach: fvcore FLOPs, or the slimmed copy timed on the latency target."""
    if meter.budget.kind == "flops":
        return real_ratio(module, masks, dense_flops, tokens)
    return meter.real_ratio(module, masks)


def choose_masks(module: DeployableModule, groups: list[ChannelGroup], result: SearchResult, meter: Meter,
                  scope: str, round_to: int, allocation: str, dense_flops: int, record: dict[str, Any],
                  tokens: TokenOptions | None = None) -> tuple[dict[str, torch.Tensor], float]:
    """Masks for the target; returns them and the cost model's estimate of their ratio.

    The post-slimming calibration: the cost model (FLOPs model or latency tables) estimates, the truth
    (fvcore, or the slimmed copy timed against the dense network on the target) confirms. Where they
    disagree (ops the FLOPs model cannot attribute, a prompt's own cost, tokens, what the latency tables
    do not see), the target handed to the model is corrected by the measured error and masks
    re-selected (`next_aim`: inside a bracket once there is one), keeping the masks whose real ratio is
    closest to the target. `record` receives every
    round (aim, estimate, confirmed ratio) and the knapsack's figures. Masks a method returns itself
    (VPNs) were chosen against the cost model during its search; they are kept as they are (one round,
    unconfirmed: a latency target's slim model is measured afterwards).
    """
    budget, model = meter.budget, meter.cost_model
    if not groups:
        if budget.ratio < 1.0:
            raise CompressError(f"this model has no prunable channel groups; the only reachable {budget.flag} is 1")
        return {}, 1.0
    if result.scores is None:
        if result.masks is None:
            raise ValueError("a method's SearchResult needs scores or masks")
        masks = {g.id: result.masks.get(g.id, torch.ones(g.width, dtype=torch.bool)) for g in groups}
        estimate = model.ratio_of_masks(masks)
        record["calibration"] = [{"aim": round(budget.ratio, 6), "estimate": round(estimate, 6), "confirmed": None}]
        return masks, estimate
    best, best_err, rounds = None, float("inf"), []
    lowest = smallest_ratio(groups, model, round_to)
    aim = max(budget.ratio, lowest)   # a target just under the floor (the pipeline allows a little) aims at it
    for _ in range(budget.calibration_rounds):
        kept = select_counts(result.scores, groups, model, aim, scope=scope, round_to=round_to,
                             normalize=result.normalize, allocation=allocation, report=record)
        masks = masks_of_counts(result.scores, groups, kept)
        estimate = model.ratio_of_masks(masks)
        real = confirmed(meter, module, masks, dense_flops, tokens)
        rounds.append({"aim": round(aim, 6), "estimate": round(estimate, 6), "confirmed": round(real, 6)})
        if abs(real - budget.ratio) < best_err:
            best, best_err = (masks, estimate), abs(real - budget.ratio)
        if budget.within(real) or (budget.kind == "flops" and tokens is None and abs(real - estimate) < 1e-3):
            break   # on target, or the model was exact and only round-to granularity is left
        # never below what the cost model can reach (every group at its minimum width)
        aim = max(lowest, next_aim([(r["aim"], r["confirmed"]) for r in rounds], budget.ratio))
        if any(abs(aim - r["aim"]) < 1e-6 for r in rounds):
            break   # the same selection again: nothing left to correct
    record["calibration"] = rounds
    return best


__all__ = ["choose_masks", "confirmed", "real_ratio"]
