"""The state a running stage carries between steps and across a resume, kept apart from the loop itself.

`StageState` holds the optimisers, schedules, loss scaler and counters and turns them into (and back
from) a checkpoint record; `EpochSums` keeps an epoch's running loss, accuracy and stage metrics on the
device and reduces them over the ranks; `schedule` is the one learning-rate schedule.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from compress.checkpoint import get_rng, set_rng, snapshot
from compress.runtime import Runtime

if TYPE_CHECKING:
    from compress.loop import Stage

REFRESH_S = 0.5   # progress-bar metrics are read from the device at most this often


class StageState:
    """Optimisers, schedules, loss scaler and counters of a running stage, and their checkpoint form."""

    def __init__(self, module: nn.Module, extras: list[nn.Module], stage: Stage, rt: Runtime, total: int):
        self.module, self.extras, self.stage = module, extras, stage
        specs = stage.optimizers(module)
        self.clips = [(spec.clip, spec.tensors()) for spec in specs]
        self.optims = [spec.build() for spec in specs]
        self.scheds = [schedule(o, spec.schedule, total) for o, spec in zip(self.optims, specs, strict=True)]
        self.scaler = rt.grad_scaler()
        self.epoch, self.history, self.times = 0, [], []
        self.entry_buffers: dict[str, torch.Tensor] | None = None

    def step(self, loss: torch.Tensor) -> None:
        for o in self.optims:
            o.zero_grad(set_to_none=True)
        (self.scaler.scale(loss) if self.scaler else loss).backward()
        for o, s, (clip, params) in zip(self.optims, self.scheds, self.clips, strict=True):
            if self.scaler:
                self.scaler.unscale_(o)
            if clip:
                torch.nn.utils.clip_grad_norm_(params, clip)
            if self.scaler:
                self.scaler.step(o)
            else:
                o.step()
            if s is not None:
                s.step()
        if self.scaler:
            self.scaler.update()

    def dump(self, done: bool) -> dict[str, Any]:
        return snapshot({
            "done": done, "epoch": self.epoch, "history": self.history, "times": self.times,
            "module": self.module.state_dict(), "extras": [m.state_dict() for m in self.extras],
            "optims": [o.state_dict() for o in self.optims],
            "scheds": [s.state_dict() if s is not None else None for s in self.scheds],
            "scaler": self.scaler.state_dict() if self.scaler else None, "rng": get_rng(),
            "generators": [g.get_state() for g in self.stage.generators()], "entry_buffers": self.entry_buffers})

    def load(self, saved: dict[str, Any]) -> None:
        from compress.errors import CompressError

        try:
            self.module.load_state_dict(saved["module"])
            for m, sd in zip(self.extras, saved["extras"], strict=True):
                m.load_state_dict(sd)
            for o, sd in zip(self.optims, saved["optims"], strict=True):
                o.load_state_dict(sd)
            for s, sd in zip(self.scheds, saved["scheds"], strict=True):
                if s is not None:
                    s.load_state_dict(sd)
            if self.scaler and saved["scaler"]:
                self.scaler.load_state_dict(saved["scaler"])
            for g, gs in zip(self.stage.generators(), saved["generators"], strict=True):
                g.set_state(gs)
        except (RuntimeError, ValueError, KeyError) as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise CompressError(f"the checkpoint of stage {self.stage.name} does not fit this run ({first}); "
                                "start over without --resume") from None
        set_rng(saved["rng"])
        self.epoch, self.history, self.times = saved["epoch"], list(saved["history"]), list(saved["times"])
        device = next((b.device for b in self.module.buffers()), torch.device("cpu"))
        eb = saved["entry_buffers"]
        self.entry_buffers = None if eb is None else {k: v.to(device) for k, v in eb.items()}


def schedule(opt: torch.optim.Optimizer, kind: str, total: int) -> torch.optim.lr_scheduler.LambdaLR | None:
    """Per-step cosine from each group's lr to zero over `total` steps; None for a constant rate."""
    if kind == "constant":
        return None
    if kind != "cosine":
        raise ValueError(f"unknown schedule {kind!r}")
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))


class EpochSums:
    """Running loss / accuracy / stage metrics of an epoch, kept on the device until they are shown."""

    def __init__(self):
        self.seen = 0
        self.loss = self.correct = None
        self.metrics: dict[str, Any] = {}
        self.batches = 0
        self.shown = 0.0

    def add(self, loss, logits, y, metrics) -> None:
        n = len(y)
        loss = loss.detach().double() * n
        correct = (logits.detach().argmax(1) == y).sum()
        self.loss = loss if self.loss is None else self.loss + loss
        self.correct = correct if self.correct is None else self.correct + correct
        for k, v in metrics.items():
            v = v.detach().double() if isinstance(v, torch.Tensor) else float(v)
            self.metrics[k] = v if k not in self.metrics else self.metrics[k] + v
        self.seen += n
        self.batches += 1

    def due(self) -> bool:
        now = time.perf_counter()
        if now - self.shown < REFRESH_S and self.batches > 1:
            return False
        self.shown = now
        return True

    def text(self) -> str:
        parts = [f"loss {float(self.loss) / self.seen:.3f}", f"acc {float(self.correct) / self.seen:.3f}"]
        parts += [f"{k} {float(v) / self.batches:.3f}" for k, v in self.metrics.items()]
        return "  ".join(parts)

    def epoch(self, rt: Runtime) -> dict[str, float]:
        """The epoch's means over all ranks."""
        keys = list(self.metrics)
        local = [float(self.loss or 0), float(self.correct or 0), float(self.seen), float(self.batches)]
        local += [float(self.metrics[k]) for k in keys]
        tot = rt.all_reduce_sum(local)
        out = {"loss": round(tot[0] / max(1, tot[2]), 5), "train_acc": round(tot[1] / max(1, tot[2]), 5)}
        out.update({k: round(v / max(1, tot[3]), 5) for k, v in zip(keys, tot[4:], strict=True)})
        return out
