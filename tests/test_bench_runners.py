"""Runner and measurement plumbing on tiny models (no timing is asserted anywhere)."""

import os
import subprocess
import sys
import time
from dataclasses import replace

import numpy as np
import pytest
import torch

from bench.backends import RUNNERS, default_backends, parse_backends
from bench.contention import OVERSUBSCRIBED_WAIT, run_queue_wait_ns
from bench.gpu_runners import OrtCudaRunner, TensorRTRunner, TorchCudaRunner
from bench.measure import Contender, Settings, load_sessions, measure_interleaved, sessions_of, to_results
from bench.report import RESULT_KEYS, SPEEDUP_KEYS, load_results, to_json, write_json
from bench.runners import OrtRunner, Runner, TorchCompileRunner, TorchRunner
from bench.session import benchmark
from bench.targets import resolve_targets
from compress.errors import CompressError
from compress.flops import count_flops, count_params
from compress.runs import build_module, build_spec, write_run

SIZE = 16
FAST = Settings(threads=1, warmup_s=0.0, warmup_iters=2, min_time_s=0.02, min_iters=5, block_s=0.005)


def make_run(path, model="resnet20"):
    spec = build_spec(model, 10, (3, SIZE, SIZE), [0.5] * 3, [0.25] * 3, adapt=None, data="synthetic")
    torch.manual_seed(0)
    module = build_module(spec).eval()
    report = {"command": "train", "model": model, "data": "synthetic", "seed": 0, "input_size": [3, SIZE, SIZE],
              "wall_time_s": 0.0, "accuracy": 0.1, "flops": count_flops(module, module.input_size),
              "params": count_params(module)}
    write_run(path, module, spec, report)
    return path, module


def make_onnx(path, module, dynamic):
    axes = {"images": {0: "batch"}, "logits": {0: "batch"}} if dynamic else None
    torch.onnx.export(module, (module.example_input(1),), str(path), dynamo=False, opset_version=18,
                      input_names=["images"], output_names=["logits"], dynamic_axes=axes)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    dense, module = make_run(root / "dense")
    small, small_module = make_run(root / "small", "resnet20")
    big, _ = make_run(root / "big", "resnet32")
    return {"dense": dense, "module": module, "big": big, "small": small,
            "dyn": make_onnx(root / "dyn.onnx", small_module, dynamic=True),
            "fixed": make_onnx(root / "fixed.onnx", small_module, dynamic=False)}


def test_parse_backends_resolves_aliases_and_rejects_unknown():
    assert parse_backends("torch, ort,onnxruntime") == ["torch", "onnxruntime"]
    assert parse_backends(None) is None
    with pytest.raises(CompressError, match="unknown backend 'tvm'"):
        parse_backends("torch,tvm")


def test_targets_resolve_kinds_counts_and_unique_labels(files, tmp_path):
    dense, dense2, onnx, fixed = resolve_targets([files["dense"], files["dense"], files["dyn"], files["fixed"]])
    assert (dense.kind, onnx.kind) == ("run", "onnx")
    assert dense.label != dense2.label and dense2.label.endswith("#2")
    assert dense.flops == count_flops(files["module"], (3, SIZE, SIZE)) and dense.params > 0
    assert onnx.flops is None and onnx.batch_dim is None and fixed.batch_dim == 1
    (tmp_path / "model.bin").write_text("x")
    for bad, msg in ((tmp_path / "nope", "does not exist"), (tmp_path / "model.bin", "not a run directory"),
                     (tmp_path, "not a run directory")):
        with pytest.raises(CompressError, match=msg):
            resolve_targets([bad])


def test_default_backends_on_this_machine(files):
    runs = resolve_targets([files["dense"]])
    onnx = resolve_targets([files["dyn"]])
    expected_runs = [n for n, c in RUNNERS.items() if c.default and c.unavailable() is None]
    assert default_backends(runs) == expected_runs
    assert "torch" not in default_backends(onnx) and "onnxruntime" in default_backends(onnx)
    assert "torch-compile" not in default_backends(runs)  # opt-in: compiling is slow


def test_torch_and_ort_runners_agree_on_outputs(files, tmp_path):
    (target,) = resolve_targets([files["dyn"]])
    (run_target,) = resolve_targets([files["small"]])
    ort_runner, torch_runner = OrtRunner(1, tmp_path), TorchRunner(1, tmp_path)
    ort_runner.load(target)
    torch_runner.load(run_target)
    for bs in (1, 3):
        x = torch_runner.prepare(bs)
        feed = ort_runner.prepare(bs)
        np.testing.assert_allclose(feed["images"], x.numpy())  # same deterministic input
        np.testing.assert_allclose(ort_runner.run(feed)[0], torch_runner.run(x).numpy(), atol=1e-4)
        times = ort_runner.time(feed, 4)
        assert times.shape == (4,) and np.all(times > 0)


def test_cpu_clock_times_the_calling_thread(files, tmp_path):
    """With --clock cpu every CPU backend records thread CPU time; GPU backends keep their own timing
    (ort-cuda runs where onnxruntime-gpu and a GPU are present, and is skipped with a reason elsewhere)."""
    targets = resolve_targets([files["dyn"]])
    skipped = []
    run = benchmark(targets, backends=["onnxruntime", "ort-cuda"], settings=replace(FAST, clock="cpu"),
                    on_skip=skipped.append)
    timing = {r.backend: r.timing for r in run.results}
    assert "CPU time" in timing["onnxruntime"] and all(np.all(r.samples_ms > 0) for r in run.results)
    if "ort-cuda" in timing:
        assert "CPU time" not in timing["ort-cuda"] and not skipped
    else:
        assert [s.backend for s in skipped] == ["ort-cuda"] and skipped[0].reason
    with pytest.raises(CompressError, match="needs --threads 1"):
        Settings(threads=2, clock="cpu")
    with pytest.raises(CompressError, match="unknown clock"):
        OrtRunner(1, tmp_path, clock="tsc")
    assert OrtCudaRunner(1, tmp_path, clock="cpu").clock == "wall"
    assert "CUDA events" in TorchCudaRunner(1, tmp_path, clock="cpu").timing()


def test_fixed_batch_onnx_refuses_other_batch_sizes(files, tmp_path):
    targets = resolve_targets([files["fixed"]])
    with pytest.raises(CompressError, match="fixed batch size of 1 and cannot run batch size 8"):
        benchmark(targets, backends=["onnxruntime"], batch_sizes=[1, 8], settings=FAST)
    runner = OrtRunner(1, tmp_path)
    runner.load(targets[0])
    with pytest.raises(CompressError, match="fixed batch size of 1"):
        runner.prepare(2)
    assert runner.prepare(1)["images"].shape == (1, 3, SIZE, SIZE)


def test_runners_reject_targets_they_cannot_run(files):
    run, onnx = resolve_targets([files["dense"], files["dyn"]])
    assert TorchRunner.rejects(onnx) and TorchRunner.rejects(run) is None
    assert OrtRunner.rejects(run) is None and OrtRunner.rejects(onnx) is None
    assert TensorRTRunner.rejects(onnx) is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA path")
def test_gpu_runners_skip_with_a_reason_without_cuda(files):
    for cls in (TorchCudaRunner, OrtCudaRunner, RUNNERS["ort-trt"], TensorRTRunner, RUNNERS["torch-compile-cuda"]):
        assert cls.unavailable(), cls.name
    skipped = []
    run = benchmark(resolve_targets([files["dyn"]]), backends=["torch-cuda", "ort-cuda", "tensorrt", "onnxruntime"],
                    settings=FAST, on_skip=skipped.append)
    assert {s.backend for s in skipped} == {"torch-cuda", "ort-cuda", "tensorrt"}
    assert all(s.reason for s in skipped)
    assert [(r.backend, r.target) for r in run.results] == [("onnxruntime", str(files["dyn"]))]
    with pytest.raises(CompressError, match="nothing was measured: skipped torch-cuda"):
        benchmark(resolve_targets([files["dyn"]]), backends=["torch-cuda"], settings=FAST)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_torch_cuda_runner_times_with_cuda_events(files, tmp_path):
    (target,) = resolve_targets([files["dense"]])
    runner = TorchCudaRunner(1, tmp_path)
    runner.load(target)
    x = runner.prepare(2)
    assert x.is_cuda and runner.run(x).shape == (2, 10)
    assert np.all(runner.time(x, 3) > 0)
    assert next(target.module().parameters()).device.type == "cpu"  # the shared module stays on the CPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("tf32", [False, True])
def test_cuda_backends_set_and_record_tf32(files, tf32):
    """Each CUDA backend present runs dense and small side by side and records the TF32 setting it
    applied; PyTorch's flags really change. Backends this machine lacks are skipped with a reason."""
    backends = ["torch-cuda", "ort-cuda", "tensorrt"]
    skipped = []
    run = benchmark(resolve_targets([files["dense"], files["small"]]), backends=backends, batch_sizes=[1, 4],
                    settings=replace(FAST, tf32=tf32), on_skip=skipped.append)
    assert all(s.reason for s in skipped)
    measured = {r.backend for r in run.results}
    assert "torch-cuda" in measured and measured | {s.backend for s in skipped} == set(backends)
    for r in run.results:
        assert r.device == "cuda" and r.tf32 is tf32 and np.all(r.samples_ms > 0), r
    expected = "tf32" if tf32 else "ieee"
    assert torch.backends.cudnn.conv.fp32_precision == torch.backends.cuda.matmul.fp32_precision == expected


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_event_times_follow_the_stream_the_work_is_on():
    """Events recorded on the stream the work runs on (a side stream, as TensorRT engines use) time it;
    recorded on another stream they would read ~0."""
    from bench.gpu_runners import cuda_event_times

    x = torch.randn(2048, 2048, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())

    def on_side():
        with torch.cuda.stream(side):
            for _ in range(4):
                x @ x

    cuda_event_times(on_side, 2, side)  # warm-up
    on_its_stream = cuda_event_times(on_side, 5, side)
    single = cuda_event_times(lambda: x @ x, 5)
    assert np.all(on_its_stream > 0) and np.median(on_its_stream) > 2 * np.median(single)


def test_torch_compile_runner_plumbing(files, tmp_path):
    """The compile path and its cold start, with the cheap "eager" compile backend (inductor is slow)."""
    (target,) = resolve_targets([files["small"]])
    runner = TorchCompileRunner(1, tmp_path)
    runner.compile_backend = "eager"
    runner.load(target)
    x = runner.prepare(2)
    expected = target.module()(x)
    torch.testing.assert_close(runner.run(x), expected)


class Recorder(Runner):
    """A real (tiny) matmul workload that logs the order runners are called in."""

    name = "recorder"
    accepts = ("onnx",)

    def __init__(self, tag, log):
        super().__init__(1, None)
        self.tag, self.log = tag, log

    def load(self, target):
        self.target = target

    def prepare(self, batch_size):
        return np.ones((batch_size, 32), dtype=np.float32)

    def run(self, batch):
        return batch @ batch.T

    def time(self, batch, iterations):
        self.log.append((self.tag, iterations))
        return super().time(batch, iterations)


def test_measurement_interleaves_in_alternating_rounds(files):
    log = []
    a, b = resolve_targets([files["dyn"], files["dyn"]])
    contenders = [Contender(a, Recorder("A", log), 0.0), Contender(b, Recorder("B", log), 0.0)]
    measure_interleaved(contenders, 2, replace(FAST, max_iters=10**7))
    warm = [tag for tag, _ in log[:2 * FAST.warmup_iters]]  # warmup_s=0: exactly warmup_iters runs each
    assert warm == ["A"] * FAST.warmup_iters + ["B"] * FAST.warmup_iters
    blocks = [tag for tag, _ in log[2 * FAST.warmup_iters:]]
    both = 2 * min(blocks.count("A"), blocks.count("B"))
    assert both >= 2
    # Rounds alternate their order: A B | B A | A B ...; one that has its minimum stops, so the other may
    # take a last block or two alone
    assert blocks[:both] == [t for i in range(both // 2) for t in (("A", "B") if i % 2 == 0 else ("B", "A"))]
    assert len(set(blocks[both:])) <= 1 and len(blocks) - both <= 2
    for c in contenders:
        assert c.count >= FAST.min_iters and c.total_ms >= FAST.min_time_s * 1000
        assert c.cold_start_ms > 0 and c.block >= 1


def test_measurement_stops_at_max_iters(files):
    capped = Settings(threads=1, warmup_s=0.0, warmup_iters=1, min_time_s=60.0, min_iters=1, max_iters=30,
                      block_s=0.001)
    (a,) = resolve_targets([files["dyn"]])
    c = Contender(a, Recorder("A", []), 0.0)
    measure_interleaved([c], 1, capped)
    assert c.count == 30


def test_sessions_split_the_duration_and_pool_into_one_result(files):
    """Three loads of each target share its duration and counts; their samples make one Result per
    target, in first-load order; runners that share one module load once."""
    log = []
    a, b = resolve_targets([files["dyn"], files["dyn"]])
    settings = replace(FAST, sessions=3, min_iters=1, min_time_s=60.0, max_iters=30)
    contenders = [c for t, tag in ((a, "A"), (b, "B")) for c in load_sessions(t, lambda tag=tag: Recorder(tag, log), 3)]
    assert len(contenders) == 6 and all(c.share == pytest.approx(1 / 3) for c in contenders)
    measure_interleaved(contenders, 1, settings)
    assert [c.count for c in contenders] == [10] * 6  # each load stops at its share of the target's cap
    results = to_results(contenders, "recorder", 1)
    assert [r.target for r in results] == [a.label, b.label] and [r.sessions for r in results] == [3, 3]
    assert [r.samples_ms.size for r in results] == [30, 30]
    assert sessions_of(OrtRunner, settings) == 3 and sessions_of(TorchRunner, settings) == 1
    assert sessions_of(OrtCudaRunner, settings) == 1 and sessions_of(TensorRTRunner, settings) == 1
    with pytest.raises(CompressError, match="--sessions"):
        replace(FAST, sessions=0)


def test_benchmark_end_to_end_json_schema(files, tmp_path):
    """Two run directories on torch and onnxruntime: every design.md key, speedups with fidelity."""
    targets = resolve_targets([files["big"], files["small"]])
    run = benchmark(targets, backends=["torch", "onnxruntime"], batch_sizes=[1, 2], settings=FAST, resamples=200)
    assert {(r.target, r.backend, r.batch_size) for r in run.results} == {
        (t.label, b, n) for t in targets for b in ("torch", "onnxruntime") for n in (1, 2)}
    doc = to_json(run)
    assert set(doc) >= {"host", "settings", "results", "speedups"}
    assert doc["settings"]["threads"] == 1 and doc["settings"]["batch_sizes"] == [1, 2]
    assert doc["host"]["physical_cores"] >= 1
    for row in doc["results"]:
        assert set(RESULT_KEYS) <= set(row)
        assert len(row["samples_ms"]) == row["n"] >= FAST.min_iters
        assert row["p90_ms"] <= row["p99_ms"] and row["flops"] > 0 and row["params"] > 0
        assert row["tf32"] is None  # no TF32 on CPUs
        assert row["cpu_wait"] >= 0 and row["oversubscribed"] == (row["cpu_wait"] > OVERSUBSCRIBED_WAIT)
    assert doc["settings"]["tf32"] is False
    assert len(doc["speedups"]) == 4
    big, small = targets
    for row in doc["speedups"]:
        assert set(SPEEDUP_KEYS) <= set(row)
        assert (row["baseline"], row["target"]) == (big.label, small.label)
        assert row["flops_ratio"] == pytest.approx(small.flops / big.flops)
        assert row["fidelity"] == pytest.approx(row["speedup"] * small.flops / big.flops)
        lo, hi = row["speedup_ci95"]
        assert lo <= row["speedup"] <= hi
    path = write_json(doc, tmp_path / "out" / "b.json")
    back = load_results(path)
    assert [(r.target, r.backend, r.batch_size) for r in back] == [
        (r.target, r.backend, r.batch_size) for r in run.results]
    np.testing.assert_allclose(back[0].samples_ms, run.results[0].samples_ms, atol=1e-5)


def test_load_results_rejects_bad_files(tmp_path):
    bad = tmp_path / "bad.json"
    for text, msg in (("{", "not valid JSON"), ('{"results": []}', "has no results"),
                      ('{"results": [{"target": "x"}]}', "lacks backend")):
        bad.write_text(text)
        with pytest.raises(CompressError, match=msg):
            load_results(bad)
    with pytest.raises(CompressError, match="not found"):
        load_results(tmp_path / "missing.json")


class FallbackRunner(OrtRunner):
    """An ONNX Runtime backend whose provider is listed but cannot run (as onnxruntime-gpu lists its
    TensorRT provider without TensorRT installed): ONNX Runtime really falls back to the CPU here."""

    name = "fallback"
    provider = "CoreMLExecutionProvider"  # in no Linux build of ONNX Runtime

    @classmethod
    def unavailable(cls):
        return None

    def providers(self):
        return [self.provider, "CPUExecutionProvider"]


def test_provider_fallback_skips_the_backend_instead_of_aborting(files, monkeypatch):
    monkeypatch.setitem(RUNNERS, "fallback", FallbackRunner)
    skipped = []
    with pytest.warns(UserWarning, match="CoreMLExecutionProvider"):
        run = benchmark(resolve_targets([files["dyn"]]), backends=["fallback", "onnxruntime"], settings=FAST,
                        on_skip=skipped.append)
    assert [r.backend for r in run.results] == ["onnxruntime"]
    (skip,) = skipped
    assert skip.backend == "fallback" and "could not use CoreMLExecutionProvider" in skip.reason
    assert "fell back to CPUExecutionProvider" in skip.reason


def test_provider_probe_reports_what_onnx_runtime_says():
    """The probe behind ort-cuda/ort-trt availability, on this machine's real ONNX Runtime: a provider
    that works gives no problem; one the build lists but cannot use gives ONNX Runtime's own account
    (with onnxruntime-gpu and no TensorRT 10: "libnvinfer.so.10: cannot open shared object file")."""
    from bench.gpu_runners import session_problem

    assert session_problem("CPUExecutionProvider") is None
    problem = session_problem("CoreMLExecutionProvider")  # in no Linux build: ONNX Runtime falls back
    assert problem == "a session on it fell back to CPUExecutionProvider"


def test_torch_tf32_is_set_explicitly_with_the_new_api():
    """cuDNN convolutions default to TF32; bench sets both matmul and conv precision either way
    (no GPU is needed to set or read the flags)."""
    from bench.gpu_runners import set_torch_tf32

    before = torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision
    try:
        set_torch_tf32(False)
        assert (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision) == (
            "ieee", "ieee")
        set_torch_tf32(True)
        assert (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision) == (
            "tf32", "tf32")
    finally:
        torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = before


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or run_queue_wait_ns() is None,
                    reason="needs Linux scheduler statistics (/proc/self/task/*/schedstat)")
def test_results_under_cpu_contention_are_marked_oversubscribed(files):
    """A real competitor spinning on the one CPU the benchmark may use: the scheduler's run-queue wait
    marks the result oversubscribed (two runnable threads on one CPU: each waits about half the time)."""
    cpu = min(os.sched_getaffinity(0))
    before = os.sched_getaffinity(0)
    spinner = subprocess.Popen([sys.executable, "-c", f"import os, time\nos.sched_setaffinity(0, {{{cpu}}})\n"
                                "end = time.time() + 20\nwhile time.time() < end: pass"])
    try:
        os.sched_setaffinity(0, {cpu})  # this thread, and the runner threads it starts
        time.sleep(0.2)  # let the spinner start
        targets = resolve_targets([files["dyn"]])
        run = benchmark(targets, backends=["onnxruntime"], settings=replace(FAST, min_time_s=0.3), resamples=100)
        cpu_clock = benchmark(targets, backends=["onnxruntime"], settings=replace(FAST, min_time_s=0.3, clock="cpu"),
                              resamples=100)
        unwatched = benchmark(targets, backends=["onnxruntime"],
                              settings=replace(FAST, min_time_s=0.3, watch_contention=False), resamples=100)
    finally:
        os.sched_setaffinity(0, before)
        spinner.kill()
        spinner.wait()
    (result,) = run.results
    assert result.cpu_wait > OVERSUBSCRIBED_WAIT and result.oversubscribed, result.cpu_wait
    assert to_json(run)["results"][0]["oversubscribed"] is True
    # thread CPU time leaves the waiting out: the wait is recorded, the figure is not marked
    (immune,) = cpu_clock.results
    assert immune.cpu_wait > OVERSUBSCRIBED_WAIT and not immune.oversubscribed
    # latency tables do not account the wait (watch_contention=False): it is unknown (None), and not flagged
    (blind,) = unwatched.results
    assert blind.cpu_wait is None and not blind.oversubscribed
