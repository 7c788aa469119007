"""The pruning engine piece by piece: groups, gates, FLOPs model, targeting, importance, structure record."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer

from compress.errors import CompressError
from compress.flops import count_flops
from compress.methods import all_options, get_method, list_methods
from compress.models import create_model
from compress.pruning import (
    FlopsModel,
    Gates,
    SplitAttention,
    apply_layer_spec,
    find_groups,
    group_l2_scores,
    group_lasso,
    group_sq_norms,
    l1_scores,
    layer_spec,
    module_copy,
    random_scores,
    select_masks,
    slim,
    smallest_ratio,
    units_removed,
    widths,
)


def _x(size=16, n=2):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0))


def _tiny_vit() -> nn.Module:
    torch.manual_seed(0)
    net = VisionTransformer(image_size=16, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=64,
                            num_classes=5)
    nn.init.normal_(net.heads.head.weight)
    return net.eval()


@pytest.fixture(scope="module")
def resnet20():
    torch.manual_seed(0)
    net = create_model("resnet20", 10, 16).eval()
    return net, find_groups(net, _x(n=1))


def _random_masks(groups, seed=0, keep=0.5):
    gen = torch.Generator().manual_seed(seed)
    masks = {}
    for g in groups:
        m = torch.rand(g.width, generator=gen) < keep
        m[0] = True
        masks[g.id] = m
    return masks


def _slimmed_copy(net, masks):
    trial = copy.deepcopy(net)
    slim(trial, find_groups(trial, _x(n=1)), masks)
    return trial


# ------------------------------------------------------------------ groups

def test_groups_of_resnet20(resnet20):
    net, groups = resnet20
    assert len(groups) == 12                       # 3 residual streams + 9 block-inner groups
    ids = [g.id for g in groups]
    assert len(set(ids)) == len(ids) and "fc" not in ids
    assert [g.depth for g in groups] == sorted(g.depth for g in groups)
    assert groups[0].depth == 0.0 and groups[-1].depth == 1.0
    stem = next(g for g in groups if g.id == "conv1")
    assert "layer1.0.conv2" in stem.members and "layer1.2.conv2" in stem.members   # coupled by residual adds
    assert all(0 < g.flops_share < 1 for g in groups)


def test_classifier_is_never_grouped(resnet20):
    _net, groups = resnet20
    assert not any(m.name == "fc" and m.side == "out" for g in groups for m in g.items)


def test_attention_heads_become_a_group():
    net = _tiny_vit()
    groups = find_groups(net, _x(n=1))
    assert isinstance(net.encoder.layers[0].self_attention, SplitAttention)
    heads = [g for g in groups if g.kind == "heads"]
    assert len(heads) == 2 and all(g.width == 4 and g.unit_channels == 8 for g in heads)
    assert len([g for g in groups if g.kind == "channels"]) == 2          # the two MLP hidden dims
    excluded = groups[0].graph.excluded
    assert excluded and "LayerNorm" in excluded[0][1]                        # residual stream: documented exclusion


def test_grouped_convolutions_prune_whole_positions_per_group():
    net = create_model("regnet_x_400mf", 10, 32, adapt=None).eval()
    groups = find_groups(net, torch.rand(1, 3, 32, 32))
    tiled = [g for g in groups if g.kind == "tiled"]
    assert tiled and all(g.channels == g.width * g.unit_channels for g in tiled)


def test_ungroupable_op_is_excluded_by_name_and_a_network_of_them_refused():
    class Rolled(nn.Module):
        def __init__(self, roll_both: bool):
            super().__init__()
            self.a, self.b, self.fc = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3), nn.Linear(8, 2)
            self.roll_both = roll_both

        def forward(self, x):
            x = torch.roll(self.a(x), 1, dims=1)          # shifts channels: removal ≠ zeroing
            x = self.b(x)
            if self.roll_both:
                x = torch.roll(x, 1, dims=1)
            return self.fc(x.mean((2, 3)))

    groups = find_groups(Rolled(roll_both=False), _x(n=1))
    assert [g.id for g in groups] == ["b"]
    assert groups[0].graph.excluded == [("a", "operation RollBackward0 on its path is not known to keep channels "
                                               "separate")]
    with pytest.raises(CompressError, match=r"no channel group of this network can be pruned exactly — a: "
                                            r"operation RollBackward0"):
        find_groups(Rolled(roll_both=True), _x(n=1))


def test_a_split_at_fixed_sizes_excludes_its_group_a_chunk_ties_it():
    class Split(nn.Module):
        def __init__(self, chunk: bool):
            super().__init__()
            self.a, self.fc = nn.Conv2d(3, 8, 3), nn.Linear(8, 2)
            self.b, self.c = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)
            self.chunk, self.half = chunk, 4

        def forward(self, x):
            x = self.a(x)
            left, right = x.chunk(2, dim=1) if self.chunk else x.split(self.half, dim=1)   # split(k): k is fixed
            return self.fc(torch.cat([self.b(left), self.c(right)], 1).mean((2, 3)))

    groups = find_groups(Split(chunk=False), _x(n=1))
    assert "a" not in [g.id for g in groups]
    assert "sizes fixed in the model code" in dict(groups[0].graph.excluded)["a"]
    tied = next(g for g in find_groups(Split(chunk=True), _x(n=1)) if g.id == "a")
    assert tied.kind == "tied" and tied.width == 4


def test_the_guard_stops_memory_growth_with_a_one_line_error():
    from compress.pruning.guard import guarded

    hoard = []
    with pytest.raises(CompressError, match=r"^the test was stopped: it needed more than 0.2 GiB"), \
            guarded("the test", max_memory_gb=0.2, max_seconds=60):
        while True:
            hoard.append(b"x" * 2**20)
    assert len(hoard) < 2000
    hoard.clear()



def test_the_guard_refuses_a_body_that_crossed_its_limit_before_the_first_poll():
    """A fast machine must not turn a crossed limit into a pass: the limits are checked at the end too."""
    from compress.pruning.guard import guarded

    with pytest.raises(CompressError, match=r"^a quick body was stopped: it ran longer than 0 s"), \
            guarded("a quick body", max_seconds=0):
        pass
    with guarded("a quick body", max_seconds=60):
        pass


# ------------------------------------------------------------------ gates

def test_soft_gates_are_differentiable_and_removable(resnet20):
    net, groups = resnet20
    x = _x()
    dense = net(x)
    logits = {g.id: torch.zeros(g.width, requires_grad=True) for g in groups}
    with Gates(net, groups) as gates:
        gates.set({gid: torch.sigmoid(v) for gid, v in logits.items()})
        net(x).square().sum().backward()
        assert all(v.grad is not None and v.grad.abs().sum() > 0 for v in logits.values())
        gates.clear()
        assert torch.allclose(net(x), dense)
    assert all(not m._forward_pre_hooks for m in net.modules())
    assert torch.allclose(net(x), dense)


def test_gate_shape_is_checked(resnet20):
    net, groups = resnet20
    with Gates(net, groups) as gates, pytest.raises(ValueError, match="must have shape"):
        gates.set({groups[0].id: torch.ones(groups[0].width + 1)})


# ------------------------------------------------------------------ FLOPs model

@pytest.mark.parametrize("seed", [0, 1])
def test_flops_model_equals_fvcore_on_slimmed_net(resnet20, seed):
    net, groups = resnet20
    fm = FlopsModel.for_groups(groups)
    assert fm.dense == count_flops(net, (3, 16, 16))
    masks = _random_masks(groups, seed)
    real = count_flops(_slimmed_copy(net, masks), (3, 16, 16)) / fm.dense
    assert fm.ratio_of_masks(masks) == pytest.approx(real, abs=1e-9)


def test_flops_model_on_heads_and_mlp():
    net = _tiny_vit()
    groups = find_groups(net, _x(n=1))
    fm = FlopsModel.for_groups(groups)
    masks = _random_masks(groups, 3)
    real = count_flops(_slimmed_copy(net, masks), (3, 16, 16)) / fm.dense
    assert fm.ratio_of_masks(masks) == pytest.approx(real, abs=1e-9)


def test_flops_model_gradient(resnet20):
    _net, groups = resnet20
    fm = FlopsModel.for_groups(groups)
    frac = torch.full((len(groups),), 0.5, dtype=torch.float64, requires_grad=True)
    ratio = fm.ratio_of_fractions(frac)
    ratio.backward()
    assert 0 < ratio.item() < 1 and bool((frac.grad > 0).all())
    assert float(fm.ratio_of_fractions(torch.ones(len(groups)))) == pytest.approx(1.0)


# ------------------------------------------------------------------ targeting

@settings(max_examples=25, deadline=None, database=None)
@given(ratio=st.floats(0.3, 1.0), scope=st.sampled_from(["global", "local"]), round_to=st.sampled_from([1, 8, 16]),
       seed=st.integers(0, 1000))
def test_select_masks_hits_the_ratio(resnet20, ratio, scope, round_to, seed):
    _net, groups = resnet20
    fm = FlopsModel.for_groups(groups)
    if ratio < smallest_ratio(groups, fm, round_to):
        return
    masks = select_masks(random_scores(groups, seed), groups, fm, ratio, scope=scope, round_to=round_to)
    for g in groups:
        kept = int(masks[g.id].sum())
        assert kept >= 1 and (kept * g.unit_channels % round_to == 0 or kept == g.width)
    achieved = fm.ratio_of_masks(masks)
    if round_to == 1:
        assert abs(achieved - ratio) <= 0.02


def test_global_scope_prunes_low_scores_first(resnet20):
    _net, groups = resnet20
    fm = FlopsModel.for_groups(groups)
    scores = {g.id: torch.arange(g.width, dtype=torch.float32) + 1 for g in groups}
    masks = select_masks(scores, groups, fm, 0.6, round_to=1)
    for g in groups:
        kept = int(masks[g.id].sum())
        assert bool(masks[g.id][g.width - kept:].all())        # the highest-scored units are the kept ones


def test_local_scope_keeps_one_fraction(resnet20):
    _net, groups = resnet20
    fm = FlopsModel.for_groups(groups)
    masks = select_masks(l1_scores(groups), groups, fm, 0.5, scope="local", round_to=1)
    assert abs(fm.ratio_of_masks(masks) - 0.5) <= 0.02
    kept = [(int(masks[g.id].sum()), g.width) for g in groups]
    for ka, wa in kept:          # one common fraction f, each group at floor(f·W) or ceil(f·W)
        for kb, wb in kept:
            assert abs(ka / wa - kb / wb) < 1 / wa + 1 / wb


@pytest.mark.parametrize("ratio", [0.0, -0.2, 1.5])
def test_ratio_outside_unit_interval(resnet20, ratio):
    _net, groups = resnet20
    with pytest.raises(CompressError, match=r"must be in \(0, 1\]"):
        select_masks(l1_scores(groups), groups, FlopsModel.for_groups(groups), ratio)


def test_unreachable_ratio_names_the_smallest(resnet20):
    _net, groups = resnet20
    fm = FlopsModel.for_groups(groups)
    lowest = smallest_ratio(groups, fm, 8)
    with pytest.raises(CompressError, match=f"smallest reachable is {lowest:.4f}"):
        select_masks(l1_scores(groups), groups, fm, lowest / 2, round_to=8)


# ------------------------------------------------------------------ importance

def test_l1_scores_are_filter_norms(resnet20):
    net, groups = resnet20
    g = next(g for g in groups if g.id == "layer2.0.conv1")
    assert torch.allclose(l1_scores(groups)[g.id], net.layer2[0].conv1.weight.abs().sum((1, 2, 3)))


def test_group_l2_averages_every_coupled_weight(resnet20):
    net, groups = resnet20
    g = next(g for g in groups if g.id == "layer2.0.conv1")    # conv1 out → bn1 → conv2 in
    blk = net.layer2[0]
    manual = (blk.conv1.weight.pow(2).sum((1, 2, 3)) + blk.bn1.weight.pow(2)
              + blk.conv2.weight.pow(2).sum((0, 2, 3)))
    assert torch.allclose(group_l2_scores(groups, normalize=False)[g.id], manual / 3)
    assert torch.allclose(group_sq_norms(g), manual)
    assert group_l2_scores(groups)[g.id].mean() == pytest.approx(1.0)


@pytest.mark.parametrize("name", ["resnet20", "efficientnet_lite0"])
def test_group_l2_is_torch_pruning_group_magnitude_importance(name):
    """DepGraph's criterion as Torch-Pruning computes it: GroupMagnitudeImportance(p=2), mean over the
    group's layers, divided by the group mean. (A guard: the scores go through Torch-Pruning, and the
    unit bookkeeping must not change them where a unit is a channel.)"""
    import torch_pruning as tp

    torch.manual_seed(0)
    net = create_model(name, 10, 32).eval()
    groups = find_groups(net, _x(32, n=1))
    ours = group_l2_scores(groups)
    reference = tp.importance.GroupMagnitudeImportance(p=2)
    graph = groups[0].graph
    for g in groups:
        [(root, fn, _unit_of)] = g.tp_roots()
        theirs = reference(graph.dg.get_pruning_group(root, fn, list(range(g.channels))))
        assert torch.allclose(ours[g.id], theirs.float(), rtol=1e-4, atol=1e-6), g.id


def test_scores_with_units_removed_equal_scores_of_the_slimmed_network(resnet20):
    net, groups = resnet20
    masks = _random_masks(groups, seed=3)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with units_removed(groups, masks):
        masked = group_l2_scores(groups, normalize=False)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())      # restored exactly
    slimmed = _slimmed_copy(net, masks)
    after = group_l2_scores(find_groups(slimmed, _x(n=1)), normalize=False)
    for gid, mask in masks.items():
        assert torch.allclose(masked[gid][mask], after[gid], rtol=1e-5), gid
    assert any(not torch.allclose(masked[g], group_l2_scores(groups, normalize=False)[g]) for g in masks)


def test_random_scores_are_seeded(resnet20):
    _net, groups = resnet20
    a, b, c = random_scores(groups, 1), random_scores(groups, 1), random_scores(groups, 2)
    assert all(torch.equal(a[k], b[k]) for k in a) and not all(torch.equal(a[k], c[k]) for k in a)


def test_group_lasso_gradient_is_gamma_weighted(resnet20):
    net, groups = resnet20
    g = next(g for g in groups if g.id == "layer2.0.conv1")
    reg = group_lasso([g], alpha=4.0, reg=1e-3)
    net.zero_grad()
    reg().backward()
    imp = group_l2_scores([g], normalize=False)[g.id]
    gamma = 2 ** (4.0 * (imp.max() - imp) / (imp.max() - imp.min()))
    w = net.layer2[0].conv1.weight
    assert torch.allclose(w.grad, 1e-3 * gamma.view(-1, 1, 1, 1) * w, rtol=1e-4, atol=1e-9)
    net.zero_grad()


# ------------------------------------------------------------------ structure record

@pytest.mark.parametrize("build", [lambda: create_model("resnet20", 10, 16), _tiny_vit,
                                   lambda: create_model("mobilenet_v3_small", 10, 16, adapt=None)],
                         ids=["resnet20", "vit", "mobilenet_v3_small"])
def test_layer_spec_rebuilds_the_slimmed_net(build):
    torch.manual_seed(0)
    net = build().eval()
    groups = find_groups(net, _x(n=1))
    slim(net, groups, _random_masks(groups, 5))
    torch.manual_seed(1)
    reference = build().eval()
    spec = layer_spec(net, reference)
    assert spec and all("type" in v for v in spec.values())
    rebuilt = apply_layer_spec(build().eval(), spec)
    rebuilt.load_state_dict(net.state_dict(), strict=True)
    assert torch.allclose(rebuilt(_x()), net(_x()), atol=1e-6)
    assert widths(rebuilt) == widths(net)


def test_a_shared_copy_slims_without_touching_the_original_and_a_meta_copy_holds_no_data():
    net = _tiny_vit()
    x = _x()
    before = net(x)
    trial = module_copy(net)
    assert trial.heads.head.weight is net.heads.head.weight                  # shared, not copied
    groups = find_groups(trial, _x(n=1))
    slim(trial, groups, _random_masks(groups, 2))
    assert sum(p.numel() for p in trial.parameters()) < sum(p.numel() for p in net.parameters())
    assert torch.equal(net(x), before)
    meta = module_copy(net, meta=True)
    assert all(t.is_meta for t in (*meta.parameters(), *meta.buffers()))
    assert layer_spec(trial, meta) == layer_spec(trial, _tiny_vit())


def test_layer_spec_rejects_unknown_types():
    with pytest.raises(CompressError, match="unknown layer type 'Conv9d'"):
        apply_layer_spec(create_model("resnet20", 10, 16), {"conv1": {"type": "Conv9d"}})
    with pytest.raises(CompressError, match="does not have"):
        apply_layer_spec(create_model("resnet20", 10, 16), {"nope.conv": {"type": "Conv2d"}})


# ------------------------------------------------------------------ method registry

def test_registry_lists_baselines_and_their_options():
    assert {"l1", "depgraph", "random"} <= set(list_methods())
    assert "--lbi-epochs" in {opt.flag for _m, opt in all_options()}
    with pytest.raises(CompressError, match="unknown method 'nope'"):
        get_method("nope")
    with pytest.raises(CompressError, match="has no option"):
        get_method("l1")(lbi_epochs=3)


# ------------------------------------------------------------------ pipeline helpers

def test_bn_recalibration_matches_the_data_statistics():
    from compress.data import ImageSet
    from compress.loop import reestimate_bn

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    images = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8)
    reestimate_bn(net, ImageSet(torch.zeros(64, dtype=torch.long), images, image_size=8), batch_size=16)
    feats = net[0](images.float() / 255)
    assert torch.allclose(net[1].running_mean, feats.mean((0, 2, 3)), atol=1e-4)
    assert torch.allclose(net[1].running_var, feats.var((0, 2, 3)), rtol=0.05)
    assert net[1].momentum == 0.1 and not net.training and not net[1].training   # mode restored
