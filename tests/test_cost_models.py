"""The cost-model protocol, the latency model's arithmetic and the knapsack allocation (no timing here:
tables are built from known functions, so every figure has an exact expected value)."""

from __future__ import annotations

import pytest
import torch

from compress.errors import CompressError
from compress.models import create_model
from compress.pruning import find_groups, l1_scores, random_scores
from compress.pruning.allocation import AllowedCounts
from compress.pruning.flops_model import FlopsModel
from compress.pruning.latency_model import (
    LatencyModel,
    LatencyTable,
    LayerTable,
    _piecewise,
    layer_shapes,
    monotone_envelope,
)
from compress.pruning.latency_stages import fit_stage_scales, stage_allocations
from compress.pruning.target import knapsack_floor, knapsack_worth, select_counts, select_masks, smallest_ratio


def _x(size=16):
    return torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def resnet20():
    torch.manual_seed(0)
    net = create_model("resnet20", 10, 16).eval()
    return net, find_groups(net, _x())


def _table(groups, round_to=8, points=4, fn=None, dense_ms=None) -> LatencyTable:
    """A table whose every layer costs fn(shape, cin, cout) ms exactly at its grid points."""
    fn = fn or (lambda shape, ci, co: 1e-3 * ci * co * (shape.kernel[0] ** 2 if shape.kernel else 1))
    needs = layer_shapes(groups, _x(), round_to, points)
    layers = []
    for n in needs:
        cin = [n.cout[0]] if n.shape.depthwise else n.cin
        rows = [[fn(n.shape, co, co) for co in n.cout]] if n.shape.depthwise else \
            [[fn(n.shape, ci, co) for co in n.cout] for ci in n.cin]
        layers.append(LayerTable(n.layer, n.shape, cin, n.cout, rows))
    dense_ms = dense_ms or 1.2 * sum(t.dense_ms() for t in layers)       # 20% outside the tables
    return LatencyTable(target={"backend": "test", "threads": 1, "batch_size": 1}, layers=layers, dense_ms=dense_ms)


# ------------------------------------------------------------------ layer shapes


def test_layer_shapes_of_resnet20(resnet20):
    _net, groups = resnet20
    needs = {n.layer: n for n in layer_shapes(groups, _x(), round_to=8, points=3)}
    conv = needs["layer2.0.conv1"]
    assert conv.shape.op == "conv" and conv.shape.kernel == (3, 3) and conv.shape.stride == (2, 2)
    assert conv.shape.bn and conv.shape.act == "relu"                  # conv → bn → relu, fused when deployed
    assert needs["layer2.0.conv2"].shape.act is None                   # conv → bn → (+ shortcut) → relu
    second = needs["layer2.0.conv2"]
    assert second.shape.input_shape == (32, 8, 8) and second.shape.cin == second.shape.cout == 32
    assert second.cin == [8, 24, 32] and second.cout == [8, 24, 32]  # multiples of 8, ≤ 3 points, dense included
    stem = needs["conv1"]
    assert stem.cin == [3] and stem.cout == [8, 16]               # the image channels never change
    fc = needs["fc"]
    assert fc.shape.op == "linear" and fc.cout == [10] and fc.cin[0] == 8 and fc.cin[-1] == 64 and len(fc.cin) == 3


def test_depthwise_layers_have_one_axis():
    net = create_model("mobilenet_v2", 10, 32).eval()
    groups = find_groups(net, _x(32))
    needs = layer_shapes(groups, _x(32), round_to=8, points=4)
    dw = [n for n in needs if n.shape.depthwise]
    assert dw and all(len(n.cin) == 1 and n.shape.groups == 1 for n in dw)
    assert any(n.shape.act == "relu6" for n in needs)


# ------------------------------------------------------------------ latency model


def test_latency_model_interpolates_bilinear_tables_exactly(resnet20):
    _net, groups = resnet20
    table = _table(groups, points=3, dense_ms=100.0)
    model = LatencyModel(groups, table)
    dense_sum = sum(t.dense_ms() for t in table.layers)
    assert model.dense == 100.0 and model.covered == pytest.approx(dense_sum)
    kept = torch.tensor([max(8.0, w - 8.0) for w in model.widths.tolist()], dtype=torch.float64)
    # cin·cout is bilinear, so interpolation between grid points is exact: predict it by hand
    fm = FlopsModel.for_groups(groups)
    layers = model.layers
    cin, cout = layers.in_width(kept), layers.out_width(kept)
    expected = 0.0
    for e, name in enumerate(layers.names):
        t = next(t for t in table.layers if t.layer == name)
        ci = t.shape.cin if len(t.cin) == 1 else float(cin[e])
        co = t.shape.cout if len(t.cout) == 1 else float(cout[e])
        k2 = t.shape.kernel[0] ** 2 if t.shape.kernel else 1
        expected += 1e-3 * ci * co * k2
    assert float(model.raw_ratio(kept)) == pytest.approx(expected / dense_sum)
    assert float(model.cost(kept)) == pytest.approx(100.0 * expected / dense_sum)     # no calibration yet
    assert fm.ids == model.ids


def test_calibration_maps_raw_ratios_monotonically(resnet20):
    _net, groups = resnet20
    table = _table(groups, dense_ms=10.0)
    table.calibration = [[0.7, 0.6], [0.3, 0.35], [0.5, 0.45], [0.55, 0.44]]   # one noisy, non-monotone point
    model = LatencyModel(groups, table)
    xs = torch.linspace(0.05, 1.0, 60, dtype=torch.float64)
    mapped = _piecewise(model.knots_x, model.knots_y, xs)
    assert bool((mapped[1:] >= mapped[:-1] - 1e-12).all()) and float(mapped[-1]) == pytest.approx(1.0)
    assert float(_piecewise(model.knots_x, model.knots_y, torch.tensor([0.7]))) == pytest.approx(0.6)
    assert float(_piecewise(model.knots_x, model.knots_y, torch.tensor([0.3]))) == pytest.approx(0.35)
    assert float(mapped[0]) >= 0.01
    assert float(model.cost(model.widths)) == pytest.approx(10.0)          # the dense network is the anchor


def test_latency_model_gradient_and_batch(resnet20):
    _net, groups = resnet20
    model = LatencyModel(groups, _table(groups))
    frac = torch.full((len(groups),), 0.6, dtype=torch.float64, requires_grad=True)
    ratio = model.ratio_of_fractions(frac)
    ratio.backward()
    assert 0 < float(ratio.detach()) < 1 and bool((frac.grad >= 0).all()) and float(frac.grad.sum()) > 0
    batch = torch.stack([model.widths, model.widths * 0.5])
    both = model.ratio(batch)
    assert both.shape == (2,) and float(both[0]) == pytest.approx(1.0) and float(both[1]) < 1


def test_select_masks_on_latency(resnet20):
    _net, groups = resnet20
    model = LatencyModel(groups, _table(groups, round_to=4, points=8))
    for allocation in ("rank", "knapsack"):
        masks = select_masks(l1_scores(groups), groups, model, 0.6, round_to=4, allocation=allocation)
        assert abs(model.ratio_of_masks(masks) - 0.6) <= 0.02
    masks = select_masks(l1_scores(groups), groups, model, 0.6, scope="local", round_to=4)
    assert abs(model.ratio_of_masks(masks) - 0.6) <= 0.02
    with pytest.raises(CompressError, match=r"--latency-ratio 0.01 is unreachable .* smallest reachable is"):
        select_masks(l1_scores(groups), groups, model, 0.01, round_to=8)


def test_a_channel_block_keeps_widths_at_its_multiples(resnet20):
    """A target whose latency steps every 16 channels: selection never stops inside a block (--round-to 8
    alone would allow 8, 24, 40, 56), and the smallest reachable ratio rises accordingly."""
    _net, groups = resnet20
    table = _table(groups, round_to=16, points=4)
    table.target["channel_block"] = 16
    blocked, plain = LatencyModel(groups, table), LatencyModel(groups, _table(groups, round_to=8, points=4))
    assert blocked.channel_step == 16 and plain.channel_step == 1
    for allocation in ("rank", "knapsack"):
        masks = select_masks(l1_scores(groups), groups, blocked, 0.6, round_to=8, allocation=allocation)
        kept = {g.id: int(masks[g.id].sum()) * g.unit_channels for g in groups}
        assert all(k % 16 == 0 or k == g.width * g.unit_channels for g in groups for k in [kept[g.id]]), kept
    assert smallest_ratio(groups, blocked, 8) > smallest_ratio(groups, plain, 8)
    with pytest.raises(CompressError, match=r"steps of 16: the target's channel block is 16"):
        select_masks(l1_scores(groups), groups, blocked, 0.01, round_to=8)


def test_tables_are_made_monotone_in_width():
    """A narrower layer never costs more than a wider one (it could run as the wider one)."""
    z = torch.tensor([[[1.0, 3.0, 2.0], [0.5, 4.0, 5.0], [2.0, 2.5, 6.0]]], dtype=torch.float64)
    out = monotone_envelope(z)
    assert out.tolist() == [[[0.5, 2.0, 2.0], [0.5, 2.5, 5.0], [2.0, 2.5, 6.0]]]
    assert bool((out[:, 1:, :] >= out[:, :-1, :]).all() and (out[:, :, 1:] >= out[:, :, :-1]).all())


def test_stage_corrections_recover_known_factors(resnet20):
    """Networks whose measured savings are the tables' savings × a known factor per stage: the fit
    returns those factors, and the corrected model predicts the stage networks exactly."""
    _net, groups = resnet20
    model = LatencyModel(groups, _table(groups, round_to=8, points=4))
    truth = {"16x16": 1.0, "8x8": 1.6, "4x4": 0.7, "1": 1.0}     # "1": the classifier, no network of its own
    assert set(model.stage) == set(truth)
    factor = torch.tensor([truth[s] for s in model.stage], dtype=torch.float64)
    runs = stage_allocations(model, AllowedCounts(groups, 8))
    assert [name for name, _ in runs] == ["16x16", "8x8", "4x4"]
    measured = [{"stage": name, "kept": kept.tolist(),
                 "saving_ms": float(((model.layer_ms(model.widths) - model.layer_ms(kept)) * factor).sum())}
                for name, kept in runs]
    scales, report = fit_stage_scales(model, measured)
    assert [r["factor"] for r in report] == pytest.approx([1.0, 1.6, 0.7], abs=1e-3)
    table = model.table
    table.scales = scales
    corrected = LatencyModel(groups, table)
    for m in measured:
        kept = torch.tensor(m["kept"], dtype=torch.float64)
        saving = float(corrected.tables_ms(corrected.widths) - corrected.tables_ms(kept))
        assert saving == pytest.approx(m["saving_ms"], rel=1e-6)


# ------------------------------------------------------------------ knapsack


def test_knapsack_is_near_the_exhaustive_optimum(resnet20):
    """round-to 16 leaves 4096 allocations: enumerate them all and compare worth at equal budget."""
    _net, groups = resnet20
    fm = FlopsModel.for_groups(groups)
    for seed in range(3):
        scores = random_scores(groups, seed)
        worth = knapsack_worth([scores[g.id].double() / scores[g.id].double().mean() for g in groups], groups)
        for target in (0.55, 0.7):
            allowed = AllowedCounts(groups, 16)
            allowed = allowed.at_least(knapsack_floor(groups, allowed, fm, target))
            grid = torch.cartesian_prod(*[torch.tensor(r, dtype=torch.float64) for r in allowed.rows])
            kept = select_counts(scores, groups, fm, target, round_to=16, allocation="knapsack")
            ratio = float(fm.ratio(kept))
            best = float(worth(grid)[fm.ratio(grid) <= max(ratio, target) + 1e-9].max())
            assert abs(ratio - target) <= 0.03 and float(worth(kept)) >= 0.98 * best
            assert all(int(kept[i]) >= allowed.rows[i][0] for i in range(len(groups)))      # the floor holds


def test_knapsack_worth_is_the_flops_ratio_when_scores_are_equal(resnet20):
    """Equal scores: every unit is worth the same, so the weighted FLOPs are the FLOPs (bilinear in the
    widths: halving two neighbouring groups keeps a quarter of the layer between them)."""
    _net, groups = resnet20
    fm = FlopsModel.for_groups(groups)
    worth = knapsack_worth([torch.ones(g.width, dtype=torch.float64) for g in groups], groups)
    kept = torch.stack([fm.widths, torch.ceil(fm.widths / 2), torch.ceil(fm.widths / 4)])
    assert worth(kept).tolist() == pytest.approx(fm.ratio(kept).tolist(), rel=1e-9)


def test_knapsack_takes_uniform_pruning_where_it_is_worth_more(resnet20):
    """The greedy is not optimal. Under a latency model blind to resolution (every layer costs in × out
    × kernel, at any size; worth is FLOPs, which are not) the chosen allocation is never worth less than
    uniform pruning to the same cost, and the report says which one was taken."""
    _net, groups = resnet20
    model = LatencyModel(groups, _table(groups, round_to=8, points=4))
    scores = l1_scores(groups)
    worth = knapsack_worth([scores[g.id].double() / scores[g.id].double().mean() for g in groups], groups)
    for target in (0.4, 0.6):
        report: dict = {}
        kept = select_counts(scores, groups, model, target, round_to=8, allocation="knapsack", report=report)
        uniform = select_counts(scores, groups, model, target, round_to=8, scope="local")
        assert float(model.ratio(kept)) <= target + 0.005 + 1e-9
        if float(model.ratio(uniform)) <= target + 0.005:
            assert float(worth(kept)) >= float(worth(uniform)) - 1e-9
        choice = report["knapsack_choice"]
        assert report[f"knapsack_worth_{choice}"] == pytest.approx(float(worth(kept)) / float(worth(model.widths)),
                                                                   abs=1e-5)
        assert report[f"knapsack_worth_{choice}"] >= report[f"knapsack_worth_{choice}_start"]   # exchanges only gain


def test_knapsack_needs_global_scope(resnet20):
    _net, groups = resnet20
    with pytest.raises(CompressError, match="needs --scope global"):
        select_masks(l1_scores(groups), groups, FlopsModel.for_groups(groups), 0.5, scope="local",
                     allocation="knapsack")
