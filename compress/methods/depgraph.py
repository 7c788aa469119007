"""DepGraph (Fang et al., "DepGraph: Towards Any Structural Pruning", CVPR 2023).

Group importance is Torch-Pruning's GroupMagnitudeImportance(p=2), normalised per group
(compress/pruning/importance.py). With `--sparse-train-epochs N` the dense model is first trained for N
epochs with the group-lasso regulariser γ_k·Imp_k (γ_k = 2^{α(Imp_max − Imp_k)/(Imp_max − Imp_min)}), which
drives whole unimportant groups of weights towards zero before they are ranked. With `--iterative-steps K`
the network is pruned progressively, as in the paper's benchmarks (Torch-Pruning's `iterative_steps`): K
steps whose FLOPs targets fall linearly from 1 to the final ratio, every step re-scoring the network with
the units removed so far cut out (their weights zeroed: exactly the slimmed network's scores) — so a unit
whose inputs were pruned is judged by the weights it has left. No training happens between steps.
"""

from __future__ import annotations

import time

import torch

from compress.errors import CompressError
from compress.methods.base import Method, MethodOption, PruneContext, SearchResult, register
from compress.pruning.importance import group_l2_scores, group_lasso, units_removed


@register
class DepGraph(Method):
    name = "depgraph"
    summary = "group L2-norm importance over coupled layers, optional group-lasso sparse training (Fang et al. 2023)"
    options = (
        MethodOption("--sparse-train-epochs", int, 0, "epochs of group-lasso sparse training before ranking"),
        MethodOption("--sparse-reg", float, 5e-4, "strength of the group-lasso regulariser"),
        MethodOption("--sparse-alpha", float, 4.0, "α of γ_k: how much harder less important units are pushed"),
        MethodOption("--iterative-steps", int, 1, "prune progressively in K steps (targets falling linearly to "
                     "--flops-ratio or --latency-ratio), re-scoring the network each step with the units already "
                     "removed"),
    )

    def search(self, ctx: PruneContext) -> SearchResult:
        from compress.loop import Fit, evaluate, run_stage

        epochs, steps = self.config["sparse_train_epochs"], self.config["iterative_steps"]
        if epochs < 0:
            raise CompressError(f"--sparse-train-epochs must be ≥ 0, got {epochs}")
        if steps < 1:
            raise CompressError(f"--iterative-steps must be ≥ 1, got {steps}")
        initial = ctx.select_masks(group_l2_scores(ctx.groups))
        stages = {}
        if epochs:
            start = time.perf_counter()
            reg = group_lasso(ctx.groups, alpha=self.config["sparse_alpha"], reg=self.config["sparse_reg"])
            record = run_stage(ctx.module, ctx.data, Fit("sparse train", epochs, ctx.lr, extra_loss=reg),
                               batch_size=ctx.batch_size, seed=ctx.seed, checkpoint=ctx.checkpoint)
            stages["sparse_train"] = {"wall_s": ctx.stopwatch.lap("sparse_train", start), "epochs": epochs,
                                      "val_acc": evaluate(ctx.module, ctx.data.val), "history": record.history}
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
