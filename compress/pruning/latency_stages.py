"""Per-stage corrections of latency tables, from whole networks with one stage slimmed.

A layer timed on its own is not the layer inside the network. On ONNX Runtime CPU at 2 threads,
ResNet-18 at 224 px (`compress latency-table --model resnet18 --image-size 224 --threads 2` prints
these), slimming the groups of one stage to a quarter of their width saved 4.06 ms at 56×56 px where
the tables predicted 4.14 ms, but 6.13 ms at 7×7 px where they predicted 3.13 ms. A single
calibration map fitted on uniformly slimmed networks cannot see such errors, since uniform slimming
moves every stage alike; a knapsack allocation is far from uniform, and it spent exactly where the
tables were wrong (it cut the early stages to their floor and kept the 7×7 stage whole, and the
network measured 9% slower than predicted).

So besides the uniform checks, bench/lut.py measures one network per stage (a stage: the layers of
one output resolution; `layer_stage`), with the groups produced in that stage at a quarter of their width.
`fit_stage_scales` solves, by least squares over those networks, one factor per stage that turns
the tables' predicted saving into the measured one (`LatencyTable.scales`, per layer); the uniform
calibration map is then fitted on the corrected tables.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch

from compress.pruning.allocation import AllowedCounts
from compress.pruning.latency_model import LatencyModel

STAGE_FRACTION = 0.25           # a stage network keeps this share of its groups' widths (a saving clear of noise)
SCALE_RANGE = (0.5, 2.0)        # a factor outside this says the measurement, not the table, is off
MIN_SAVING_SHARE = 0.01         # a stage whose predicted saving is below this share of dense is not corrected


def group_stages(model: LatencyModel) -> list[str | None]:
    """Per group, the stage its channels are produced in: the most common stage among the tabulated
    layers whose output width the group sets (None when no tabulated layer produces it)."""
    out = []
    for g in range(model.layers.a_out.shape[1]):
        producers = [model.stage[e] for e in torch.nonzero(model.layers.a_out[:, g]).flatten().tolist()]
        out.append(Counter(producers).most_common(1)[0][0] if producers else None)
    return out


def stage_allocations(model: LatencyModel, allowed: AllowedCounts) -> list[tuple[str, torch.Tensor]]:
    """(stage, kept units per group) for every stage: its groups at STAGE_FRACTION, the others dense."""
    stages = group_stages(model)
    narrow = allowed.round_up(torch.ceil(model.widths * STAGE_FRACTION - 1e-9))
    out = []
    for stage in dict.fromkeys(s for s in stages if s is not None):
        kept = model.widths.clone()
        members = torch.tensor([s == stage for s in stages])
        kept[members] = narrow[members]
        if bool((kept < model.widths).any()):
            out.append((stage, kept))
    return out


def fit_stage_scales(model: LatencyModel, measured: list[dict[str, Any]]) -> tuple[dict[str, float], list[dict]]:
    """Per layer, its stage's factor; and per stage network what was fitted (for reports).

    `measured`: [{"stage", "kept", "saving_ms"}] — the dense network's latency minus the stage
    network's, both measured whole. The model: measured saving = Σ over stages r of factor_r × the
    tables' saving in the layers of stage r (a stage's slimming also narrows the inputs of the next
    stage's first layers). Least squares, factors clipped to SCALE_RANGE; a stage the networks barely
    move keeps 1."""
    if not measured:
        return {}, []
    names = list(dict.fromkeys(m["stage"] for m in measured))    # stages without a network of their own keep 1
    dense_layers = model.layer_ms(model.widths)
    rows, savings, predicted = [], [], []
    for m in measured:
        saved = dense_layers - model.layer_ms(torch.tensor(m["kept"], dtype=torch.float64))
        rows.append([float(saved[[s == r for s in model.stage]].sum()) for r in names])
        fixed = float(saved[[s not in names for s in model.stage]].sum())
        savings.append(float(m["saving_ms"]) - fixed)
        predicted.append(float(saved.sum()))
    a, b = torch.tensor(rows, dtype=torch.float64), torch.tensor(savings, dtype=torch.float64)
    movable = a.sum(0) > MIN_SAVING_SHARE * float(dense_layers.sum())
    factors = torch.ones(len(names), dtype=torch.float64)
    if bool(movable.any()):
        solved = torch.linalg.lstsq(a[:, movable], b.unsqueeze(1)).solution.flatten()
        factors[movable] = solved.clamp(*SCALE_RANGE)
    by_stage = {s: 1.0 for s in model.stage} | dict(zip(names, factors.tolist(), strict=True))
    report = [{"stage": m["stage"], "saving_ms": round(float(m["saving_ms"]), 4), "tables_saving_ms": round(p, 4),
               "factor": round(by_stage[m["stage"]], 4)} for m, p in zip(measured, predicted, strict=True)]
    return {name: by_stage[stage] for name, stage in zip(model.layers.names, model.stage, strict=True)}, report
