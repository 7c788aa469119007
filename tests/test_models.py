import pytest
import torch

from compress.errors import CompressError
from compress.models import create_model, default_adapt

# A dozen-plus architectures across families: residual, plain, depthwise, dense, grouped, attention.
ARCHS = ["resnet18", "resnet50", "vgg11_bn", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "densenet121",
         "regnet_x_400mf", "shufflenet_v2_x0_5", "squeezenet1_0", "convnext_tiny", "vit_b_16", "mnasnet0_5",
         "resnet20", "resnet56", "efficientnet_lite0"]


@pytest.mark.parametrize("name", ARCHS)
@torch.no_grad()
def test_builds_and_runs_at_32px(name):
    net = create_model(name, num_classes=7, image_size=32).eval()
    assert net(torch.rand(2, 3, 32, 32)).shape == (2, 7)


@pytest.mark.parametrize("name", [a for a in ARCHS if a not in ("resnet20", "resnet56")])
@torch.no_grad()
def test_builds_and_runs_at_224px(name):
    net = create_model(name, num_classes=5, image_size=224).eval()
    assert net(torch.rand(1, 3, 224, 224)).shape == (1, 5)


def test_small_inputs_get_a_cifar_stem_large_ones_do_not():
    assert default_adapt("resnet18", 32) == "cifar-stem"
    assert default_adapt("resnet18", 224) is None
    small = create_model("resnet18", 10, 32)
    assert small.conv1.stride == (1, 1) and isinstance(small.maxpool, torch.nn.Identity)


def test_cifar_resnet_depths():
    n_convs = {name: sum(isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3) for m in
                         create_model(name, 10, 32).modules()) for name in ("resnet20", "resnet56")}
    assert n_convs == {"resnet20": 19, "resnet56": 55}  # 6n+1 3×3 convs + the fc = depth


def test_unknown_model():
    with pytest.raises(CompressError, match="unknown model 'resnet7'"):
        create_model("resnet7", 10, 32)
