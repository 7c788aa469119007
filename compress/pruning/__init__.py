"""Structural pruning engine: channel groups, gates, slimming, cost models, targeting, structure records.

    groups = find_groups(net, example_input)              # coupled channel groups (Torch-Pruning)
    fm = FlopsModel.for_groups(groups)                     # a CostModel: analytic, differentiable fvcore FLOPs
    lm = LatencyModel(groups, table)                       # a CostModel: measured per-layer latency tables
    masks = select_masks(scores, groups, fm, 0.5)          # keep-masks hitting a cost ratio (any CostModel)
    masks = select_masks(scores, groups, lm, 0.5, allocation="knapsack")   # max importance under the budget
    with Gates(net, groups) as gates:                      # train through gates (exact w.r.t. slim)
        gates.set({gid: gate_tensor, ...})
    slim(net, groups, masks)                               # physically smaller layers, in place
    spec = layer_spec(net, dense_reference)                # model.json "layers"
"""

from compress.pruning.attention import SplitAttention, split_attention
from compress.pruning.cost import CostModel
from compress.pruning.flops_model import FlopsModel
from compress.pruning.gates import Gates
from compress.pruning.groups import ChannelGroup, find_groups
from compress.pruning.importance import (
    group_l2_scores,
    group_lasso,
    group_sq_norms,
    l1_scores,
    random_scores,
    units_removed,
)
from compress.pruning.latency_model import LatencyModel, LatencyTable, layer_shapes
from compress.pruning.slim import slim
from compress.pruning.structure import apply_layer_spec, layer_spec, module_copy, widths
from compress.pruning.target import check_ratio, select_counts, select_masks, smallest_ratio

__all__ = ["ChannelGroup", "CostModel", "FlopsModel", "Gates", "LatencyModel", "LatencyTable", "SplitAttention",
           "apply_layer_spec", "check_ratio", "find_groups", "group_l2_scores", "group_lasso", "group_sq_norms",
           "l1_scores", "layer_shapes", "layer_spec", "module_copy", "random_scores", "select_counts", "select_masks",
           "slim", "smallest_ratio", "split_attention", "units_removed", "widths"]
