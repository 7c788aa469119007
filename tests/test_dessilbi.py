"""`compress prune --method dessilbi` end to end: the path in report.json, its plot, the target, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli import main
from compress.runs import load


def _prune(*args: str):
    return CliRunner().invoke(main, ["prune", *args])


@pytest.fixture(scope="module")
def dessilbi_run(digits_run, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("dessilbi") / "p"
    res = _prune("--from", str(digits_run), "--data", "digits", "--method", "dessilbi", "--flops-ratio", "0.5",
                 "--lbi-epochs", "2", "--finetune-epochs", "1", "--subset", "200", "--batch-size", "64",
                 "--round-to", "1", "--out", str(out))
    assert res.exit_code == 0, res.output
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


@pytest.mark.parametrize("flags, message", [
    (["--lbi-epochs", "0"], "--lbi-epochs must be at least 1"),
    (["--lbi-nu", "-1"], "--lbi-nu must be > 0"),
    (["--lbi-optimizer", "lamb"], "Invalid value for '--lbi-optimizer'"),
    (["--lbi-threshold", "two"], "Invalid value for '--lbi-threshold'"),
])
def test_bad_lbi_flags_are_one_line_errors(digits_run, tmp_path, flags, message):
    res = _prune("--from", str(digits_run), "--data", "digits", "--method", "dessilbi", "--flops-ratio", "0.5",
                 "--out", str(tmp_path / "p"), *flags)
    assert res.exit_code == 2 and message in res.output
    assert "Traceback" not in res.output and not (tmp_path / "p").exists()
