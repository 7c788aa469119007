"""`compress study`: method specs, missing methods reported, runs reused, hand-written analysis kept."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from compress.errors import CompressError
from compress.methods.base import discover
from compress.study import StudyConfig, parse_method, preset, run_study


def test_method_specs_are_typed_by_the_methods_own_options():
    registry = discover()
    spec = parse_method("vpns:prompt=none:score-epochs=2:score-lr=0.5", registry)
    assert (spec.name, spec.options) == ("vpns", {"prompt": "none", "score_epochs": 2, "score_lr": 0.5})
    assert spec.slug == "vpns_prompt-none_score-epochs-2_score-lr-0.5"
    assert parse_method("not-a-method:x=1", registry).name == "not-a-method"   # reported as missing later
    with pytest.raises(CompressError, match="no option"):
        parse_method("vpns:bogus=1", registry)
    with pytest.raises(CompressError, match="choose one of"):
        parse_method("vpns:prompt=frame", registry)
    with pytest.raises(CompressError, match="option=value"):
        parse_method("vpns:prompt", registry)
    sparse = parse_method("l1:sparse-reg=l1:sparse-train-epochs=2:sparse-lambda=0.05", registry)
    assert (sparse.options, sparse.stage) == ({}, {"sparse_reg": "l1", "sparse_train_epochs": 2, "sparse_lambda": 0.05})
    lbi = parse_method("dessilbi:lbi-epochs=3:lbi-nu=2", registry)
    assert (lbi.options, lbi.stage) == ({"lbi_epochs": 3, "lbi_nu": 2.0}, {})


def test_study_reports_missing_methods_reuses_runs_and_keeps_the_analysis(tmp_path):
    docs = tmp_path / "docs"
    config = StudyConfig(data="synthetic:120", subset=100, dense_epochs=1, finetune_epochs=0, ratios=(0.5,),
                         seeds=(0,), methods=("l1", "no-such-method"), work=str(tmp_path / "work"), docs=str(docs),
                         latency=False)
    first = run_study(config)
    assert first["missing"] == ["no-such-method"] and first["runs_done"] == 1
    (row,) = [r for r in first["summary"] if r["method"] == "l1"]
    assert abs(row["flops_ratio"] - 0.5) <= 0.02 and row["n"] == 1
    md = (docs / "results.md").read_text()
    assert "| no-such-method | 0.5 | not registered |" in md and (docs / "results.png").stat().st_size > 0

    (docs / "results.md").write_text("# Results\n\nOur analysis.\n\n" + md[md.index("<!-- study:begin"):])
    second = run_study(config)
    assert second["runs_reused"] == 1 and second["runs_done"] == 0
    assert "Our analysis." in (docs / "results.md").read_text()
    assert json.loads((docs / "results.json").read_text())["records"][0]["reused"] is True

    # --only-done trains nothing: a second seed is listed as not run, the made cell is reported
    partial = run_study(replace(config, seeds=(0, 1), only_done=True))
    assert partial["runs_done"] == 0 and partial["not_run"] == ["l1 @ 0.5 seed 1"]
    assert not (tmp_path / "work" / "l1" / "r0.5" / "s1").exists()
    assert "Not run (`--only-done`; these cells were not made): l1 @ 0.5 seed 1." in (docs / "results.md").read_text()
    with pytest.raises(CompressError, match="--only-done: no dense parent"):
        run_study(replace(config, dense_epochs=2, only_done=True))


def test_presets_name_whole_studies_and_flags_override_them():
    registry = discover()
    config = preset("pretrained", seeds=(0,), subset=None)
    assert (config.model, config.weights, config.image_size, config.name) == (
        "efficientnet_lite0", "imagenet", 64, "results-pretrained")
    assert config.seeds == (0,) and config.subset == 4000 and config.ratios == (0.5, 0.3)
    assert preset("scratch") == StudyConfig()
    for method in config.methods:             # every row of the papers' setting parses against the registry
        assert parse_method(method, registry).name in registry
    with pytest.raises(CompressError, match="unknown study preset 'nope'"):
        preset("nope")


def test_study_command_takes_a_preset_and_overrides(tmp_path):
    from click.testing import CliRunner

    from cli import main

    res = CliRunner().invoke(main, ["study", "--preset", "scratch", "--data", "synthetic:120", "--subset", "100",
                                    "--dense-epochs", "1", "--finetune-epochs", "0", "--ratios", "0.5", "--seeds", "0",
                                    "--methods", "l1", "--no-latency", "--work", str(tmp_path / "w"), "--docs",
                                    str(tmp_path / "d"), "--name", "mine"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "d" / "mine.md").is_file() and (tmp_path / "d" / "mine.json").is_file()
    assert "| l1 | 0.5 |" in (tmp_path / "d" / "mine.md").read_text()


def test_study_jobs_make_each_cell_once_in_worker_processes(tmp_path):
    docs = tmp_path / "docs"
    config = StudyConfig(data="synthetic:120", subset=100, dense_epochs=1, finetune_epochs=0, ratios=(0.5, 0.3),
                         seeds=(0,), methods=("l1", "random"), work=str(tmp_path / "work"), docs=str(docs),
                         latency=False, jobs=2)
    made = run_study(config)
    assert made["runs_done"] == 4 and made["runs_reused"] == 0 and made["not_run"] == []
    assert "cells made by 2 worker processes × " in (docs / "results.md").read_text()
    # the one-process study finds every cell made with its own settings
    again = run_study(replace(config, jobs=1))
    assert again["runs_reused"] == 4
    assert [r["accuracy"] for r in again["records"]] == [r["accuracy"] for r in made["records"]]

    # a cell that fails in a worker does not stop the others; the study then exits with one error naming it
    failing = replace(config, methods=("l1", f"pass:hypernet-from={tmp_path / 'missing'}"), seeds=(0, 1))
    with pytest.raises(CompressError, match=r"4 of 8 study cells failed \(pass:hypernet-from=\S+ @ 0\.\d seed \d: "
                       r"--hypernet-from \S+ is not a directory"):
        run_study(failing)
    assert (tmp_path / "work" / "l1" / "r0.3" / "s1" / "report.json").is_file()
    with pytest.raises(CompressError, match="--jobs must be ≥ 1"):
        run_study(replace(config, jobs=0))
