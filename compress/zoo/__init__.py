"""The model-zoo sweep: which models `compress` prunes, reloads and exports end to end (docs/zoo.md).

`python -m compress.zoo --help` runs it. Models are swept at the smallest input size they accept
from 64 px up (found by building the model at each size in turn, in a child process), and a set of
common ones also at 224 px. The sweep is a command, not a test: the test suite covers a small
representative set (tests/test_zoo.py).
"""

from __future__ import annotations

from compress.zoo.sweep import Entry, SweepConfig, run_entry, sweep

# torchvision models also swept at their published 224 px.
COMMON_224 = ("resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0", "densenet121",
              "regnet_y_400mf", "shufflenet_v2_x1_0", "convnext_tiny", "vit_b_16", "swin_t", "mnasnet1_0")

# One representative per timm family (the nine first, then further families).
TIMM_FAMILIES = {
    "resnet": "resnet18", "resnetv2": "resnetv2_50", "regnet": "regnetx_002", "efficientnet": "efficientnet_b0",
    "mobilenetv3": "mobilenetv3_small_100", "convnext": "convnext_atto", "vit": "vit_tiny_patch16_224",
    "deit": "deit_tiny_patch16_224", "swin": "swin_tiny_patch4_window7_224",
    "mobilenetv2": "mobilenetv2_050", "ghostnet": "ghostnet_100", "mixnet": "mixnet_s", "densenet": "densenet121",
    "dla": "dla34", "rexnet": "rexnet_100", "cspnet": "cspresnet50", "levit": "levit_128s",
    "mobilevit": "mobilevit_xs", "edgenext": "edgenext_xx_small", "repvgg": "repvgg_a0", "inception_v3": "inception_v3",
    "vgg": "vgg11", "resnest": "resnest14d", "res2net": "res2net50_14w_8s", "efficientformer": "efficientformer_l1",
    "poolformer": "poolformer_s12", "convmixer": "convmixer_768_32", "hrnet": "hrnet_w18_small",
}
REQUIRED_TIMM = ("resnet", "resnetv2", "regnet", "efficientnet", "mobilenetv3", "convnext", "vit", "deit", "swin")
MIN_PX, MAX_PX = 64, 224

__all__ = ["COMMON_224", "MAX_PX", "MIN_PX", "REQUIRED_TIMM", "TIMM_FAMILIES", "Entry", "SweepConfig",
           "run_entry", "smallest_size", "sweep"]


def smallest_size(name: str, start: int = MIN_PX, stop: int = MAX_PX) -> int | None:
    """The smallest input size in [start, stop] at which model `name` builds and runs one image (None if none)."""
    from compress.errors import CompressError
    from compress.models import create_model

    for size in range(start, stop + 1):
        try:
            create_model(name, 10, size)
        except CompressError:
            continue
        return size
    return None
