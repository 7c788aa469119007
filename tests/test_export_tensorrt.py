"""TensorRT engines (needs a CUDA GPU and the `tensorrt` package; skipped otherwise, with the reason).

fp32 and fp16 builds from a run directory and from an ONNX file, the dynamic-batch profile,
fixed-batch rejection, the timing cache, and parity against PyTorch / ONNX Runtime.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import compress
from cli import main
from compress.errors import CompressError
from export.parity import FP16_TOLERANCE, TENSORRT_FP32_TOLERANCE

try:
    import tensorrt  # noqa: F401

    HAVE_TENSORRT = True
except ImportError:
    HAVE_TENSORRT = False

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)"),
    pytest.mark.skipif(not HAVE_TENSORRT, reason='needs the tensorrt package: pip install -e ".[gpu]"'),
]

SIZE = 32


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from test_export import make_run

    return make_run(tmp_path_factory.mktemp("trt-runs"), "resnet18")


def run_cli(*args):
    return CliRunner().invoke(main, ["export", *[str(a) for a in args]])


def pytorch_logits(run_dir, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return compress.load(run_dir)(torch.from_numpy(x)).numpy()


def rel_error(ref: np.ndarray, got: np.ndarray) -> float:
    return float(np.abs(ref - got).max() / np.abs(ref).max())


@pytest.mark.parametrize("fp16, tolerance", [(False, TENSORRT_FP32_TOLERANCE), (True, FP16_TOLERANCE)])
def test_engine_from_run_dynamic_batch(run_dir, tmp_path, fp16, tolerance):
    from export.tensorrt import TensorRTEngine

    out, cache = tmp_path / "m.engine", tmp_path / "timing.cache"
    args = ["--format", "tensorrt", "--out", out, "--dynamic-batch", "--max-batch", 32, "--timing-cache", cache,
            "--json", tmp_path / "r.json"] + (["--fp16"] if fp16 else [])
    result = run_cli(run_dir, *args)
    assert result.exit_code == 0, result.output
    figures = json.loads((tmp_path / "r.json").read_text())
    assert figures["format"] == "tensorrt" and figures["precision"] == ("fp16" if fp16 else "fp32")
    assert figures["parity"]["passed"] and figures["parity"]["max_rel"] <= tolerance
    assert figures["batch_profile"] == [1, 32, 32] and figures["size_bytes"] > 0
    assert cache.is_file() and cache.stat().st_size > 0
    print(f"\ntensorrt {figures['precision']}: build {figures['build_time_s']} s, engine {figures['size_bytes']} B, "
          f"parity {figures['parity']}")

    engine = TensorRTEngine.load(out)
    assert engine.input_name == "images" and engine.output_name == "logits"
    assert engine.input_dtype == torch.float32 and engine.batch_range == (1, 32, 32)
    for batch in (1, 7, 32):
        x = np.random.default_rng(batch).random((batch, 3, SIZE, SIZE), dtype=np.float32)
        assert rel_error(pytorch_logits(run_dir, x), engine(x)) <= tolerance
    with pytest.raises(CompressError, match="batch profile of 1..32"):
        engine.infer(np.zeros((33, 3, SIZE, SIZE), np.float32))


def test_engine_from_fixed_batch_onnx_file(run_dir, tmp_path):
    from export import to_onnx, to_tensorrt
    from export.tensorrt import TensorRTEngine

    onnx_path = to_onnx(compress.load(run_dir), tmp_path / "b4.onnx", batch_size=4).path
    result = to_tensorrt(onnx_path, tmp_path / "b4.engine")
    assert result.parity.passed and "onnxruntime" in result.parity.inputs
    engine = TensorRTEngine.load(result.path)
    assert engine.batch_range == (4, 4, 4) and engine.input_shape == (4, 3, SIZE, SIZE)
    with pytest.raises(CompressError, match="fixed batch size of 4"):
        engine.infer(np.zeros((1, 3, SIZE, SIZE), np.float32))
    with pytest.raises(CompressError, match="fixed batch size of 4"):
        to_tensorrt(onnx_path, tmp_path / "bad.engine", max_batch=8)


def test_engine_parity_failure_is_exit_1(run_dir, tmp_path, monkeypatch):
    """A tampered engine build (TensorRT given a corrupted ONNX graph) is caught by the engine parity check."""
    import onnx

    import export.tensorrt as export_trt

    real_build = export_trt.build_engine

    def build_tampered(trt, onnx_path, **kwargs):
        model = onnx.load(str(onnx_path))
        biggest = max(model.graph.initializer, key=lambda t: np.prod(t.dims))
        values = onnx.numpy_helper.to_array(biggest).copy() + 0.5
        biggest.CopyFrom(onnx.numpy_helper.from_array(values, biggest.name))
        bad = tmp_path / "tampered.onnx"
        onnx.save_model(model, str(bad))
        return real_build(trt, bad, **kwargs)

    monkeypatch.setattr(export_trt, "build_engine", build_tampered)
    out = tmp_path / "m.engine"
    result = run_cli(run_dir, "--format", "tensorrt", "--out", out)
    assert result.exit_code == 1 and "parity check failed" in result.stderr
    assert not out.exists() and (tmp_path / "m.engine.failed").is_file()
