"""L1 sparse training: the proximal step is the soft threshold, it makes exact zeros, and ranking change."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from compress.pruning import find_groups
from compress.pruning.sparsity import ProximalSGD, prunable_weights, ranking_change, soft_threshold_, zero_share


def test_soft_threshold_by_hand():
    w = torch.tensor([-0.3, -0.05, 0.0, 0.02, 0.5])
    soft_threshold_(w, 0.1)
    torch.testing.assert_close(w, torch.tensor([-0.2, 0.0, 0.0, 0.0, 0.4]))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-3, 3), min_size=1, max_size=8), st.floats(0.0, 1.0))
def test_soft_threshold_is_the_proximal_operator_of_the_l1_norm(values, tau):
    """x* = S_τ(v) minimises ½‖x − v‖² + τ‖x‖₁: no coordinate can move either way and do better."""
    v = torch.tensor(values, dtype=torch.float64)
    x = soft_threshold_(v.clone(), tau)

    def objective(z):
        return 0.5 * float(((z - v) ** 2).sum()) + tau * float(z.abs().sum())

    best = objective(x)
    for i in range(len(v)):
        for delta in (1e-3, -1e-3, 0.1, -0.1):
            moved = x.clone()
            moved[i] += delta
            assert best <= objective(moved) + 1e-12


def test_proximal_sgd_step_is_an_sgd_step_then_the_soft_threshold_at_lr_times_lambda():
    """w = [1, 0.05, −0.2], ∇ = [0.5, 0.1, −1], lr 0.1, λ 0.5, no momentum: SGD gives [0.95, 0.04, −0.1],
    the threshold τ = 0.05 gives [0.9, 0, −0.05]; the bias (no L1) takes the plain SGD step."""
    w = nn.Parameter(torch.tensor([1.0, 0.05, -0.2]))
    b = nn.Parameter(torch.tensor([0.01]))
    opt = ProximalSGD.split([w, b], l1_params=[w], l1=0.5, lr=0.1, momentum=0.0)
    w.grad, b.grad = torch.tensor([0.5, 0.1, -1.0]), torch.tensor([0.05])
    opt.step()
    torch.testing.assert_close(w.data, torch.tensor([0.9, 0.0, -0.05]))
    torch.testing.assert_close(b.data, torch.tensor([0.005]))
    assert float(w.detach()[1]) == 0.0


def _task():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(512, 16, generator=gen)
    y = (x[:, 0] + 0.8 * x[:, 1] - 0.6 * x[:, 2] > 0).long()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 2))
    return net, x, y


def _fit(net, opt, x, y, steps=200, extra=None):
    for step in range(steps):
        i = torch.arange(step * 64, step * 64 + 64) % len(x)
        loss = nn.functional.cross_entropy(net(x[i]), y[i])
        if extra is not None:
            loss = loss + extra()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return float((net(x).argmax(1) == y).float().mean())


def test_proximal_l1_training_makes_exact_zeros_where_a_loss_term_does_not():
    net, x, y = _task()
    weights = prunable_weights(find_groups(net, x[:1]))
    assert {tuple(w.shape) for w in weights} == {(32, 16), (32, 32), (2, 32)}
    acc = _fit(net, ProximalSGD.split(net.parameters(), l1_params=weights, l1=0.05, lr=0.1), x, y)
    prox_zeros = zero_share(weights)

    twin, _, _ = _task()
    twin_weights = prunable_weights(find_groups(twin, x[:1]))
    _fit(twin, torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9), x, y,
         extra=lambda: 0.05 * sum(w.abs().sum() for w in twin_weights))
    assert acc > 0.9
    assert prox_zeros > 0.5 > zero_share(twin_weights) + 0.4      # the subgradient leaves ~no exact zeros


def test_ranking_change():
    s = {"a": torch.tensor([1.0, 2.0, 3.0, 4.0]), "b": torch.tensor([4.0, 1.0])}
    same = ranking_change(s, s, {k: v > 1.5 for k, v in s.items()}, {k: v > 1.5 for k, v in s.items()})
    assert same == {"kendall_tau": 1.0, "kept_overlap": 1.0}
    flipped = {k: -v for k, v in s.items()}
    kept_before = {"a": torch.tensor([False, False, True, True]), "b": torch.tensor([True, False])}
    kept_after = {"a": torch.tensor([True, True, False, False]), "b": torch.tensor([True, True])}
    out = ranking_change(s, flipped, kept_before, kept_after)
    assert out["kendall_tau"] == -1.0 and out["kept_overlap"] == 0.25
