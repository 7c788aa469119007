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


def test_small_vits_have_4px_patches_deit_tiny_width_and_their_named_depth():
    for depth in (6, 8, 12):
        net = create_model(f"vit_tiny_p4_d{depth}", 10, 28).eval()
        assert (net.patch_size, net.hidden_dim, len(net.encoder.layers)) == (4, 192, depth)
        assert net.encoder.layers[0].self_attention.num_heads == 3
        with torch.no_grad():
            assert net(torch.rand(2, 3, 28, 28)).shape == (2, 10)
    assert create_model("vit_tiny_p4_d6", 10, 32).encoder.pos_embedding.shape[1] == 65   # 64 patches + class token
    with pytest.raises(CompressError, match="not a multiple of 4"):
        create_model("vit_tiny_p4_d6", 10, 30)
