"""The shared training loop: batches per rank, streaming image folders, checkpoints, runtime flags, devices."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from compress.batches import batches, epoch_plan, iterate_batches, shard_indices
from compress.checkpoint import Checkpoint, partial_dir
from compress.data import load_data
from compress.errors import CompressError
from compress.loop import Fit, Optim, Stage, StepOut, run_stage
from compress.runtime import Runtime, configure, current, using

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)")


def test_ranks_together_see_exactly_the_single_process_batches():
    """Each rank takes one slice of every global batch, augmentation included: the union is the one-process epoch."""
    data = load_data("digits", image_size=16, subset=200)
    whole = list(batches(data.train, 64, shuffle=True, seed=7, augment=True, rt=Runtime()))
    parts = [list(batches(data.train, 64, shuffle=True, seed=7, augment=True, rt=Runtime(rank=r, world_size=3)))
             for r in range(3)]
    assert all(len(p) == len(whole) for p in parts)
    for step, (x, y) in enumerate(whole):
        assert torch.equal(torch.cat([p[step][0] for p in parts]), x)
        assert torch.equal(torch.cat([p[step][1] for p in parts]), y)


def test_unsharded_batches_are_the_same_on_every_rank_and_limited():
    data = load_data("digits", image_size=16, subset=200)
    a = list(batches(data.train, 32, shuffle=True, seed=1, rt=Runtime(rank=0, world_size=2), shard=False, limit=70))
    b = list(batches(data.train, 32, shuffle=True, seed=1, rt=Runtime(rank=1, world_size=2), shard=False, limit=70))
    assert len(a) == 3 and all(torch.equal(u[0], v[0]) for u, v in zip(a, b, strict=True))


def test_evaluation_shards_cover_every_index_once():
    got = torch.cat([shard_indices(103, Runtime(rank=r, world_size=4)) for r in range(4)])
    assert torch.equal(got, torch.arange(103))


def test_image_folder_streams_through_workers_with_the_same_batches(imagefolder_dir):
    data = load_data(f"imagefolder:{imagefolder_dir}", image_size=24)
    direct = list(batches(data.train, 4, shuffle=True, seed=3, augment=True, rt=Runtime(workers=0)))
    streamed = list(batches(data.train, 4, shuffle=True, seed=3, augment=True, rt=Runtime(workers=2)))
    again = list(batches(data.train, 4, shuffle=True, seed=3, augment=True, rt=Runtime(workers=2)))  # workers persist
    assert len(direct) == len(streamed) == 5
    for (x0, y0), (x1, y1), (x2, _) in zip(direct, streamed, again, strict=True):
        assert torch.equal(x0, x1) and torch.equal(y0, y1) and torch.equal(x1, x2)


def test_iterate_batches_is_the_one_process_cpu_epoch():
    data = load_data("digits", image_size=16, subset=100)
    order, _ = epoch_plan(len(data.train), 32, shuffle=True, seed=5)
    x, y = next(iterate_batches(data.train, 32, shuffle=True, seed=5))
    assert torch.equal(y, data.train.labels[order[0]]) and x.shape == (32, 3, 16, 16)


class _Counting(Stage):
    """Two optimisers (one constant, one cosine) and an after-step hook, to see the loop drive them."""

    name = "counting"
    epochs = 2
    evaluate = False

    def __init__(self):
        self.extra = nn.Linear(1, 1)
        self.steps = []

    def modules(self):
        return [self.extra]

    def optimizers(self, module):
        return [Optim(list(module.parameters()), "sgd", 0.1),
                Optim(list(self.extra.parameters()), "adam", 0.01, schedule="constant", clip=1.0)]

    def forward(self, module, x, y, step):
        logits = module(x) + self.extra(torch.ones(1, 1, device=x.device))
        return StepOut(nn.functional.cross_entropy(logits, y), logits, {"k": 1.0})

    def after_step(self, module, step):
        self.steps.append((step.epoch, step.step, step.total))


def _tiny():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10))


def test_run_stage_drives_optimisers_schedules_and_hooks():
    data = load_data("digits", image_size=8, subset=100)
    stage = _Counting()
    model = _tiny()
    record = run_stage(model, data, stage, batch_size=40, seed=0)
    assert stage.steps == [(0, 0, 6), (0, 1, 6), (0, 2, 6), (1, 3, 6), (1, 4, 6), (1, 5, 6)]
    assert [r["epoch"] for r in record.history] == [1, 2] and all(r["k"] == 1.0 for r in record.history)
    assert all("val_acc" not in r and r["time_s"] >= 0 for r in record.history)
    assert not model.training


def test_a_two_pass_stage_steps_twice_per_batch_on_the_same_batch():
    data = load_data("digits", image_size=8, subset=100)
    stage = _Counting()
    stage.passes, stage.epochs = 2, 1
    seen = []
    forward = stage.forward
    stage.forward = lambda module, x, y, step: seen.append((step.pass_index, x.sum().item())) or forward(
        module, x, y, step)
    run_stage(_tiny(), data, stage, batch_size=40, seed=0)
    assert stage.steps == [(0, s, 6) for s in range(6)]                     # 3 batches × 2 optimiser steps
    assert [p for p, _ in seen] == [0, 1] * 3
    assert all(seen[i][1] == seen[i + 1][1] for i in range(0, 6, 2))         # both passes see one batch


def test_a_finished_stage_is_restored_from_its_checkpoint_without_training(tmp_path):
    data = load_data("digits", image_size=8, subset=100)
    ckpt = Checkpoint(tmp_path / "out", {"k": 1})
    trained = _tiny()
    first = run_stage(trained, data, Fit("fit", 2, 0.1), batch_size=32, seed=0, checkpoint=ckpt)
    again = Checkpoint(tmp_path / "out", {"k": 1}, resume=True)
    fresh = _tiny()
    second = run_stage(fresh, data, Fit("fit", 2, 0.1), batch_size=32, seed=0, checkpoint=again)
    assert second.history == first.history
    assert all(torch.equal(a, b) for a, b in zip(trained.state_dict().values(), fresh.state_dict().values(),
                                                  strict=True))


def test_a_step_result_is_written_at_once_to_its_own_file_and_read_back_on_resume(tmp_path):
    ckpt = Checkpoint(tmp_path / "out", {"k": 1})
    weights = torch.arange(4.0)
    ckpt.save_result("search", {"w": weights})
    weights += 1                      # a live tensor changing later: the result is what it held when saved
    state = torch.load(partial_dir(tmp_path / "out") / "state.pt", weights_only=True)
    assert state["results"] == {"search": "result-search.pt"}                 # no copy in the state
    again = Checkpoint(tmp_path / "out", {"k": 1}, resume=True)
    assert torch.equal(again.result("search")["w"], torch.arange(4.0)) and again.result("other") is None


def test_checkpoint_refuses_other_settings_missing_and_corrupt_progress(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(CompressError, match="no progress to resume"):
        Checkpoint(out, {"epochs": 3}, resume=True)
    Checkpoint(out, {"epochs": 3}).save_result("x", 1)
    with pytest.raises(CompressError, match="made with epochs=3, this run asks for epochs=5"):
        Checkpoint(out, {"epochs": 5}, resume=True)
    assert Checkpoint(out, {"epochs": 5}, resume="auto").state["results"] == {}      # auto: starts over
    assert not partial_dir(out).exists()                                              # … and drops the old one
    partial_dir(out).mkdir()
    (partial_dir(out) / "state.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CompressError, match="not a readable checkpoint"):
        Checkpoint(out, {"epochs": 5}, resume=True)
    assert not out.exists()


@pytest.mark.parametrize("args,message", [
    (["--device", "tpu"], "--device must be auto, cpu, cuda or cuda:N"),
    (["--precision", "fp16", "--device", "cpu"], "--precision fp16 needs a CUDA device"),
    (["--workers", "-1"], "--workers must be ≥ 0"),
])
def test_bad_runtime_flags_are_one_line_errors(tmp_path, args, message):
    cmd = [sys.executable, "-m", "compress", "train", "--model", "resnet20", "--data", "digits", "--epochs", "1",
           "--out", str(tmp_path / "r"), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "r").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error a CPU-only machine gives")
def test_cuda_device_on_a_cpu_machine_is_refused():
    with pytest.raises(CompressError, match="no CUDA device is available"):
        configure(device="cuda")
    assert current().device.type == "cpu"


def test_bf16_autocast_trains_on_the_cpu(tmp_path):
    from compress.training import train_run

    with using(Runtime(precision="bf16")):
        report = train_run("resnet20", "digits", tmp_path / "b", epochs=1, image_size=8, subset=64, batch_size=32)
    assert report["precision"] == "bf16" and 0 <= report["accuracy"] <= 1


@CUDA
def test_train_on_cuda_in_bf16_writes_a_cpu_loadable_run(tmp_path):
    from compress.training import train_run

    with using(Runtime(device=torch.device("cuda"), precision="bf16", channels_last=True)):
        report = train_run("resnet20", "digits", tmp_path / "g", epochs=1, image_size=16, subset=256)
    state = torch.load(tmp_path / "g" / "model.pt", map_location=None, weights_only=True)
    assert report["device"].startswith("cuda") and all(v.device.type == "cpu" for v in state.values())


@CUDA
def test_prune_on_cuda_with_every_learned_method(tmp_path, digits_run):
    from compress.pipeline import prune_run

    with using(Runtime(device=torch.device("cuda"), precision="bf16")):
        for method in ("pass", "vpns", "depgraph"):
            report = prune_run(tmp_path / method, data="digits", method=method, flops_ratio=0.5, source=digits_run,
                               finetune_epochs=1, subset=256, round_to=1)
            assert abs(report["flops_ratio"] - 0.5) <= 0.02


@CUDA
def test_fp16_uses_a_grad_scaler():
    assert Runtime(device=torch.device("cuda"), precision="fp16").grad_scaler() is not None


def test_report_records_where_it_ran(digits_run):
    report = json.loads((digits_run / "report.json").read_text())
    assert report["device"] == "cpu" and report["precision"] == "fp32" and report["world_size"] == 1


@CUDA
def test_streamed_batches_land_on_the_gpu_identical_to_the_cpu_ones(imagefolder_dir):
    data = load_data(f"imagefolder:{imagefolder_dir}", image_size=24)
    cpu = list(batches(data.train, 4, shuffle=True, seed=3, augment=True, rt=Runtime(workers=0)))
    gpu = list(batches(data.train, 4, shuffle=True, seed=3, augment=True,
                       rt=Runtime(device=torch.device("cuda"), workers=2, channels_last=True)))
    assert all(x.device.type == "cuda" and x.is_contiguous(memory_format=torch.channels_last) for x, _ in gpu)
    assert all(torch.equal(a.cpu(), b) and torch.equal(ya.cpu(), yb) for (a, ya), (b, yb) in zip(gpu, cpu, strict=True))
