"""train/eval through the real CLI: run-directory contract, reproducibility, and every bad input."""

import json
import os
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from cli import main

TRAIN_KEYS = {"command", "version", "model", "data", "seed", "input_size", "wall_time_s", "accuracy", "flops", "params"}


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_help_lists_commands():
    out = run_cli("--help").output
    assert "train" in out and "eval" in out
    assert run_cli("--version").exit_code == 0


def test_run_directory_contract(digits_run):
    report = json.loads((digits_run / "report.json").read_text())
    assert report.keys() >= TRAIN_KEYS and report["command"] == "train"
    assert report["input_size"] == [3, 16, 16] and report["flops"] > 0 and report["params"] > 0
    spec = json.loads((digits_run / "model.json").read_text())
    assert spec["model"] == "resnet20" and spec["num_classes"] == 10 and spec["prompt"] is None
    state = torch.load(digits_run / "model.pt", weights_only=True)
    assert any(k.startswith("net.") for k in state)
    assert not [p for p in digits_run.parent.iterdir() if p.name.startswith(".")], "temporary directories left"


def test_eval_prints_the_reported_accuracy(digits_run):
    report = json.loads((digits_run / "report.json").read_text())
    result = run_cli("eval", digits_run, "--data", "digits")
    assert result.exit_code == 0, result.output
    assert f"accuracy {report['accuracy']:.4f}" in result.output


def test_load_round_trip_in_a_fresh_process(digits_run):
    """compress.load rebuilds the module from JSON + weights alone, in a process that never saw it."""
    import compress

    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    expected = compress.load(digits_run)(x)
    code = ("import sys, torch, compress; m = compress.load(sys.argv[1]); "
            "x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(1)); "
            "torch.save(m(x).detach(), sys.argv[2])")
    out = digits_run.parent / "roundtrip.pt"
    subprocess.run([sys.executable, "-c", code, str(digits_run), str(out)], check=True, env={**os.environ})
    assert torch.allclose(torch.load(out, weights_only=True), expected, atol=1e-6)


def test_same_seed_same_accuracy(tmp_path):
    args = ["train", "--model", "resnet20", "--data", "synthetic:200", "--epochs", "1", "--image-size", "16",
            "--seed", "3"]
    for name in ("a", "b"):
        assert run_cli(*args, "--out", tmp_path / name).exit_code == 0
    ra, rb = (json.loads((tmp_path / n / "report.json").read_text()) for n in ("a", "b"))
    untimed = lambda h: [{k: v for k, v in r.items() if k != "time_s"} for r in h]  # noqa: E731
    assert ra["accuracy"] == rb["accuracy"] and untimed(ra["history"]) == untimed(rb["history"])


def _assert_clean_failure(result, words, parent):
    assert result.exit_code == 2, result.output
    assert words in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    if parent is not None and parent.exists():
        assert not [p for p in parent.iterdir() if p.name.startswith(".") or p.name == "out"], "partial output left"


@pytest.mark.parametrize("args, words", [
    (["--model", "resnet7", "--data", "digits"], "unknown model 'resnet7'"),
    (["--model", "resnet20", "--data", "mnist"], "unknown data spec"),
    (["--model", "resnet20", "--data", "cifar10:/no/such/dir"], "no data_batch_1"),
    (["--model", "resnet20", "--data", "digits", "--epochs", "0"], "--epochs must be at least 1"),
])
def test_train_bad_input(tmp_path, args, words):
    _assert_clean_failure(run_cli("train", *args, "--out", tmp_path / "out"), words, tmp_path)


def test_train_unwritable_out(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    result = run_cli("train", "--model", "resnet20", "--data", "digits", "--out", blocker / "run")
    _assert_clean_failure(result, "cannot write to --out", None)


def test_train_refuses_to_replace_a_non_run_directory(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    result = run_cli("train", "--model", "resnet20", "--data", "digits", "--out", tmp_path / "mine")
    _assert_clean_failure(result, "is not a run directory", None)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def _copy_run(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_eval_missing_directory(tmp_path):
    _assert_clean_failure(run_cli("eval", tmp_path / "nope", "--data", "digits"), "does not exist", None)


def test_eval_not_a_run(tmp_path):
    _assert_clean_failure(run_cli("eval", tmp_path, "--data", "digits"), "is not a run directory", None)


def test_eval_truncated_weights(digits_run, tmp_path):
    run = _copy_run(digits_run, tmp_path / "run")
    raw = (run / "model.pt").read_bytes()
    (run / "model.pt").write_bytes(raw[: len(raw) // 2])
    _assert_clean_failure(run_cli("eval", run, "--data", "digits"), "not a readable weights file", None)


def test_eval_spec_that_does_not_match_weights(digits_run, tmp_path):
    run = _copy_run(digits_run, tmp_path / "run")
    spec = json.loads((run / "model.json").read_text())
    spec["model"] = "resnet32"
    (run / "model.json").write_text(json.dumps(spec))
    _assert_clean_failure(run_cli("eval", run, "--data", "digits"), "model.pt does not match model.json", None)


def test_eval_wrong_number_of_classes(digits_run, cifar100_dir):
    result = run_cli("eval", digits_run, "--data", f"cifar100:{cifar100_dir}")
    _assert_clean_failure(result, "has 100 classes", None)


def test_a_model_that_reads_version_metadata_reloads_in_a_fresh_process(tmp_path):
    """torchvision's MNASNet refuses a state_dict without per-module version metadata: model.pt keeps it,
    and a plain-dict model.pt (older runs) gets the code's own."""
    from compress.deploy import DeployableModule
    from compress.models import create_model
    from compress.runs import build_spec, write_run

    torch.manual_seed(0)
    module = DeployableModule(create_model("mnasnet0_5", 10, 32), [0.5] * 3, [0.25] * 3, input_size=(3, 32, 32))
    spec = build_spec("mnasnet0_5", 10, (3, 32, 32), [0.5] * 3, [0.25] * 3, adapt=None, data="synthetic")
    run = write_run(tmp_path / "mnas", module.eval(), spec, {"command": "train"})
    code = ("import sys, torch, compress; m = compress.load(sys.argv[1]); "
            "x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)); print(m(x).sum().item())")
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    expected = module(x).sum().item()
    for _ in range(2):
        done = subprocess.run([sys.executable, "-c", code, str(run)], capture_output=True, text=True,
                              env={**os.environ})
        assert done.returncode == 0, done.stderr
        assert abs(float(done.stdout.split()[-1]) - expected) <= 1e-4 * max(1.0, abs(expected))
        plain = dict(torch.load(run / "model.pt", weights_only=True))        # drops the metadata
        torch.save(plain, run / "model.pt")


def test_checkpoint_in_a_training_script_wrapper_without_version_metadata(tmp_path):
    from compress.models import create_model
    from compress.training import build_dense

    torch.manual_seed(0)
    weights = {k: v.clone() for k, v in create_model("mnasnet0_5", 10, 32).state_dict().items()}   # no _metadata
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": weights, "epoch": 3}, path)
    module, _spec, _data = build_dense("mnasnet0_5", "synthetic:20", image_size=32, checkpoint=str(path))
    assert all(torch.equal(module.net.state_dict()[k], v) for k, v in weights.items())
