"""Bench output: the JSON of design.md (plus extra keys), reading it back for the gate, and the rich table."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

from bench.compare import Speedup
from bench.contention import OVERSUBSCRIBED_WAIT
from bench.gate import Verdict
from bench.measure import Result
from bench.session import BenchRun
from bench.stats import UNSTABLE_CV, summarize
from compress.errors import CompressError

RESULT_KEYS = ("target", "backend", "batch_size", "median_ms", "p90_ms", "p99_ms", "cv", "throughput",
               "samples_ms", "flops", "params")
SPEEDUP_KEYS = ("baseline", "target", "backend", "batch_size", "speedup", "flops_ratio", "fidelity")


def result_record(r: Result) -> dict[str, Any]:
    s = r.summary
    return {
        "target": r.target, "backend": r.backend, "batch_size": r.batch_size,
        "median_ms": s.median_ms, "p90_ms": s.p90_ms, "p99_ms": s.p99_ms, "cv": s.cv,
        "throughput": s.throughput,
        "samples_ms": [round(float(v), 5) for v in r.samples_ms],
        "flops": r.flops, "params": r.params,
        "mean_ms": s.mean_ms, "min_ms": s.min_ms, "n": s.n, "unstable": s.unstable,
        "device": r.device, "timing": r.timing, "cold_start_ms": r.cold_start_ms, "load_ms": r.load_ms,
        "tf32": r.tf32, "cpu_wait": r.cpu_wait, "oversubscribed": r.oversubscribed, "sessions": r.sessions,
    }


def speedup_record(s: Speedup) -> dict[str, Any]:
    return {"baseline": s.baseline, "target": s.target, "backend": s.backend, "batch_size": s.batch_size,
            "speedup": s.speedup, "flops_ratio": s.flops_ratio, "fidelity": s.fidelity,
            "speedup_ci95": [s.ci_low, s.ci_high], "latency_ratio": 1.0 / s.speedup,
            "latency_ratio_target": s.latency_ratio_target, "latency_target_error": s.latency_target_error}


def verdict_record(v: Verdict) -> dict[str, Any]:
    return {"baseline": v.baseline, "target": v.target, "backend": v.backend, "batch_size": v.batch_size,
            "ratio": v.ratio, "limit": v.gate.limit, "p_value": v.p_value, "alpha": v.gate.alpha,
            "failed": v.failed}


def to_json(run: BenchRun, verdicts: list[Verdict] | None = None) -> dict[str, Any]:
    doc = {
        "host": run.host,
        "settings": run.settings,
        "results": [result_record(r) for r in run.results],
        "speedups": [speedup_record(s) for s in run.speedups],
        "baseline": run.baseline,
        "skipped": [{"backend": s.backend, "target": s.target, "reason": s.reason} for s in run.skips],
    }
    if verdicts is not None:
        doc["gate"] = [verdict_record(v) for v in verdicts]
    return doc


def write_json(doc: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write atomically (temp file in the same directory, then rename): never a half-written file."""
    out = Path(path)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    except OSError as exc:
        raise CompressError(f"cannot write --json {out}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=1)
            f.write("\n")
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def load_results(path: str | os.PathLike) -> list[Result]:
    """Results of a saved `--json` file, samples included (what the gate compares against)."""
    return load_saved(path)[0]


def load_saved(path: str | os.PathLike) -> tuple[list[Result], dict[str, Any]]:
    """(results, settings) of a saved `--json` file; one-line CompressError when it is not one."""
    p = Path(path)
    try:
        doc = json.loads(p.read_text())
    except FileNotFoundError:
        raise CompressError(f"baseline file {p} not found") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CompressError(f"baseline file {p} is not valid JSON ({exc})") from None
    rows = doc.get("results") if isinstance(doc, dict) else None
    if not isinstance(rows, list) or not rows:
        raise CompressError(f"baseline file {p} has no results (is it a `compress bench --json` file?)")
    out = []
    for i, row in enumerate(rows):
        missing = [k for k in RESULT_KEYS if k not in row]
        if missing:
            raise CompressError(f"baseline file {p}: results[{i}] lacks {', '.join(missing)}")
        samples = np.asarray(row["samples_ms"], dtype=np.float64)
        if samples.size == 0:
            raise CompressError(f"baseline file {p}: results[{i}] has no samples")
        out.append(Result(target=str(row["target"]), backend=str(row["backend"]), batch_size=int(row["batch_size"]),
                          samples_ms=samples, summary=summarize(samples, int(row["batch_size"])),
                          flops=row["flops"], params=row["params"], device=row.get("device", "?"),
                          timing=row.get("timing", "?"), cold_start_ms=row.get("cold_start_ms", math.nan),
                          load_ms=row.get("load_ms", math.nan), tf32=row.get("tf32"), cpu_wait=row.get("cpu_wait"),
                          oversubscribed=bool(row.get("oversubscribed", False)), sessions=int(row.get("sessions", 1))))
    settings = doc.get("settings")
    return out, settings if isinstance(settings, dict) else {}


def human(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def table(run: BenchRun) -> Table:
    """One row per target × backend × batch size, with speedup and fidelity against the baseline."""
    ups = {(s.target, s.backend, s.batch_size): s for s in run.speedups}
    aimed = any(s.latency_ratio_target is not None for s in run.speedups)
    t = Table(title=f"compress bench — baseline {run.baseline}, {run.settings['threads']} thread(s), "
                    f"{run.settings['clock']} clock",
              caption=f"FLOPs: fvcore MACs at batch 1. CV > {UNSTABLE_CV:.0%} is flagged unstable; oversubscribed: "
                      f"the run's threads waited for a CPU > {OVERSUBSCRIBED_WAIT:.0%} of the (wall-clock) time. "
                      "Speedup: baseline median ÷ median \\[bootstrap 95% CI]; fidelity: speedup ÷ FLOPs reduction."
                      + (" Latency ratio: median ÷ baseline median (the --latency-ratio the run was pruned to, "
                         "relative error)." if aimed else ""))
    for name, justify in (("target", "left"), ("backend", "left"), ("batch", "right"), ("median ms", "right"),
                          ("p90 ms", "right"), ("p99 ms", "right"), ("CV", "right"), ("img/s", "right"),
                          ("FLOPs", "right"), ("params", "right"), ("cold ms", "right"),
                          ("speedup \\[95% CI]", "right"), ("fidelity", "right")):
        t.add_column(name, justify=justify)
    if aimed:
        t.add_column("latency ratio (target, error)", justify="right")
    order = {tg.label: i for i, tg in enumerate(run.targets)}
    rows = sorted(run.results, key=lambda r: (r.backend, r.batch_size, order.get(r.target, 0)))
    for r in rows:
        s = r.summary
        cv = f"[yellow]{s.cv:.1%} unstable[/]" if s.unstable else f"{s.cv:.1%}"
        if r.oversubscribed:
            cv += f" [red]oversubscribed ({r.cpu_wait:.0%} wait)[/]"
        up = ups.get((r.target, r.backend, r.batch_size))
        speed = "baseline" if r.target == run.baseline else "-"
        fidelity = "-"
        if up is not None:
            speed = f"{up.speedup:.2f}x [{up.ci_low:.2f}, {up.ci_high:.2f}]"
            fidelity = f"{up.fidelity:.2f}" if up.fidelity is not None else "-"
        row = [r.target, r.backend, str(r.batch_size), f"{s.median_ms:.3f}", f"{s.p90_ms:.3f}",
               f"{s.p99_ms:.3f}", cv, f"{s.throughput:,.0f}", human(r.flops), human(r.params),
               f"{r.cold_start_ms:.0f}", speed, fidelity]
        if aimed:
            row.append(_latency_cell(up))
        t.add_row(*row)
    return t


def oversubscription_note(run: BenchRun) -> str | None:
    """One line when some results were measured on oversubscribed CPUs, saying what that means."""
    hit = [r for r in run.results if r.oversubscribed]
    if not hit:
        return None
    worst = max(hit, key=lambda r: r.cpu_wait)
    backends = ", ".join(dict.fromkeys(r.backend for r in hit))
    return (f"warning: {len(hit)} of {len(run.results)} results ({backends}) are marked oversubscribed: their threads "
            f"waited for a CPU up to {worst.cpu_wait:.0%} of the time, because other processes compete for the cores. "
            "Those latencies measure the machine's load as much as the model; re-run on a quiet machine, or compare "
            "with --threads 1 --clock cpu.")


def _latency_cell(up: Speedup | None) -> str:
    """Measured latency ratio, and against the ratio the run was pruned to: "0.512 (0.50, +2.4%)"."""
    if up is None:
        return "-"
    if up.latency_ratio_target is None:
        return f"{1 / up.speedup:.3f}"
    return f"{1 / up.speedup:.3f} ({up.latency_ratio_target:g}, {up.latency_target_error:+.1%})"
