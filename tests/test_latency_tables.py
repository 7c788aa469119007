"""Latency lookup tables measured with the bench runners: grids, the cache (reuse, corrupt and foreign
files), the layer graphs, `compress latency-table`, and the latency-target error of `compress bench`.

Timings here are real but tiny (resnet20 at 16 px, two widths per axis); no test asserts a speed."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

from bench.compare import speedups
from bench.layers import onnx_layer, torch_layer
from bench.lut import build_latency_model
from bench.lut_cache import TableCache, TableTarget
from bench.measure import Result
from bench.stats import summarize
from cli import main
from compress.errors import CompressError
from compress.models import default_adapt
from compress.pruning import find_groups
from compress.pruning.allocation import AllowedCounts
from compress.pruning.latency_model import LayerShape
from compress.runs import build_module, build_spec

TARGET = TableTarget("onnxruntime", threads=1)


def _resnet20(size=16):
    spec = build_spec("resnet20", 10, (3, size, size), [0.5] * 3, [0.25] * 3, adapt=default_adapt("resnet20", size),
                      data="none")
    module = build_module(spec).eval()
    return module, find_groups(module.net, module.normalize(module.example_input(1)))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache_dir = tmp_path_factory.mktemp("lut")
    module, groups = _resnet20()
    model, report = build_latency_model(module, groups, TARGET, round_to=8, points=2, cache=TableCache(cache_dir))
    return cache_dir, model, report


def test_tables_are_measured_then_reused(built):
    cache_dir, model, report = built
    assert report.measured == report.signatures > 0 and report.points > 0 and not report.network_cached
    assert all(v > 0 for layer in model.table.layers for row in layer.ms for v in row)
    assert model.dense > 0 and len(model.table.checks) == 4 and len(model.table.calibration) == 4
    _module, groups = _resnet20()
    narrowest = model.table.checks[-1]                  # the floor is measured, not extrapolated
    assert narrowest["fraction"] == 0 and narrowest["kept"] == AllowedCounts(groups, report.step).minimum.tolist()
    assert all(0 < c["measured_ratio"] < 1.5 and c["held_out_ratio"] > 0 for c in model.table.checks)
    module, groups = _resnet20()
    again, second = build_latency_model(module, groups, TARGET, round_to=8, points=2, cache=TableCache(cache_dir))
    assert second.measured == 0 and second.points == 0 and second.network_cached and not second.notices
    assert again.dense == model.dense and [t.ms for t in again.table.layers] == [t.ms for t in model.table.layers]


def test_corrupt_and_foreign_cache_files_are_measured_again(built, tmp_path):
    cache_dir, _model, _report = built
    copy = tmp_path / "cache"
    copy.mkdir()
    layer_files = sorted(cache_dir.glob("layer-*.json"))
    for f in cache_dir.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    (copy / layer_files[0].name).write_text('{"key": {"kind": "layer"')                 # truncated: corrupt
    doc = json.loads(layer_files[1].read_text())
    doc["key"]["host"]["hostname"] = "elsewhere"                                        # copied from another host
    (copy / layer_files[1].name).write_text(json.dumps(doc))
    lines = []
    module, groups = _resnet20()
    _m, report = build_latency_model(module, groups, TARGET, round_to=8, points=2, cache=TableCache(copy),
                                     say=lines.append)
    assert report.measured == 2
    assert any("is corrupt" in line and layer_files[0].name in line for line in lines)
    assert any("measured for another target (host" in line for line in lines)
    assert all("\n" not in line for line in lines)
    json.loads((copy / layer_files[0].name).read_text())                              # rewritten whole


@pytest.mark.parametrize("shape", [
    LayerShape(op="conv", input_shape=(16, 8, 8), channel_dim=0, cin=16, cout=24, kernel=(3, 3), stride=(2, 2),
               padding=(1, 1), dilation=(1, 1), bn=True, act="hardswish"),
    LayerShape(op="conv", input_shape=(16, 8, 8), channel_dim=0, cin=16, cout=16, kernel=(3, 3), stride=(1, 1),
               padding=(1, 1), dilation=(1, 1), depthwise=True, bn=True, act="relu6"),
    LayerShape(op="linear", input_shape=(4, 4, 32), channel_dim=2, cin=32, cout=64, bias=True, act="gelu"),
])
@pytest.mark.parametrize("copies", [1, 2])
def test_onnx_and_torch_layers_agree_in_shape(shape, copies):
    cin, cout = (8, 8) if shape.depthwise else (8, 16)
    graph = onnx_layer(shape, cin, cout, batch_size=2, copies=copies)
    session = ort.InferenceSession(graph, providers=["CPUExecutionProvider"])
    dims = list(shape.input_shape)
    dims[shape.channel_dim] = cin
    x = np.random.default_rng(0).random((2, *dims), dtype=np.float32)
    (y,) = session.run(None, {session.get_inputs()[0].name: x})
    with torch.no_grad():
        expected = torch_layer(shape, cin, cout, copies)(torch.from_numpy(x))
    assert y.shape == tuple(expected.shape)
    if copies == 2:       # the copies' weights differ, so no optimiser can merge them into one layer
        import onnx

        weights = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load_from_string(graph).graph.initializer}
        assert not np.array_equal(weights["c0_w"], weights["c1_w"])


def test_unknown_or_unavailable_backend_is_one_line():
    module, groups = _resnet20()
    with pytest.raises(CompressError, match="unknown latency backend"):
        build_latency_model(module, groups, TableTarget("nope", 1), round_to=8)
    if not torch.cuda.is_available():
        with pytest.raises(CompressError, match="latency backend torch-cuda cannot run here"):
            build_latency_model(module, groups, TableTarget("torch-cuda", 1), round_to=8)


def test_latency_table_command_reuses_the_cache(built, tmp_path):
    cache_dir, _model, _report = built
    args = ["latency-table", "--model", "resnet20", "--image-size", "16", "--num-classes", "10", "--threads", "1",
            "--points", "2", "--cache-dir", str(cache_dir)]
    r = CliRunner().invoke(main, [*args, "--json", str(tmp_path / "t.json")])
    assert r.exit_code == 0, r.output
    assert "0 measured now" in r.stdout and "(cached)" in r.stdout and "from the other checks" in r.stdout
    doc = json.loads((tmp_path / "t.json").read_text())
    assert doc["layers"] and doc["dense_ms"] > 0 and doc["target"]["backend"] == "onnxruntime"
    assert "channel block:" in r.stdout and doc["channel_block"] == doc["target"]["channel_block"]
    assert doc["step"] % 8 == 0 and doc["step"] % doc["channel_block"] == 0 and len(doc["block_probe"]["probes"]) == 2
    bad = CliRunner().invoke(main, [*args[:-4], "--points", "1"])
    assert bad.exit_code == 2 and bad.stderr.strip().count("\n") == 0 and "--points" in bad.stderr


def _result(label: str, ms: float, backend="onnxruntime") -> Result:
    samples = np.full(20, ms) + np.linspace(0, 0.01, 20)
    return Result(target=label, backend=backend, batch_size=1, samples_ms=samples, summary=summarize(samples, 1),
                  flops=100, params=10, device="cpu", timing="wall", cold_start_ms=0.0, load_ms=0.0)


def test_bench_reports_the_latency_target_error():
    results = [_result("dense", 10.0), _result("pruned", 5.5), _result("other", 4.0)]
    aims = {"pruned": {"ratio": 0.5, "backend": "onnxruntime", "threads": 2, "batch_size": 1}}
    ups = {s.target: s for s in speedups(results, "dense", resamples=50, latency_targets=aims, threads=2)}
    assert ups["pruned"].latency_ratio_target == 0.5
    assert ups["pruned"].latency_target_error == pytest.approx(0.5505 / 0.5 - 1, abs=2e-3)
    assert ups["other"].latency_target_error is None
    other_threads = speedups(results, "dense", resamples=50, latency_targets=aims, threads=1)
    assert all(s.latency_target_error is None for s in other_threads)     # measured elsewhere than aimed
