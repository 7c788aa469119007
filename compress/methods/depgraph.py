"""DepGraph (Fang et al., "DepGraph: Towards Any Structural Pruning", CVPR 2023).

Group importance is the sum of squared L2 norms of all coupled weights of a unit, normalised per
group. With `--sparse-train-epochs N` the dense model is first trained for N epochs with the
group-lasso regulariser γ_k·Imp_k (γ_k = 2^{α(Imp_max − Imp_k)/(Imp_max − Imp_min)}), which drives
whole unimportant groups of weights towards zero before they are ranked.
"""

from __future__ import annotations

import time

from compress.errors import CompressError
from compress.methods.base import Method, MethodOption, PruneContext, SearchResult, register
from compress.pruning.importance import group_l2_scores, group_lasso


@register
class DepGraph(Method):
    name = "depgraph"
    summary = "group L2-norm importance over coupled layers, optional group-lasso sparse training (Fang et al. 2023)"
    options = (
        MethodOption("--sparse-train-epochs", int, 0, "epochs of group-lasso sparse training before ranking"),
        MethodOption("--sparse-reg", float, 5e-4, "strength of the group-lasso regulariser"),
        MethodOption("--sparse-alpha", float, 4.0, "α of γ_k: how much harder less important units are pushed"),
    )

    def search(self, ctx: PruneContext) -> SearchResult:
        from compress.loop import Fit, evaluate, run_stage

        epochs = self.config["sparse_train_epochs"]
        stages = {}
        if epochs < 0:
            raise CompressError(f"--sparse-train-epochs must be ≥ 0, got {epochs}")
        if epochs:
            start = time.perf_counter()
            reg = group_lasso(ctx.groups, alpha=self.config["sparse_alpha"], reg=self.config["sparse_reg"])
            record = run_stage(ctx.module, ctx.data, Fit("sparse train", epochs, ctx.lr, extra_loss=reg),
                               batch_size=ctx.batch_size, seed=ctx.seed, checkpoint=ctx.checkpoint)
            stages["sparse_train"] = {"wall_s": ctx.stopwatch.lap("sparse_train", start), "epochs": epochs,
                                      "val_acc": evaluate(ctx.module, ctx.data.val), "history": record.history}
        return SearchResult(scores=group_l2_scores(ctx.groups), stages=stages)
