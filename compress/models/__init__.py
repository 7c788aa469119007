"""One registry and one `create_model` entry point (timm style).

Models come from *families*, each a small class in this package with the same four methods
(`names`, `owns`, `default_adapt`, `create`): the CIFAR ResNets (cifar.py), every torchvision
classifier (torchvision_.py) and every timm classifier as `timm:NAME` (timm_.py). A new family is
one module and one line in FAMILIES. Whatever a family needs to rebuild a model (its name, input
size, "adapt") is recorded in model.json, so a run directory rebuilds in any process from JSON alone.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from compress.errors import CompressError
from compress.models.cifar import CIFAR_RESNETS, CifarResNet
from compress.models.torchvision_ import SMALL_INPUT_PX, TorchvisionFamily

__all__ = ["CIFAR_RESNETS", "FAMILIES", "SMALL_INPUT_PX", "CifarResNet", "Family", "create_model", "default_adapt",
           "list_models", "weights_normalization"]


class Family(Protocol):
    def names(self) -> list[str]: ...                 # the names `compress models` lists
    def owns(self, name: str) -> bool: ...            # whether `name` is this family's
    def default_adapt(self, name: str, image_size: int) -> str | None: ...
    def create(self, name: str, num_classes: int, image_size: int, adapt: str | None,
               weights: str | None) -> nn.Module: ...


def _families() -> list[Family]:
    from compress.models.cifar import CifarFamily
    from compress.models.lite0 import Lite0Family
    from compress.models.small_vit import SmallViTFamily
    from compress.models.timm_ import TimmFamily

    return [CifarFamily(), Lite0Family(), TorchvisionFamily(), SmallViTFamily(), TimmFamily()]


FAMILIES: list[Family] = _families()


def _family(name: str) -> Family:
    for family in FAMILIES:
        if family.owns(name):
            return family
    raise CompressError(f"unknown model {name!r}; `compress models` lists the available names")


def list_models() -> list[str]:
    return sorted({n for family in FAMILIES for n in family.names()})


def default_adapt(name: str, image_size: int) -> str | None:
    """The small-input adaptation a model gets at `image_size` px (None: used as published)."""
    return _family(name).default_adapt(name, image_size)


def weights_normalization(name: str, weights: str | None) -> tuple[list[float], list[float]] | None:
    """(mean, std) of the inputs pretrained `weights` of `name` were trained on, if its family says; None: normalise
    with the dataset's own statistics (no weights, or a family that does not know)."""
    family = _family(name)
    known = getattr(family, "normalization", None)
    return known(name, weights) if weights and known is not None else None


def create_model(name: str, num_classes: int, image_size: int = 224, adapt: str | None | bool = True,
                 weights: str | None = None) -> nn.Module:
    """Build model `name` for `num_classes` classes at `image_size` px.

    `adapt=True` picks the default small-input adaptation; a string or None forces one (as
    model.json records it). `weights` names pretrained weights the family knows how to load.
    One image is run through the model, so that a size it cannot take (a kernel larger than a
    feature map, a window that does not tile it) is a one-line error here, not a traceback later.
    """
    family = _family(name)
    if adapt is True:
        adapt = family.default_adapt(name, image_size)
    net = family.create(name, num_classes, image_size, adapt or None, weights)
    _check_runs(name, net, image_size)
    return net


def _check_runs(name: str, net: nn.Module, image_size: int) -> None:
    was_training = net.training
    try:
        with torch.no_grad():
            net.eval()(torch.zeros(1, 3, image_size, image_size))
    except Exception as exc:  # model code rejects sizes in many ways
        detail = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
        raise CompressError(f"{name} does not run on {image_size} px inputs ({detail}); try another "
                            "--image-size") from None
    finally:
        net.train(was_training)
