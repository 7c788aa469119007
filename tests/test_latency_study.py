"""`compress latency-study`: the budget, capacity and accuracy experiments end to end on a tiny network (resnet20 at
16 px, ONNX Runtime, one thread timed by its CPU time, very short bench sessions). Asserts what the study
records and writes, never a speed."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from cli import main


def test_budget_and_capacity_write_json_and_doc(tmp_path):
    docs, work = tmp_path / "docs", tmp_path / "work"
    args = ["latency-study", "--budget-models", "resnet20", "--capacity-models", "resnet20", "--ratios", "0.8,0.01",
            "--flops-ratio", "0.5", "--threads", "1", "--clock", "cpu", "--image-size", "16", "--bench-duration",
            "0.05", "--work", str(work), "--docs", str(docs), "--cache-dir", str(tmp_path / "cache")]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    results = json.loads((docs / "latency.json").read_text())
    (budget,) = results["budget"]
    row, refused = budget["rows"]                  # 0.01 is below every group at its narrowest: recorded, not fatal
    assert refused["ratio"] == 0.01 and refused["unreachable"] and 0.01 < refused["smallest_reachable"] < 1
    assert not (work / "resnet20" / "latency-0.01-t1").exists()
    assert row["ratio"] == 0.8 and row["measured"] > 0 and row["predicted"] is not None
    assert row["within"] == (abs(row["measured"] / 0.8 - 1) <= 0.07)
    (capacity,) = results["capacity"]["1"]
    assert capacity["flops_targeted"]["flops_ratio"] == pytest.approx(0.5, abs=0.05)
    assert capacity["latency_targeted"]["predicted"] is not None and capacity["flops_kept"] > 0
    doc = (docs / "latency.md").read_text()
    assert "thread CPU time" in doc and "| resnet20 |" in doc and "latency-study:capacity:end" in doc
    assert "unreachable ✗ (smallest reachable" in doc and "of 2 within" in doc

    before = (work / "resnet20" / "latency-0.8-t1" / "report.json").stat().st_mtime_ns
    res = CliRunner().invoke(main, [*args, "--parts", "budget"])      # the prune is reused, capacity kept
    assert res.exit_code == 0, res.output
    assert (work / "resnet20" / "latency-0.8-t1" / "report.json").stat().st_mtime_ns == before
    assert "capacity" in json.loads((docs / "latency.json").read_text())


def test_a_rerun_keeps_the_figures_it_does_not_redo():
    from compress.latency_study import LatencyStudyConfig, kept_figures

    previous = {"budget": [{"model": "a"}, {"model": "b"}],
                "capacity": {"2": [{"model": "a"}, {"model": "b"}], "1": [{"model": "a"}, {"model": "b"}]},
                "accuracy": [{"method": "l1"}]}
    one_thread = LatencyStudyConfig(parts=("capacity",), capacity_models=("a",), threads=(1,))
    kept = kept_figures(previous, one_thread)
    assert kept["budget"] == previous["budget"] and kept["accuracy"] == previous["accuracy"]
    assert kept["capacity"] == {"2": previous["capacity"]["2"], "1": [{"model": "b"}]}
    budget_b = LatencyStudyConfig(parts=("budget", "accuracy"), budget_models=("b",))
    kept = kept_figures(previous, budget_b)
    assert kept["budget"] == [{"model": "a"}] and kept["capacity"] == previous["capacity"] and kept["accuracy"] == []


def test_cpu_clock_needs_one_thread(tmp_path):
    res = CliRunner().invoke(main, ["latency-study", "--threads", "2", "--clock", "cpu", "--docs", str(tmp_path)])
    assert res.exit_code == 2 and "needs --threads 1" in res.stderr.strip()
    assert not (tmp_path / "latency.json").exists()


def test_accuracy_prunes_a_trained_parent_both_ways(digits_run, tmp_path):
    """One method, one seed: the FLOPs-targeted prune, its measured latency, the latency-targeted prune at
    that latency, both fine-tuned alike and benched side by side; rows and the doc block written."""
    docs, work = tmp_path / "docs", tmp_path / "work"
    res = CliRunner().invoke(main, ["latency-study", "--parts", "accuracy", "--parent", str(digits_run), "--data",
                                    "digits", "--accuracy-methods", "l1", "--seeds", "0", "--subset", "200",
                                    "--finetune-epochs", "1", "--accuracy-flops-ratio", "0.5", "--threads", "1",
                                    "--clock", "cpu", "--bench-duration", "0.05", "--work", str(work), "--docs",
                                    str(docs), "--cache-dir", str(tmp_path / "cache")])
    assert res.exit_code == 0, res.output
    (row,) = json.loads((docs / "latency.json").read_text())["accuracy"]
    assert row["method"] == "l1" and row["seed"] == 0 and 0 < row["latency_level"] < 1.5
    for arm in ("flops_targeted", "latency_targeted"):
        assert 0 <= row[arm]["accuracy"] <= 1 and 0 < row[arm]["flops_ratio"] < 1 and row[arm]["latency_ratio"] > 0
    assert row["flops_targeted"]["flops_ratio"] == pytest.approx(0.5, abs=0.05)
    latency_run = json.loads((work / "accuracy" / "l1" / "s0" / "latency" / "report.json").read_text())
    assert latency_run["latency_ratio_target"] == row["latency_level"] and latency_run["finetune_epochs"] == 1
    doc = (docs / "latency.md").read_text()
    assert "latency-study:accuracy:end" in doc and "| l1 | 1 |" in doc


def test_accuracy_needs_a_trained_parent(tmp_path):
    res = CliRunner().invoke(main, ["latency-study", "--parts", "accuracy", "--docs", str(tmp_path)])
    assert res.exit_code == 2 and "needs --parent DIR" in res.stderr.strip()
    assert not (tmp_path / "latency.json").exists()
