"""`compress bench`: real latency of run directories, ONNX files and TensorRT engines, side by side.

    from bench import Settings, benchmark, resolve_targets
    run = benchmark(resolve_targets(["runs/d", "runs/p"]), backends=["onnxruntime"], batch_sizes=[1, 32],
                    settings=Settings(threads=1, clock="cpu"))
    run.speedups[0].fidelity
"""

from bench.backends import RUNNERS, default_backends, parse_backends
from bench.gate import Gate, Verdict, judge_all, pairs_against_saved, verdict_line
from bench.measure import Result, Settings
from bench.session import BenchRun, Skip, benchmark
from bench.targets import Target, resolve_targets

__all__ = ["RUNNERS", "BenchRun", "Gate", "Result", "Settings", "Skip", "Target", "Verdict", "benchmark",
           "default_backends", "judge_all", "pairs_against_saved", "parse_backends", "resolve_targets",
           "verdict_line"]
