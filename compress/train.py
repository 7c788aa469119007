"""Training and evaluation loops shared by `train`, fine-tuning after pruning, and the learned methods."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn

from compress.data import DataBundle, ImageSet, iterate_batches
from compress.progress import EpochBar, progress_bars


@torch.no_grad()
def evaluate(module: nn.Module, imageset: ImageSet, batch_size: int = 256) -> float:
    """Top-1 accuracy in [0, 1] of `module` (in eval mode) on a split."""
    was_training = module.training
    module.eval()
    correct = 0
    for x, y in iterate_batches(imageset, batch_size):
        correct += int((module(x).argmax(1) == y).sum())
    module.train(was_training)
    return correct / max(1, len(imageset))


def make_optimizer(params: Iterable, kind: str, lr: float, weight_decay: float,
                   momentum: float = 0.9) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=True)
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {kind!r}")


def fit(module: nn.Module, data: DataBundle, *, epochs: int, lr: float, batch_size: int = 128,
        weight_decay: float = 5e-4, seed: int = 0, params: Iterable | None = None,
        extra_loss: Callable[[nn.Module], torch.Tensor] | None = None, desc: str = "train",
        optimizer: str = "sgd", augment: bool = True, evaluate_each_epoch: bool = True) -> list[dict]:
    """Train with SGD (Nesterov, momentum 0.9) and a per-step cosine schedule to zero.

    `params` restricts what is trained (the rest keeps its values); `extra_loss(module)` is added to
    the cross-entropy each step (e.g. a group-lasso regulariser). Returns one record per epoch.
    """
    opt = make_optimizer(module.parameters() if params is None else params, optimizer, lr, weight_decay)
    steps_per_epoch = math.ceil(len(data.train) / batch_size)
    total = max(1, epochs * steps_per_epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    criterion = nn.CrossEntropyLoss()
    history = []
    with progress_bars() as progress:
        for epoch in range(epochs):
            module.train()
            bar = EpochBar(progress, f"{desc} {epoch + 1}/{epochs}", steps_per_epoch)
            seen = correct = 0
            loss_sum = 0.0
            for x, y in iterate_batches(data.train, batch_size, shuffle=True, seed=seed * 1000 + epoch,
                                        augment=augment):
                logits = module(x)
                loss = criterion(logits, y)
                if extra_loss is not None:
                    loss = loss + extra_loss(module)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                seen += len(y)
                correct += int((logits.argmax(1) == y).sum())
                loss_sum += loss.item() * len(y)
                bar.advance(f"loss {loss_sum / seen:.3f}  acc {correct / seen:.3f}")
            record = {"epoch": epoch + 1, "loss": round(loss_sum / max(1, seen), 5),
                      "train_acc": round(correct / max(1, seen), 5)}
            if evaluate_each_epoch:
                record["val_acc"] = round(evaluate(module, data.val), 5)
            history.append(record)
            bar.done("  ".join(f"{k} {v:.4f}" for k, v in record.items() if k != "epoch"))
    module.eval()
    return history
