"""TensorRT engines.

On any machine: the pure-Python parts of the build (which input the batch profile names, how the
reference of a parity check is chosen and named). With a CUDA GPU and the `tensorrt` package
(skipped otherwise, with the reason): fp32 and fp16 builds from a run directory and from ONNX files
(ours and one whose input has another name), the dynamic-batch profile, fixed-batch rejection, the
timing cache, the engine's own CUDA stream, and parity against PyTorch / ONNX Runtime.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import compress
from cli import main
from compress.errors import CompressError
from export import OnnxRunner
from export.onnx_file import onnx_input
from export.parity import FP16_TOLERANCE, TENSORRT_FP32_TOLERANCE
from export.tensorrt import Profile, _source, batch_profile, parity_label

try:
    import tensorrt  # noqa: F401

    HAVE_TENSORRT = True
except ImportError:
    HAVE_TENSORRT = False

gpu = pytest.mark.gpu
needs_tensorrt = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)"),
    pytest.mark.skipif(not HAVE_TENSORRT, reason='needs the tensorrt package: pip install -e ".[gpu]"'),
]


def tensorrt_test(fn):
    """Marks a test as needing a GPU and TensorRT (`pytest -m gpu` selects it; skipped with the reason otherwise)."""
    for mark in [gpu, *needs_tensorrt]:
        fn = mark(fn)
    return fn


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


@tensorrt_test
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
    # its own stream: execute_async_v3 on the legacy default stream adds device synchronisations
    assert engine.stream.cuda_stream not in (0, torch.cuda.default_stream().cuda_stream)
    assert engine.input_dtype == torch.float32 and engine.batch_range == (1, 32, 32)
    for batch in (1, 7, 32):
        x = np.random.default_rng(batch).random((batch, 3, SIZE, SIZE), dtype=np.float32)
        assert rel_error(pytorch_logits(run_dir, x), engine(x)) <= tolerance
    with pytest.raises(CompressError, match="batch profile of 1..32"):
        engine.infer(np.zeros((33, 3, SIZE, SIZE), np.float32))


@tensorrt_test
def test_engine_from_fixed_batch_onnx_file(run_dir, tmp_path):
    from export import to_onnx, to_tensorrt
    from export.tensorrt import TensorRTEngine

    onnx_path = to_onnx(compress.load(run_dir), tmp_path / "b4.onnx", batch_size=4).path
    result = to_tensorrt(onnx_path, tmp_path / "b4.engine")
    assert result.parity.passed and "tensorrt fp32 vs onnxruntime" in result.parity.inputs
    engine = TensorRTEngine.load(result.path)
    assert engine.batch_range == (4, 4, 4) and engine.input_shape == (4, 3, SIZE, SIZE)
    with pytest.raises(CompressError, match="fixed batch size of 4"):
        engine.infer(np.zeros((1, 3, SIZE, SIZE), np.float32))
    with pytest.raises(CompressError, match="fixed batch size of 4"):
        to_tensorrt(onnx_path, tmp_path / "bad.engine", max_batch=8)


@tensorrt_test
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


@tensorrt_test
def test_engine_from_onnx_whose_input_has_another_name(tmp_path):
    """A user's dynamic-batch ONNX file names its input "pixel_values": the profile must use that name."""
    from export import to_tensorrt
    from export.tensorrt import TensorRTEngine

    path = conv_onnx(tmp_path / "other.onnx", "pixel_values")
    result = to_tensorrt(path, tmp_path / "other.engine", min_batch=1, max_batch=8)
    assert result.parity.passed and result.input_names == ["pixel_values"] and result.batch_profile == [1, 8, 8]
    engine = TensorRTEngine.load(result.path)
    assert engine.input_name == "pixel_values" and engine.batch_range == (1, 8, 8)
    x = np.random.default_rng(0).random((3, 3, 8, 8), dtype=np.float32)  # a batch inside the profile
    expected = OnnxRunner(path)(x)
    assert rel_error(expected, engine(x)) <= TENSORRT_FP32_TOLERANCE


# ------------------------------------------------------------------ pure-Python parts (any machine)


def conv_onnx(path, input_name: str, *, dynamic: bool = True, initializers_as_inputs: bool = False):
    """A real one-conv ONNX graph whose input is called `input_name` (as other exporters name theirs)."""
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "conv.weight")
    batch = "N" if dynamic else 2
    x = helper.make_tensor_value_info(input_name, TensorProto.FLOAT, [batch, 3, 8, 8])
    y = helper.make_tensor_value_info("out", TensorProto.FLOAT, [batch, 4, 8, 8])
    node = helper.make_node("Conv", [input_name, "conv.weight"], ["out"], pads=[1, 1, 1, 1])
    inputs = [x]
    if initializers_as_inputs:  # IR < 4 files list every initializer among the graph inputs, first here
        inputs = [helper.make_tensor_value_info("conv.weight", TensorProto.FLOAT, [4, 3, 3, 3]), x]
    graph = helper.make_graph([node], "g", inputs, [y], initializer=[weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save_model(model, str(path))
    return path


def test_batch_profile_names_the_files_real_input(tmp_path):
    path = conv_onnx(tmp_path / "m.onnx", "pixel_values")
    name, shape = onnx_input(path)
    assert (name, shape) == ("pixel_values", ("N", 3, 8, 8))
    assert batch_profile(name, shape, 1, None, 8) == Profile("pixel_values", (1, 8, 8),
                                                             ((1, 3, 8, 8), (8, 3, 8, 8), (8, 3, 8, 8)))
    assert batch_profile(name, shape, 2, 4, None).batches == (2, 4, 32)  # default max 32, opt as given
    legacy = conv_onnx(tmp_path / "legacy.onnx", "input.1", initializers_as_inputs=True)
    assert onnx_input(legacy)[0] == "input.1"  # the weight listed among the inputs is not the input


def test_batch_profile_of_a_fixed_batch_file(tmp_path):
    name, shape = onnx_input(conv_onnx(tmp_path / "b2.onnx", "x", dynamic=False))
    assert batch_profile(name, shape, 1, None, None) is None
    with pytest.raises(CompressError, match="fixed batch size of 2"):
        batch_profile(name, shape, 1, None, 8)
    with pytest.raises(CompressError, match="1 <= min <= opt <= max"):
        batch_profile("x", ("N", 3, 8, 8), 4, 2, 8)


def test_engine_parity_names_its_reference(tmp_path):
    """Built from an .onnx file, the engine is checked against ONNX Runtime (and the text says so);
    built from a module, against PyTorch."""
    path = conv_onnx(tmp_path / "m.onnx", "x")
    source = _source(path, tmp_path, 1, 8, 18, True, None, print)
    assert source.reference_name == "onnxruntime" and source.input_size == (3, 8, 8)
    x = np.ones((2, 3, 8, 8), np.float32)
    assert source.reference(x).shape == (2, 4, 8, 8)  # a real ONNX Runtime session on the file
    assert parity_label("16 seeded", False, source.reference_name) == "16 seeded, tensorrt fp32 vs onnxruntime"
    assert parity_label("16 seeded", True, "pytorch") == "16 seeded, tensorrt fp16 vs pytorch"
    with pytest.raises(CompressError, match="expected \\[batch, C, H, W\\]"):
        bad = helper.make_model(helper.make_graph(
            [helper.make_node("Relu", ["v"], ["w"])], "g",
            [helper.make_tensor_value_info("v", TensorProto.FLOAT, ["N", 5])],
            [helper.make_tensor_value_info("w", TensorProto.FLOAT, ["N", 5])]),
            opset_imports=[helper.make_opsetid("", 17)])
        onnx.save_model(bad, str(tmp_path / "flat.onnx"))
        _source(tmp_path / "flat.onnx", tmp_path, 1, 8, 18, True, None, print)
