"""Split LBI (DessiLBI) over channel groups: one step by hand, coupled and overlapping Γ groups, the path."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from compress.pruning import find_groups
from compress.pruning.coupled import UnitSlice, group_slices
from compress.pruning.lbi import GammaGroup, SplitLBI, gamma_groups


def _rows(param: nn.Parameter, name: str) -> UnitSlice:
    n = param.shape[0]
    return UnitSlice(param=param, name=name, kind="rows", idx=torch.arange(n), unit=torch.arange(n))


def _cols(param: nn.Parameter, name: str) -> UnitSlice:
    n = param.shape[1]
    return UnitSlice(param=param, name=name, kind="cols", idx=torch.arange(n), unit=torch.arange(n))


def test_one_step_matches_the_hand_computed_iteration():
    """κ = 2, ν = 0.5, α = 0.25, plain SGD. Start: W = [[3, 4], [0.6, 0.8]], V = Γ = 0, ∇W = [[1, −1], [0.5, 0]].
    W₁ = W − κα(∇W + (W − 0)/ν) = [[−0.5, 0.5], [−0.25, 0]]; V₁ = (α/ν)·W = [[1.5, 2], [0.3, 0.4]];
    ‖V₁‖ per row = 2.5, 0.5, so Γ₁ = κ(1 − 1/2.5)·V₁ = [[1.8, 2.4], [0, 0]] (row 1 stays outside the support).
    A bias outside every Γ group takes b − κα·∇b. A second step with the same gradients:
    W₂ = W₁ − κα(∇W + (W₁ − Γ₁)/ν) = [[1.3, 2.9], [−0.25, 0]],
    V₂ = V₁ + (α/ν)(W₁ − Γ₁) = [[0.35, 1.05], [0.175, 0.4]]."""
    w = nn.Parameter(torch.tensor([[3.0, 4.0], [0.6, 0.8]]))
    b = nn.Parameter(torch.tensor([1.0, -1.0]))
    opt = SplitLBI([w, b], [GammaGroup("fc", 2, [_rows(w, "fc.weight")])], lr=0.25, kappa=2.0, nu=0.5, momentum=0.0)
    assert float(opt.V["fc"][0].abs().sum()) == 0.0 and not opt.support()["fc"].any()
    grad_w, grad_b = torch.tensor([[1.0, -1.0], [0.5, 0.0]]), torch.tensor([0.2, 0.4])

    w.grad, b.grad = grad_w.clone(), grad_b.clone()
    opt.step()
    torch.testing.assert_close(w.data, torch.tensor([[-0.5, 0.5], [-0.25, 0.0]]))
    torch.testing.assert_close(opt.V["fc"][0], torch.tensor([[1.5, 2.0], [0.3, 0.4]]))
    torch.testing.assert_close(opt.gamma("fc")[0], torch.tensor([[1.8, 2.4], [0.0, 0.0]]))
    torch.testing.assert_close(b.data, torch.tensor([0.9, -1.2]))
    assert opt.support()["fc"].tolist() == [True, False]
    assert opt.entered["fc"].tolist() == [1, -1]

    w.grad, b.grad = grad_w.clone(), grad_b.clone()
    opt.step()
    torch.testing.assert_close(w.data, torch.tensor([[1.3, 2.9], [-0.25, 0.0]]))
    torch.testing.assert_close(opt.V["fc"][0], torch.tensor([[0.35, 1.05], [0.175, 0.4]]))
    torch.testing.assert_close(opt.gamma("fc")[0][0], 2.0 * (1 - 1 / 1.225 ** 0.5) * torch.tensor([0.35, 1.05]))


def test_a_group_threshold_scales_the_shrinkage():
    """The same first step with λ = 2: ‖V₁‖ = 2.5 > 2, Γ₁ = κ(1 − 2/2.5)·V₁ = [0.6, 0.8]; a λ of 3 keeps Γ₁ = 0."""
    for lam, gamma in ((2.0, [0.6, 0.8]), (3.0, [0.0, 0.0])):
        w = nn.Parameter(torch.tensor([[3.0, 4.0], [0.6, 0.8]]))
        opt = SplitLBI([w], [GammaGroup("fc", 2, [_rows(w, "fc.weight")], threshold=lam)], lr=0.25, kappa=2.0,
                       nu=0.5, momentum=0.0)
        w.grad = torch.tensor([[1.0, -1.0], [0.5, 0.0]])
        opt.step()
        torch.testing.assert_close(opt.gamma("fc")[0][0], torch.tensor(gamma))
        assert opt.support()["fc"].tolist() == [lam < 2.5, False]


def test_group_mean_thresholds_are_the_mean_unit_norm():
    net, x, _y = _separable_task()
    groups = find_groups(net, x[:1])
    for g, gg in zip(groups, gamma_groups(groups), strict=True):
        norms = (net[0].weight.pow(2).sum(1) + net[2].weight.pow(2).sum(0)).detach().sqrt() if g is groups[0] else None
        if norms is not None:
            assert gg.threshold == pytest.approx(float(norms.mean()), rel=1e-5)
    assert {gg.threshold for gg in gamma_groups(groups, threshold="one")} == {1.0}


def test_a_unit_spans_its_coupled_slices_and_overlapping_groups_add_their_pull():
    """Unit 0 of group "h" owns row 0 of A and column 0 of B. (α/ν)·‖row‖ = 0.5 and (α/ν)·‖col‖ = 1.0
    are each inside the unit ball; together √1.25 > 1, so the unit enters the support on step 1.
    A is also covered column-wise by group "x": its coupling gradient is (A − Γ_h)/ν + (A − Γ_x)/ν."""
    a = nn.Parameter(torch.tensor([[1.0, 0.0], [0.0, 0.2]]))
    b = nn.Parameter(torch.tensor([[0.0, 0.0], [2.0, 0.0]]))
    h = GammaGroup("h", 2, [_rows(a, "a.weight"), _cols(b, "b.weight")])
    x = GammaGroup("x", 2, [_cols(a, "a.weight")])
    opt = SplitLBI([a, b], [h, x], lr=0.5, kappa=1.0, nu=1.0, momentum=0.0)
    a.grad, b.grad = torch.zeros(2, 2), torch.zeros(2, 2)
    a0 = a.detach().clone()
    opt.step()
    assert opt.support()["h"].tolist() == [True, False]
    assert opt.support()["x"].tolist() == [False, False]        # column norms 0.5 and 0.1
    torch.testing.assert_close(a.data, a0 - 0.5 * (a0 + a0))   # pulled towards Γ_h = 0 and Γ_x = 0
    torch.testing.assert_close(opt.V["h"][1], torch.tensor([[0.0, 1.0], [0.0, 0.0]]))   # B's columns as rows


def _separable_task(seed: int = 0):
    """A small MLP that must find 4 informative inputs among 16: a classification task with a clear
    answer, on which the inverse scale space is well behaved."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(512, 16, generator=gen)
    y = (x[:, 0] + 0.8 * x[:, 1] - 0.6 * x[:, 2] > 0).long() + (x[:, 3] > 0.5).long()
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 3))
    return net, x, y


def _train(net, opt, x, y, steps, record=None):
    for step in range(steps):
        i = torch.arange(step * 64, step * 64 + 64) % len(x)
        opt.zero_grad()
        nn.functional.cross_entropy(net(x[i]), y[i]).backward()
        opt.step()
        if record is not None:
            record.append({k: v.clone() for k, v in opt.support().items()})


@pytest.fixture(scope="module")
def path_run():
    """300 SGD steps (fixed lr) of Split LBI on the small task; the support after every step."""
    net, x, y = _separable_task()
    groups = find_groups(net, x[:1])
    opt = SplitLBI(net.parameters(), gamma_groups(groups), lr=0.1, kappa=1.0, nu=5.0)
    assert all(float(v.abs().sum()) == 0 for vs in opt.V.values() for v in vs)
    assert all(float(gm.abs().sum()) == 0 for gg in opt.structure for gm in opt.gamma(gg.id))
    assert all(not m.any() for m in opt.support().values())
    path = []
    _train(net, opt, x, y, 300, record=path)
    return net, x, y, groups, opt, path


def test_gamma_starts_at_zero_and_its_support_only_grows_with_sgd_at_a_fixed_lr(path_run):
    *_, groups, _opt, path = path_run
    sizes = [sum(int(m.sum()) for m in s.values()) for s in path]
    assert sizes[0] < sizes[-1] and 0 < sizes[-1] < sum(g.width for g in groups)
    for before, after in zip(path, path[1:], strict=False):
        for gid in before:
            assert not (before[gid] & ~after[gid]).any(), "a unit left the support"


def test_the_units_that_enter_first_carry_the_task(path_run):
    """Keeping the 6 first-entered hidden units of the first layer keeps most of the accuracy; keeping the
    6 last-ranked ones loses it."""
    net, x, y, groups, opt, _path = path_run
    first = groups[0]
    order = torch.argsort(opt.scores()[first.id], descending=True)
    entered = opt.entered[first.id][order]
    assert (entered[entered > 0].diff() >= 0).all()       # ranked by entry step

    def accuracy_keeping(units):
        trial = copy.deepcopy(net)
        drop = torch.ones(first.width, dtype=torch.bool)
        drop[units] = False
        with torch.no_grad():
            trial[0].weight[drop] = 0.0
            trial[0].bias[drop] = 0.0
        return float((trial(x).argmax(1) == y).float().mean())

    assert accuracy_keeping(order[:6]) > 0.85 > 0.5 > accuracy_keeping(order[-6:])


def test_adamw_variant_decouples_weight_decay():
    """AdamW: W ← (1 − α·wd)·W − κα(m̂/(√v̂ + ε) + coupling); the first Adam direction is sign(∇)."""
    w = nn.Parameter(torch.tensor([[2.0, -1.0]]))
    opt = SplitLBI([w], [GammaGroup("fc", 1, [_rows(w, "fc.weight")])], lr=0.1, kappa=1.0, nu=2.0, inner="adamw",
                   weight_decay=0.5)
    w.grad = torch.tensor([[0.3, 0.2]])
    w0 = w.detach().clone()
    opt.step()
    expected = (1 - 0.1 * 0.5) * w0 - 0.1 * (torch.sign(w.grad) + w0 / 2.0)
    torch.testing.assert_close(w.data, expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(opt.V["fc"][0], 0.05 * w0)


def test_resume_from_state_dict_continues_the_same_path():
    net, x, y = _separable_task()
    groups = find_groups(net, x[:1])
    opt = SplitLBI(net.parameters(), gamma_groups(groups), lr=0.1, nu=5.0)
    _train(net, opt, x, y, 40)
    twin = copy.deepcopy(net)
    saved = copy.deepcopy(opt.state_dict())
    other = SplitLBI(twin.parameters(), gamma_groups(find_groups(twin, x[:1])), lr=0.1, nu=5.0)
    other.load_state_dict(saved)
    _train(net, opt, x, y, 20)
    _train(twin, other, x, y, 20)
    for p, q in zip(net.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q)
    for gid in opt.V:
        assert torch.equal(opt.entered[gid], other.entered[gid])


def test_gamma_groups_cover_the_same_weights_as_the_group_norm():
    torch.manual_seed(0)
    from compress.models import create_model
    from compress.pruning import group_sq_norms

    net = create_model("resnet20", 10, 16)
    groups = find_groups(net, torch.rand(1, 3, 16, 16))
    for g, gg in zip(groups, gamma_groups(groups), strict=True):
        norms = sum(s.unit_sums(s.gather(s.param).pow(2), g.width) for s in group_slices(g))
        torch.testing.assert_close(norms, group_sq_norms(g))
        assert {s.name for s in gg.slices} >= {f"{g.id}.weight"}


def test_an_untrained_slice_is_refused():
    w = nn.Parameter(torch.ones(2, 2))
    with pytest.raises(ValueError, match="does not train"):
        SplitLBI([nn.Parameter(torch.ones(1))], [GammaGroup("fc", 2, [_rows(w, "fc.weight")])], lr=0.1)


def test_gather_and_scatter_are_inverse_on_every_kind_of_slice():
    """Rows, columns and grouped-conv ("tiled") input channels: scattering a slice's rows into zeros
    writes exactly the entries `gather` reads."""
    from torchvision.models import resnext50_32x4d

    net = resnext50_32x4d(num_classes=4)
    groups = find_groups(net, torch.rand(1, 3, 32, 32))
    kinds = set()
    gen = torch.Generator().manual_seed(0)
    for g in groups[:12]:
        for s in group_slices(g):
            kinds.add(s.kind)
            w = torch.rand(s.param.shape, generator=gen) + 0.5
            out = torch.zeros_like(w)
            rows = s.gather(w)
            s.scatter_add_(out, rows)
            torch.testing.assert_close(s.gather(out), rows)
            assert int((out != 0).sum()) == rows.numel()
    assert kinds == {"rows", "cols", "tiled"}
    for kind, shape in (("rows", (4, 3, 2)), ("cols", (3, 4, 2))):      # scattered channels: the indexed path
        w = torch.rand(shape, generator=gen) + 0.5
        s = UnitSlice(param=nn.Parameter(w), name="w", kind=kind, idx=torch.tensor([3, 0]), unit=torch.tensor([0, 1]))
        assert s.span is None
        out = torch.zeros_like(w)
        s.scatter_add_(out, s.gather(w))
        picked = w[[3, 0]] if kind == "rows" else w[:, [3, 0]]
        torch.testing.assert_close(s.gather(out), s.gather(w))
        assert int((out != 0).sum()) == picked.numel()


def test_path_points_and_plot(path_run):
    from compress.methods.lbi_path import build_path, entry_epochs, path_png, support_summary

    _net, _x, _y, groups, opt, _path = path_run
    fm = groups[0].graph.flops_model
    now = support_summary(opt, fm)
    support = opt.support()
    assert now["support_units"] == sum(int(m.sum()) for m in support.values()) > 0
    assert now["support_flops_ratio"] == round(fm.ratio_of_masks(support), 6) < 1.0
    start = {"step": 0, "support_units": 0, "support_share": 0.0, "support_flops_ratio": 0.0, "val_acc": 0.9}
    history = [{"epoch": 1, "loss": 0.1, **now, "val_acc": 0.8, "support_val_acc": 0.7}]
    path = build_path(start, history, opt, steps_per_epoch=300)          # all 300 steps in one "epoch"
    assert [p["epoch"] for p in path] == [0, 1] and "loss" not in path[1]
    assert path[0]["per_group"] == {g.id: 0 for g in groups}
    assert path[1]["per_group"] == {gid: int(m.sum()) for gid, m in support.items()}   # this path only grew
    entries = entry_epochs(opt, steps_per_epoch=100)
    assert [e is None for e in entries[groups[0].id]] == (opt.entered[groups[0].id] < 0).tolist()
    png = path_png(path, {g.id: g.width for g in groups}, title="test")
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
