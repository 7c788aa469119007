"""The one training loop: every training-like stage of every command runs through `run_stage`.

Dense training, fine-tuning, sparse training, the VPNs warm-up and score search, the PASS hypernetwork
search and the later methods differ only in what a small `Stage` subclass says: which parameters
train with which optimiser (`optimizers`), what one step computes (`forward`), what happens after the
optimiser step (`after_step`), what an epoch adds to the history (`end_epoch`), whether the network
is frozen (`freeze`) and which extra modules and RNGs belong to the stage (`modules`, `generators`).
Everything else is the loop's, once: seeded per-epoch batches on the runtime's device, the per-step
cosine schedule, mixed precision and loss scaling, DistributedDataParallel under torchrun (extra
modules such as scores or a hypernetwork are synchronised too), gradient clipping, progress bars,
per-epoch checkpoints and bit-identical resume. `evaluate` and `reestimate_bn` are the loop's
forward-only passes.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from compress.batches import batches, eval_batches, steps_per_epoch
from compress.checkpoint import Checkpoint
from compress.data import DataBundle, ImageSet
from compress.loop_state import EpochSums, StageState
from compress.progress import EpochBar, progress_bars
from compress.runtime import Runtime, current

FREEZE = ("batch", "running")


@dataclass
class Optim:
    """One optimiser over some parameters (tensors, or torch param-group dicts with their own lr)."""

    params: list
    kind: str | Callable[[list], torch.optim.Optimizer] = "sgd"   # sgd (momentum, Nesterov) | adam | adamw | factory
    lr: float = 0.1
    weight_decay: float = 0.0
    momentum: float = 0.9
    schedule: str = "cosine"              # per-step cosine to zero over the stage, or "constant"
    clip: float | None = None             # gradient-norm clip over these parameters before the step

    def build(self) -> torch.optim.Optimizer:
        if callable(self.kind):
            return self.kind(self.params)
        if self.kind == "sgd":
            return torch.optim.SGD(self.params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay,
                                   nesterov=self.momentum > 0)
        if self.kind == "adam":
            return torch.optim.Adam(self.params, lr=self.lr, weight_decay=self.weight_decay)
        if self.kind == "adamw":
            return torch.optim.AdamW(self.params, lr=self.lr, weight_decay=self.weight_decay)
        raise ValueError(f"unknown optimizer {self.kind!r}")

    def tensors(self) -> list[torch.Tensor]:
        return [p for item in self.params for p in (item["params"] if isinstance(item, dict) else [item])]


@dataclass
class StepInfo:
    epoch: int        # 0-based epoch of the stage
    step: int         # 0-based optimiser step within the stage
    total: int        # optimiser steps in the whole stage
    pass_index: int = 0   # which of the stage's `passes` over this batch (0-based)


@dataclass
class StepOut:
    loss: torch.Tensor
    logits: torch.Tensor
    metrics: dict[str, torch.Tensor | float] = field(default_factory=dict)   # averaged per epoch into history


@dataclass
class StageRecord:
    """What report.json records of one stage."""

    name: str
    epochs: int
    history: list[dict]
    epoch_times: list[float]
    accuracy: float | None = None

    @property
    def epoch_time_s(self) -> float | None:
        return sum(self.epoch_times) / len(self.epoch_times) if self.epoch_times else None

    def as_dict(self) -> dict[str, Any]:
        mean = self.epoch_time_s
        return {"epochs": self.epochs, "epoch_s": None if mean is None else round(mean, 3), "val_acc": self.accuracy,
                "history": self.history}


class Stage:
    """What one training-like stage does differently; subclass and override. Defaults: train every
    parameter of the module that requires grad, cross-entropy, validation accuracy after each epoch."""

    name: str = "train"           # unique within a command: progress label and checkpoint key
    epochs: int = 1
    freeze: str | None = None     # "batch" | "running": network weights frozen, its buffers restored on exit
    augment: bool = True
    evaluate: bool = True         # validation accuracy ("val_acc") after each epoch
    passes: int = 1               # forward + optimiser steps per batch (`step.pass_index` says which)

    def modules(self) -> list[nn.Module]:
        """Extra trainable modules (scores, hypernetwork): on the device, DDP-synchronised, checkpointed."""
        return []

    def optimizers(self, module: nn.Module) -> list[Optim]:
        raise NotImplementedError

    def generators(self) -> list[torch.Generator]:
        """RNGs the stage draws from, saved and restored with it (so a resumed run is bit-identical)."""
        return []

    def context(self, module: nn.Module) -> contextlib.AbstractContextManager:
        """Held around the whole stage (e.g. gate hooks on the network)."""
        return contextlib.nullcontext()

    def forward(self, module: nn.Module, x: torch.Tensor, y: torch.Tensor, step: StepInfo) -> StepOut:
        logits = module(x)
        return StepOut(F.cross_entropy(logits, y), logits)

    def after_step(self, module: nn.Module, step: StepInfo) -> None:
        """After the optimisers stepped (e.g. a proximal step)."""

    def end_epoch(self, module: nn.Module, epoch: int) -> dict[str, Any]:
        """Extra history entries, after the training steps (and validation) of an epoch."""
        return {}


class Fit(Stage):
    """Plain supervised training: dense training, fine-tuning, sparse training (with `extra_loss`)."""

    def __init__(self, name: str, epochs: int, lr: float, weight_decay: float = 5e-4, optimizer: str = "sgd",
                 params: list | None = None, extra_loss: Callable[[nn.Module], torch.Tensor] | None = None,
                 augment: bool = True, evaluate: bool = True):
        self.name, self.epochs, self.lr, self.weight_decay = name, epochs, lr, weight_decay
        self.optimizer, self.params, self.extra_loss = optimizer, params, extra_loss
        self.augment, self.evaluate = augment, evaluate

    def optimizers(self, module: nn.Module) -> list[Optim]:
        params = [p for p in (module.parameters() if self.params is None else self.params) if p.requires_grad]
        return [Optim(params, self.optimizer, self.lr, self.weight_decay)]

    def forward(self, module, x, y, step) -> StepOut:
        out = super().forward(module, x, y, step)
        if self.extra_loss is not None:
            out.loss = out.loss + self.extra_loss(module)
        return out


def fit(module: nn.Module, data: DataBundle, *, epochs: int, lr: float, batch_size: int = 128,
        weight_decay: float = 5e-4, seed: int = 0, desc: str = "train", augment: bool = True,
        checkpoint: Checkpoint | None = None, **kwargs: Any) -> list[dict]:
    """Train all of `module` with SGD (Nesterov) and a per-step cosine schedule; the history per epoch."""
    stage = Fit(desc, epochs, lr, weight_decay, augment=augment, **kwargs)
    return run_stage(module, data, stage, batch_size=batch_size, seed=seed, checkpoint=checkpoint).history


# ---------------------------------------------------------------- the loop


def run_stage(module: nn.Module, data: DataBundle, stage: Stage, *, batch_size: int, seed: int,
              rt: Runtime | None = None, checkpoint: Checkpoint | None = None) -> StageRecord:
    """Train `module` (in place, on the runtime's device) for the stage's epochs; its record.

    With a `checkpoint`, every epoch is saved and a stage found there continues where it stopped
    (a finished one is restored without training).
    """
    rt = rt or current()
    extras = [rt.place(m) for m in stage.modules()]
    steps = steps_per_epoch(len(data.train), batch_size)
    total = max(1, stage.epochs * steps * stage.passes)
    state = StageState(module, extras, stage, rt, total)
    saved = checkpoint.stage(stage.name) if checkpoint is not None else None
    if saved is not None:
        state.load(saved)
        if saved["done"]:
            return _record(stage, saved["history"], saved["times"])
    history, times = state.history, state.times
    with frozen(module, stage.freeze, state), stage.context(module), progress_bars(rt.is_main) as progress:
        net = _wrap(module, extras, stage, rt)
        for epoch in range(state.epoch, stage.epochs):
            started = time.perf_counter()
            bar = EpochBar(progress, f"{stage.name} {epoch + 1}/{stage.epochs}", steps)
            sums = EpochSums()
            for i, (x, y) in enumerate(batches(data.train, batch_size, shuffle=True, seed=seed * 1000 + epoch,
                                               augment=stage.augment, rt=rt)):
                for p in range(stage.passes):
                    info = StepInfo(epoch, (epoch * steps + i) * stage.passes + p, total, p)
                    _train_mode(module, extras, stage.freeze)
                    with rt.autocast():
                        loss, logits, metrics = net(x, y, info)
                    state.step(loss)
                    stage.after_step(module, info)
                    sums.add(loss, logits, y, metrics)
                bar.advance(sums.text() if sums.due() else None)
            times.append(time.perf_counter() - started)
            record = {"epoch": epoch + 1, **sums.epoch(rt), "time_s": round(times[-1], 3)}
            if stage.evaluate:
                record["val_acc"] = round(evaluate(module, data.val, rt=rt), 5)
            record.update(stage.end_epoch(module, epoch))
            history.append(record)
            bar.done("  ".join(f"{k} {_fmt(v)}" for k, v in record.items() if k != "epoch"))
            state.epoch = epoch + 1
            if checkpoint is not None and epoch + 1 < stage.epochs:
                checkpoint.save_stage(stage.name, state.dump(done=False))
    module.eval()
    for m in extras:
        m.eval()
    if checkpoint is not None:
        checkpoint.save_stage(stage.name, state.dump(done=True))
    return _record(stage, history, times)


def _record(stage: Stage, history: list[dict], times: list[float]) -> StageRecord:
    accuracy = history[-1].get("val_acc") if history else None
    return StageRecord(stage.name, stage.epochs, history, times, accuracy)


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


class _Trainable(nn.Module):
    """The module and the stage's extra modules as one, so DDP synchronises every trained parameter."""

    def __init__(self, module: nn.Module, extras: list[nn.Module], stage: Stage):
        super().__init__()
        self.module, self.extras = module, nn.ModuleList(extras)
        self._stage = stage

    def forward(self, x, y, step):
        out = self._stage.forward(self.module, x, y, step)
        return out.loss, out.logits, out.metrics


def _wrap(module: nn.Module, extras: list[nn.Module], stage: Stage, rt: Runtime) -> nn.Module:
    trainable = _Trainable(module, extras, stage)
    if not rt.distributed or not any(p.requires_grad for p in trainable.parameters()):
        return trainable
    from torch.nn.parallel import DistributedDataParallel

    ids = [rt.device.index] if rt.cuda else None
    return DistributedDataParallel(trainable, device_ids=ids, broadcast_buffers=stage.freeze is None)


def _train_mode(module: nn.Module, extras: list[nn.Module], freeze: str | None) -> None:
    """Training mode for a step: a frozen network with "running" BN runs in eval mode (dense statistics)."""
    module.train()
    if freeze == "running":
        getattr(module, "net", module).eval()
    for m in extras:
        m.train()


@contextlib.contextmanager
def frozen(module: nn.Module, freeze: str | None, state: StageState | None = None) -> Iterator[None]:
    """The one freezing helper: the network (`module.net`, else `module`) gets no gradient and its buffers
    (BN statistics) end exactly as they were when the stage began — after a resume too, from the
    checkpoint's copy in `state`. The prompt in front of the network stays trainable. `freeze=None`: no-op."""
    if freeze is None:
        yield
        return
    if freeze not in FREEZE:
        raise ValueError(f"freeze must be one of {FREEZE}, got {freeze!r}")
    net = getattr(module, "net", module)
    flags = [(p, p.requires_grad) for p in net.parameters()]
    entry = state.entry_buffers if state is not None else None
    if entry is None:
        entry = {k: v.detach().clone() for k, v in net.named_buffers()}
        if state is not None:
            state.entry_buffers = entry
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        with buffers_kept(net, entry):
            yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@contextlib.contextmanager
def buffers_kept(module: nn.Module, saved: dict[str, torch.Tensor] | None = None) -> Iterator[None]:
    """Every buffer of `module` (BN statistics) restored on exit: to `saved` (a copy of its named buffers,
    e.g. from a checkpoint) when given, else to their values on entry."""
    if saved is None:
        saved = {k: v.detach().clone() for k, v in module.named_buffers()}
    try:
        yield
    finally:
        with torch.no_grad():
            for k, v in module.named_buffers():
                v.copy_(saved[k])


# ---------------------------------------------------------------- forward-only passes


@torch.no_grad()
def evaluate(module: nn.Module, imageset: ImageSet, batch_size: int = 256, rt: Runtime | None = None) -> float:
    """Top-1 accuracy in [0, 1] of `module` (in eval mode) on a split; each rank counts its shard."""
    rt = rt or current()
    was_training = module.training
    module.eval()
    correct = 0
    for x, y in eval_batches(imageset, batch_size, rt):
        with rt.autocast():
            correct += int((module(x).argmax(1) == y).sum())
    module.train(was_training)
    right, = rt.all_reduce_sum([float(correct)])
    return right / max(1, len(imageset))


BN_IMAGES = 2048


@torch.no_grad()
def reestimate_bn(module: nn.Module, imageset: ImageSet, batch_size: int = 128, images: int = BN_IMAGES,
                  seed: int = 0, rt: Runtime | None = None) -> None:
    """Re-estimate BatchNorm running statistics on training images (no gradient step).

    Pruning (or gating) changes what every BN layer after a pruned consumer sees, so the dense running
    statistics no longer fit; a pass over training data (cumulative average, BN layers alone in train
    mode) restores them. Every rank runs the same batches, so the statistics agree without communication.
    """
    rt = rt or current()
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return
    was_training = module.training
    module.eval()
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None          # cumulative average over the batches
        m.train()
    for x, _y in batches(imageset, batch_size, shuffle=True, seed=seed, rt=rt, shard=False, limit=images):
        with rt.autocast():
            module(x)
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
    module.train(was_training)
