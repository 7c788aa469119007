"""`compress prune` end to end on real data (digits), the run it writes, and every bad input."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cli import main
from compress.models import create_model
from compress.pruning.structure import widths as layer_widths
from compress.runs import load

REPO = Path(__file__).resolve().parents[1]
PRUNE_KEYS = {"command", "version", "model", "data", "seed", "input_size", "wall_time_s", "accuracy", "flops",
              "params", "method", "flops_ratio_target", "flops_ratio", "dense", "accuracy_before_finetune", "widths"}


def _prune(*args: str):
    return CliRunner().invoke(main, ["prune", *args])


@pytest.fixture(scope="module")
def depgraph_run(digits_run, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("prune") / "p"
    res = _prune("--from", str(digits_run), "--data", "digits", "--method", "depgraph", "--flops-ratio", "0.5",
                 "--finetune-epochs", "1", "--sparse-train-epochs", "1", "--subset", "200", "--out", str(out))
    assert res.exit_code == 0, res.output
    return out, json.loads((out / "report.json").read_text())


def test_prune_writes_a_complete_run(depgraph_run, digits_run):
    out, report = depgraph_run
    assert set(report) >= PRUNE_KEYS
    assert report["command"] == "prune" and report["method"] == "depgraph"
    assert report["bn_recalibration"] is True and 0 <= report["accuracy_slimmed"] <= 1
    assert set(report["dense"]) == {"flops", "params", "accuracy"}
    assert abs(report["flops_ratio"] - 0.5) <= 0.02
    assert report["flops"] < report["dense"]["flops"] and report["params"] < report["dense"]["params"]
    assert report["flops_ratio"] == pytest.approx(report["flops"] / report["dense"]["flops"], abs=1e-6)
    assert {"dense", "groups", "search", "target", "slim", "finetune"} <= set(report["stages_s"])
    assert report["sparse_train"]["epochs"] == 1 and report["sparse_train"]["reg"] == "group-lasso"
    spec = json.loads((out / "model.json").read_text())
    assert spec["layers"] and spec["widths"] == report["widths"]
    dense_widths = layer_widths(create_model("resnet20", 10, 16))
    assert set(report["widths"]) == set(dense_widths)
    assert all(w % 8 == 0 or w == dense_widths[k] for k, w in report["widths"].items())


def test_pruned_run_reloads_in_a_fresh_process(depgraph_run):
    out, report = depgraph_run
    code = ("import json, sys, compress; from compress.flops import count_flops, count_params; "
            "m = compress.load(sys.argv[1]); print(json.dumps([count_flops(m, tuple(m.input_size)), count_params(m)]))")
    proc = subprocess.run([sys.executable, "-c", code, str(out)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    flops, params = json.loads(proc.stdout.strip().splitlines()[-1])
    assert flops == report["flops"] and params == report["params"]


def test_pruned_run_exports_to_onnx_with_matching_outputs(depgraph_run, tmp_path):
    import onnxruntime as ort

    out, _report = depgraph_run
    module = load(out)
    x = module.example_input(4)
    path = tmp_path / "p.onnx"
    torch.onnx.export(module, (x,), str(path), input_names=["x"], output_names=["y"], dynamo=False,
                      dynamic_axes={"x": {0: "n"}, "y": {0: "n"}})
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"x": x.numpy()})[0]
    with torch.no_grad():
        want = module(x).numpy()
    assert np.abs(got - want).max() <= 1e-4 * max(1.0, np.abs(want).max())


@pytest.mark.parametrize(("method", "scope", "round_to"), [("l1", "global", 16), ("random", "local", 1),
                                                           ("l1", "local", 8)])
def test_methods_scopes_and_round_to(digits_run, tmp_path, method, scope, round_to):
    out = tmp_path / "p"
    res = _prune("--from", str(digits_run), "--data", "digits", "--method", method, "--flops-ratio", "0.5",
                 "--scope", scope, "--round-to", str(round_to), "--finetune-epochs", "0", "--out", str(out))
    assert res.exit_code == 0, res.output
    assert "pruned ÷ dense" in res.output
    report = json.loads((out / "report.json").read_text())
    assert report["scope"] == scope and report["round_to"] == round_to
    if report["flops_ratio_note"].startswith("within"):
        assert abs(report["flops_ratio"] - 0.5) <= 0.02
    else:
        assert f"--round-to {round_to}" in report["flops_ratio_note"]
    dense_widths = layer_widths(create_model("resnet20", 10, 16))
    assert all(w % round_to == 0 or w == dense_widths[k] for k, w in report["widths"].items())
    assert report["accuracy"] == report["accuracy_before_finetune"]     # no fine-tuning asked


def test_prune_from_a_model_name(tmp_path):
    out = tmp_path / "m"
    res = _prune("--model", "resnet20", "--data", "synthetic:40", "--method", "random", "--flops-ratio", "0.7",
                 "--finetune-epochs", "0", "--out", str(out))
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    assert report["source"] is None and report["model"] == "resnet20"
    module = load(out)
    assert module(torch.rand(1, *module.input_size)).shape == (1, module.spec["num_classes"])


# ------------------------------------------------------------------ bad input: exit 2, one line, nothing written

def _refused(tmp_path: Path, args: list[str], match: str) -> None:
    out = tmp_path / "never"
    res = _prune(*args, "--out", str(out))
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], res.output
    assert not out.exists() and not any(p.name.startswith(".never") for p in tmp_path.iterdir())


@pytest.mark.parametrize("ratio", ["0", "1.5", "-0.3"])
def test_ratio_outside_unit_interval(digits_run, tmp_path, ratio):
    _refused(tmp_path, ["--from", str(digits_run), "--data", "digits", "--method", "l1", "--flops-ratio", ratio],
             "--flops-ratio must be in (0, 1]")


def test_unreachable_ratio_gives_the_smallest(digits_run, tmp_path):
    _refused(tmp_path, ["--from", str(digits_run), "--data", "digits", "--method", "l1", "--flops-ratio", "0.01"],
             "the smallest reachable is")


def test_a_ratio_just_under_the_floor_prunes_to_the_floor(tmp_path):
    """Within the pipeline's tolerance below the smallest reachable ratio: every group at its narrowest,
    not a refusal from target selection."""
    res = _prune("--model", "resnet20", "--data", "synthetic:40", "--method", "l1", "--flops-ratio", "0.01",
                 "--finetune-epochs", "0", "--out", str(tmp_path / "never"))
    smallest = float(re.search(r"smallest reachable is ([0-9.]+)", res.output).group(1))
    out = tmp_path / "floor"
    res = _prune("--model", "resnet20", "--data", "synthetic:40", "--method", "l1", "--flops-ratio",
                 f"{smallest - 0.01:.4f}", "--finetune-epochs", "0", "--out", str(out))
    assert res.exit_code == 0, res.output
    assert json.loads((out / "report.json").read_text())["flops_ratio"] == pytest.approx(smallest, abs=0.02)


def test_unreachable_ratio_names_the_groups_left_dense(tmp_path):
    """A ViT's residual stream cannot be pruned (LayerNorm): the refusal says so, not just the smallest ratio."""
    _refused(tmp_path, ["--model", "timm:vit_tiny_patch16_224", "--image-size", "32", "--data", "synthetic:40",
                        "--method", "l1", "--flops-ratio", "0.01", "--finetune-epochs", "0"],
             "coupled group(s) cannot be pruned and stay at full width, e.g. ")


def test_unknown_method(digits_run, tmp_path):
    _refused(tmp_path, ["--from", str(digits_run), "--data", "digits", "--method", "magic", "--flops-ratio", "0.5"],
             "unknown method 'magic'")


def test_option_of_another_method(digits_run, tmp_path):
    _refused(tmp_path, ["--from", str(digits_run), "--data", "digits", "--method", "l1", "--flops-ratio", "0.5",
                        "--lbi-epochs", "2"], "--lbi-epochs does not apply to method l1")


@pytest.mark.parametrize("flags, message", [
    (["--method", "dessilbi", "--lbi-epochs", "0"], "--lbi-epochs must be at least 1"),
    (["--method", "dessilbi", "--lbi-nu", "-1"], "--lbi-nu must be > 0"),
    (["--method", "depgraph", "--sparse-train-epochs", "1", "--sparse-reg", "l2"],
     "--sparse-reg must be one of l1, group-lasso"),
    (["--method", "depgraph", "--sparse-lambda", "0.1"], "take effect only with --sparse-train-epochs"),
    (["--method", "l1", "--sparse-train-epochs", "-1"], "--sparse-train-epochs must be ≥ 0"),
])
def test_bad_dessilbi_and_sparse_training_values(digits_run, tmp_path, flags, message):
    _refused(tmp_path, ["--from", str(digits_run), "--data", "digits", "--flops-ratio", "0.5", *flags], message)


def test_dependency_analysis_over_its_limit_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESS_ANALYSIS_MAX_S", "0")
    _refused(tmp_path, ["--model", "resnet18", "--data", "synthetic:20", "--method", "l1", "--flops-ratio", "0.5"],
             "dependency analysis of this network was stopped: it ran longer than 0 s")


def test_from_a_directory_that_is_not_a_run(tmp_path):
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("hello")
    _refused(tmp_path, ["--from", str(junk), "--data", "digits", "--method", "l1", "--flops-ratio", "0.5"],
             "is not a run directory")


def test_weights_not_matching_model_json(digits_run, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(digits_run, bad)
    spec = json.loads((bad / "model.json").read_text())
    spec["layers"] = {"layer1.0.conv1": {"type": "Conv2d", "in_channels": 16, "out_channels": 8,
                                         "kernel_size": [3, 3], "stride": [1, 1], "padding": [1, 1],
                                         "dilation": [1, 1], "groups": 1, "bias": False, "padding_mode": "zeros"}}
    (bad / "model.json").write_text(json.dumps(spec))
    _refused(tmp_path, ["--from", str(bad), "--data", "digits", "--method", "l1", "--flops-ratio", "0.5"],
             "model.pt does not match model.json")


def test_out_is_not_a_run(digits_run, tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("...")
    res = _prune("--from", str(digits_run), "--data", "digits", "--method", "l1", "--flops-ratio", "0.5",
                 "--out", str(precious))
    assert res.exit_code == 2 and "is not a run directory" in res.output
    assert (precious / "thesis.tex").exists()
