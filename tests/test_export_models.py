"""Acceptance 1: dense and engine-pruned runs of resnet18, mobilenet_v2, vit_b_16 and resnet56 export to ONNX
files that pass onnx.checker, match PyTorch in ONNX Runtime, and shrink in proportion to their parameters.

The pruned run comes from the real `compress prune` pipeline (L1 criterion, half the FLOPs, no
fine-tuning: parity does not need accuracy), starting from the dense run directory.
"""

from __future__ import annotations

import json

import onnx
import pytest
from click.testing import CliRunner
from test_export import independent_parity, make_run

import compress
from cli import main
from compress.flops import count_params
from compress.pipeline import prune_run
from export import read_metadata
from export.parity import FP32_TOLERANCE

SIZE = 32


def export(run_dir, out, *extra):
    result = CliRunner().invoke(main, ["export", str(run_dir), "--out", str(out), "--json", f"{out}.json", *extra])
    assert result.exit_code == 0, result.output
    onnx.checker.check_model(onnx.load(str(out)))
    figures = json.loads(out.with_name(out.name + ".json").read_text())
    assert figures["parity"]["passed"] and figures["parity"]["max_rel"] <= FP32_TOLERANCE
    assert figures["opset"] == 18 and figures["input_names"] == ["images"] and figures["output_names"] == ["logits"]
    assert figures["input_shapes"] == [[1, 3, SIZE, SIZE]] and figures["output_shapes"] == [[1, 10]]
    assert figures["size_bytes"] == out.stat().st_size
    assert "max rel error" in result.output and "top-1 agreement" in result.output
    assert independent_parity(run_dir, out, 1) <= FP32_TOLERANCE
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")], "temporary files left behind"
    return figures


# onnxslim's constant folding over vit_b_16's 340 MB of weights is slow; the graph is exported as is.
@pytest.mark.parametrize("model, extra", [("resnet18", []), ("mobilenet_v2", []), ("resnet56", []),
                                          ("vit_b_16", ["--no-simplify"])])
def test_dense_and_pruned_export_size_follows_params(tmp_path, model, extra):
    dense = make_run(tmp_path, model)
    pruned = tmp_path / f"{model}-pruned"
    report = prune_run(pruned, data="synthetic:20", method="l1", flops_ratio=0.5, source=dense, finetune_epochs=0)
    assert report["flops_ratio"] < 0.75

    dense_fig = export(dense, tmp_path / "dense.onnx", *extra)
    pruned_fig = export(pruned, tmp_path / "pruned.onnx", *extra)

    param_ratio = count_params(compress.load(pruned)) / count_params(compress.load(dense))
    size_ratio = pruned_fig["size_bytes"] / dense_fig["size_bytes"]
    print(f"\n{model}: dense {dense_fig['size_bytes']} B, pruned {pruned_fig['size_bytes']} B, size ratio "
          f"{size_ratio:.4f}, params ratio {param_ratio:.4f}, flops ratio {report['flops_ratio']:.4f}, parity "
          f"dense {dense_fig['parity']['max_rel']:.2e} pruned {pruned_fig['parity']['max_rel']:.2e}, export "
          f"{dense_fig['build_time_s']} s / {pruned_fig['build_time_s']} s")
    assert param_ratio < 0.9
    assert abs(size_ratio / param_ratio - 1) <= 0.10

    meta = read_metadata(tmp_path / "pruned.onnx")
    assert meta["method"] == "l1" and json.loads(meta["flops_ratio"]) == report["flops_ratio"]
    assert json.loads(meta["params"]) == report["params"]
