"""`--method dessilbi` end to end: the path in report.json, its plot, the target (flags: test_prune_cli.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from compress.pipeline import prune_run
from compress.runs import load


@pytest.fixture(scope="module")
def dessilbi_run(digits_run, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("dessilbi") / "p"
    prune_run(out, source=digits_run, data="digits", method="dessilbi", flops_ratio=0.5, finetune_epochs=1,
              subset=200, batch_size=64, round_to=1, method_options={"lbi_epochs": 2})
    return out, json.loads((out / "report.json").read_text())


def test_the_path_is_recorded_and_plotted(dessilbi_run):
    out, report = dessilbi_run
    lbi = report["method_report"]["dessilbi"]
    steps = 4                                                    # 200 images, batch 64
    assert lbi["steps_per_epoch"] == steps and lbi["steps"] == 2 * steps
    assert lbi["nu_default"] and lbi["nu"] == pytest.approx(lbi["kappa"] * lbi["lr"] * 50)   # short path: 2% pull
    assert [p["epoch"] for p in lbi["path"]] == [0, 1, 2]
    assert [p["step"] for p in lbi["path"]] == [0, steps, 2 * steps]
    start, *points = lbi["path"]
    assert start["support_units"] == 0 and start["per_group"] == {g: 0 for g in lbi["widths"]}
    for p in points:
        assert {"support_share", "support_flops_ratio", "val_acc", "support_val_acc", "per_group"} <= set(p)
        assert 0 <= p["support_flops_ratio"] <= 1 and 0 <= p["val_acc"] <= 1
    assert set(lbi["thresholds"]) == set(lbi["widths"]) and min(lbi["thresholds"].values()) > 0
    assert {g: len(e) for g, e in lbi["entry_epochs"].items()} == lbi["widths"]
    assert (out / lbi["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_it_hits_the_target_and_reloads(dessilbi_run):
    out, report = dessilbi_run
    assert abs(report["flops_ratio"] - 0.5) <= 0.02
    module = load(out)
    assert module.spec["widths"] == report["widths"]
