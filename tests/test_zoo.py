"""The zoo on a small representative set: timm models, layers rebuilt by resizing, the sweep's verdicts.

The full sweep is a command (`python -m compress.zoo`, results in docs/zoo.md); here a channel-shuffle
network and a timm transformer go through the same three child processes (prune → eval in a new
process → ONNX export with parity), a model that cannot take the input size must come back as a clean
refusal, and a memory hog must be killed by the sweep's cap.
"""

from __future__ import annotations

import copy
import json
import sys

import pytest
import torch

from compress.errors import CompressError
from compress.models import create_model, list_models
from compress.pruning import apply_layer_spec, find_groups, layer_spec, slim
from compress.zoo import Entry, SweepConfig, doc, run_entry, sweep
from compress.zoo.proc import run_measured


def test_timm_models_are_listed_and_built_at_the_requested_size():
    assert "timm:resnet18" in list_models() and "timm:vit_tiny_patch16_224" in list_models()
    net = create_model("timm:vit_tiny_patch16_224", 7, 32).eval()        # fixed-size model: built for 32 px
    assert net(torch.rand(2, 3, 32, 32)).shape == (2, 7)
    with pytest.raises(CompressError, match="unknown model 'timm:no_such_net'"):
        create_model("timm:no_such_net", 10, 32)


def test_timm_weights_come_only_from_the_local_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(CompressError, match="not cached on this machine .* nothing is downloaded"):
        create_model("timm:resnet18", 10, 32, weights="pretrained")
    with pytest.raises(CompressError, match="--weights for timm models is 'pretrained'"):
        create_model("timm:resnet18", 10, 32, weights="IMAGENET1K_V1")


def test_a_model_that_cannot_take_the_size_is_refused_in_one_line():
    with pytest.raises(CompressError, match=r"^inception_v3 does not run on 32 px inputs \(.*Kernel size"):
        create_model("inception_v3", 10, 32)


def test_timm_layers_rebuild_by_resizing():
    """timm's BatchNormAct2d and friends are not torch's types: model.json records how they were resized."""
    torch.manual_seed(0)
    net = create_model("timm:mobilenetv3_small_100", 10, 32).eval()
    x = torch.rand(2, 3, 32, 32)
    groups = find_groups(net, x[:1])
    gen = torch.Generator().manual_seed(0)
    slim(net, groups, {g.id: torch.rand(g.width, generator=gen) < 0.6 for g in groups
                       if g.width > 1} | {g.id: torch.ones(g.width, dtype=torch.bool) for g in groups if g.width == 1})
    spec = layer_spec(net, create_model("timm:mobilenetv3_small_100", 10, 32))
    assert any(entry["type"] == "Resized" and entry["class"] == "BatchNormAct2d" for entry in spec.values())
    rebuilt = apply_layer_spec(create_model("timm:mobilenetv3_small_100", 10, 32), copy.deepcopy(spec))
    rebuilt.load_state_dict(net.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.allclose(rebuilt.eval()(x), net(x), atol=1e-6)


# Fine-tuning after slimming is tested elsewhere; here the three processes are.
SMALL_SWEEP = SweepConfig(data="synthetic:40", finetune_epochs=0, batch_size=16, timeout_s=900)


@pytest.mark.parametrize("model, method", [("shufflenet_v2_x0_5", "l1"), ("timm:deit_tiny_patch16_224", "depgraph")])
def test_prune_reload_export_in_fresh_processes(tmp_path, model, method):
    record = run_entry(Entry(model, 32, method), SMALL_SWEEP, tmp_path)
    assert record["status"] == "works", record
    prune = record["prune"]
    assert prune["groups_pruned"] >= 1 and abs(prune["flops_ratio"] - 0.5) <= 0.05 and prune["params_ratio"] < 1
    assert record["export"]["passed"] and record["export"]["max_rel"] <= 1e-4
    assert 0 < prune["peak_rss_gb"] < 4
    assert not any(tmp_path.iterdir()), "the sweep leaves nothing behind without --keep"


def test_a_refusal_is_recorded_with_its_reason_and_a_stopped_sweep_says_what_it_did_not_reach(tmp_path):
    results, command = tmp_path / "zoo.json", "python -m compress.zoo --models inception_v3"
    entries = [Entry("inception_v3", 32, "l1"), Entry("inception_v3", 32, "depgraph")]

    def stop(record, i, n):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sweep(entries, SMALL_SWEEP, results, tmp_path / "work", command=command, on_record=stop)
    saved = json.loads(results.read_text())
    [record] = saved["records"]
    assert record["status"] == "refused" and record["stage"] == "prune"
    assert record["reason"].startswith("inception_v3 does not run on 32 px inputs")
    assert not record["prune"]["traceback"]
    assert saved["commands"] == [command] and saved["planned"] == [e.key for e in entries]
    text = doc.render(saved)
    assert f"`{command}`" in text and "Not run (1 of 2 planned entries" in text
    assert "`inception_v3@32/depgraph`" in text


def test_the_sweep_kills_a_step_above_its_memory_cap():
    hog = "import time\nx = []\nfor _ in range(4000):\n    x.append(b'1' * 2**20)\n    time.sleep(0.005)"
    outcome = run_measured([sys.executable, "-c", hog], max_rss_gb=0.3, timeout_s=60)
    assert outcome.killed and "resident memory reached" in outcome.error_line() and outcome.rc != 0
    assert outcome.peak_rss_gb < 1.0          # ~200 MB/s against a poll every 0.1 s: killed long before 4 GB
