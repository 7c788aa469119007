"""`compress bench`: real latency of run directories, ONNX files and TensorRT engines, side by side."""

from bench.gate import Gate, Verdict, judge_all, pairs_against_saved, verdict_line
from bench.measure import Result, Settings
from bench.runners import RUNNERS, default_backends, parse_backends
from bench.session import BenchRun, Skip, benchmark

__all__ = ["RUNNERS", "BenchRun", "Gate", "Result", "Settings", "Skip", "Verdict", "benchmark", "default_backends",
           "judge_all", "pairs_against_saved", "parse_backends", "verdict_line"]
