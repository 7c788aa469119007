"""PASS: hypernetwork masks, gradients, FLOPs penalty, prompt dependence, frozen backbone, reuse."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from compress.data import load_data
from compress.deploy import DeployableModule
from compress.errors import CompressError
from compress.loop import frozen
from compress.methods.hypernet import HypernetConfig, MaskHypernet, check_compatible, group_signature, prompt_tensor
from compress.methods.pass_ import (
    PassOptions,
    new_hypernet,
    resource_penalty,
    reuse_hypernet,
    search,
    temperature,
)
from compress.methods.pass_stats import backbone_fingerprint, group_statistics
from compress.models import create_model
from compress.prompt import make_prompt
from compress.pruning.flops_model import FlopsModel
from compress.pruning.gates import Gates
from compress.pruning.groups import find_groups


def toy_net(widths=(8, 16, 12)) -> nn.Module:
    torch.manual_seed(0)
    a, b, c = widths
    return nn.Sequential(
        nn.Conv2d(3, a, 3, padding=1, bias=False), nn.BatchNorm2d(a), nn.ReLU(),
        nn.Conv2d(a, b, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(b), nn.ReLU(),
        nn.Conv2d(b, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10))


@pytest.fixture()
def toy():
    net = toy_net()
    groups = find_groups(net, torch.rand(1, 3, 16, 16))
    module = DeployableModule(net, [0.5] * 3, [0.25] * 3, prompt=make_prompt("pad", 16, 2), input_size=(3, 16, 16))
    return module, groups


def hypernet_for(groups, use_prompt=True, init_keep=0.5, hidden=16) -> MaskHypernet:
    torch.manual_seed(1)
    return MaskHypernet(HypernetConfig(groups=group_signature(groups), hidden=hidden, use_prompt=use_prompt),
                        init_keep=init_keep)


def test_masks_have_one_binary_entry_per_group_unit(toy):
    module, groups = toy
    stats = group_statistics(module.net, groups)
    out = hypernet_for(groups)(prompt_tensor(module.prompt), stats, tau=0.5, noise=True)
    assert [m.shape for m in out.masks] == [(g.width,) for g in groups]
    assert [lg.shape for lg in out.logits] == [(g.width,) for g in groups]
    for m in out.masks:
        assert set(m.detach().unique().tolist()) <= {0.0, 1.0}
    assert stats.stats.shape == (len(groups), stats.stats.shape[1]) and torch.isfinite(stats.stats).all()


def test_gradients_reach_prompt_encoder_and_lstm(toy):
    module, groups = toy
    with torch.no_grad():
        module.prompt.delta.uniform_(-0.2, 0.2)    # a zero prompt gives the first conv's weights no gradient
    hyper = hypernet_for(groups)
    stats = group_statistics(module.net, groups)
    x, y = torch.rand(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    with frozen(module, "running"), Gates(module.net, groups) as gates:
        sample = hyper(prompt_tensor(module.prompt), stats, tau=1.0, noise=True)
        gates.set(dict(zip(stats.ids, sample.masks, strict=True)))
        ratio = FlopsModel.for_groups(groups).ratio_of_fractions(sample.fractions())
        loss = nn.functional.cross_entropy(module(x), y) + resource_penalty(ratio, 0.3)
        loss.backward()
    named = dict(hyper.named_parameters())
    for name in ("encoder.convs.0.weight", "encoder.convs.2.weight", "encoder.convs.4.weight", "encoder.out.weight",
                 "lstm.weight_ih", "lstm.weight_hh", "mask_embed.weight", "heads.0.weight", "channel_gain.weight"):
        assert named[name].grad is not None and named[name].grad.abs().sum() > 0, name
    assert module.prompt.delta.grad is not None and module.prompt.delta.grad.abs().sum() > 0
    assert all(p.grad is None for p in module.net.parameters())


def test_resource_penalty_pulls_sampled_flops_to_target(toy):
    module, groups = toy
    flops = FlopsModel.for_groups(groups)
    stats = group_statistics(module.net, groups)
    hyper = hypernet_for(groups, init_keep=0.95)
    opt = torch.optim.Adam(hyper.parameters(), lr=0.02)
    g = torch.Generator().manual_seed(0)
    target = 0.3

    def sampled_ratio() -> float:
        with torch.no_grad():
            return sum(float(flops.ratio_of_fractions(hyper(None, stats, 0.5, True, g).fractions()))
                       for _ in range(8)) / 8

    before = sampled_ratio()
    for _ in range(60):
        ratio = flops.ratio_of_fractions(hyper(prompt_tensor(module.prompt), stats, 0.5, True, g).fractions())
        opt.zero_grad()
        resource_penalty(ratio, target).backward()
        opt.step()
    after = sampled_ratio()
    assert before > 0.7
    assert abs(after - target) < 0.1 < abs(before - target)


def test_logits_depend_on_the_prompt_and_not_without_one(toy):
    module, groups = toy
    stats = group_statistics(module.net, groups)
    hyper = hypernet_for(groups).eval()
    a = hyper.scores(prompt_tensor(module.prompt), stats)
    with torch.no_grad():
        module.prompt.delta.add_(0.5)
    b = hyper.scores(prompt_tensor(module.prompt), stats)
    assert any(not torch.allclose(a[k], b[k]) for k in a)
    plain = hypernet_for(groups, use_prompt=False).eval()
    assert plain.encoder is None
    s1, s2 = plain.scores(None, stats), plain.scores(prompt_tensor(module.prompt), stats)
    assert all(torch.equal(s1[k], s2[k]) for k in s1)


def test_temperature_anneals_from_start_to_end():
    assert temperature(0, 10, 1.0, 0.1) == pytest.approx(1.0)
    assert temperature(9, 10, 1.0, 0.1) == pytest.approx(0.1)
    assert temperature(4, 10, 1.0, 0.1) == pytest.approx(0.1 ** (4 / 9))
    assert resource_penalty(torch.tensor(0.6), 0.3) == pytest.approx(math.log(2))


def test_search_leaves_backbone_bitwise_unchanged_and_trains_prompt(toy):
    module, groups = toy
    data = load_data("synthetic:60", image_size=16)
    before = {k: v.clone() for k, v in module.net.state_dict().items()}
    prompt_before = module.prompt.delta.detach().clone()
    result = search(module, data, groups, 0.4, PassOptions(search_epochs=2, batch_size=16, hidden=16), seed=0)
    after = module.net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)      # BN running stats included
    assert all(p.requires_grad for p in module.net.parameters())       # unfrozen again for fine-tuning
    assert not torch.equal(prompt_before, module.prompt.delta.detach())
    assert set(result.scores) == {g.id for g in groups}
    assert [result.scores[g.id].shape for g in groups] == [(g.width,) for g in groups]
    assert len(result.history) == 2 and len(result.epoch_times_s) == 2
    assert set(result.extras()["hypernet.pt"]) == set(result.hypernet.state_dict())


def test_reuse_on_another_backbone_forgets_only_unit_identity(toy):
    module, groups = toy
    stats = group_statistics(module.net, groups)
    same = backbone_fingerprint(stats)
    with torch.no_grad():
        module.net[0].weight.mul_(1.5)
        module.net[4].weight.add_(0.1)                           # BN scales of the second group
    other = backbone_fingerprint(group_statistics(module.net, groups))
    assert other != same
    hyper = new_hypernet(groups, True, 0.5, PassOptions(hidden=16), backbone=same)
    with torch.no_grad():
        for p in hyper.parameters():
            p.normal_()
    before = {k: v.clone() for k, v in hyper.state_dict().items()}
    assert reuse_hypernet(hyper, same) == "all"
    assert all(torch.equal(before[k], v) for k, v in hyper.state_dict().items())
    assert reuse_hypernet(hyper, other) == "index-free" and hyper.config.backbone == other
    for k, v in hyper.state_dict().items():
        if k.startswith("heads."):
            assert torch.allclose(v, before[k].mean(0, keepdim=True).expand_as(v)), k
        else:
            assert torch.equal(before[k], v), k


def test_saved_hypernet_must_match_groups_and_prompt(toy):
    module, groups = toy
    hyper = new_hypernet(groups, True, 0.5, PassOptions(hidden=16))
    config = HypernetConfig.from_dict(hyper.config.to_dict())
    check_compatible(config, groups, True, "src")
    with pytest.raises(CompressError, match="trained with a prompt"):
        check_compatible(config, groups, False, "src")
    other = find_groups(toy_net((8, 16, 10)), torch.rand(1, 3, 16, 16))
    with pytest.raises(CompressError, match="does not fit"):
        check_compatible(config, other, True, "src")


def test_step_statistics_read_the_producers_weights_over_its_kept_channels_only(toy):
    """M(i−1) ⊗ W(i): group 1 (conv2's outputs) is produced from group 0's channels; with group 0 masked,
    each unit's L2 norm counts conv2's filter over the kept input channels only (plus its consumer columns)."""
    module, groups = toy
    net = module.net
    stats = group_statistics(net, groups)
    assert stats.producers(0) == [] and stats.producers(1) == [(0, 1.0)] and stats.producers(2) == [(1, 1.0)]
    keep = torch.tensor([1.0, 0, 1, 1, 0, 0, 1, 0], requires_grad=True)
    step = stats.step(1, [keep])
    w2, w3 = net[3].weight.detach(), net[6].weight.detach()
    sq = w2[:, keep.detach().bool()].pow(2).sum((1, 2, 3)) + w3.pow(2).sum((0, 2, 3))
    l2 = sq.sqrt()
    assert torch.allclose(step.share, l2 / l2.sum(), atol=1e-6)
    everything = stats.step(1, [torch.ones(8)])
    assert torch.allclose(everything.row, stats.stats[1]) and not torch.allclose(step.row, everything.row)
    step.row.sum().backward()
    assert keep.grad is not None and keep.grad.abs().sum() > 0             # the producer's mask gets gradient


def test_resnet_steps_read_their_real_producer_not_the_previous_group():
    net = create_model("resnet20", 10, 16)
    groups = find_groups(net, torch.rand(1, 3, 16, 16))
    stats = group_statistics(net, groups)
    ids = [g.id for g in groups]
    for i, gid in enumerate(ids):
        if gid.startswith("layer1.") and gid.endswith("conv1"):   # every stage-1 block reads the stem's stream
            assert [ids[p] for p, _ in stats.producers(i)] == ["conv1"], gid
    assert ids[2] == "layer1.1.conv1" and ids[1] == "layer1.0.conv1"


def test_saved_hypernet_of_the_list_order_version_is_refused(toy):
    module, groups = toy
    old = new_hypernet(groups, True, 0.5, PassOptions(hidden=16)).config.to_dict()
    del old["version"]
    with pytest.raises(CompressError, match="version 1 reads other step inputs"):
        check_compatible(HypernetConfig.from_dict(old), groups, True, "src")


# ---------------------------------------------------------------- through `compress prune`


def _prune(*args: str):
    from click.testing import CliRunner

    from cli import main

    return CliRunner().invoke(main, ["prune", *args])


@pytest.fixture(scope="module")
def pass_run(digits_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("pass") / "p"
    res = _prune("--from", str(digits_run), "--data", "digits", "--method", "pass", "--flops-ratio", "0.4",
                 "--hypernet-epochs", "1", "--finetune-epochs", "0", "--subset", "200", "--out", str(out))
    assert res.exit_code == 0, res.output
    return out


def test_prune_pass_hits_the_ratio_and_saves_prompt_and_hypernetwork(pass_run):
    import json

    from compress.runs import load, load_state

    report = json.loads((pass_run / "report.json").read_text())
    assert report["method"] == "pass" and abs(report["flops_ratio"] - 0.4) <= 0.02
    stage = report["search"]["hypernet_search"]
    assert stage["epochs"] == 1 and stage["epoch_time_s"] > 0 and "hypernet_search" in report["stages_s"]
    config = HypernetConfig.from_dict(report["method_report"]["hypernet"])
    hyper = MaskHypernet(config)
    hyper.load_state_dict(load_state(pass_run / "hypernet.pt"), strict=True)
    module = load(pass_run)
    assert module.spec["prompt"]["kind"] == "pad" and module.prompt.delta.abs().sum() > 0
    overlap = report["mask_overlap"]          # final masks vs the masks of the untrained hypernetwork
    assert 0 < overlap["jaccard_kept"] <= 1 and 0 < overlap["jaccard_removed"] <= 1 and overlap["units_changed"] >= 0


def test_hypernetwork_at_initialisation_is_a_control(digits_run, tmp_path):
    """--hypernet-epochs 0 without --hypernet-from: the untrained hypernetwork decides the masks."""
    import json

    res = _prune("--from", str(digits_run), "--data", "digits", "--method", "pass", "--flops-ratio", "0.4",
                 "--hypernet-epochs", "0", "--finetune-epochs", "0", "--subset", "100", "--out", str(tmp_path / "c"))
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "c" / "report.json").read_text())
    assert report["search"]["hypernet_search"]["history"] == [] and abs(report["flops_ratio"] - 0.4) <= 0.02
    assert report["mask_overlap"] == {"jaccard_kept": 1.0, "jaccard_removed": 1.0, "units_changed": 0}


def test_hypernet_from_reuses_a_pass_run_and_refuses_what_does_not_fit(pass_run, digits_run, tmp_path):
    import json

    common = ["--data", "digits", "--method", "pass", "--flops-ratio", "0.5", "--finetune-epochs", "0",
              "--subset", "100", "--from", str(digits_run)]
    res = _prune(*common, "--hypernet-from", str(pass_run), "--hypernet-epochs", "0", "--out", str(tmp_path / "t"))
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "t" / "report.json").read_text())
    assert report["method_report"]["hypernet_from"] == str(pass_run) and abs(report["flops_ratio"] - 0.5) <= 0.02
    assert report["method_report"]["hypernet_reuse"] == "all"      # the same dense parent: every weight applies
    for extra, message in ((["--hypernet-from", str(digits_run)], "no hypernet.pt"),
                           (["--hypernet-from", str(pass_run), "--prompt", "none"], "trained with a prompt"),
                           (["--hypernet-from", str(tmp_path / "nowhere")], "not a directory"),
                           (["--hypernet-epochs", "-1"], "≥ 0")):
        res = _prune(*common, *extra, "--out", str(tmp_path / "bad"))
        assert res.exit_code == 2 and message in res.output, res.output
        assert not (tmp_path / "bad").exists()


def test_transfer_table_replaces_only_its_own_block(tmp_path):
    from compress.files import write_generated_block
    from compress.transfer import BEGIN, END, markdown

    result = {"config": {"source_data": "digits", "source_epochs": 2, "target_data": "fashion-mnist", "subset": 600,
                         "flops_ratio": 0.25, "finetune_epochs": 4, "seeds": [0, 1]},
              "source": {"search_s": 12.0},
              "summary": [{"arm": "scratch", "hypernet_epochs_target": 2, "accuracy": 0.8, "accuracy_std": 0.01,
                           "flops_ratio": 0.25, "search_s": 30.0},
                          {"arm": "transfer", "hypernet_epochs_target": 2, "accuracy": 0.81, "accuracy_std": 0.02,
                           "flops_ratio": 0.25, "search_s": 31.0}]}
    doc = tmp_path / "pass.md"
    doc.write_text(f"# PASS\n\nOur analysis.\n\n{BEGIN}\nold table\n{END}\n\nMore text.\n")
    write_generated_block(doc, BEGIN, END, markdown(result))
    text = doc.read_text()
    assert "Our analysis." in text and "More text." in text and "old table" not in text
    assert "| transfer | 2 + 2 | 0.8100 ± 0.0200 | 0.250 | 31 |" in text
    assert "| scratch | 0 + 2 | 0.8000 ± 0.0100 | 0.250 | 30 |" in text
