"""One registry and one `create_model` entry point (timm style).

Every torchvision classification model is available by name, plus the CIFAR ResNets of He et al.
(2016) that the pruning literature benchmarks on. Inputs of 64 px or less get a small-input
adaptation (recorded in model.json as "adapt") so early stride-2 stems do not erase the image.
"""

from __future__ import annotations

import torch
from torch import nn

from compress.errors import CompressError

SMALL_INPUT_PX = 64


class BasicBlock(nn.Module):
    """CIFAR ResNet block. Shortcuts that change shape use a 1×1 conv + BN (option B): it is
    traceable and prunable, unlike option A's zero-padding lambda."""

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False),
                                            nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32 px inputs: 3 stages of n blocks with 16/32/64 channels."""

    def __init__(self, depth: int, num_classes: int = 10):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError("CIFAR ResNet depth must be 6n+2")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        layers, in_planes = [], 16
        for i, planes in enumerate((16, 32, 64)):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(in_planes, planes, 2 if (i > 0 and j == 0) else 1))
                in_planes = planes
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


CIFAR_RESNETS: dict[str, int] = {"resnet20": 20, "resnet32": 32, "resnet44": 44, "resnet56": 56, "resnet110": 110}


def list_models() -> list[str]:
    from torchvision import models as tvm

    return sorted(set(tvm.list_models(module=tvm)) | set(CIFAR_RESNETS))


def default_adapt(name: str, image_size: int) -> str | None:
    """The small-input adaptation a model gets at `image_size` px (None: used as published)."""
    if name in CIFAR_RESNETS or image_size > SMALL_INPUT_PX:
        return None
    if name.startswith(("resnet", "resnext", "wide_resnet")):
        return "cifar-stem"
    if name.startswith("densenet"):
        return "cifar-stem"
    return None


def _cifar_stem_resnet(net: nn.Module) -> None:
    net.conv1 = nn.Conv2d(3, net.conv1.out_channels, 3, 1, 1, bias=False)
    net.maxpool = nn.Identity()


def _cifar_stem_densenet(net: nn.Module) -> None:
    feats = net.features
    feats.conv0 = nn.Conv2d(3, feats.conv0.out_channels, 3, 1, 1, bias=False)
    feats.pool0 = nn.Identity()


def _apply_adapt(name: str, net: nn.Module, adapt: str | None) -> None:
    if adapt is None:
        return
    if adapt != "cifar-stem":
        raise CompressError(f"unknown model adaptation {adapt!r} in model.json")
    if name.startswith("densenet"):
        _cifar_stem_densenet(net)
    elif hasattr(net, "conv1") and hasattr(net, "maxpool"):
        _cifar_stem_resnet(net)
    else:
        raise CompressError(f"adaptation 'cifar-stem' does not apply to model {name!r}")


def create_model(name: str, num_classes: int, image_size: int = 224, adapt: str | None | bool = True,
                 weights: str | None = None) -> nn.Module:
    """Build model `name` for `num_classes` classes at `image_size` px.

    `adapt=True` picks the default small-input adaptation; a string or None forces one (as
    model.json records it). `weights` names a torchvision weights enum (needs internet).
    """
    if name in CIFAR_RESNETS:
        if weights:
            raise CompressError(f"{name} has no torchvision weights; use --checkpoint")
        return CifarResNet(CIFAR_RESNETS[name], num_classes)
    from torchvision import models as tvm

    if name not in tvm.list_models(module=tvm):
        raise CompressError(f"unknown model {name!r}; `compress models` lists the available names")
    # torchvision ViTs bake the input size into their position embedding.
    kwargs = {"image_size": image_size} if name.startswith("vit_") else {}
    if weights:
        try:
            net = tvm.get_model(name, weights=weights)
        except Exception as exc:
            raise CompressError(f"cannot load torchvision weights {weights!r} for {name}: {exc}") from None
        _replace_classifier(net, num_classes)
    else:
        try:
            net = tvm.get_model(name, weights=None, num_classes=num_classes, **kwargs)
        except Exception as exc:
            raise CompressError(f"cannot build {name} at {image_size} px: {exc}") from None
    if adapt is True:
        adapt = default_adapt(name, image_size)
    _apply_adapt(name, net, adapt or None)
    return net


def _replace_classifier(net: nn.Module, num_classes: int) -> None:
    """Swap the last Linear for one with `num_classes` outputs (pretrained weights, new task)."""
    last_name, last = None, None
    for mod_name, mod in net.named_modules():
        if isinstance(mod, nn.Linear):
            last_name, last = mod_name, mod
    if last is None:
        raise CompressError("model has no Linear classifier to resize")
    if last.out_features == num_classes:
        return
    parent = net.get_submodule(last_name.rpartition(".")[0]) if "." in last_name else net
    new = nn.Linear(last.in_features, num_classes, bias=last.bias is not None)
    child = last_name.rpartition(".")[2]
    if isinstance(parent, nn.Sequential) and child.isdigit():
        parent[int(child)] = new
    else:
        setattr(parent, child, new)
