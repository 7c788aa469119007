"""torchvision Swin (V1 and V2): split window attention computes torchvision's function, and its heads
prune as whole groups with their per-head tensors (bias table; V2's logit scale and bias-MLP output),
counted by the FLOPs model and rebuilt from the structure record. Slim == gated is in
test_pruning_equivalence.py."""

from __future__ import annotations

import copy

import pytest
import torch
from test_pruning_equivalence import _randomise
from test_pruning_equivalence import tiny_swin as _tiny_swin
from torch import nn

from compress.flops import count_flops
from compress.pruning import FlopsModel, apply_layer_spec, find_groups, layer_spec, slim, split_attention
from compress.pruning.window_attention import SplitWindowAttention, SplitWindowAttentionV2


def tiny_swin(v2: bool = False) -> nn.Module:
    """Two stages of two blocks: at 32 px the first stage's second block shifts its windows, the second
    stage's map fits one window (no shift); at 40 px the first stage pads its map to whole windows.
    Zero-initialised tensors are lifted so that every head matters."""
    torch.manual_seed(0)
    net = _tiny_swin(v2)
    _randomise(net)
    return net


def _x(size: int = 32) -> torch.Tensor:
    return torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(2))


def _masks(groups, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    masks = {}
    for g in groups:
        m = torch.rand(g.width, generator=gen) < 0.5
        m[0] = True
        masks[g.id] = m
    return masks


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
@pytest.mark.parametrize("size", [32, 40], ids=["shifted", "padded"])
def test_split_window_attention_computes_torchvisions_function(v2, size):
    net = tiny_swin(v2)
    with torch.no_grad():
        dense = net(_x(size))
    assert split_attention(net) == ["features.1.0.attn", "features.1.1.attn", "features.3.0.attn",
                                    "features.3.1.attn"]
    assert type(net.features[1][1].attn) is (SplitWindowAttentionV2 if v2 else SplitWindowAttention)
    with torch.no_grad():
        assert torch.allclose(net(_x(size)), dense, atol=1e-6)


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_heads_are_groups_with_their_per_head_tensors(v2):
    net = tiny_swin(v2)
    groups = find_groups(net, _x()[:1])
    heads = {g.id: g for g in groups if g.kind == "heads"}
    assert sorted(heads) == [f"features.{s}.{b}.attn.v" for s in (1, 3) for b in (0, 1)]
    group = heads["features.3.1.attn.v"]
    assert group.width == 4 and group.unit_channels == 8
    per_head = ["logit_scale", "cpb_mlp.2"] if v2 else ["relative_position_bias_table"]
    for name in ("q", "k", "v", "out_proj", *per_head):
        member = next(m for m in group.items if m.name == f"features.3.1.attn.{name}")
        width = 4 if name in per_head else 32
        assert sorted(member.idx.tolist()) == list(range(width))            # each channel once
        assert member.unit.tolist() == (member.idx if name in per_head else member.idx // 8).tolist()
    assert not groups[0].graph.excluded or all("LayerNorm" in why for _r, why in groups[0].graph.excluded)

    slim(net, groups, {"features.3.1.attn.v": torch.tensor([True, False, True, False])})
    attn = net.features[3][1].attn
    assert attn.num_heads == 2 and attn.q.out_features == attn.out_proj.in_features == 16
    if v2:
        assert attn.logit_scale.shape == (2, 1, 1) and attn.cpb_mlp[2].out_features == 2
    else:
        assert attn.relative_position_bias_table.shape == (49, 2)


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_flops_model_and_structure_record_follow_pruned_heads(v2):
    net = tiny_swin(v2)
    groups = find_groups(net, _x()[:1])
    fm = FlopsModel.for_groups(groups)
    masks = _masks(groups, 4)
    slimmed = copy.deepcopy(net)
    slim(slimmed, find_groups(slimmed, _x()[:1]), masks)
    assert fm.ratio_of_masks(masks) == pytest.approx(count_flops(slimmed, (3, 32, 32)) / fm.dense, abs=1e-9)

    spec = layer_spec(slimmed, tiny_swin(v2))
    assert spec["features.3.1.attn"]["type"] == ("SplitWindowAttentionV2" if v2 else "SplitWindowAttention")
    rebuilt = apply_layer_spec(tiny_swin(v2), copy.deepcopy(spec))
    rebuilt.load_state_dict(slimmed.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.allclose(rebuilt(_x()), slimmed(_x()), atol=1e-6)
