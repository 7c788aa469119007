"""Sparse training before ranking: a prune-pipeline stage any ranking method can use.

`compress prune --sparse-reg l1|group-lasso --sparse-train-epochs N [--sparse-lambda λ]` trains the
dense network for N epochs with a sparsity regulariser before the method ranks its units:

- `l1` (seed report §2.3.1): λ‖W‖₁ on the conv/linear weights the groups span, applied as a proximal
  soft-threshold step after each SGD step (exact zeros; `compress.pruning.sparsity`);
- `group-lasso` (DepGraph): reg/2 · Σ γ_k·Imp_k added to the loss, γ_k = 2^{α(Imp_max − Imp_k)/(Imp_max −
  Imp_min)} (`compress.pruning.importance.group_lasso`).

report.json records, under "sparse_train", the share of exactly-zero weights before and after, validation
accuracy after the stage (BN statistics re-estimated: shrinking weights leave them behind), and how
the two magnitude rankings (L1 filter norm, DepGraph group norm) moved: Kendall τ per group and the
overlap of the units kept at the run's target before vs after.

`--sparse-reg FLOAT` (its meaning before this stage: DepGraph's group-lasso strength) still works, as
`--sparse-reg group-lasso --sparse-lambda FLOAT`, with a deprecation warning.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

from torch import nn

from compress.errors import CompressError
from compress.loop import Optim, Stage, StepOut, run_stage
from compress.methods.base import MethodOption
from compress.probe import accuracy_now
from compress.pruning.importance import group_l2_scores, group_lasso, l1_scores
from compress.pruning.sparsity import ProximalSGD, prunable_weights, ranking_change, zero_share

SPARSE_REGS = ("l1", "group-lasso")
DEFAULT_LAMBDA = {"l1": 2e-2, "group-lasso": 5e-4}

# The stage's `compress prune` flags (prune_run keywords), declared once for the CLI and study specs.
SPARSE_OPTIONS = (
    MethodOption("--sparse-train-epochs", int, 0, "sparse training of the dense network before the method ranks "
                 "its units (any method)"),
    MethodOption("--sparse-reg", str, None, "its regulariser: l1 (proximal soft threshold on conv/linear weights: "
                 "exact zeros) or group-lasso (DepGraph's)  [default: group-lasso]; a number (the group-lasso "
                 "strength) is deprecated"),
    MethodOption("--sparse-lambda", float, None, f"its strength λ  [default: l1 {DEFAULT_LAMBDA['l1']:g}, group-lasso "
                 f"{DEFAULT_LAMBDA['group-lasso']:g}]"),
    MethodOption("--sparse-alpha", float, 4.0, "group lasso: α of γ_k = 2^{α(Imp_max − Imp_k)/(Imp_max − Imp_min)}"),
)


@dataclass(frozen=True)
class SparseConfig:
    """What the sparse-training stage does; `epochs == 0` turns it off."""

    reg: str = "group-lasso"
    epochs: int = 0
    lam: float | None = None         # None: DEFAULT_LAMBDA[reg]
    alpha: float = 4.0               # group lasso's α

    @classmethod
    def from_flags(cls, reg: str | float | None, epochs: int, lam: float | None, alpha: float) -> SparseConfig:
        """From the command-line values, accepting the deprecated numeric --sparse-reg."""
        if reg is not None and reg not in SPARSE_REGS:
            try:
                strength = float(reg)
            except (TypeError, ValueError):
                raise CompressError(f"--sparse-reg must be one of {', '.join(SPARSE_REGS)}, got {reg!r}") from None
            if lam is not None and lam != strength:
                raise CompressError(f"--sparse-reg {reg} (deprecated: the group-lasso strength) contradicts "
                                    f"--sparse-lambda {lam}")
            warnings.warn(f"--sparse-reg {reg} is deprecated: use --sparse-reg group-lasso --sparse-lambda {reg}",
                          FutureWarning, stacklevel=2)
            reg, lam = "group-lasso", strength
        elif not epochs and (lam is not None or reg is not None):
            raise CompressError("--sparse-reg/--sparse-lambda take effect only with --sparse-train-epochs N (N ≥ 1)")
        config = cls(reg=reg or "group-lasso", epochs=epochs, lam=lam, alpha=alpha)
        config.check()
        return config

    @property
    def strength(self) -> float:
        return DEFAULT_LAMBDA[self.reg] if self.lam is None else self.lam

    def check(self) -> None:
        if self.epochs < 0:
            raise CompressError(f"--sparse-train-epochs must be ≥ 0, got {self.epochs}")
        if self.strength < 0:
            raise CompressError(f"--sparse-lambda must be ≥ 0, got {self.strength}")

    def describe(self) -> dict[str, Any]:
        """What report.json (and the checkpoint key) record: every value resolved."""
        return {"reg": self.reg, "epochs": self.epochs, "lambda": self.strength, "alpha": self.alpha}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> SparseConfig:
        return cls(reg=record["reg"], epochs=record["epochs"], lam=record["lambda"], alpha=record["alpha"])


class SparseTrain(Stage):
    """SGD (Nesterov, cosine) with the regulariser; the share of exact zeros after each epoch."""

    name = "sparse-train"
    evaluate = False            # the shrinking weights leave BN statistics behind: measured once at the end

    def __init__(self, groups: list, config: SparseConfig, lr: float, weight_decay: float):
        self.groups, self.config, self.epochs = groups, config, config.epochs
        self.lr, self.weight_decay = lr, weight_decay
        self.weights = prunable_weights(groups)
        self.penalty = group_lasso(groups, alpha=config.alpha, reg=config.strength) \
            if config.reg == "group-lasso" else None

    def optimizers(self, module: nn.Module) -> list[Optim]:
        params = [p for p in module.parameters() if p.requires_grad]
        if self.config.reg == "group-lasso":
            return [Optim(params, "sgd", self.lr, self.weight_decay)]

        def build(ps: list) -> ProximalSGD:
            return ProximalSGD.split(ps, l1_params=self.weights, l1=self.config.strength, lr=self.lr, momentum=0.9,
                                     weight_decay=self.weight_decay, nesterov=True)

        return [Optim(params, kind=build, lr=self.lr)]

    def forward(self, module, x, y, step) -> StepOut:
        out = super().forward(module, x, y, step)
        if self.penalty is not None:
            out.loss = out.loss + self.penalty()
        return out

    def end_epoch(self, module: nn.Module, epoch: int) -> dict[str, Any]:
        return {"zero_share": round(zero_share(self.weights), 6)}


def sparse_train(ctx, config: SparseConfig, weight_decay: float) -> dict[str, Any]:
    """Run the stage on `ctx.module` (a PruneContext) in place; what report.json records of it. The dense
    rankings are left in `ctx.before_sparse` for the method's mask_overlap."""
    rankings = {"l1": l1_scores, "group_l2": group_l2_scores}
    before = {name: score(ctx.groups) for name, score in rankings.items()}
    ctx.before_sparse = before
    kept_before = {name: ctx.select_masks(s) for name, s in before.items()}
    weights = prunable_weights(ctx.groups)
    zeros_before = zero_share(weights)
    stage = SparseTrain(ctx.groups, config, ctx.lr, weight_decay)
    record = run_stage(ctx.module, ctx.data, stage, batch_size=ctx.batch_size, seed=ctx.seed,
                       checkpoint=ctx.checkpoint)
    after = {name: score(ctx.groups) for name, score in rankings.items()}
    changes = {name: ranking_change(before[name], after[name], kept_before[name], ctx.select_masks(after[name]))
               for name in rankings}
    accuracy = accuracy_now(ctx.module, ctx.data, ctx.batch_size)
    return {**config.describe(), "weights": sum(w.numel() for w in weights), "val_acc": round(accuracy, 5),
            "zero_share_before": round(zeros_before, 6), "zero_share": round(zero_share(weights), 6),
            "ranking_change": changes, "epoch_s": record.as_dict()["epoch_s"], "history": record.history}


__all__ = ["DEFAULT_LAMBDA", "SPARSE_OPTIONS", "SPARSE_REGS", "SparseConfig", "SparseTrain", "sparse_train"]
