"""The prune pipeline's sparse-training stage: any method, exact zeros reported, ranking change, old flags."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from cli import main
from compress.errors import CompressError
from compress.pipeline import _legacy_sparse_options
from compress.sparse import SparseConfig


def _prune(*args: str):
    return CliRunner().invoke(main, ["prune", *args])


def test_l1_sparse_training_before_l1_ranking_reports_exact_zeros_and_the_ranking_change(digits_run, tmp_path):
    out = tmp_path / "p"
    res = _prune("--from", str(digits_run), "--data", "digits", "--method", "l1", "--flops-ratio", "0.5",
                 "--sparse-train-epochs", "1", "--sparse-reg", "l1", "--sparse-lambda", "0.2", "--subset", "200",
                 "--finetune-epochs", "0", "--round-to", "1", "--out", str(out))
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    sparse = report["sparse_train"]
    assert (sparse["reg"], sparse["epochs"], sparse["lambda"]) == ("l1", 1, 0.2)
    assert sparse["zero_share_before"] == 0.0 < sparse["zero_share"] <= 1.0
    assert sparse["history"][-1]["zero_share"] == sparse["zero_share"]
    for criterion in ("l1", "group_l2"):
        change = sparse["ranking_change"][criterion]
        assert -1.0 <= change["kendall_tau"] < 1.0 and 0.0 <= change["kept_overlap"] <= 1.0
    assert 0.0 <= sparse["val_acc"] <= 1.0 and "sparse_train" in report["stages_s"]
    assert abs(report["flops_ratio"] - 0.5) <= 0.02


def test_the_numeric_sparse_reg_still_means_group_lasso_strength():
    with pytest.warns(FutureWarning, match="--sparse-reg 0.001 is deprecated"):
        config = SparseConfig.from_flags("0.001", 2, None, 4.0)
    assert (config.reg, config.strength, config.epochs) == ("group-lasso", 0.001, 2)
    assert SparseConfig.from_flags(None, 2, None, 4.0).describe() == {"reg": "group-lasso", "epochs": 2,
                                                                      "lambda": 5e-4, "alpha": 4.0}
    assert SparseConfig.from_flags("l1", 2, None, 4.0).strength == 0.02
    with pytest.raises(CompressError, match="contradicts"):
        SparseConfig.from_flags("0.001", 2, 0.01, 4.0)


def test_depgraphs_old_method_options_move_to_the_stage():
    options = {"sparse_train_epochs": 3, "sparse_reg": 1e-3, "sparse_alpha": 2.0, "other": 1}
    with pytest.warns(FutureWarning, match="prune_run arguments"):
        moved = _legacy_sparse_options(options)
    assert options == {"other": 1} and moved == {"epochs": 3, "reg": 1e-3, "alpha": 2.0}
