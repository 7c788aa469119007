"""DynamicViT training as a stage of the shared loop (compress/loop.py): runs on every device, under
torchrun, with mixed precision and resumable checkpoints like every other stage.

What the stage says (the rest is the loop's):
- the module is a deployable module whose network is a `TokenSparseViT`; during the stage it runs its
  masked-training path (Gumbel-softmax decisions, masked attention) and returns a `SparseOutput`;
- loss: `DynamicViTLoss` against the frozen dense parent (teacher logits and final patch tokens);
- optimisers, as the reference code: AdamW, weight decay 0.05 (none on biases and norms; class token
  and position embedding not trained); the prediction modules at `lr` with a per-step cosine; the
  backbone at lr 0 for the first `freeze_epochs` epochs, then min(backbone_lr_mult · lr, the cosine)
  — the paper's "backbone at 1/100 of the predictors' rate, frozen for the first 5 of 30 epochs";
- the Gumbel noise comes from the stage's own generator (per rank), saved with the stage on resume.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from compress.errors import CompressError
from compress.loop import Optim, Stage, StepInfo, StepOut
from compress.tokens.losses import DynamicViTLoss
from compress.tokens.model import TokenSparseViT, check_keep_ratio, dense_forward

NOT_TRAINED = ("class_token", "cls_token", "pos_embedding", "pos_embed", "reg_token", "dist_token")


ORDERS = ("after", "before")     # token sparsification after channel pruning (default) or before it


@dataclass
class TokenOptions:
    """Token sparsification in `compress prune` (CLI: --token-keep, --token-stages, --token-order, --token-*)."""

    keep_ratio: float = 0.7
    stages: list[int] | None = None       # None: ¼, ½, ¾ of the depth
    order: str = "after"
    epochs: int = 5
    lr: float = 1e-3
    backbone_lr_mult: float = 0.01
    freeze_epochs: int | None = None      # None: the paper's 5/30 of the epochs (at least 1 when epochs ≥ 2)
    weight_decay: float = 0.05
    ratio_weight: float = 2.0
    distill_weight: float = 0.5
    finetune_epochs: int = 0              # not in the paper: plain fine-tuning on the top-k tokens after the stage

    def frozen_epochs(self) -> int:
        if self.freeze_epochs is not None:
            return self.freeze_epochs
        return max(1, round(self.epochs * 5 / 30)) if self.epochs >= 2 else 0

    def check(self) -> None:
        check_keep_ratio(self.keep_ratio)
        if self.order not in ORDERS:
            raise CompressError(f"--token-order must be one of {', '.join(ORDERS)}, got {self.order!r}")
        if self.epochs < 0 or self.finetune_epochs < 0:
            raise CompressError("--token-epochs and --token-finetune-epochs must be ≥ 0")
        if self.lr <= 0 or self.backbone_lr_mult < 0 or self.weight_decay < 0:
            raise CompressError("--token-lr must be > 0, --token-backbone-lr-mult and the weight decay ≥ 0")
        if self.freeze_epochs is not None and not 0 <= self.freeze_epochs <= self.epochs:
            raise CompressError(f"--token-freeze-epochs must be in 0..{self.epochs}, got {self.freeze_epochs}")
        if self.ratio_weight < 0 or self.distill_weight < 0:
            raise CompressError("--token-ratio-weight and --token-distill-weight must be ≥ 0")


# `compress prune` flags: (flag, TokenOptions field, click type or choices, help). Unset flags keep the defaults.
TOKEN_FLAGS = (
    ("--token-keep", "keep_ratio", float, "DynamicViT token sparsification (ViTs): keep ratio ρ per stage, cumulative "
     "ρ, ρ², ρ³ of the patch tokens; the class token is always kept  [default with --method dynamicvit: 0.7]"),
    ("--token-stages", "stages", str, "comma list of blocks before which tokens are pruned  [default: ¼, ½, ¾ of "
     "the depth]"),
    ("--token-order", "order", ORDERS, "token sparsification after channel pruning and fine-tuning, or before the "
     "channel search  [default: after]"),
    ("--token-epochs", "epochs", int, "epochs of the DynamicViT stage  [default: 5]"),
    ("--token-lr", "lr", float, "AdamW learning rate of the prediction modules (cosine)  [default: 0.001]"),
    ("--token-backbone-lr-mult", "backbone_lr_mult", float, "backbone rate ÷ predictor rate  [default: 0.01]"),
    ("--token-freeze-epochs", "freeze_epochs", int, "first epochs with the backbone frozen  [default: 5/30 of "
     "--token-epochs, at least 1]"),
    ("--token-ratio-weight", "ratio_weight", float, "weight of the keep-ratio loss  [default: 2.0]"),
    ("--token-distill-weight", "distill_weight", float, "weight of the logit and token distillation from the dense "
     "parent  [default: 0.5]"),
    ("--token-finetune-epochs", "finetune_epochs", int, "after the DynamicViT stage, epochs of plain fine-tuning (SGD "
     "at --lr) of the backbone on the tokens the frozen predictors keep at inference (top-k); not in the paper: it "
     "trains the backbone on inference's token sets instead of the stage's sampled ones (docs/tokens.md)  "
     "[default: 0]"),
)


def token_options(values: dict[str, object], implied: bool = False) -> TokenOptions | None:
    """TokenOptions from the given flag values (field → value, None when unset); None when token
    sparsification is not asked for. `implied`: the method prunes tokens anyway (dynamicvit)."""
    given = {k: v for k, v in values.items() if v is not None}
    if "keep_ratio" not in given and not implied:
        if given:
            raise CompressError("--token-* flags need --token-keep (or --method dynamicvit)")
        return None
    if isinstance(given.get("stages"), str):
        try:
            given["stages"] = [int(v) for v in given["stages"].split(",")]
        except ValueError:
            raise CompressError(f"--token-stages takes block indices like 1,3,4, got {values['stages']!r}") from None
    options = TokenOptions(**given)
    options.check()
    return options


class DynamicViTStage(Stage):
    """Train the prediction modules (and fine-tune the backbone) of `module.net` against `teacher`."""

    augment = True
    evaluate = True

    def __init__(self, teacher: nn.Module, settings: TokenOptions, seed: int, name: str = "dynamicvit"):
        settings.check()
        self.name, self.epochs, self.settings = name, settings.epochs, settings
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.seed = seed
        self._generator: torch.Generator | None = None
        self._backbone: torch.optim.Optimizer | None = None

    # ---------------------------------------------------------------- what trains, and how fast

    def optimizers(self, module: nn.Module) -> list[Optim]:
        net = _sparse_net(module)
        s = self.settings
        predictors = [p for p in net.predictors.parameters() if p.requires_grad]
        decay, no_decay = [], []
        for name, p in net.backbone.named_parameters():
            if not p.requires_grad or name.rpartition(".")[2] in NOT_TRAINED:
                continue
            (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
        prompt = [p for p in getattr(module, "prompt", nn.Identity()).parameters() if p.requires_grad]
        groups = [{"params": decay + prompt, "weight_decay": s.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return [Optim(predictors, "adamw", s.lr, s.weight_decay),
                Optim(groups, self._backbone_optimizer, schedule="constant")]

    def _backbone_optimizer(self, groups: list[dict]) -> torch.optim.Optimizer:
        self._backbone = torch.optim.AdamW(groups, lr=0.0)
        return self._backbone

    def _set_backbone_lr(self, step: StepInfo) -> None:
        s = self.settings
        cosine = s.lr * 0.5 * (1 + math.cos(math.pi * min(step.step, step.total) / step.total))
        lr = 0.0 if step.epoch < s.frozen_epochs() else min(s.backbone_lr_mult * s.lr, cosine)
        for group in self._backbone.param_groups:
            group["lr"] = lr

    # ---------------------------------------------------------------- randomness and modes

    def generators(self) -> list[torch.Generator]:
        if self._generator is None:
            from compress.runtime import current

            rt = current()
            self._generator = torch.Generator(device=rt.device).manual_seed(self.seed * 7919 + rt.rank)
        return [self._generator]

    def context(self, module: nn.Module) -> contextlib.AbstractContextManager:
        return self._sparse_training(module)

    @contextlib.contextmanager
    def _sparse_training(self, module: nn.Module) -> Iterator[None]:
        net = _sparse_net(module)
        s = self.settings
        targets = [s.keep_ratio ** (i + 1) for i in range(len(net.stages))]     # cumulative: ρ, ρ², ρ³…
        self.criterion = DynamicViTLoss(targets, s.ratio_weight, s.distill_weight)
        self.teacher.to(next(net.parameters()).device)
        net.sparse_training, net.generator = True, self.generators()[0]
        try:
            yield
        finally:
            net.sparse_training, net.generator = False, None

    # ---------------------------------------------------------------- one step

    def forward(self, module: nn.Module, x: torch.Tensor, y: torch.Tensor, step: StepInfo) -> StepOut:
        self._set_backbone_lr(step)
        out = module(x)
        teacher = self.teacher
        with torch.no_grad():
            t_logits, t_tokens = dense_forward(teacher.net, teacher.normalize(teacher.prompt(x)))
        loss, metrics = self.criterion(out, y, t_logits, t_tokens)
        return StepOut(loss, out.logits, metrics)


def _sparse_net(module: nn.Module) -> TokenSparseViT:
    net = getattr(module, "net", module)
    if not isinstance(net, TokenSparseViT):
        raise CompressError("the DynamicViT stage needs a token-sparse network (compress.tokens.sparsify)")
    return net


def check_model(net: nn.Module, options: TokenOptions) -> None:
    """Refuse, before any work, a network token sparsification cannot handle or a schedule it does not fit."""
    from compress.tokens.backbones import adapter_for
    from compress.tokens.model import check_stages, default_stages

    adapter = adapter_for(getattr(net, "backbone", net))
    depth = len(adapter.blocks(getattr(net, "backbone", net)))
    check_stages(depth, options.stages if options.stages is not None else default_stages(depth))


def train_tokens(module: nn.Module, teacher: nn.Module, data, options: TokenOptions, seed: int, batch_size: int,
                 checkpoint=None, lr: float = 0.05, weight_decay: float = 5e-4) -> dict:
    """Give `module`'s ViT prediction modules (unless it has them) and run the DynamicViT stage, then the
    optional plain fine-tuning on the top-k tokens (`options.finetune_epochs`, SGD at `lr`); its record.

    Why the fine-tuning: the stage trains the backbone on token sets *sampled* from the predictors' keep
    probabilities, inference keeps the top-k. Until the predictors are confident (the paper's 30 ImageNet
    epochs) the two sets differ — the top-k ones hold more of the object and less of its surroundings —
    and a backbone that never saw the top-k sets can do worse on them than on random ones (docs/tokens.md).

    `teacher` is the dense parent (a deployable module); `checkpoint` (compress.checkpoint.Checkpoint)
    makes both stages resumable like every stage of the loop."""
    from compress.loop import Fit, run_stage
    from compress.runtime import current
    from compress.tokens.model import sparsify

    if not isinstance(module.net, TokenSparseViT):
        module.net = sparsify(module.net, options.keep_ratio, options.stages)
        current().place(module)
    stage = DynamicViTStage(teacher, options, seed=seed)
    record = run_stage(module, data, stage, batch_size=batch_size, seed=seed, checkpoint=checkpoint).as_dict()
    if options.finetune_epochs:
        fit = Fit("token-fine-tune", options.finetune_epochs, lr, weight_decay)
        with frozen_predictors(module):
            record["fine-tune"] = run_stage(module, data, fit, batch_size=batch_size, seed=seed,
                                            checkpoint=checkpoint).as_dict()
    return record


@contextlib.contextmanager
def frozen_predictors(module: nn.Module) -> Iterator[None]:
    """Inside: a token-sparse module's prediction modules get no gradient (plain fine-tuning then trains the
    backbone on the tokens they keep); a no-op for any other module."""
    net = getattr(module, "net", module)
    params = list(net.predictors.parameters()) if isinstance(net, TokenSparseViT) else []
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)
