"""VPNs, structured: a visual prompt and channel masks optimised jointly (Jin et al., arXiv 2312.01397).

The authors' structured variant (ILM-VP `develop-can`, see docs/vpns.md) learns one score per channel
with the weights frozen; the forward pass keeps the channels above one global threshold (a hard 0/1
mask, straight-through gradient to the scores) while a visual prompt trains alongside. Here a score
belongs to a channel-group unit (coupled channels are kept or removed together), scores start from
weight magnitude normalised per group, and the threshold is re-chosen at every step by the engine's
targeting in the run's cost model, so that every step's masked network meets `--flops-ratio` (or
`--latency-ratio`, by the latency tables) — the masks the search trains under are exactly those the
final projection would produce from the same scores.

Stages: dense weight + prompt warm-up → mask search (weights and BN statistics frozen; scores and
prompt trained with Adam) → (common pipeline) final masks projected onto the target, slim,
fine-tune weights and prompt. Accuracies are always the deployable module's (prompt included) on
the validation split.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from compress.checkpoint import Checkpoint
from compress.data import DataBundle
from compress.deploy import DeployableModule
from compress.errors import CompressError
from compress.loop import Optim, Stage, StageRecord, StepOut, evaluate, reestimate_bn, run_stage
from compress.methods.base import PROMPT_OPTIONS, Method, MethodOption, PruneContext, SearchResult, register
from compress.prompt import PROMPT_KINDS, install_prompt, prompt_spec
from compress.pruning.gates import Gates
from compress.pruning.groups import ChannelGroup
from compress.pruning.importance import group_sq_norms

# Added to the scores of units a cap protects: they rank above every other unit, so the targeting
# removes them only if the target cannot be met otherwise.
PROTECT = 1e6
# Masks are kept within this distance of the target by the cost model (the pipeline confirms the final
# ratio with fvcore or a measurement; the model and the truth differ by the prompt's own cost).
TARGET_TOLERANCE = 0.01


@dataclass
class VPNsSettings:
    """Every knob of the method; defaults are the reference schedule (5/5/30 epochs) scaled to small budgets."""

    prompt: str = "pad"
    prompt_size: int | None = None        # pad frame width; None: 16 px at 224 px, scaled
    warmup_epochs: int = 1                # dense weights + prompt (reference: 5)
    warmup_lr: float = 0.01               # SGD, momentum 0.9, cosine
    score_epochs: int = 1                 # mask search: scores + prompt, weights frozen (reference: 5)
    score_lr: float = 0.05                # Adam, cosine (reference: 1 on Kaiming-scale scores; docs/vpns.md)
    score_decay: float = 0.1              # Adam weight decay on the scores (reference: 0.1)
    score_clip: float = 0.25              # gradient-norm clip on the scores (reference: 0.25)
    vpns_prompt_lr: float = 1e-3          # Adam, warm-up and search (reference: 1e-3)
    first_stage_cap: float = 1.0          # share of stem/first-stage units the masks may remove (reference: 0.25)
    search_bn: str = "batch"              # "batch": batch statistics, buffers restored; "running": BN in eval
    two_pass: bool = False                # the reference's prompted + unprompted optimiser steps per batch
    batch_size: int = 128

    def check(self) -> None:
        if self.prompt not in PROMPT_KINDS:
            raise CompressError(f"--prompt must be one of {', '.join(PROMPT_KINDS)}, got {self.prompt!r}")
        if self.warmup_epochs < 0 or self.score_epochs < 0:
            raise CompressError("--warmup-epochs and --score-epochs must be ≥ 0")
        if min(self.warmup_lr, self.score_lr, self.vpns_prompt_lr) <= 0 or self.score_clip <= 0:
            raise CompressError("VPNs learning rates and --score-clip must be > 0")
        if self.score_decay < 0:
            raise CompressError(f"--score-decay must be ≥ 0, got {self.score_decay}")
        if not 0.0 <= self.first_stage_cap <= 1.0:
            raise CompressError(f"--first-stage-cap must be in [0, 1], got {self.first_stage_cap}")
        if self.search_bn not in ("batch", "running"):
            raise CompressError(f"--search-bn must be batch or running, got {self.search_bn!r}")
        if self.two_pass and self.prompt == "none":
            raise CompressError("--two-pass alternates prompted and unprompted steps: it needs a --prompt")


@register
class VPNs(Method):
    name = "vpns"
    summary = "visual prompt + channel scores trained jointly, hard global-threshold masks (Jin et al. 2023)"
    options = (
        *PROMPT_OPTIONS,
        MethodOption("--warmup-epochs", int, 1, "VPNs: dense weight + prompt warm-up epochs (reference 5)"),
        MethodOption("--warmup-lr", float, 0.01, "VPNs: SGD learning rate of the warm-up (cosine)"),
        MethodOption("--score-epochs", int, 1, "VPNs: mask-search epochs, weights frozen (reference 5)"),
        MethodOption("--score-lr", float, 0.05, "VPNs: Adam learning rate of the channel scores (cosine)"),
        MethodOption("--score-decay", float, 0.1, "VPNs: Adam weight decay of the channel scores"),
        MethodOption("--score-clip", float, 0.25, "VPNs: gradient-norm clip of the channel scores"),
        MethodOption("--vpns-prompt-lr", float, 1e-3, "VPNs: Adam learning rate of the prompt (warm-up, search)"),
        MethodOption("--first-stage-cap", float, 1.0, "VPNs: share of stem/first-stage channels the masks may "
                     "remove while the target allows it (reference 0.25; 1 = no cap)"),
        MethodOption("--search-bn", ("batch", "running"), "batch", "VPNs: BN during the search: batch statistics "
                     "(running ones restored afterwards) or the dense running statistics"),
        MethodOption("--two-pass", bool, False, "VPNs: the reference's two optimiser steps per batch in the warm-up "
                     "and the mask search, one with the prompt and one without"),
    )

    def search(self, ctx: PruneContext) -> SearchResult:
        settings = VPNsSettings(**{f.name: self.config[f.name] for f in fields(VPNsSettings) if f.name in self.config},
                                batch_size=ctx.batch_size)
        settings.check()
        module: DeployableModule = ctx.module
        prompt = install_prompt(module, settings.prompt, settings.prompt_size)
        stages: dict[str, dict] = {}

        start = time.perf_counter()
        if settings.warmup_epochs:
            warm = run_stage(module, ctx.data, Warmup(settings), batch_size=settings.batch_size, seed=ctx.seed,
                             checkpoint=ctx.checkpoint)
            warm.accuracy = evaluate(module, ctx.data.val)
            stages["warmup"] = {**warm.as_dict(), "wall_s": ctx.stopwatch.lap("warmup", start)}

        start = time.perf_counter()
        scores = magnitude_scores(ctx.groups)
        capped = first_stage_groups(module, ctx.groups) if settings.first_stage_cap < 1.0 else []
        protected = protected_units(ctx.groups, scores, capped, settings.first_stage_cap)
        selector = MaskSelector(ctx, protected)
        initial = selector(scores)
        found = search_masks(module, ctx.groups, ctx.data, selector=selector, scores=scores, settings=settings,
                             seed=ctx.seed, checkpoint=ctx.checkpoint)
        stages["mask_search"] = {**found.as_dict(), "wall_s": ctx.stopwatch.lap("mask_search", start)}

        final = selector(scores)
        ctx.report.update({
            "vpns": {**{f.name: getattr(settings, f.name) for f in fields(VPNsSettings)},
                     "prompt_size": getattr(prompt, "size", None),
                     "mask_search_epoch_s": found.epoch_time_s,
                     "capped_groups": capped,
                     "first_stage_removed": removed_share(final, ctx.groups, capped),
                     f"{ctx.cost_model.name}_ratio_estimate_search": round(selector.ratio(final), 6)}})
        return SearchResult(masks=final, prompt=prompt,
                            prompt_spec=prompt_spec(prompt) if prompt is not None else None, stages=stages,
                            initial_masks=initial)


# ---------------------------------------------------------------- scores and masks


def magnitude_scores(groups: list[ChannelGroup]) -> dict[str, torch.Tensor]:
    """Per unit, the L2 norm of all its coupled weights (the engine's group norms), divided by the group's
    mean so that units of different groups start on one scale for the global threshold."""
    out = {}
    with torch.no_grad():
        for g in groups:
            norm = group_sq_norms(g).detach().to(torch.float64).cpu().sqrt()
            out[g.id] = (norm / norm.mean().clamp_min(1e-12)).float()
    return out


def first_stage_groups(module: DeployableModule, groups: list[ChannelGroup]) -> list[str]:
    """Groups whose root layer outputs at the spatial size of the first group's root: the stem and the
    first stage, which the reference code protects."""
    sizes: dict[str, tuple[int, ...]] = {}

    def recorder(gid: str):
        def hook(_mod, _inputs, out) -> None:
            sizes.setdefault(gid, tuple(out.shape[2:]))
        return hook

    net = module.net
    hooks = [net.get_submodule(g.id).register_forward_hook(recorder(g.id)) for g in groups]
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            net(module.normalize(module.example_input(1)))
    finally:
        net.train(was_training)
        for h in hooks:
            h.remove()
    if not groups or len(sizes.get(groups[0].id, ())) < 2:
        return []
    first = sizes[groups[0].id]
    return [g.id for g in groups if sizes.get(g.id) == first]


def protected_units(groups: list[ChannelGroup], scores: dict[str, torch.Tensor], capped: list[str],
                    cap: float) -> dict[str, torch.Tensor]:
    """For each capped group, the (1 − cap) share of its units with the highest initial scores."""
    out = {}
    for g in groups:
        if g.id in capped:
            keep = max(1, math.ceil(g.width * (1.0 - cap) - 1e-9))
            mask = torch.zeros(g.width, dtype=torch.bool)
            mask[torch.argsort(scores[g.id], descending=True, stable=True)[:keep]] = True
            out[g.id] = mask
    return out


def removed_share(masks: dict[str, torch.Tensor], groups: list[ChannelGroup], ids: list[str]) -> float | None:
    """Share of the units of groups `ids` that `masks` remove."""
    width = sum(g.width for g in groups if g.id in ids)
    if not width:
        return None
    return round(sum(int((~masks[g.id]).sum()) for g in groups if g.id in ids) / width, 4)


class MaskSelector:
    """One global threshold per step: the engine's targeting (this run's cost model, --scope, --round-to
    and allocation) over the raw scores, with protected units ranked first; where coarse --round-to
    widths make it miss the target by more than TARGET_TOLERANCE, the engine moves whole allowed blocks
    until it fits."""

    def __init__(self, ctx: PruneContext, protected: dict[str, torch.Tensor]):
        self.ctx = ctx
        self.protected = protected

    def ranked(self, scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Scores as the targeting ranks them (protected units lifted above all others)."""
        return {gid: s.detach().float().cpu() + PROTECT * self.protected[gid] if gid in self.protected
                else s.detach().float().cpu() for gid, s in scores.items()}

    def __call__(self, scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.ctx.select_masks(self.ranked(scores), normalize=False, tolerance=TARGET_TOLERANCE)

    def ratio(self, masks: dict[str, torch.Tensor]) -> float:
        return self.ctx.cost_model.ratio_of_masks(masks)


def straight_through(scores: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Gates equal to the hard masks in the forward pass, with d(gate)/d(score) = 1 (edge-popup STE)."""
    return {gid: masks[gid].to(s) + (s - s.detach()) for gid, s in scores.items()}


# ---------------------------------------------------------------- stages


class Warmup(Stage):
    """Dense weights (SGD, Nesterov, cosine) and prompt (Adam, cosine) trained together before the search."""

    name = "vpns warm-up"
    evaluate = False

    def __init__(self, settings: VPNsSettings):
        self.settings, self.epochs = settings, settings.warmup_epochs
        self.passes = 2 if settings.two_pass else 1

    def optimizers(self, module: DeployableModule) -> list[Optim]:
        weights = [p for p in module.net.parameters() if p.requires_grad]
        opts = [Optim(weights, "sgd", self.settings.warmup_lr, weight_decay=1e-4)]
        if list(module.prompt.parameters()):
            opts.append(Optim(list(module.prompt.parameters()), "adam", self.settings.vpns_prompt_lr))
        return opts

    def forward(self, module, x, y, step) -> StepOut:
        logits = run_pass(module, x, step)
        return StepOut(F.cross_entropy(logits, y), logits)


def run_pass(module: DeployableModule, x: torch.Tensor, step) -> torch.Tensor:
    """The reference's two-pass step: the first pass over a batch is prompted, the second is not (the network
    learns to work with and without its prompt; its evaluation, unlike here, is unprompted)."""
    if step.pass_index == 0:
        return module(x)
    return module.net(module.normalize(x))


class Scores(nn.Module):
    """One trainable score per unit of every group (a module, so the loop can place, sync and save it)."""

    def __init__(self, scores: dict[str, torch.Tensor]):
        super().__init__()
        self.ids = list(scores)
        self.values = nn.ParameterList(nn.Parameter(s.detach().clone().float()) for s in scores.values())

    def as_dict(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.ids, self.values, strict=True))


class MaskSearch(Stage):
    """Unit scores (Adam, clipped) and prompt (Adam) trained on the frozen network gated by the hard masks
    of every step's targeted global threshold, straight-through to the scores."""

    name = "vpns mask search"
    augment = True
    evaluate = False

    def __init__(self, groups: list[ChannelGroup], data: DataBundle, scores: dict[str, torch.Tensor],
                 selector: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]], settings: VPNsSettings,
                 check_step: Callable[[dict[str, torch.Tensor]], None] | None = None):
        self.groups, self.data, self.selector, self.settings = groups, data, selector, settings
        self.epochs, self.freeze, self.check_step = settings.score_epochs, settings.search_bn, check_step
        self.passes = 2 if settings.two_pass else 1
        self.scores = Scores(scores)
        self.gates: Gates | None = None

    def modules(self) -> list[nn.Module]:
        return [self.scores]

    def optimizers(self, module: DeployableModule) -> list[Optim]:
        s = self.settings
        opts = [Optim(list(self.scores.values), "adam", s.score_lr, weight_decay=s.score_decay, clip=s.score_clip)]
        if list(module.prompt.parameters()):
            opts.append(Optim(list(module.prompt.parameters()), "adam", s.vpns_prompt_lr))
        return opts

    def context(self, module: DeployableModule) -> Gates:
        self.gates = Gates(module.net, self.groups)
        return self.gates

    def forward(self, module, x, y, step) -> StepOut:
        params = self.scores.as_dict()
        masks = self.selector(params)
        if self.check_step is not None:
            self.check_step(masks)
        self.gates.set(straight_through(params, masks))
        logits = run_pass(module, x, step)
        return StepOut(F.cross_entropy(logits, y), logits)

    def end_epoch(self, module: DeployableModule, epoch: int) -> dict:
        self.gates.set_masks(self.selector(self.scores.as_dict()))
        if self.settings.search_bn == "batch":   # evaluate the masked network on its own BN statistics
            bs = self.settings.batch_size
            reestimate_bn(module, self.data.train, bs, images=10 * bs, seed=12345)
        return {"val_acc_masked": round(evaluate(module, self.data.val), 5)}


def search_masks(module: DeployableModule, groups: list[ChannelGroup], data: DataBundle, *,
                 selector: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]],
                 scores: dict[str, torch.Tensor], settings: VPNsSettings, seed: int,
                 check_step: Callable[[dict[str, torch.Tensor]], None] | None = None,
                 checkpoint: Checkpoint | None = None) -> StageRecord:
    """Train unit scores (and the prompt) with the network frozen; updates `scores` in place.

    Every step draws hard masks from the current scores (`selector`: one threshold meeting the target)
    and gates the network with them, straight-through. `check_step(masks)` sees each step's masks.
    """
    stage = MaskSearch(groups, data, scores, selector, settings, check_step)
    record = run_stage(module, data, stage, batch_size=settings.batch_size, seed=seed, checkpoint=checkpoint)
    for gid, p in stage.scores.as_dict().items():
        scores[gid] = p.detach().clone()
    record.accuracy = record.history[-1]["val_acc_masked"] if record.history else None
    return record
