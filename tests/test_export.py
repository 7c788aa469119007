"""`compress export --format onnx` and export.to_onnx: batch handling, metadata, prompts, exporters, failures.

(The four architectures, dense and pruned, are in test_export_models.py.)

Run directories are written with the real run-directory code (untrained weights: parity does not
need training), at 32 px so every export stays small and fast.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

import compress
from cli import main
from compress.deploy import DeployableModule
from compress.errors import CompressError
from compress.flops import count_params
from compress.models import default_adapt
from compress.runs import build_module, build_spec, write_run
from export import OnnxRunner, onnx_input_shape, read_metadata, require_batch_size, to_onnx
from export.fp16 import convert_to_fp16
from export.parity import FP16_TOLERANCE, FP32_TOLERANCE, compare

SIZE = 32


def make_run(root: Path, model: str, *, size: int = SIZE, report: dict | None = None, seed: int = 0,
             prompt: dict | None = None, name: str | None = None) -> Path:
    """A run directory of `model` with seeded, untrained weights (zero-initialised heads and prompts
    randomised, since an all-zero output would make any parity check trivially pass)."""
    spec = build_spec(model, 10, (3, size, size), [0.49, 0.48, 0.45], [0.25, 0.24, 0.26],
                      adapt=default_adapt(model, size), data="synthetic")
    spec["prompt"] = prompt
    torch.manual_seed(seed)
    module = build_module(spec)
    with torch.no_grad():
        for p in module.parameters():
            if not p.any():
                p.normal_(0, 0.05)
    base = {"command": "train", "model": model, "data": "synthetic", "seed": seed, "input_size": [3, size, size],
            "wall_time_s": 0.0, "accuracy": 0.1, "params": count_params(module)}
    return write_run(root / (name or model), module, spec, {**base, **(report or {})})


def run_cli(*args):
    return CliRunner().invoke(main, ["export", *[str(a) for a in args]])


def independent_parity(run_dir: Path, onnx_path: Path, batch: int) -> float:
    """Max |ORT - PyTorch| / max |PyTorch| on fresh inputs, computed without the export package."""
    module = compress.load(run_dir)
    x = torch.rand(batch, *module.input_size, generator=torch.Generator().manual_seed(123))
    with torch.no_grad():
        ref = module(x).numpy()
    got = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).run(None, {"images": x.numpy()})[0]
    return float(np.abs(got - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("export-runs")


@pytest.fixture(scope="module")
def small_run(runs) -> Path:
    """resnet20 (CIFAR ResNet, residual adds and downsampling shortcuts): the quickest real run to export."""
    return make_run(runs, "resnet20", seed=1)


# ------------------------------------------------------------------ acceptance 2: batch sizes


def test_dynamic_batch_runs_at_1_7_32(small_run, tmp_path):
    out = tmp_path / "dyn.onnx"
    result = run_cli(small_run, "--out", out, "--dynamic-batch")
    assert result.exit_code == 0, result.output
    assert f"[batch, 3, {SIZE}, {SIZE}]" in result.output  # the table shows the symbolic batch
    assert onnx_input_shape(out)[0] == "batch" and onnx_input_shape(out)[1:] == (3, SIZE, SIZE)
    runner = OnnxRunner(out)
    assert runner.batch_size is None
    for batch in (1, 7, 32):
        assert independent_parity(small_run, out, batch) <= FP32_TOLERANCE
        assert runner(np.zeros((batch, 3, SIZE, SIZE), np.float32)).shape == (batch, 10)


def test_fixed_batch_file_rejects_other_batch_sizes(small_run, tmp_path):
    out = tmp_path / "b4.onnx"
    assert run_cli(small_run, "--out", out, "--batch-size", 4).exit_code == 0
    assert onnx_input_shape(out) == (4, 3, SIZE, SIZE)
    runner = OnnxRunner(out)
    assert runner.batch_size == 4 and runner(np.zeros((4, 3, SIZE, SIZE), np.float32)).shape == (4, 10)
    with pytest.raises(CompressError, match="fixed batch size of 4 and cannot run at batch 7.*--dynamic-batch"):
        runner(np.zeros((7, 3, SIZE, SIZE), np.float32))
    with pytest.raises(CompressError, match="fixed batch size of 4"):
        require_batch_size(out, 1)
    require_batch_size(out, 4)
    with pytest.raises(Exception, match="(?i)dimension|shape"):  # the file itself, not just our check, is fixed
        ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(
            None, {"images": np.zeros((7, 3, SIZE, SIZE), np.float32)})


# ------------------------------------------------------------------ metadata and data


def test_metadata_round_trip(runs, tmp_path):
    run_dir = make_run(runs, "resnet32", report={"command": "prune", "method": "l1", "flops_ratio": 0.42,
                                                 "flops": 1234567})
    out = tmp_path / "meta.onnx"
    assert run_cli(run_dir, "--out", out).exit_code == 0
    meta = read_metadata(out)
    assert meta["model"] == "resnet32" and meta["method"] == "l1"
    assert json.loads(meta["flops_ratio"]) == 0.42 and json.loads(meta["flops"]) == 1234567
    assert json.loads(meta["input_size"]) == [3, SIZE, SIZE]
    assert json.loads(meta["mean"]) == [0.49, 0.48, 0.45] and json.loads(meta["std"]) == [0.25, 0.24, 0.26]
    assert json.loads(meta["params"]) == count_params(compress.load(run_dir))
    assert meta["prompt"] == "false" and meta["compress_version"] == compress.__version__


def test_parity_on_real_validation_images(digits_run, tmp_path):
    """A trained run, checked on digits validation images as well as seeded inputs."""
    out = tmp_path / "digits.onnx"
    result = run_cli(digits_run, "--out", out, "--data", "digits", "--json", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    parity = json.loads((tmp_path / "r.json").read_text())["parity"]
    assert "val images of digits" in parity["inputs"] and parity["n_samples"] > 16
    assert parity["passed"] and parity["top1_agreement"] == 1.0
    meta = read_metadata(out)
    assert meta["method"] == "dense" and json.loads(meta["flops_ratio"]) == 1.0
    assert json.loads(meta["flops"]) == json.loads((digits_run / "report.json").read_text())["flops"]


@pytest.fixture(scope="module")
def prompted_run(runs) -> Path:
    """resnet20 behind a resize-pad visual prompt (bilinear resize + learnt frame + clamp)."""
    return make_run(runs, "resnet20", prompt={"kind": "resize-pad", "image_size": SIZE, "size": 3}, name="prompted")


def test_visual_prompt_is_part_of_the_graph(prompted_run, tmp_path):
    run_dir = prompted_run
    out = tmp_path / "prompted.onnx"
    assert run_cli(run_dir, "--out", out, "--dynamic-batch").exit_code == 0
    assert "Resize" in {n.op_type for n in onnx.load(str(out)).graph.node}  # the prompt's inner resize
    assert read_metadata(out)["prompt"] == "true"
    assert independent_parity(run_dir, out, 3) <= FP32_TOLERANCE


def test_fp16_graph_for_strongly_typed_tensorrt(prompted_run, tmp_path):
    """The TensorRT 11 fp16 path converts the graph first; ONNX Runtime (CPU) can run the result too.
    Resize's scales must stay fp32 (the ONNX spec fixes their type)."""
    path = to_onnx(compress.load(prompted_run), tmp_path / "fp32.onnx", dynamic_batch=True, check=False).path
    half = convert_to_fp16(onnx.load(str(path)))
    onnx.checker.check_model(half)
    weights = [t for t in half.graph.initializer if len(t.dims) >= 2]  # conv and linear weights
    assert weights and all(t.data_type == onnx.TensorProto.FLOAT16 for t in weights)
    io_types = [i.type.tensor_type.elem_type for i in (*half.graph.input, *half.graph.output)]
    assert io_types == [onnx.TensorProto.FLOAT] * 2
    onnx.save_model(half, str(tmp_path / "fp16.onnx"))
    x = np.random.default_rng(0).random((5, 3, SIZE, SIZE), dtype=np.float32)
    ref = OnnxRunner(path)(x)
    got = OnnxRunner(tmp_path / "fp16.onnx")(x)
    assert got.dtype == np.float32
    p = compare(ref, got, FP16_TOLERANCE)
    assert p.passed and p.max_rel > 1e-6, p  # close, and really computed in half precision


# ------------------------------------------------------------------ acceptance 3: a broken export is caught


def tamper_after_save(monkeypatch):
    """Corrupt the biggest weight of the file as it is written, i.e. after export and before the check."""
    import export.onnx as export_onnx

    real_save = export_onnx.save_model

    def save_then_tamper(model, path):
        real_save(model, path)
        written = onnx.load(str(path))
        biggest = max(written.graph.initializer, key=lambda t: np.prod(t.dims))
        values = onnx.numpy_helper.to_array(biggest).copy()
        values.flat[: max(1, values.size // 10)] += 0.5
        biggest.CopyFrom(onnx.numpy_helper.from_array(values, biggest.name))
        onnx.save_model(written, str(path))

    monkeypatch.setattr(export_onnx, "save_model", save_then_tamper)


def test_tampered_weight_fails_parity_and_leaves_nothing_at_out(small_run, tmp_path, monkeypatch):
    out = tmp_path / "model.onnx"
    out.write_bytes(b"stale file from an earlier export")
    tamper_after_save(monkeypatch)
    result = run_cli(small_run, "--out", out, "--json", tmp_path / "r.json")
    assert result.exit_code == 1, result.output
    assert "parity check failed" in result.stderr and "Traceback" not in result.output
    assert not out.exists(), "a file failing parity must not be at --out"
    failed = tmp_path / "model.onnx.failed"
    assert failed.is_file()
    onnx.checker.check_model(onnx.load(str(failed)))  # a valid graph computing the wrong thing
    assert independent_parity(small_run, failed, 1) > FP32_TOLERANCE
    assert not (tmp_path / "r.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]

    monkeypatch.undo()  # a later good export replaces the .failed leftover
    assert run_cli(small_run, "--out", out, "--no-simplify").exit_code == 0
    assert out.is_file() and not failed.exists()


def test_no_check_skips_parity_and_says_so(small_run, tmp_path, monkeypatch):
    tamper_after_save(monkeypatch)
    out = tmp_path / "unchecked.onnx"
    result = run_cli(small_run, "--out", out, "--no-check", "--json", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    assert "not checked" in result.output and out.is_file()
    assert json.loads((tmp_path / "r.json").read_text())["parity"] is None


# ------------------------------------------------------------------ exporters


class DataDependent(torch.nn.Module):
    """A branch on tensor values: torch.export refuses it, the TorchScript tracer records the branch taken."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8, 10)

    def forward(self, x):
        x = self.conv(x)
        if x.mean() > -100:  # always true for images in [0, 1]
            x = torch.relu(x)
        return self.fc(x.mean((2, 3)))


def test_dynamo_failure_falls_back_to_torchscript_with_reason(tmp_path):
    torch.manual_seed(0)
    module = DeployableModule(DataDependent(), [0.5] * 3, [0.25] * 3, input_size=(3, 16, 16)).eval()
    notes = []
    result = to_onnx(module, tmp_path / "fallback.onnx", log=notes.append)
    assert result.exporter == "torchscript" and result.parity.passed
    assert notes and "dynamo exporter failed" in notes[0] and "TorchScript" in notes[0]
    assert any("dynamo exporter failed" in n for n in result.notes)


def test_torchscript_exporter_on_request(small_run, tmp_path):
    result = to_onnx(compress.load(small_run), tmp_path / "ts.onnx", exporter="torchscript", dynamic_batch=True)
    assert result.exporter == "torchscript" and result.parity.passed
    assert result.input_shapes[0][0] == "batch"
    assert OnnxRunner(result.path)(np.zeros((3, 3, SIZE, SIZE), np.float32)).shape == (3, 10)


def test_opset_is_pinned(small_run, tmp_path):
    module = compress.load(small_run)
    result = to_onnx(module, tmp_path / "o20.onnx", opset=20, simplify=False)
    assert result.opset == 20 and result.exporter == "dynamo"
    assert next(o.version for o in onnx.load(str(result.path)).opset_import if o.domain == "") == 20
    # dynamo writes opset >= 18 only: an older pinned opset comes from the TorchScript exporter, said so
    result = to_onnx(module, tmp_path / "o17.onnx", opset=17, simplify=False, log=lambda _: None)
    assert result.opset == 17 and result.exporter == "torchscript" and result.parity.passed
    assert any("opset 17" in note for note in result.notes)


# ------------------------------------------------------------------ bad input


def test_not_a_run_directory(tmp_path):
    (tmp_path / "empty").mkdir()
    result = run_cli(tmp_path / "empty", "--out", tmp_path / "m.onnx")
    assert result.exit_code == 2 and "not a run directory" in result.stderr
    result = run_cli(tmp_path / "missing", "--out", tmp_path / "m.onnx")
    assert result.exit_code == 2 and "does not exist" in result.stderr
    (tmp_path / "file.onnx").write_bytes(b"x")
    result = run_cli(tmp_path / "file.onnx", "--out", tmp_path / "m.onnx")
    assert result.exit_code == 2 and "takes a run directory" in result.stderr
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("args, message", [
    (["--batch-size", "2", "--dynamic-batch"], "exclude each other"),
    (["--batch-size", "0"], "positive"),
    (["--fp16"], "--fp16 only applies to --format tensorrt"),
    (["--max-batch", "8", "--workspace", "2"], "only apply to --format tensorrt"),
    (["--opset", "7"], "--opset 7 is out of range"),
])
def test_bad_flags(small_run, tmp_path, args, message):
    result = run_cli(small_run, "--out", tmp_path / "m.onnx", *args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "m.onnx").exists()


def test_unwritable_out(small_run, tmp_path):
    (tmp_path / "a-file").write_text("x")
    result = run_cli(small_run, "--out", tmp_path / "a-file" / "m.onnx")
    assert result.exit_code == 2 and "cannot write to --out" in result.stderr
    result = run_cli(small_run, "--out", tmp_path)
    assert result.exit_code == 2 and "is a directory" in result.stderr
    result = run_cli(small_run, "--out", tmp_path / "m.onnx", "--json", tmp_path / "a-file" / "r.json")
    assert result.exit_code == 2 and "cannot write" in result.stderr
    assert not (tmp_path / "m.onnx").exists()


def test_tensorrt_without_gpu_is_a_clean_exit_2(small_run, tmp_path):
    try:
        import tensorrt  # noqa: F401

        if torch.cuda.is_available():
            pytest.skip("this machine has a GPU and tensorrt: tests/test_export_tensorrt.py covers it")
    except ImportError:
        pass
    result = run_cli(small_run, "--format", "tensorrt", "--out", tmp_path / "m.engine")
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: TensorRT export needs")
    assert 'pip install -e ".[gpu]"' in lines[0]
    if not torch.cuda.is_available():
        assert "no CUDA GPU" in lines[0]
    assert not (tmp_path / "m.engine").exists()


# ------------------------------------------------------------------ parity arithmetic


def test_compare_scales_by_output_and_counts_top1():
    ref = np.array([[10.0, 0.0, -5.0], [0.0, 2.0, 1.0]])
    close = ref + 5e-4  # 5e-4 / 10 = 5e-5 relative
    p = compare(ref, close, 1e-4)
    assert p.passed and p.max_abs == pytest.approx(5e-4) and p.max_rel == pytest.approx(5e-5)
    assert p.top1_agreement == 1.0 and p.n_samples == 2
    flipped = ref.copy()
    flipped[1] = [0.0, 1.0, 2.0]
    p = compare(ref, flipped, 1e-4)
    assert not p.passed and p.top1_agreement == 0.5
    assert not compare(ref, ref * np.nan, 1.0).passed
    assert not compare(ref, ref[:, :2], 1.0).passed
