"""`compress prune --method dynamicvit` / `--token-keep` end to end on a small ViT: run directory, fresh-process
reload, channel + token composition in both orders, export, one-line errors, torchrun."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli import main

COMMON = ["--data", "digits", "--subset", "160", "--batch-size", "64", "--device", "cpu"]


def _cli(*args) -> object:
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("vit") / "dense"
    res = _cli("train", "--model", "vit_tiny_p4_d6", "--image-size", "16", "--epochs", "1", "--lr", "0.02",
               "--out", out, *COMMON)
    assert res.exit_code == 0, res.output
    return out


def _report(run: Path) -> dict:
    return json.loads((run / "report.json").read_text())


@pytest.fixture(scope="module")
def study(vit_run, tmp_path_factory) -> tuple[dict, object, Path]:
    """The token study at toy scale: tokens only, then depgraph + tokens in both orders at the same FLOPs."""
    from compress.token_study import TokenStudyConfig, run_token_study

    root = tmp_path_factory.mktemp("study")
    docs = root / "docs" / "tokens.md"
    docs.parent.mkdir()
    docs.write_text("# hand-written intro\n")
    cfg = TokenStudyConfig(source=str(vit_run), data="digits", subset=160, seeds=(0,), token_epochs=1,
                           both_finetune_epochs=1, both_token_epochs=1, arms=("tokens", "both-after", "both-before"),
                           batch_size=64, work=str(root / "work"), docs=str(docs))
    return run_token_study(cfg), cfg, docs


def _run_of(result: dict, arm: str) -> Path:
    return Path(next(r["run"] for r in result["records"] if r["arm"] == arm))


def test_dynamicvit_prunes_tokens_only_reloads_in_a_fresh_process_and_exports(study, tmp_path):
    result, _cfg, _docs = study
    out = _run_of(result, "tokens")
    report = _report(out)
    spec = json.loads((out / "model.json").read_text())
    assert spec["tokens"]["stages"] == [1, 3, 4] and spec["tokens"]["keep"] == [11, 7, 5]     # 16 patches, ρ 0.7
    assert spec["layers"] == {} and report["groups"] == 0                                  # no channel pruned
    assert report["flops_ratio_target"] is None and report["flops_ratio"] < 0.75
    assert report["tokens"]["tokens_per_block"] == [17, 12, 12, 8, 6, 6]
    history = report["tokens"]["training"]["dynamicvit"]["history"]
    assert {"keep1", "ratio", "kl", "token_mse", "val_acc"} <= set(history[0])
    proc = subprocess.run([sys.executable, "-m", "compress", "eval", str(out), "--data", "digits", "--device", "cpu"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert f"accuracy {report['accuracy']:.4f}" in proc.stdout                            # same accuracy, new process
    onnx = tmp_path / "tok.onnx"
    res = _cli("export", out, "--out", onnx, "--batch-size", "2", "--no-simplify", "--json", tmp_path / "e.json")
    assert res.exit_code == 0, res.output
    parity = json.loads((tmp_path / "e.json").read_text())["parity"]
    assert parity["passed"] and parity["indices_agreement"] == 1.0 and parity["top1_agreement"] == 1.0


@pytest.mark.parametrize("order", ["after", "before"])
def test_channels_and_tokens_compose_in_either_order_at_the_tokens_flops(study, order):
    result, _cfg, _docs = study
    out = _run_of(result, f"both-{order}")
    report = _report(out)
    target = _report(_run_of(result, "tokens"))["flops_ratio"]
    assert abs(report["flops_ratio"] - target) <= 0.02                # the whole module's ratio, tokens included
    assert report["groups_pruned"] > 0 and report["tokens"]["order"] == order
    spec = json.loads((out / "model.json").read_text())
    assert spec["layers"] and spec["tokens"]["keep"] == [13, 11, 9]    # ρ 0.85 of 16 patches
    assert not any(name.startswith(("backbone.", "predictors.")) for name in spec["layers"])   # backbone names


def test_token_study_writes_its_table_picture_and_reuses_its_runs(study):
    from compress.token_study import run_token_study

    result, cfg, docs = study
    text = docs.read_text()
    assert text.startswith("# hand-written intro") and "| tokens |" in text and "| both-before |" in text
    assert (docs.parent / "tokens" / "patches.png").is_file()
    record = json.loads((docs.parent / "tokens" / "results.json").read_text())["records"][0]
    assert record["arm"] == "tokens" and "| tokens | 0 | " in text and "| top-k | random | bottom-k |" in text
    sets = record["selection"]                # token sets on the whole (small) validation split: top-k = the run's
    assert sets["top_k"] == pytest.approx(record["accuracy"]) and 0 <= sets["object_top_k"] <= 1
    assert all(r["reused"] for r in run_token_study(cfg)["records"])
    res = _cli("token-study", "--from", cfg.source, "--data", "digits", "--subset", 160, "--seeds", "0,1",
               "--token-epochs", 1, "--both-finetune-epochs", 1, "--both-token-epochs", 1, "--batch-size", 64,
               "--arms", "tokens,both-after,both-before", "--work", cfg.work, "--docs", docs, "--only-done",
               "--device", "cpu")                                                  # trains nothing
    assert res.exit_code == 0, res.output
    assert "Not run (`--only-done`: the study was stopped before them): tokens seed 1." in res.output
    assert "Not run (`--only-done`" in docs.read_text() and "| tokens | 1 |" in docs.read_text()


@pytest.mark.parametrize("args, message", [
    (["--method", "dynamicvit", "--flops-ratio", "0.5"], "prunes tokens only and takes no --flops-ratio"),
    (["--method", "depgraph"], "needs --flops-ratio"),
    (["--method", "depgraph", "--flops-ratio", "0.5", "--token-epochs", "2"], "need --token-keep"),
    (["--method", "dynamicvit", "--token-keep", "1.5"], "--token-keep must be in (0, 1)"),
    (["--method", "dynamicvit", "--token-stages", "4,2"], "--token-stages must be increasing"),
    (["--method", "dynamicvit", "--token-stages", "a"], "--token-stages takes block indices"),
])
def test_bad_token_flags_are_one_line_errors(vit_run, tmp_path, args, message):
    res = CliRunner().invoke(main, ["prune", "--from", str(vit_run), "--out", str(tmp_path / "x"), *COMMON, *args])
    assert res.exit_code == 2 and message in res.output and "Traceback" not in res.output
    assert not (tmp_path / "x").exists()


def test_token_sparsification_of_a_cnn_is_refused_before_any_work(digits_run, tmp_path):
    res = CliRunner().invoke(main, ["prune", "--from", str(digits_run), "--method", "dynamicvit",
                                    "--out", str(tmp_path / "x"), *COMMON])
    assert res.exit_code == 2 and "needs a vision transformer" in res.output
    assert not (tmp_path / "x").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dynamicvit_under_torchrun(vit_run, tmp_path):
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    cmd = [torchrun, "--nproc_per_node", "2", "--master_port", str(_free_port()), "-m", "compress", "prune",
           "--from", str(vit_run), "--method", "dynamicvit", "--token-epochs", "1", "--out", "ddp", *COMMON]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = _report(tmp_path / "ddp")
    assert report["world_size"] == 2 and report["tokens"]["keep"] == [11, 7, 5]
