"""`compress prune --latency-ratio`: the pipeline with a measured latency budget, every method's search
through the latency model, and the refusals. Timings are real and small (resnet20 at 16 px, ONNX Runtime,
one thread timed by its CPU time); no test asserts a speed, only what the run records about it."""

from __future__ import annotations

import json
import re

import pytest
from click.testing import CliRunner

from cli import main

LATENCY = ["--latency-threads", "1", "--latency-clock", "cpu"]
REPORT_KEYS = {"latency_ratio_target", "latency_ratio", "latency_ratio_predicted", "latency_backend", "latency_threads",
               "latency_batch_size", "latency_ms", "latency_dense_ms", "flops_ratio", "target", "allocation",
               "calibration"}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("latency-cache"))


def _prune(*args: str):
    return CliRunner().invoke(main, ["prune", "--model", "resnet20", "--image-size", "16", "--data", "synthetic:60",
                                     "--finetune-epochs", "0", "--no-bn-recalibration", "--batch-size", "16", *args])


@pytest.mark.parametrize("method", ["l1", "pass", "vpns"])
def test_prune_to_a_latency_ratio(method, cache, tmp_path):
    extra = {"pass": ["--hypernet-epochs", "1"],
             "vpns": ["--warmup-epochs", "0", "--score-epochs", "1"]}.get(method, [])
    out = tmp_path / "run"
    res = _prune("--method", method, "--latency-ratio", "0.8", *LATENCY, "--latency-cache", cache, *extra,
                 "--out", str(out))
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    assert set(report) >= REPORT_KEYS and report["target"] == "latency" and report["allocation"] == "knapsack"
    assert report["flops_ratio_target"] is None and 0 < report["flops_ratio"] < 1
    assert report["latency_ratio_target"] == 0.8 and report["latency_backend"] == "onnxruntime"
    assert 0 < report["latency_ratio"] < 1.2 and 0 < report["latency_ratio_predicted"] < 1
    assert report["latency_ms"] > 0 and report["latency_dense_ms"] > 0 and report["calibration"]
    assert "latency" in report["stages_s"] and "latency ratio" not in res.stderr
    if method == "pass":                  # the penalty was the latency model's ratio
        assert "latency_ratio" in report["method_report"]["search_history"][0]
    bench = CliRunner().invoke(main, ["bench", str(out), "--backend", "onnxruntime", "--threads", "1", "--duration",
                                      "0.05", "--min-iters", "3", "--warmup", "0"])
    assert bench.exit_code == 0, bench.output


def test_bench_shows_the_latency_target_error(cache, tmp_path):
    dense = tmp_path / "dense"
    pruned = tmp_path / "pruned"
    for out, ratio in ((dense, ["--flops-ratio", "1.0"]), (pruned, ["--latency-ratio", "0.8", *LATENCY,
                                                                     "--latency-cache", cache])):
        res = _prune("--method", "l1", *ratio, "--out", str(out))
        assert res.exit_code == 0, res.output
    doc = tmp_path / "b.json"
    res = CliRunner().invoke(main, ["bench", str(dense), str(pruned), "--backend", "onnxruntime", "--threads", "1",
                                    "--duration", "0.05", "--min-iters", "3", "--warmup", "0", "--json", str(doc)])
    assert res.exit_code == 0, res.output
    assert re.search(r"\d\.\d{3} \(0\.8,", res.stdout), res.stdout    # the latency ratio (its target, …)
    (up,) = json.loads(doc.read_text())["speedups"]
    assert up["latency_ratio_target"] == 0.8 and up["latency_target_error"] == pytest.approx(
        up["latency_ratio"] / 0.8 - 1)


@pytest.mark.parametrize("args, message", [
    (["--flops-ratio", "0.5", "--latency-ratio", "0.5"], "exactly one of --flops-ratio R or --latency-ratio R"),
    ([], "needs --flops-ratio R or --latency-ratio R"),
    (["--latency-ratio", "0.5", "--token-keep", "0.7"], "--latency-ratio with token sparsification .* not supported"),
    (["--flops-ratio", "0.5", "--latency-threads", "2"], "--latency-threads goes with --latency-ratio"),
    (["--latency-ratio", "1.5"], r"--latency-ratio must be in \(0, 1\]"),
    (["--latency-ratio", "0.5", "--latency-backend", "tvm"], "unknown backend 'tvm'"),
    (["--latency-ratio", "0.5", "--latency-threads", "2", "--latency-clock", "cpu"], "needs --threads 1"),
    (["--latency-ratio", "0.5", "--latency-precision", "bf16"], "at bf16 are measured on torch-cuda only"),
    (["--flops-ratio", "0.5", "--latency-precision", "bf16"], "--latency-precision goes with --latency-ratio"),
    (["--latency-ratio", "0.5", "--scope", "local", "--allocation", "knapsack"], "needs --scope global"),
])
def test_bad_latency_targets_are_one_line(args, message, tmp_path):
    res = _prune("--method", "l1", *args, "--out", str(tmp_path / "never"))
    assert res.exit_code == 2 and not (tmp_path / "never").exists()
    line = res.stderr.strip()
    assert "\n" not in line and line.startswith("error:")
    assert re.search(message, line), line


def test_unreachable_latency_names_the_smallest(cache, tmp_path):
    res = _prune("--method", "l1", "--latency-ratio", "0.01", *LATENCY, "--latency-cache", cache,
                 "--out", str(tmp_path / "never"))
    assert res.exit_code == 2 and not (tmp_path / "never").exists()
    # on a cold cache the table build's progress lines come first; the refusal is one line, no traceback
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in res.stderr, res.stderr
    assert "--latency-ratio 0.01 is unreachable" in errors[0] and "smallest reachable is" in errors[0]


def test_calibration_brackets_a_jumping_ratio():
    """A confirmed ratio that jumps between nearby aims (latency's staircase): once the target is
    bracketed the next aim interpolates inside the bracket instead of oscillating across the jump."""
    from compress.budget import next_aim

    assert next_aim([(0.5, 0.64)], 0.5) == pytest.approx(0.36)          # no bracket yet: moved by the error
    aim = next_aim([(0.5, 0.64), (0.36, 0.34)], 0.5)
    assert 0.36 < aim < 0.5 and aim == pytest.approx(0.36 + (0.5 - 0.34) / (0.64 - 0.34) * 0.14)
    tighter = next_aim([(0.5, 0.64), (0.36, 0.34), (aim, 0.45)], 0.5)   # the bracket shrinks to [aim, 0.5]
    assert aim < tighter < 0.5
