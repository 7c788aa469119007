"""DepGraph (Fang et al., "DepGraph: Towards Any Structural Pruning", CVPR 2023).

Group importance is Torch-Pruning's GroupMagnitudeImportance(p=2), normalised per group
(compress/pruning/importance.py). DepGraph's sparse training (the group-lasso regulariser γ_k·Imp_k,
γ_k = 2^{α(Imp_max − Imp_k)/(Imp_max − Imp_min)}, which drives whole unimportant groups of weights towards
zero before they are ranked) is the prune pipeline's sparse-training stage, open to every method:
`--sparse-train-epochs N [--sparse-reg group-lasso] [--sparse-lambda λ]` (compress/sparse.py); `mask_overlap`
then compares with the masks of the dense weights' scores. With `--iterative-steps K`
the network is pruned progressively, as in the paper's benchmarks (Torch-Pruning's `iterative_steps`): K
steps whose FLOPs targets fall linearly from 1 to the final ratio, every step re-scoring the network with
the units removed so far cut out (their weights zeroed: exactly the slimmed network's scores) — so a unit
whose inputs were pruned is judged by the weights it has left. No training happens between steps.
"""

from __future__ import annotations

import torch

from compress.errors import CompressError
from compress.methods.base import Method, MethodOption, PruneContext, SearchResult, register
from compress.pruning.importance import group_l2_scores, units_removed


@register
class DepGraph(Method):
    name = "depgraph"
    summary = ("group L2-norm importance over coupled layers (Fang et al. 2023); group-lasso sparse training via "
               "--sparse-train-epochs")
    options = (
        MethodOption("--iterative-steps", int, 1, "prune progressively in K steps (targets falling linearly to "
                     "--flops-ratio or --latency-ratio), re-scoring the network each step with the units already "
                     "removed"),
    )

    def search(self, ctx: PruneContext) -> SearchResult:
        steps = self.config["iterative_steps"]
        if steps < 1:
            raise CompressError(f"--iterative-steps must be ≥ 1, got {steps}")
        first = (ctx.before_sparse or {}).get("group_l2")      # the dense weights' scores, if sparse training ran
        initial = ctx.select_masks(first if first is not None else group_l2_scores(ctx.groups))
        stages = {}
        scores, progressive = progressive_scores(ctx, steps)
        if progressive:
            stages["iterative"] = {"steps": steps, "per_step": progressive}
        return SearchResult(scores=scores, stages=stages, initial_masks=initial)


def progressive_scores(ctx: PruneContext, steps: int) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """The scores the last of `steps` pruning steps ranks by, and a record of the earlier steps.

    Step k < K removes units down to cost ratio 1 − (1 − R)·k/K (FLOPs or latency, the run's target); each
    step scores the network with every unit removed so far cut out, so those units score 0 and stay removed;
    the pipeline selects the final masks (step K, ratio R) from the returned scores."""
    kept: dict[str, torch.Tensor] = {}
    record = []
    for k in range(1, steps):
        with units_removed(ctx.groups, kept):
            scores = group_l2_scores(ctx.groups)
        target = 1.0 - (1.0 - ctx.ratio) * k / steps
        kept = ctx.select_masks(scores, ratio=target)
        name = ctx.cost_model.name
        record.append({"step": k, f"{name}_ratio_target": round(target, 4),
                       f"{name}_ratio_estimate": round(ctx.cost_model.ratio_of_masks(kept), 4),
                       "units_removed": int(sum(int((~m).sum()) for m in kept.values()))})
    with units_removed(ctx.groups, kept):
        return group_l2_scores(ctx.groups), record
