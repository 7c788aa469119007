"""DynamicViT's training objective (the reference's DistillDiffPruningLoss, with DeiT's MSE token loss).

    loss = CE(logits, y)
         + ratio_weight   · (1/S) Σ_s mean_b (kept share of stage s − ρ^s)²
         + distill_weight · KL(teacher logits ‖ student logits)
         + distill_weight · MSE(student tokens, teacher tokens) over the tokens kept at the last stage

The kept share is the mean of the (cumulative, hard, straight-through) keep decisions, so the ratio
loss reaches the predictors through the Gumbel-softmax; the teacher is the dense parent, frozen.
Defaults are the reference code's (ratio 2.0, distillation 0.5, classification 1.0).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from compress.tokens.model import SparseOutput


def ratio_loss(decisions: list[torch.Tensor], targets: list[float]) -> torch.Tensor:
    """Mean over stages of the batch-mean squared gap between each image's kept share and its target."""
    if len(decisions) != len(targets):
        raise ValueError(f"{len(decisions)} stages of decisions but {len(targets)} targets")
    terms = [((d.float().mean(1) - t) ** 2).mean() for d, t in zip(decisions, targets, strict=True)]
    return torch.stack(terms).mean()


def logit_distillation(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """KL(teacher ‖ student) of the class distributions, averaged over the batch (temperature 1)."""
    return F.kl_div(F.log_softmax(student.float(), -1), F.log_softmax(teacher.float(), -1), reduction="batchmean",
                    log_target=True)


def token_distillation(student: torch.Tensor, teacher: torch.Tensor, keep_mask: torch.Tensor) -> torch.Tensor:
    """MSE between student and teacher final patch tokens [B, N, C], over the tokens still kept."""
    kept = keep_mask.reshape(-1) > 0.5
    if not bool(kept.any()):
        return student.new_zeros(())
    c = student.shape[-1]
    return F.mse_loss(student.reshape(-1, c)[kept].float(), teacher.reshape(-1, c)[kept].float())


@dataclass
class DynamicViTLoss:
    targets: list[float]                 # cumulative keep share per stage: ρ, ρ², ρ³
    ratio_weight: float = 2.0
    distill_weight: float = 0.5
    clf_weight: float = 1.0

    def __call__(self, out: SparseOutput, labels: torch.Tensor, teacher_logits: torch.Tensor | None = None,
                 teacher_tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """Total loss and its parts (floats, for progress and history)."""
        parts = {"ce": F.cross_entropy(out.logits, labels), "ratio": ratio_loss(out.decisions, self.targets)}
        loss = self.clf_weight * parts["ce"] + self.ratio_weight * parts["ratio"]
        if teacher_logits is not None and self.distill_weight:
            parts["kl"] = logit_distillation(out.logits, teacher_logits)
            parts["token_mse"] = token_distillation(out.tokens, teacher_tokens, out.keep_mask)
            loss = loss + self.distill_weight * (parts["kl"] + parts["token_mse"])
        metrics = {k: float(v.detach()) for k, v in parts.items()}
        metrics.update({f"keep{s + 1}": float(d.detach().float().mean()) for s, d in enumerate(out.decisions)})
        return loss, metrics
