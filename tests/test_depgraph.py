"""DepGraph's progressive pruning (--iterative-steps): linear FLOPs targets, re-scoring with removed units cut out."""

from __future__ import annotations

import torch

from compress.deploy import DeployableModule
from compress.methods.base import PruneContext
from compress.methods.depgraph import DepGraph, progressive_scores
from compress.models import create_model
from compress.pruning import find_groups, group_l2_scores
from compress.runs import Stopwatch


def _ctx(ratio: float = 0.4) -> PruneContext:
    torch.manual_seed(0)
    module = DeployableModule(create_model("resnet20", 10, 16), [0.5] * 3, [0.25] * 3, input_size=(3, 16, 16))
    groups = find_groups(module.net, module.normalize(module.example_input(1)))
    return PruneContext(module=module, data=None, groups=groups, cost_model=groups[0].graph.flops_model,
                        ratio=ratio, scope="global", round_to=1, seed=0, lr=0.01, batch_size=32,
                        stopwatch=Stopwatch())


def test_one_step_is_one_shot_ranking():
    ctx = _ctx()
    scores, record = progressive_scores(ctx, 1)
    assert record == []
    assert all(torch.equal(scores[g], s) for g, s in group_l2_scores(ctx.groups).items())


def test_progressive_steps_keep_what_they_removed_and_rescore_the_rest():
    ctx = _ctx(0.4)
    before = {k: v.clone() for k, v in ctx.module.state_dict().items()}
    scores, record = progressive_scores(ctx, 3)
    assert all(torch.equal(before[k], v) for k, v in ctx.module.state_dict().items())     # weights restored
    assert [r["flops_ratio_target"] for r in record] == [0.8, 0.6]
    assert all(abs(r["flops_ratio_estimate"] - r["flops_ratio_target"]) < 0.02 for r in record)
    assert 0 < record[0]["units_removed"] < record[1]["units_removed"]
    final = ctx.select_masks(scores)
    gone = {g: s == 0 for g, s in scores.items()}                  # removed by step 2: their weights are cut out
    assert sum(int(z.sum()) for z in gone.values()) == record[1]["units_removed"]
    assert all(not bool((final[g] & gone[g]).any()) for g in final)               # … and stay removed
    one_shot = ctx.select_masks(group_l2_scores(ctx.groups))
    assert any(not torch.equal(final[g], one_shot[g]) for g in final)             # re-scoring changed the choice


def test_depgraph_records_its_steps_and_the_one_shot_masks():
    ctx = _ctx(0.4)
    result = DepGraph(iterative_steps=3).search(ctx)
    assert len(result.stages["iterative"]["per_step"]) == 2
    one_shot = ctx.select_masks(group_l2_scores(ctx.groups))
    assert all(torch.equal(result.initial_masks[g], one_shot[g]) for g in one_shot)
