"""Acceptance 1: for random keep-masks, the slimmed network computes what the gated network computes.

Property-based over masks (hypothesis), one architecture family per case: residual adds, concat,
depthwise and grouped convolutions, SE blocks, LayerNorm-excluded residual streams and attention
heads. Weights and BN statistics are randomised so that every channel matters.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from compress.models import create_model
from compress.pruning import Gates, find_groups, slim

SMALL = ["resnet20", "resnet56", "resnet18", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "regnet_x_400mf",
         "efficientnet_lite0"]
LARGE = ["resnet50", "vgg16_bn", "densenet121", "convnext_tiny", "vit_b_16"]   # one example each: time budget
SIZE = 32


def _randomise(net: nn.Module) -> None:
    """BN statistics/affines away from identity, and near-zero initialisations (ViT head, ConvNeXt layer
    scale) lifted, so that removing a channel visibly changes the output."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.uniform_(-0.5, 0.5, generator=g)
        for p in net.parameters():
            if p.abs().max() < 1e-3:
                p.uniform_(0.5, 1.0, generator=g)


@pytest.fixture(scope="module")
def case(request):
    torch.manual_seed(0)
    # Published stems (adapt=None): the small-input stem adaptation does not change grouping, only cost.
    net = create_model(request.param, 10, SIZE, adapt=None).eval()
    _randomise(net)
    x = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    groups = find_groups(net, x[:1])
    return request.param, net, groups, x


_SETTINGS = {"deadline": None, "database": None,
             "suppress_health_check": [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]}
_MASKS = {"seed": st.integers(0, 2**31 - 1), "keep": st.floats(0.05, 0.95)}


@pytest.mark.parametrize("case", SMALL, indirect=True)
@settings(max_examples=3, **_SETTINGS)
@given(**_MASKS)
def test_slimmed_equals_gated(case, seed, keep):
    _check(case, seed, keep)


@pytest.mark.parametrize("case", LARGE, indirect=True)
@settings(max_examples=1, **_SETTINGS)
@given(**_MASKS)
def test_slimmed_equals_gated_large(case, seed, keep):
    _check(case, seed, keep)


def _check(case, seed, keep):
    name, net, groups, x = case
    assert groups, f"{name} has no prunable groups"
    gen = torch.Generator().manual_seed(seed)
    masks = {}
    for g in groups:
        mask = torch.rand(g.width, generator=gen) < keep
        mask[torch.randint(g.width, (1,), generator=gen)] = True
        masks[g.id] = mask
    with torch.no_grad(), Gates(net, groups) as gates:
        gates.set_masks(masks)
        gated = net(x)
    assert not net._forward_pre_hooks and all(not m._forward_pre_hooks for m in net.modules())

    slimmed = copy.deepcopy(net)
    slim(slimmed, find_groups(slimmed, x[:1]), masks)
    with torch.no_grad():
        out = slimmed(x)
        dense = net(x)
    scale = gated.abs().max().item()
    assert out.shape == gated.shape
    assert (out - gated).abs().max().item() <= 1e-4 * scale, name
    if any(not bool(m.all()) for m in masks.values()):
        assert (dense - gated).abs().max().item() > 1e-4 * scale, "masks had no effect: the test would be vacuous"
        assert sum(p.numel() for p in slimmed.parameters()) < sum(p.numel() for p in net.parameters())
