"""CIFAR ResNets of He et al. (2016): the networks the pruning literature benchmarks on at 32 px."""

from __future__ import annotations

import torch
from torch import nn

from compress.errors import CompressError

CIFAR_RESNETS: dict[str, int] = {"resnet20": 20, "resnet32": 32, "resnet44": 44, "resnet56": 56, "resnet110": 110}


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


class CifarFamily:
    """resnet20/32/44/56/110; they take any input size (global pooling) and have no published weights."""

    def names(self) -> list[str]:
        return list(CIFAR_RESNETS)

    def owns(self, name: str) -> bool:
        return name in CIFAR_RESNETS

    def default_adapt(self, name: str, image_size: int) -> str | None:
        return None

    def create(self, name: str, num_classes: int, image_size: int, adapt: str | None, weights: str | None) -> nn.Module:
        if weights:
            raise CompressError(f"{name} has no published weights; use --checkpoint")
        if adapt is not None:
            raise CompressError(f"unknown model adaptation {adapt!r} for {name} in model.json")
        return CifarResNet(CIFAR_RESNETS[name], num_classes)
