"""`compress train` / `compress eval` as library calls: build, train, measure, and write a run directory."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from compress.checkpoint import Checkpoint, interruptible
from compress.data import DataBundle, load_data
from compress.deploy import DeployableModule
from compress.errors import CompressError
from compress.flops import count_flops, count_params
from compress.loop import Fit, evaluate, run_stage
from compress.models import create_model, default_adapt, weights_normalization
from compress.runs import Stopwatch, build_spec, check_out_dir, load, load_state, with_version_metadata, write_run
from compress.runtime import current


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train_run(model: str, data: str, out: str | Path, *, epochs: int = 30, batch_size: int = 128, lr: float = 0.1,
              weight_decay: float = 5e-4, image_size: int | None = None, seed: int = 0, subset: int | None = None,
              weights: str | None = None, checkpoint: str | None = None, augment: bool = True,
              resume: bool | str = False) -> dict[str, Any]:
    """Train a dense model and write its run directory; returns report.json's content.

    Runs on the configured runtime (compress.runtime.configure: device, precision, torchrun ranks);
    every epoch is checkpointed beside `out`, and `resume=True` continues an interrupted run."""
    if epochs < 1:
        raise CompressError(f"--epochs must be at least 1, got {epochs}")
    if batch_size < 1 or lr <= 0:
        raise CompressError("--batch-size must be ≥ 1 and --lr > 0")
    check_out_dir(out)
    rt = current()
    settings = {"command": "train", "model": model, "data": data, "epochs": epochs, "batch_size": batch_size,
                "lr": lr, "weight_decay": weight_decay, "image_size": image_size, "seed": seed, "subset": subset,
                "weights": weights, "checkpoint": checkpoint, "augment": augment, "precision": rt.precision,
                "world_size": rt.world_size}
    progress = Checkpoint(out, settings, resume=resume)
    with interruptible(progress):
        watch = Stopwatch()
        seed_everything(seed)
        module, spec, bundle = build_dense(model, data, image_size=image_size, subset=subset, seed=seed,
                                           weights=weights, checkpoint=checkpoint)
        rt.place(module)
        stage = Fit("train", epochs, lr, weight_decay, augment=augment)
        history = run_stage(module, bundle, stage, batch_size=batch_size, seed=seed, checkpoint=progress).history
        report = {"command": "train", "model": model, "data": bundle.spec, "seed": seed,
                  "input_size": list(bundle.input_size), "accuracy": evaluate(module, bundle.val),
                  "flops": count_flops(module, bundle.input_size), "params": count_params(module),
                  "epochs": epochs, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay,
                  "augment": augment, "train_size": len(bundle.train), "val_size": len(bundle.val),
                  **rt.describe(), "resumed": progress.resumed, "history": history}
        report["wall_time_s"] = watch.total()
        if rt.is_main:
            write_run(out, module, spec, report)
        rt.barrier()
    progress.discard()
    return report


def build_dense(model: str, data: str, *, image_size: int | None = None, subset: int | None = None, seed: int = 0,
                weights: str | None = None, checkpoint: str | None = None,
                ) -> tuple[DeployableModule, dict[str, Any], DataBundle]:
    """A dense deployable module for `model` on `data` (sized and normalised for it), its model.json spec and
    the data: the common start of `train` and of `prune --model`."""
    if checkpoint and not Path(checkpoint).is_file():
        raise CompressError(f"--checkpoint {checkpoint} does not exist")
    bundle = load_data(data, image_size=image_size, subset=subset, seed=seed)
    size = bundle.input_size[1]
    adapt = default_adapt(model, size)
    net = create_model(model, bundle.num_classes, size, adapt=adapt, weights=weights)
    if checkpoint:
        _load_checkpoint(net, checkpoint)
    # Pretrained weights keep the input statistics they were trained with (Lite0: [-1, 1]).
    mean, std = weights_normalization(model, weights) or (bundle.mean, bundle.std)
    spec = build_spec(model, bundle.num_classes, bundle.input_size, mean, std, adapt=adapt, data=bundle.spec,
                      classes=bundle.classes)
    return DeployableModule(net, mean, std, input_size=bundle.input_size), spec, bundle


def _load_checkpoint(net: torch.nn.Module, path: str) -> None:
    """Accept a plain state_dict, one saved from a DeployableModule ("net." prefix), or a training script's
    {"state_dict": …} / {"model": …} wrapper (timm's, torchvision's references)."""
    state = load_state(Path(path))
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if isinstance(state, dict) and any(k.startswith("net.") for k in state):
        state = {k[4:]: v for k, v in state.items() if k.startswith("net.")}
    state = with_version_metadata(state, net)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = next((ln.strip() for ln in str(exc).splitlines()[1:] if ln.strip()), str(exc))
        raise CompressError(f"--checkpoint {path} does not match the model: {first}") from None


def eval_run(run_dir: str | Path, data: str, split: str = "val") -> dict[str, Any]:
    """Accuracy, FLOPs and params of a run's deployable module on `split` of `data`."""
    module = current().place(load(run_dir))
    c, h, w = module.input_size
    bundle = load_data(data, image_size=h)
    if bundle.num_classes != module.spec["num_classes"]:
        raise CompressError(f"{data} has {bundle.num_classes} classes but the model in {run_dir} has "
                            f"{module.spec['num_classes']}")
    imageset = {"val": bundle.val, "test": bundle.test}.get(split)
    if imageset is None:
        raise CompressError(f"{data} has no {split} split")
    return {"run": str(run_dir), "data": bundle.spec, "split": split, "accuracy": evaluate(module, imageset),
            "flops": count_flops(module, (c, h, w)), "params": count_params(module), "n": len(imageset)}
