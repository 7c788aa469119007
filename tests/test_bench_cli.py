"""`compress bench` on the command line: outputs, exit codes, and the gate's verdict plumbing."""

import json

import pytest
import torch
from click.testing import CliRunner

from bench.report import RESULT_KEYS, SPEEDUP_KEYS
from cli import main
from compress.flops import count_flops, count_params
from compress.runs import build_module, build_spec, write_run

SIZE = 16
QUICK = ["--threads", "1", "--duration", "0.02", "--min-iters", "5", "--warmup", "0"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench-cli")
    spec = build_spec("resnet20", 10, (3, SIZE, SIZE), [0.5] * 3, [0.25] * 3, adapt=None, data="synthetic")
    module = build_module(spec).eval()
    report = {"command": "train", "model": "resnet20", "data": "synthetic", "seed": 0, "input_size": [3, SIZE, SIZE],
              "wall_time_s": 0.0, "accuracy": 0.1, "flops": count_flops(module, module.input_size),
              "params": count_params(module)}
    run = write_run(root / "run", module, spec, report)
    onnx = {}
    for name, axes in (("dyn", {"images": {0: "batch"}, "logits": {0: "batch"}}), ("fixed", None)):
        onnx[name] = root / f"{name}.onnx"
        torch.onnx.export(module, (module.example_input(1),), str(onnx[name]), dynamo=False, opset_version=18,
                          input_names=["images"], output_names=["logits"], dynamic_axes=axes)
    return {"run": str(run), "dyn": str(onnx["dyn"]), "fixed": str(onnx["fixed"]), "root": root}


def bench(*args):
    return CliRunner().invoke(main, ["bench", *args])


def test_side_by_side_json_has_every_design_key(files, tmp_path):
    out = tmp_path / "b.json"
    r = bench(files["dyn"], files["dyn"], "--batch-size", "1,2", "--json", str(out), *QUICK)
    assert r.exit_code == 0, r.output
    assert "speedup" in r.stdout and "baseline" in r.stdout and f"wrote {out}" in r.stdout
    doc = json.loads(out.read_text())
    assert {"host", "settings", "results", "speedups"} <= set(doc)
    # the default backends: every one present that runs .onnx files (onnxruntime, plus ort-cuda, ort-trt and
    # tensorrt where onnxruntime-gpu, TensorRT and a GPU are there), each with 2 targets x 2 batch sizes
    backends = {row["backend"] for row in doc["results"]}
    assert "onnxruntime" in backends and not backends & {"torch", "torch-cuda"}
    assert all(set(RESULT_KEYS) <= set(row) for row in doc["results"]) and len(doc["results"]) == 4 * len(backends)
    assert all(set(SPEEDUP_KEYS) <= set(row) for row in doc["speedups"]) and len(doc["speedups"]) == 2 * len(backends)
    assert doc["settings"]["threads"] == 1 and doc["settings"]["gate"] is None


def test_plot_of_a_run_directory(files, tmp_path):
    png = tmp_path / "lat.png"
    r = bench(files["run"], "--backend", "torch", "--plot", str(png), *QUICK)
    assert r.exit_code == 0, r.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args, message", [
    (["{dyn}", "--backend", "torch,tvm"], "unknown backend 'tvm'"),
    (["{fixed}", "--batch-size", "1,8"], "fixed batch size of 1 and cannot run batch size 8"),
    (["{dyn}", "--batch-size", "1,x"], "--batch-size takes a comma list"),
    (["{dyn}", "--batch-size", "0"], "positive integers"),
    (["{dyn}", "--max-regression", "0.1"], "needs a baseline"),
    (["{dyn}", "{dyn}", "--max-regression", "0.1", "--min-speedup", "2"], "exactly one of"),
    (["{dyn}", "--baseline", "{dyn}"], "--baseline needs --max-regression"),
    (["{dyn}", "--baseline", "{root}/none.json", "--max-regression", "0.1"], "not found"),
    (["{dyn}", "--plot", "{root}/p.png"], "no target records FLOPs"),
    (["{run}", "--plot", "{root}/p.svg"], "ending in .png"),
    (["{root}/missing"], "does not exist"),
    (["{dyn}", "--threads", "0"], "--threads must be >= 1"),
    (["{dyn}", "--clock", "cpu", "--threads", "2"], "needs --threads 1"),
])
def test_bad_input_is_one_line_and_exit_2(files, args, message):
    r = bench(*[a.format(**files) for a in args], *QUICK[2:])
    assert r.exit_code == 2, r.output
    assert message in r.stderr and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1
    assert "Traceback" not in r.output


def test_gate_defaults_to_one_thread_on_the_cpu_clock(files, tmp_path):
    """Without --threads/--clock a gate uses the settings that do not flake on shared machines."""
    out = tmp_path / "g.json"
    r = bench(files["dyn"], files["dyn"], "--max-regression", "0.5", "--json", str(out), *QUICK[2:])
    assert r.exit_code in (0, 1) and "latency gate" in r.output
    settings = json.loads(out.read_text())["settings"]
    assert (settings["threads"], settings["clock"]) == (1, "cpu")
    r = bench(files["dyn"], "--json", str(out), *QUICK[2:])
    assert json.loads(out.read_text())["settings"]["clock"] == "wall"


def saved(path, target, ms):
    """A saved bench file whose samples are physically impossible latencies (1 ns) or absurd ones (1000 s)."""
    row = {"target": target, "backend": "onnxruntime", "batch_size": 1, "median_ms": ms, "p90_ms": ms,
           "p99_ms": ms, "cv": 0.0, "throughput": 1000 / ms, "samples_ms": [ms] * 50, "flops": None, "params": None}
    path.write_text(json.dumps({"host": {}, "settings": {"threads": 1}, "results": [row], "speedups": []}))
    return str(path)


def test_gate_against_saved_file_exit_codes(files, tmp_path):
    fast = saved(tmp_path / "fast.json", files["dyn"], 1e-6)
    out = tmp_path / "gate.json"
    r = bench(files["dyn"], "--baseline", fast, "--max-regression", "0.1", "--json", str(out), *QUICK)
    assert r.exit_code == 1, r.output
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: latency gate FAILED:")
    doc = json.loads(out.read_text())  # the JSON is written before the gate fails
    assert doc["gate"][0]["failed"] is True and doc["settings"]["gate"]["baseline_file"] == fast

    slow = saved(tmp_path / "slow.json", "another/name.onnx", 1e6)  # single-target file matches any name
    r = bench(files["dyn"], "--baseline", slow, "--max-regression", "0.1", *QUICK)
    assert r.exit_code == 0, r.output
    assert "latency gate passed" in r.stdout
