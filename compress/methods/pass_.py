"""PASS (arXiv 2407.17412): a visual prompt and a recurrent hypernetwork locate the channel masks.

Search: the backbone is frozen (weights and BN statistics, bit for bit); the prompt, the prompt encoder
and the LSTM hypernetwork are trained jointly with Adam on the task loss of the *gated* network plus
λ·|log(cost ratio of the sampled masks / target)| (the engine's cost model of the run's target — the
analytic FLOPs model or the measured latency tables — differentiable through the straight-through masks).
The hypernetwork's deterministic channel logits are then ranked globally and projected exactly onto the
target; slimming and fine-tuning follow in the common pipeline.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from compress.checkpoint import Checkpoint
from compress.data import DataBundle
from compress.deploy import DeployableModule
from compress.errors import CompressError
from compress.loop import Optim, Stage, StepOut, evaluate, run_stage
from compress.methods.base import PROMPT_OPTIONS, Method, MethodOption, PruneContext, register
from compress.methods.base import SearchResult as MethodResult
from compress.methods.hypernet import HypernetConfig, MaskHypernet, check_compatible, group_signature, prompt_tensor
from compress.methods.pass_stats import GroupStats, backbone_fingerprint, group_statistics
from compress.prompt import install_prompt, prompt_spec
from compress.pruning.cost import CostModel
from compress.pruning.gates import Gates
from compress.pruning.groups import ChannelGroup

HYPERNET_FILE = "hypernet.pt"
SEARCH_BN = ("batch", "running")


@dataclass
class PassOptions:
    """Every knob of the search (CLI flags of `--method pass`)."""

    search_epochs: int = 2
    hypernet_lr: float = 5e-3
    prompt_lr: float = 1e-2
    lam: float = 2.0                     # weight of the resource penalty
    temp_start: float = 1.0              # Gumbel-sigmoid temperature, annealed geometrically …
    temp_end: float = 0.2                # … to this value over the search
    hidden: int = 64
    mask_embed: int = 16
    batch_size: int = 128
    weight_decay: float = 0.0
    grad_clip: float = 5.0
    search_bn: str = "batch"
    hypernet_from: str | None = None

    def check(self) -> None:
        if self.search_epochs < 0:
            raise CompressError(f"--hypernet-epochs must be ≥ 0, got {self.search_epochs}")
        if self.hypernet_lr <= 0 or self.prompt_lr < 0:
            raise CompressError("--hypernet-lr must be > 0 and --hypernet-prompt-lr ≥ 0")
        if self.lam < 0:
            raise CompressError(f"--flops-lambda must be ≥ 0, got {self.lam}")
        if not 0 < self.temp_end <= self.temp_start:
            raise CompressError(f"need 0 < --temp-end ≤ --temp-start, got {self.temp_end} and {self.temp_start}")
        if self.search_bn not in SEARCH_BN:
            raise CompressError(f"--hypernet-bn must be one of {', '.join(SEARCH_BN)}, got {self.search_bn!r}")
        if self.hidden < 1 or self.mask_embed < 1 or self.batch_size < 1:
            raise CompressError("--hypernet-hidden, --mask-embed and --batch-size must be positive")


@dataclass
class SearchResult:
    hypernet: MaskHypernet
    stats: GroupStats
    scores: dict[str, torch.Tensor]             # deterministic logits per group id (for global ranking)
    initial_scores: dict[str, torch.Tensor]     # the same from the hypernetwork before the search
    history: list[dict[str, float]] = field(default_factory=list)
    epoch_times_s: list[float] = field(default_factory=list)
    transferred_from: str | None = None
    reuse: str | None = None                    # "all" / "index-free" with --hypernet-from

    def report(self) -> dict[str, Any]:
        """What report.json records about the search (the hypernetwork's config included)."""
        times = self.epoch_times_s
        return {"hypernet": self.hypernet.config.to_dict(), "hypernet_file": HYPERNET_FILE,
                "hypernet_from": self.transferred_from, "hypernet_reuse": self.reuse, "search_history": self.history,
                "search_epoch_s": [round(t, 3) for t in self.epoch_times_s],
                "search_epoch_s_mean": round(sum(times) / len(times), 3) if times else None}

    def extras(self) -> dict[str, dict[str, torch.Tensor]]:
        """Weights-only files for the run directory."""
        return {HYPERNET_FILE: {k: v.detach().cpu().contiguous() for k, v in self.hypernet.state_dict().items()}}


def temperature(step: int, total: int, start: float, end: float) -> float:
    """Geometric annealing from `start` (step 0) to `end` (last step)."""
    if total <= 1:
        return end
    return start * (end / start) ** (min(step, total - 1) / (total - 1))


def resource_penalty(ratio: torch.Tensor, target: float) -> torch.Tensor:
    """|log(ratio / target)|: symmetric in over- and undershoot, scale-free across targets."""
    return (ratio.clamp_min(1e-6).log() - math.log(target)).abs()


def new_hypernet(groups: list[ChannelGroup], use_prompt: bool, target: float, opts: PassOptions,
                 backbone: str | None = None) -> MaskHypernet:
    """A fresh hypernetwork whose initial masks keep about √target of each group (FLOPs ≈ target)."""
    config = HypernetConfig(groups=group_signature(groups), hidden=opts.hidden, mask_embed=opts.mask_embed,
                            use_prompt=use_prompt, backbone=backbone)
    return MaskHypernet(config, init_keep=math.sqrt(target))


def reuse_hypernet(hyper: MaskHypernet, backbone: str) -> str:
    """Adopt a loaded hypernetwork for the backbone with fingerprint `backbone`; returns how it was reused.

    "all": the same backbone it was trained on (every weight applies). "index-free": another backbone
    (e.g. the same architecture trained on other data): per-unit head weights are averaged away."""
    same = hyper.config.backbone == backbone
    if not same:
        hyper.forget_channel_identity()
    hyper.config.backbone = backbone
    return "all" if same else "index-free"


def load_hypernet(run_dir: str | Path, groups: list[ChannelGroup], use_prompt: bool) -> MaskHypernet:
    """The hypernetwork saved by an earlier PASS run (`--hypernet-from`), checked against this model."""
    from compress.runs import load_state, read_report

    d = Path(run_dir)
    if not (d / HYPERNET_FILE).is_file():
        raise CompressError(f"--hypernet-from {d}: no {HYPERNET_FILE} there (it must be a run written by "
                            "`compress prune --method pass`)")
    report = read_report(d)
    saved = report.get("method_report", {}).get("hypernet")
    if report.get("method") != "pass" or saved is None:
        raise CompressError(f"--hypernet-from {d}: its report.json records no PASS hypernetwork")
    config = HypernetConfig.from_dict(saved)
    check_compatible(config, groups, use_prompt, str(d))
    hyper = MaskHypernet(config)
    try:
        hyper.load_state_dict(load_state(d / HYPERNET_FILE), strict=True)
    except RuntimeError as exc:
        first = next((ln.strip() for ln in str(exc).splitlines()[1:] if ln.strip()), str(exc))
        raise CompressError(f"--hypernet-from {d}: {HYPERNET_FILE} does not match its config: {first}") from None
    return hyper


class HypernetSearch(Stage):
    """Prompt + encoder + LSTM hypernetwork trained with Adam on the frozen, gated backbone: task loss of the
    network under the sampled (Gumbel-sigmoid, straight-through) masks + λ·resource penalty (the ratio of the
    run's cost model: FLOPs, or the latency tables)."""

    name = "pass search"
    evaluate = False

    def __init__(self, hyper: MaskHypernet, stats: GroupStats, groups: list[ChannelGroup], prompt: nn.Module | None,
                 target: float, opts: PassOptions, seed: int, cost_model: CostModel | None = None):
        self.hyper, self.stats, self.groups, self.prompt, self.target, self.opts = hyper, stats, groups, prompt, \
            target, opts
        self.epochs, self.freeze = opts.search_epochs, opts.search_bn
        self.cost = cost_model or groups[0].graph.flops_model
        self.noise = torch.Generator().manual_seed(seed)
        self.tau = opts.temp_start
        self.gates: Gates | None = None

    def modules(self) -> list[nn.Module]:
        return [self.hyper]

    def generators(self) -> list[torch.Generator]:
        return [self.noise]

    def optimizers(self, module: DeployableModule) -> list[Optim]:
        o = self.opts
        groups = [{"params": list(self.hyper.parameters()), "lr": o.hypernet_lr}]
        if self.prompt is not None and o.prompt_lr > 0:
            groups.append({"params": list(self.prompt.parameters()), "lr": o.prompt_lr})
        return [Optim(groups, "adam", o.hypernet_lr, weight_decay=o.weight_decay, schedule="constant",
                      clip=o.grad_clip if o.grad_clip > 0 else None)]

    def context(self, module: DeployableModule) -> Gates:
        self.gates = Gates(module.net, self.groups)
        return self.gates

    def forward(self, module, x, y, step) -> StepOut:
        o = self.opts
        self.tau = temperature(step.step, step.total, o.temp_start, o.temp_end)
        sample = self.hyper(prompt_tensor(self.prompt), self.stats, tau=self.tau, noise=True, generator=self.noise)
        self.gates.set(dict(zip(self.stats.ids, sample.masks, strict=True)))
        logits = module(x)
        task = F.cross_entropy(logits, y)
        ratio = self.cost.ratio_of_fractions(sample.fractions()).to(task.device)
        loss = task + o.lam * resource_penalty(ratio, self.target)
        return StepOut(loss, logits, {"task_loss": task.detach(), f"{self.cost.name}_ratio": ratio.detach()})

    def end_epoch(self, module: DeployableModule, epoch: int) -> dict:
        return {"temperature": round(self.tau, 4)}


def search(module: DeployableModule, data: DataBundle, groups: list[ChannelGroup], target: float,
           opts: PassOptions, seed: int = 0, checkpoint: Checkpoint | None = None,
           cost_model: CostModel | None = None) -> SearchResult:
    """Train prompt + encoder + hypernetwork on the frozen, gated backbone; return the channel scores.

    `module.prompt` (an `nn.Identity` for `--prompt none`) is trained in place; `module.net` is unchanged.
    `target` is a ratio of `cost_model` (default: the groups' FLOPs model).
    """
    opts.check()
    prompt = module.prompt if prompt_tensor(module.prompt) is not None else None
    use_prompt = prompt is not None
    stats = group_statistics(module.net, groups)
    backbone = backbone_fingerprint(stats)
    reuse = None
    if opts.hypernet_from:
        hyper = load_hypernet(opts.hypernet_from, groups, use_prompt)
        reuse = reuse_hypernet(hyper, backbone)
    else:
        hyper = new_hypernet(groups, use_prompt, target, opts, backbone)
    start_prompt = prompt_tensor(prompt)
    initial = hyper.scores(None if start_prompt is None else start_prompt.detach().cpu(), stats)  # hyper is on the CPU
    stage = HypernetSearch(hyper, stats, groups, prompt, target, opts, seed, cost_model)
    record = run_stage(module, data, stage, batch_size=opts.batch_size, seed=seed, checkpoint=checkpoint)
    hyper.eval()
    scores = hyper.scores(prompt_tensor(prompt), stats)
    return SearchResult(hyper, stats, scores, initial, record.history, record.epoch_times, opts.hypernet_from, reuse)


# ---------------------------------------------------------------- the method


@register
class Pass(Method):
    name = "pass"
    summary = "visual prompt + recurrent hypernetwork over channel groups emits the masks (PASS, 2024)"
    options = (
        *PROMPT_OPTIONS,
        MethodOption("--hypernet-epochs", int, PassOptions.search_epochs, "epochs of hypernetwork + prompt training "
                     "(backbone frozen); 0 is the control: the hypernetwork as initialised (or as loaded by "
                     "--hypernet-from) and an untrained prompt decide the masks"),
        MethodOption("--hypernet-lr", float, PassOptions.hypernet_lr, "Adam learning rate of encoder + LSTM + heads"),
        MethodOption("--hypernet-prompt-lr", float, PassOptions.prompt_lr, "Adam learning rate of the prompt during "
                     "the search"),
        MethodOption("--flops-lambda", float, PassOptions.lam, "weight λ of the resource penalty |log(ratio / "
                     "target)| (the ratio of --flops-ratio or --latency-ratio, whichever is the target)"),
        MethodOption("--temp-start", float, PassOptions.temp_start, "Gumbel-sigmoid temperature at the start"),
        MethodOption("--temp-end", float, PassOptions.temp_end, "temperature at the end (geometric annealing)"),
        MethodOption("--hypernet-hidden", int, PassOptions.hidden, "LSTM hidden size (also the prompt embedding size)"),
        MethodOption("--mask-embed", int, PassOptions.mask_embed, "size of the previous-mask embedding"),
        MethodOption("--hypernet-bn", SEARCH_BN, PassOptions.search_bn, "BN during the search: dense running "
                     "statistics, or each gated batch's own (buffers restored)"),
        MethodOption("--hypernet-from", str, None, "PASS run directory whose hypernetwork to start from "
                     "(same architecture: channel group ids and widths must match)"),
    )

    def settings(self, batch_size: int) -> PassOptions:
        c = self.config
        return PassOptions(search_epochs=c["hypernet_epochs"], hypernet_lr=c["hypernet_lr"],
                           prompt_lr=c["hypernet_prompt_lr"], lam=c["flops_lambda"], temp_start=c["temp_start"],
                           temp_end=c["temp_end"], hidden=c["hypernet_hidden"], mask_embed=c["mask_embed"],
                           batch_size=batch_size, search_bn=c["hypernet_bn"], hypernet_from=c["hypernet_from"])

    def search(self, ctx: PruneContext) -> MethodResult:
        opts = self.settings(ctx.batch_size)
        opts.check()
        if opts.hypernet_from and not Path(opts.hypernet_from).is_dir():
            raise CompressError(f"--hypernet-from {opts.hypernet_from} is not a directory")
        prompt = install_prompt(ctx.module, self.config["prompt"], self.config["prompt_size"])
        start = time.perf_counter()
        found = search(ctx.module, ctx.data, ctx.groups, ctx.ratio, opts, seed=ctx.seed,
                       checkpoint=ctx.checkpoint, cost_model=ctx.cost_model)
        wall = ctx.stopwatch.lap("hypernet_search", start)
        masks = ctx.select_masks(found.scores, normalize=False)
        with ctx.gates() as gates:
            gates.set_masks(masks)
            accuracy = evaluate(ctx.module, ctx.data.val)
        ctx.report.update(found.report())
        stage = {"wall_s": wall, "epochs": opts.search_epochs, "epoch_time_s": found.report()["search_epoch_s_mean"],
                 "accuracy_masked": accuracy,
                 f"{ctx.cost_model.name}_ratio_estimate": ctx.cost_model.ratio_of_masks(masks),
                 "history": found.history}
        return MethodResult(scores=found.scores, normalize=False, prompt=prompt, prompt_spec=prompt_spec(prompt),
                            stages={"hypernet_search": stage}, extras=found.extras(),
                            initial_masks=ctx.select_masks(found.initial_scores, normalize=False))
