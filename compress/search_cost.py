"""Cost of one search epoch: PASS's hypernetwork vs VPNs' mask search vs a plain frozen-backbone epoch.

The three run on the same dense model, data and batch size, interleaved round by round, each timed
in CPU seconds of this process with one torch thread: on a shared machine wall time measures the
neighbours, CPU time the work. Every method's own setup (group statistics, score initialisation,
the final mask selection) is inside its timed call, as it is inside a real search; evaluation is
not (the validation split is cut to one image). The issue's budget: PASS ≤ 1.5 × VPNs.

    python -m compress.search_cost --from runs/study/dense --data fashion-mnist --subset 2000 --rounds 3
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

import click
import torch
from torch import nn

from compress.batches import iterate_batches
from compress.data import load_data
from compress.files import write_atomic
from compress.methods.base import PruneContext, get_method
from compress.pruning.groups import find_groups
from compress.runs import Stopwatch, load


def _context(module: nn.Module, data, ratio: float, batch_size: int) -> PruneContext:
    groups = find_groups(module.net, module.normalize(module.example_input(1)))
    return PruneContext(module=module, data=data, groups=groups, cost_model=groups[0].graph.flops_model,
                        ratio=ratio, scope="global", round_to=1, seed=0, lr=0.01, batch_size=batch_size,
                        stopwatch=Stopwatch())


def plain_epoch(module: nn.Module, data, batch_size: int) -> None:
    """Forward + backward of the frozen backbone (batch-statistics BN), gradient to the input only: the
    floor under any frozen-backbone search."""
    for p in module.parameters():
        p.requires_grad_(False)
    module.train()
    criterion = nn.CrossEntropyLoss()
    for x, y in iterate_batches(data.train, batch_size, shuffle=True, seed=0, augment=True):
        x.requires_grad_(True)
        criterion(module(x), y).backward()


def measure(source: str, data_spec: str, subset: int, ratio: float, rounds: int, batch_size: int) -> dict[str, Any]:
    torch.set_num_threads(1)
    dense = load(source)
    data = load_data(data_spec, image_size=dense.input_size[1], subset=subset, seed=0)
    data = dataclasses.replace(data, val=data.val.subset(torch.arange(1)))
    pass_cls, vpns_cls = get_method("pass"), get_method("vpns")
    runs = {
        "pass": lambda ctx: pass_cls(hypernet_epochs=1).search(ctx),
        "vpns": lambda ctx: vpns_cls(warmup_epochs=0, score_epochs=1).search(ctx),
        "plain": lambda ctx: plain_epoch(ctx.module, data, batch_size),
    }
    cpu: dict[str, list[float]] = {k: [] for k in runs}
    for r in range(rounds + 1):            # round 0 warms kernels and allocator up and is not counted
        for name, fn in runs.items():
            ctx = _context(copy.deepcopy(dense), data, ratio, batch_size)
            start = time.process_time()
            fn(ctx)
            took = time.process_time() - start
            if r:
                cpu[name].append(took)
            click.echo(f"round {r}/{rounds}{' (warm-up)' if not r else ''}  {name:5s}  {took:.2f} CPU s", err=True)
    med = {k: statistics.median(v) for k, v in cpu.items()}
    return {"source": source, "data": data_spec, "subset": subset, "train_images": len(data.train),
            "steps_per_epoch": math.ceil(len(data.train) / batch_size), "batch_size": batch_size,
            "flops_ratio": ratio, "rounds": rounds, "torch_threads": 1, "cpu_s": cpu, "median_cpu_s": med,
            "pass_over_vpns": round(med["pass"] / med["vpns"], 3),
            "pass_over_plain": round(med["pass"] / med["plain"], 3),
            "vpns_over_plain": round(med["vpns"] / med["plain"], 3)}


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--from", "source", required=True, type=click.Path(exists=True), help="dense run directory")
@click.option("--data", "data_spec", required=True, help="data spec of the run")
@click.option("--subset", default=2000, show_default=True, help="training images per epoch")
@click.option("--flops-ratio", "ratio", default=0.25, show_default=True)
@click.option("--rounds", default=3, show_default=True, help="interleaved rounds (median reported)")
@click.option("--batch-size", default=128, show_default=True)
@click.option("--json", "json_path", type=click.Path(), help="write the figures here")
def main(source: str, data_spec: str, subset: int, ratio: float, rounds: int, batch_size: int,
         json_path: str | None) -> None:
    """Per-epoch search cost of PASS vs VPNs vs a plain frozen-backbone epoch (CPU seconds, 1 thread)."""
    result = measure(source, data_spec, subset, ratio, rounds, batch_size)
    if json_path:
        write_atomic(Path(json_path), (json.dumps(result, indent=1) + "\n").encode())
    med = result["median_cpu_s"]
    click.echo(f"one search epoch ({result['steps_per_epoch']} steps of {batch_size}), median CPU s over {rounds} "
               f"rounds: pass {med['pass']:.2f}  vpns {med['vpns']:.2f}  plain {med['plain']:.2f}  →  "
               f"pass/vpns {result['pass_over_vpns']:.2f}  pass/plain {result['pass_over_plain']:.2f}")


if __name__ == "__main__":
    main()
