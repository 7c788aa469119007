"""DessiLBI (Fu et al., "Exploring structural sparsity of deep networks via inverse scale spaces",
ICML 2020 / TPAMI 2022; seed report §3.3): rank units by when they enter the support of Γ.

The network trains with Split LBI (`compress.pruning.lbi.SplitLBI`) for `--lbi-epochs` through the
shared loop: the weights W follow the task loss plus a coupling ½ν⁻¹‖W − Γ‖² to a sparse structural
parameter Γ, one Γ group per unit of every channel group, spanning the unit's slices in every
coupled layer. Γ starts empty and units enter its support in order of importance (the inverse scale
space); the step a unit enters (ties by ‖V_u‖/λ_g) is its score, and the common target selection
turns the scores into masks for any FLOPs or latency target. Scores are comparable across groups
(every group's threshold λ_g is its mean unit norm), so they are ranked globally as they are.

report.json gains `method_report.dessilbi`: the resolved ν, κ, lr, the thresholds, the path (per
epoch: support size, FLOPs ratio of the Γ-support network, validation accuracy of W and of that
network with BN statistics re-estimated, units per group in the support) and every unit's entry
epoch; `dessilbi_path.png` beside model.json plots it.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from compress.errors import CompressError
from compress.loop import Optim, Stage, run_stage
from compress.methods.base import Method, MethodOption, PruneContext, SearchResult, register
from compress.methods.lbi_path import build_path, entry_epochs, path_png, support_summary
from compress.probe import accuracy_now
from compress.pruning.lbi import INNER, THRESHOLDS, SplitLBI, gamma_groups

TIME_CONSTANTS = 8      # default ν: the path spans this many coupling time constants ν/(κ·lr) ...
MAX_PULL = 0.02         # ... unless a step would then pull W more than this share of the way to Γ
PATH_PNG = "dessilbi_path.png"


@register
class DessiLBI(Method):
    name = "dessilbi"
    summary = ("Split LBI over coupled channel groups; units ranked by when they enter the support of the "
               "structural sparsity Γ (Fu et al. 2020)")
    options = (
        MethodOption("--lbi-epochs", int, 5, "epochs of Split LBI training (the path) before ranking"),
        MethodOption("--lbi-lr", float, None, "learning rate α of the path, constant  [default: --lr]"),
        MethodOption("--lbi-kappa", float, 1.0, "κ (W steps by κα; Γ = κ·Prox(V)); the report's 1"),
        MethodOption("--lbi-nu", float, None, "ν of the coupling ‖W − Γ‖²/(2ν) (the authors' `mu`; the "
                     f"report's μ = 20)  [default: κα·max(T/{TIME_CONSTANTS}, 1/{MAX_PULL}): {TIME_CONSTANTS} time "
                     f"constants ν/(κα) over the T steps of the path, a step pulling W at most {MAX_PULL:.0%} of the "
                     "way to Γ]"),
        MethodOption("--lbi-optimizer", INNER, "sgd", "inner step for W: sgd (momentum 0.9) or adamw "
                     "(the report's variant for ResNet-50/VGG-19)"),
        MethodOption("--lbi-weight-decay", float, 0.0, "weight decay of the inner step (decoupled for "
                     "adamw); the coupling already shrinks W towards Γ"),
        MethodOption("--lbi-threshold", THRESHOLDS, "group-mean", "Γ threshold λ_g per group: the group's "
                     "mean unit norm at the start (ranks groups of different sizes together) or 1 (the authors')"),
    )

    def __init__(self, **options: Any):
        super().__init__(**options)
        c = self.config
        if c["lbi_epochs"] < 1:
            raise CompressError(f"--lbi-epochs must be at least 1, got {c['lbi_epochs']}")
        for flag, value in (("--lbi-lr", c["lbi_lr"]), ("--lbi-nu", c["lbi_nu"]), ("--lbi-kappa", c["lbi_kappa"])):
            if value is not None and value <= 0:
                raise CompressError(f"{flag} must be > 0, got {value}")
        if c["lbi_weight_decay"] < 0:
            raise CompressError(f"--lbi-weight-decay must be ≥ 0, got {c['lbi_weight_decay']}")

    def search(self, ctx: PruneContext) -> SearchResult:
        from compress.batches import steps_per_epoch

        c = self.config
        if not ctx.groups:
            raise CompressError("this model has no prunable channel groups: DessiLBI has nothing to rank")
        per_epoch = steps_per_epoch(len(ctx.data.train), ctx.batch_size)
        lr = c["lbi_lr"] or ctx.lr
        kappa = c["lbi_kappa"]
        nu = c["lbi_nu"] or kappa * lr * max(c["lbi_epochs"] * per_epoch / TIME_CONSTANTS, 1 / MAX_PULL)
        structure = gamma_groups(ctx.groups, threshold=c["lbi_threshold"])
        stage = PathStage(ctx, structure, epochs=c["lbi_epochs"], lr=lr, kappa=kappa, nu=nu,
                          inner=c["lbi_optimizer"], weight_decay=c["lbi_weight_decay"])

        start_time = time.perf_counter()
        start = {"step": 0, "support_units": 0, "support_share": 0.0, "support_flops_ratio": 0.0,
                 "val_acc": round(stage.accuracy(ctx.module), 5)}
        record = run_stage(ctx.module, ctx.data, stage, batch_size=ctx.batch_size, seed=ctx.seed,
                           checkpoint=ctx.checkpoint)
        opt = stage.opt
        path = build_path(start, record.history, opt, per_epoch)
        widths = {g.id: g.width for g in ctx.groups}
        ctx.report["dessilbi"] = {
            "lr": lr, "kappa": kappa, "nu": nu, "nu_default": c["lbi_nu"] is None, "optimizer": c["lbi_optimizer"],
            "weight_decay": c["lbi_weight_decay"], "threshold": c["lbi_threshold"], "steps": opt.steps,
            "steps_per_epoch": per_epoch, "time_constants": round(opt.steps * kappa * lr / nu, 3),
            "thresholds": {gg.id: round(gg.threshold, 6) for gg in structure}, "widths": widths,
            "path": path, "entry_epochs": entry_epochs(opt, per_epoch), "plot": PATH_PNG}
        title = (f"DessiLBI path: {c['lbi_epochs']} epochs, {c['lbi_optimizer']} lr {lr:g}, κ {kappa:g}, ν {nu:.3g}, "
                 f"threshold {c['lbi_threshold']}")
        stages = {"lbi": {"wall_s": ctx.stopwatch.lap("lbi", start_time), **record.as_dict()}}
        return SearchResult(scores=opt.scores(), normalize=False, stages=stages,
                            files={PATH_PNG: path_png(path, widths, title)})


class PathStage(Stage):
    """Split LBI on the whole network; after each epoch a point of the path (support of Γ, the FLOPs of
    the Γ-support network, accuracy of W and of that network with BN statistics re-estimated)."""

    name = "dessilbi"
    evaluate = False            # W's accuracy needs re-estimated BN statistics: measured in end_epoch

    def __init__(self, ctx: PruneContext, structure, *, epochs: int, lr: float, kappa: float, nu: float,
                 inner: str, weight_decay: float):
        self.ctx, self.structure, self.epochs = ctx, structure, epochs
        self.lr, self.kappa, self.nu, self.inner, self.weight_decay = lr, kappa, nu, inner, weight_decay
        self.opt: SplitLBI | None = None

    def optimizers(self, module: nn.Module) -> list[Optim]:
        def build(params: list) -> SplitLBI:
            self.opt = SplitLBI(params, self.structure, lr=self.lr, kappa=self.kappa, nu=self.nu, inner=self.inner,
                                weight_decay=self.weight_decay)
            return self.opt

        params = [p for p in module.parameters() if p.requires_grad]
        return [Optim(params, kind=build, lr=self.lr, schedule="constant")]

    def end_epoch(self, module: nn.Module, epoch: int) -> dict[str, Any]:
        support = self.opt.support()
        flops_model = self.ctx.groups[0].graph.flops_model if self.ctx.groups else None   # the support's FLOPs
        return {**support_summary(self.opt, flops_model), "val_acc": round(self.accuracy(module), 5),
                "support_val_acc": round(self.accuracy(module, support), 5)}

    def accuracy(self, module: nn.Module, keep: dict[str, torch.Tensor] | None = None) -> float:
        """Accuracy of W, or of the network keeping only `keep`'s units, with BN statistics re-estimated."""
        return accuracy_now(module, self.ctx.data, self.ctx.batch_size, self.ctx.groups, keep)
