"""VPNs, structured: a visual prompt and channel masks optimised jointly (Jin et al., arXiv 2312.01397).

The authors' structured variant (ILM-VP `develop-can`, see docs/vpns.md) learns one score per channel
with the weights frozen; the forward pass keeps the channels above one global threshold (a hard 0/1
mask, straight-through gradient to the scores) while a visual prompt trains alongside. Here a score
belongs to a channel-group unit (coupled channels are kept or removed together), scores start from
weight magnitude normalised per group, and the threshold is re-chosen at every step by the engine's
FLOPs targeting, so that every step's masked network meets `--flops-ratio` — the masks the search
trains under are exactly those the final projection would produce from the same scores.

Stages: dense weight + prompt warm-up → mask search (weights and BN statistics frozen; scores and
prompt trained with Adam) → (common pipeline) final masks projected onto the target, slim,
fine-tune weights and prompt. Accuracies are always the deployable module's (prompt included) on
the validation split.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields

import torch
from torch import nn

from compress.data import DataBundle, iterate_batches
from compress.deploy import DeployableModule
from compress.errors import CompressError
from compress.methods.base import PROMPT_OPTIONS, Method, MethodOption, PruneContext, SearchResult, register
from compress.methods.fit_target import fit_to_target
from compress.pipeline import recalibrate_bn
from compress.progress import EpochBar, progress_bars
from compress.prompt import PROMPT_KINDS, make_prompt, prompt_spec
from compress.pruning.gates import Gates
from compress.pruning.groups import ChannelGroup
from compress.pruning.importance import group_sq_norms
from compress.train import evaluate

# Added to the scores of units a cap protects: they rank above every other unit, so the targeting
# removes them only if the FLOPs target cannot be met otherwise.
PROTECT = 1e6
# Masks are kept within this distance of the target by the FLOPs model (the pipeline promises ±0.02
# by real fvcore; the model and fvcore differ by the prompt's few FLOPs).
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
                     "remove while the FLOPs target allows it (reference 0.25; 1 = no cap)"),
        MethodOption("--search-bn", ("batch", "running"), "batch", "VPNs: BN during the search: batch statistics "
                     "(running ones restored afterwards) or the dense running statistics"),
    )

    def search(self, ctx: PruneContext) -> SearchResult:
        settings = VPNsSettings(**{f.name: self.config[f.name] for f in fields(VPNsSettings) if f.name in self.config},
                                batch_size=ctx.batch_size)
        settings.check()
        module: DeployableModule = ctx.module
        prompt = install_prompt(module, settings)
        stages: dict[str, dict] = {}

        start = time.perf_counter()
        if settings.warmup_epochs:
            warm = train_weights_and_prompt(module, ctx.data, epochs=settings.warmup_epochs, lr=settings.warmup_lr,
                                            weight_decay=1e-4, prompt_lr=settings.vpns_prompt_lr,
                                            batch_size=settings.batch_size, seed=ctx.seed, desc="vpns warm-up")
            stages["warmup"] = {**warm.as_dict(), "wall_s": ctx.stopwatch.lap("warmup", start)}

        start = time.perf_counter()
        scores = magnitude_scores(ctx.groups)
        capped = first_stage_groups(module, ctx.groups) if settings.first_stage_cap < 1.0 else []
        protected = protected_units(ctx.groups, scores, capped, settings.first_stage_cap)
        selector = MaskSelector(ctx, protected)
        found = search_masks(module, ctx.groups, ctx.data, selector=selector, scores=scores, settings=settings,
                             seed=ctx.seed)
        stages["mask_search"] = {**found.as_dict(), "wall_s": ctx.stopwatch.lap("mask_search", start)}

        final = selector(scores)
        ctx.report.update({
            "vpns": {**{f.name: getattr(settings, f.name) for f in fields(VPNsSettings)},
                     "prompt_size": getattr(prompt, "size", None),
                     "mask_search_epoch_s": found.epoch_time_s,
                     "capped_groups": capped,
                     "first_stage_removed": removed_share(final, ctx.groups, capped),
                     "flops_ratio_estimate_search": round(selector.ratio(final), 6)}})
        return SearchResult(masks=final, prompt=prompt,
                            prompt_spec=prompt_spec(prompt) if prompt is not None else None, stages=stages)


# ---------------------------------------------------------------- prompt


def install_prompt(module: DeployableModule, settings: VPNsSettings) -> nn.Module | None:
    """Put a fresh (zero) prompt of the requested kind in front of the network; returns it (None for none).

    A source run that already deploys a prompt keeps it and trains it further."""
    if not isinstance(module.prompt, nn.Identity):
        return module.prompt
    _, h, w = module.input_size
    if h != w:
        raise CompressError(f"visual prompts need square inputs, the model takes {h}×{w}")
    prompt = make_prompt(settings.prompt, h, settings.prompt_size)
    if prompt is not None:
        module.prompt = prompt
    return prompt


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
    """One global threshold per step: the engine's targeting (this run's --scope and --round-to) over
    the raw scores, with protected units ranked first; where coarse --round-to widths make it miss the
    target by more than TARGET_TOLERANCE, whole allowed blocks are moved until it fits (fit_target.py)."""

    def __init__(self, ctx: PruneContext, protected: dict[str, torch.Tensor]):
        self.ctx = ctx
        self.protected = protected

    def ranked(self, scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Scores as the targeting ranks them (protected units lifted above all others)."""
        return {gid: s.detach().float() + PROTECT * self.protected[gid] if gid in self.protected
                else s.detach().float() for gid, s in scores.items()}

    def __call__(self, scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        ranked = self.ranked(scores)
        masks = self.ctx.select_masks(ranked, normalize=False)
        return fit_to_target(masks, ranked, self.ctx.groups, self.ctx.flops_model, self.ctx.flops_ratio,
                             self.ctx.round_to, TARGET_TOLERANCE)

    def ratio(self, masks: dict[str, torch.Tensor]) -> float:
        return self.ctx.flops_model.ratio_of_masks(masks)


def straight_through(scores: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Gates equal to the hard masks in the forward pass, with d(gate)/d(score) = 1 (edge-popup STE)."""
    return {gid: masks[gid].to(s.dtype) + (s - s.detach()) for gid, s in scores.items()}


# ---------------------------------------------------------------- freezing


@contextmanager
def frozen_network(module: DeployableModule, bn: str = "batch") -> Iterator[Callable[[], None]]:
    """Freeze the network's weights and BN statistics for the mask search; the prompt stays trainable.

    bn="batch": BN normalises with the batch statistics of the masked network, and every buffer is
    restored bitwise on exit, so running statistics and counters end unchanged. bn="running": BN runs
    in eval mode on the dense statistics. Yields a function that (re-)enters search mode, to call
    before each step (an evaluation in between switches every layer to eval and back).
    """
    net = module.net
    flags = {p: p.requires_grad for p in net.parameters()}
    saved = {name: buf.clone() for name, buf in net.named_buffers()}
    for p in net.parameters():
        p.requires_grad_(False)

    def search_mode() -> None:
        module.train()
        if bn == "running":
            for m in net.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()

    try:
        yield search_mode
    finally:
        with torch.no_grad():
            for name, buf in net.named_buffers():
                buf.copy_(saved[name])
        for p, flag in flags.items():
            p.requires_grad_(flag)
        module.eval()


# ---------------------------------------------------------------- stages


@dataclass
class StageRecord:
    """What report.json records of one stage."""

    epochs: int
    epoch_time_s: float | None
    accuracy: float | None
    history: list[dict]

    def as_dict(self) -> dict:
        return {"epochs": self.epochs, "epoch_s": None if self.epoch_time_s is None else round(self.epoch_time_s, 3),
                "val_acc": self.accuracy, "history": self.history}


Step = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, str]]


def run_epochs(data: DataBundle, epochs: int, batch_size: int, seed: int, desc: str, step: Step,
               on_epoch: Callable[[], dict] | None = None) -> tuple[list[dict], list[float]]:
    """The loop both stages share: augmented shuffled batches and a progress bar per epoch.
    `step(x, y)` trains on one batch and returns (loss, logits, extra progress text).
    Returns per-epoch records and per-epoch training times (evaluation excluded)."""
    steps = math.ceil(len(data.train) / batch_size)
    history, times = [], []
    with progress_bars() as progress:
        for epoch in range(epochs):
            started = time.perf_counter()
            bar = EpochBar(progress, f"{desc} {epoch + 1}/{epochs}", steps)
            seen = correct = 0
            loss_sum = 0.0
            for x, y in iterate_batches(data.train, batch_size, shuffle=True, seed=seed * 1000 + epoch, augment=True):
                loss, logits, extra = step(x, y)
                seen += len(y)
                correct += int((logits.argmax(1) == y).sum())
                loss_sum += float(loss) * len(y)
                bar.advance(f"loss {loss_sum / seen:.3f}  acc {correct / seen:.3f}{extra}")
            times.append(time.perf_counter() - started)
            record = {"epoch": epoch + 1, "loss": round(loss_sum / max(1, seen), 5),
                      "train_acc": round(correct / max(1, seen), 5)}
            if on_epoch is not None:
                record.update(on_epoch())
            history.append(record)
            bar.done("  ".join(f"{k} {v}" for k, v in record.items() if k != "epoch"))
    return history, times


def cosine(optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    total = max(1, total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))


def train_weights_and_prompt(module: DeployableModule, data: DataBundle, *, epochs: int, lr: float,
                             weight_decay: float, prompt_lr: float, batch_size: int, seed: int,
                             desc: str) -> StageRecord:
    """The warm-up: weights with SGD (momentum 0.9, Nesterov), prompt with Adam, both cosine to zero."""
    weights = [p for p in module.net.parameters() if p.requires_grad]
    opts = [torch.optim.SGD(weights, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)]
    if list(module.prompt.parameters()):
        opts.append(torch.optim.Adam(module.prompt.parameters(), lr=prompt_lr))
    total = epochs * math.ceil(len(data.train) / batch_size)
    scheds = [cosine(o, total) for o in opts]
    criterion = nn.CrossEntropyLoss()

    def step(x, y):
        module.train()
        logits = module(x)
        loss = criterion(logits, y)
        for o in opts:
            o.zero_grad(set_to_none=True)
        loss.backward()
        for o, s in zip(opts, scheds, strict=True):
            o.step()
            s.step()
        return loss.detach(), logits.detach(), ""

    history, times = run_epochs(data, epochs, batch_size, seed, desc, step)
    module.eval()
    return StageRecord(epochs, _mean(times), evaluate(module, data.val), history)


def search_masks(module: DeployableModule, groups: list[ChannelGroup], data: DataBundle, *,
                 selector: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]],
                 scores: dict[str, torch.Tensor], settings: VPNsSettings, seed: int,
                 check_step: Callable[[dict[str, torch.Tensor]], None] | None = None) -> StageRecord:
    """Train unit scores (and the prompt) with the network frozen; updates `scores` in place.

    Every step draws hard masks from the current scores (`selector`: one threshold meeting the FLOPs
    target) and gates the network with them, straight-through. `check_step(masks)` sees each step's masks.
    """
    params = {gid: nn.Parameter(s.detach().clone().float()) for gid, s in scores.items()}
    opts = [torch.optim.Adam(params.values(), lr=settings.score_lr, weight_decay=settings.score_decay)]
    if list(module.prompt.parameters()):
        opts.append(torch.optim.Adam(module.prompt.parameters(), lr=settings.vpns_prompt_lr))
    total = settings.score_epochs * math.ceil(len(data.train) / settings.batch_size)
    scheds = [cosine(o, total) for o in opts]
    criterion = nn.CrossEntropyLoss()

    with frozen_network(module, settings.search_bn) as search_mode, Gates(module.net, groups) as gates:
        def step(x, y):
            search_mode()
            masks = selector(params)
            if check_step is not None:
                check_step(masks)
            gates.set(straight_through(params, masks))
            logits = module(x)
            loss = criterion(logits, y)
            for o in opts:
                o.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(params.values()), settings.score_clip)
            for o, s in zip(opts, scheds, strict=True):
                o.step()
                s.step()
            return loss.detach(), logits.detach(), ""

        def on_epoch() -> dict:
            gates.set_masks(selector(params))
            if settings.search_bn == "batch":   # evaluate the masked network on its own BN statistics
                recalibrate_bn(module, data, settings.batch_size, images=10 * settings.batch_size, seed=12345)
            return {"val_acc_masked": round(evaluate(module, data.val), 5)}

        history, times = run_epochs(data, settings.score_epochs, settings.batch_size, seed, "vpns mask search",
                                    step, on_epoch)
    for gid, p in params.items():
        scores[gid] = p.detach().clone()
    accuracy = history[-1]["val_acc_masked"] if history else None
    return StageRecord(settings.score_epochs, _mean(times), accuracy, history)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None
