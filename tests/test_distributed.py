"""Real torch.distributed: two gloo processes on the CPU, launched by torchrun, writing one run directory."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from compress.runtime import Runtime

TORCHRUN = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))


def _torchrun(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [TORCHRUN, "--nproc_per_node", "2", "--master_port", str(_free_port()), "-m", "compress", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env, timeout=600)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_trains_and_prunes_with_identical_masks_on_both_ranks(tmp_path):
    proc = _torchrun("train", "--model", "resnet20", "--data", "digits", "--epochs", "1", "--image-size", "16",
                     "--subset", "256", "--batch-size", "64", "--device", "cpu", "--out", "d", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    dense = json.loads((tmp_path / "d" / "report.json").read_text())
    assert dense["world_size"] == 2 and dense["device"] == "cpu"
    assert proc.stdout.count("accuracy (val)") == 1                      # one table: rank 0 prints
    for method, extra in (("pass", ["--hypernet-epochs", "1"]), ("vpns", ["--warmup-epochs", "1"]),
                          ("depgraph", ["--sparse-train-epochs", "1"]), ("dessilbi", ["--lbi-epochs", "1"])):
        proc = _torchrun("prune", "--from", "d", "--data", "digits", "--method", method, "--flops-ratio", "0.5",
                         "--round-to", "1", "--finetune-epochs", "1", "--subset", "256", "--batch-size", "64",
                         "--device", "cpu", "--out", method, *extra, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-2000:]
        report = json.loads((tmp_path / method / "report.json").read_text())
        assert report["world_size"] == 2 and abs(report["flops_ratio"] - 0.5) <= 0.02
        digests = report["mask_digests"]
        assert len(digests) == 2 and digests[0] == digests[1]           # every rank held the same masks
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []                                              # no temporary or partial directories


def _mismatch_worker(rank: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    rt = Runtime(rank=rank, world_size=2)
    try:
        same = rt.assert_same("masks", {"g": torch.tensor([True, False])})
        try:
            rt.assert_same("masks", {"g": torch.tensor([True, bool(rank)])})
            results.put((rank, same, "no error"))
        except RuntimeError as exc:
            results.put((rank, same, str(exc)))
        total = rt.all_reduce_sum([1.0, float(rank)])
        results.put((rank, total, rt.broadcast_object({"from": rank})))
    finally:
        dist.destroy_process_group()


def test_assert_same_catches_ranks_that_disagree():
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_mismatch_worker, args=(r, port, results)) for r in range(2)]
    for p in procs:
        p.start()
    got = [results.get(timeout=120) for _ in range(4)]
    for p in procs:
        p.join(timeout=60)
    checks = sorted(g for g in got if isinstance(g[1], list) and isinstance(g[1][0], str))
    sums = sorted(g for g in got if not (isinstance(g[1], list) and isinstance(g[1][0], str)))
    assert [c[0] for c in checks] == [0, 1]
    assert all(c[1][0] == c[1][1] and "ranks disagree on masks" in c[2] for c in checks)
    assert all(s[1] == [2.0, 1.0] and s[2] == {"from": 0} for s in sums)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs for NCCL")
def test_torchrun_on_two_gpus_with_nccl(tmp_path):
    proc = _torchrun("train", "--model", "resnet20", "--data", "digits", "--epochs", "1", "--device", "cuda",
                     "--precision", "bf16", "--out", "g", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((tmp_path / "g" / "report.json").read_text())["world_size"] == 2
