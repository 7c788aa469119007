"""The zoo sweep: every model through prune → reload → export, each step a fresh `compress` process.

One entry is (model, input size, method). Its steps are the commands a user types:

1. `compress prune --model M --image-size S --data D --method X --flops-ratio R …` (peak memory and
   wall time measured by the sweep);
2. `compress eval RUN --data D` in a new process: the run is rebuilt from model.json + model.pt,
   and its accuracy must equal the one the prune process measured before writing (same images);
3. `compress export RUN --format onnx` in a new process: ONNX Runtime parity against PyTorch.

An entry *works* when all three pass, is *refused* when a step exits 2 with a one-line message
(a clean refusal), and *fails* otherwise (parity failure, reload mismatch, a traceback, a kill by
the sweep's memory/time cap). Results are appended to a JSON file as they come, so an interrupted
sweep resumes where it stopped.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from compress.errors import CompressError
from compress.files import write_atomic
from compress.zoo.proc import Outcome, compress_cli, run_measured


@dataclass(frozen=True)
class Entry:
    model: str
    image_size: int
    method: str

    @property
    def key(self) -> str:
        return f"{self.model}@{self.image_size}/{self.method}"

    @property
    def slug(self) -> str:
        return self.key.replace(":", "_").replace("/", "-").replace("@", "-")


_RECORDED = ("data", "flops_ratio", "finetune_epochs", "batch_size")   # settings the figures depend on


@dataclass
class SweepConfig:
    """Settings shared by every entry (recorded in the results file)."""

    data: str = "synthetic:200"
    flops_ratio: float = 0.5
    finetune_epochs: int = 1
    batch_size: int = 32
    max_rss_gb: float = 16.0      # the sweep's safety cap per process (the engine refuses earlier)
    timeout_s: float = 3600.0     # per step
    keep: bool = False            # keep run directories and ONNX files


def run_entry(entry: Entry, cfg: SweepConfig, work: Path) -> dict[str, Any]:
    """Run one entry's steps; returns its record (see the module docstring for the statuses)."""
    run, onnx = work / entry.slug, work / f"{entry.slug}.onnx"
    figures = work / f"{entry.slug}.export.json"
    record: dict[str, Any] = {**asdict(entry), "key": entry.key, "status": "works", "stage": None, "reason": None}
    limits = {"max_rss_gb": cfg.max_rss_gb, "timeout_s": cfg.timeout_s}
    try:
        prune = run_measured(compress_cli(
            "prune", "--model", entry.model, "--image-size", str(entry.image_size), "--data", cfg.data,
            "--method", entry.method, "--flops-ratio", str(cfg.flops_ratio), "--finetune-epochs",
            str(cfg.finetune_epochs), "--batch-size", str(cfg.batch_size), "--out", str(run)), **limits)
        record["prune"] = _step(prune)
        if not _ok(record, "prune", prune):
            return record
        report = json.loads((run / "report.json").read_text())
        record["prune"].update(_prune_figures(report))

        reload = run_measured(compress_cli("eval", str(run), "--data", cfg.data), **limits)
        record["reload"] = _step(reload)
        if not _ok(record, "reload", reload):
            return record
        accuracy = _parse_accuracy(reload.stdout)
        record["reload"]["accuracy"] = accuracy
        if accuracy is None or abs(accuracy - round(report["accuracy"], 4)) > 1e-9:
            return _fail(record, "reload", f"the reloaded run scores {accuracy} instead of the pruned model's "
                                           f"{report['accuracy']:.4f} on the same images")

        export = run_measured(compress_cli("export", str(run), "--format", "onnx", "--out", str(onnx),
                                           "--json", str(figures)), **limits)
        record["export"] = _step(export)
        if figures.is_file():
            parity = json.loads(figures.read_text()).get("parity") or {}
            record["export"].update(max_rel=parity.get("max_rel"), passed=parity.get("passed"))
        _ok(record, "export", export)
        return record
    finally:
        if not cfg.keep:
            shutil.rmtree(run, ignore_errors=True)
            for path in (onnx, figures, onnx.with_name(onnx.name + ".failed")):
                path.unlink(missing_ok=True)


def _step(outcome: Outcome) -> dict[str, Any]:
    return {"rc": outcome.rc, "seconds": outcome.seconds, "peak_rss_gb": outcome.peak_rss_gb,
            "traceback": outcome.traceback, "error": None if outcome.rc == 0 else outcome.error_line()}


def _ok(record: dict[str, Any], stage: str, outcome: Outcome) -> bool:
    """Record a step's verdict: False (and the entry's status) unless it succeeded."""
    if outcome.rc == 0 and not outcome.traceback:
        return True
    if outcome.traceback:
        return _fail(record, stage, f"traceback: {outcome.error_line()}", status="traceback")
    if outcome.rc == 2 and not outcome.killed:
        record.update(status="refused", stage=stage, reason=outcome.error_line())
        return False
    return _fail(record, stage, outcome.error_line())


def _fail(record: dict[str, Any], stage: str, reason: str, status: str = "failed") -> bool:
    record.update(status=status, stage=stage, reason=reason)
    return False


def _prune_figures(report: dict[str, Any]) -> dict[str, Any]:
    dense = report.get("dense", {})
    return {"flops_ratio": report.get("flops_ratio"), "params_ratio": round(report["params"] / dense["params"], 4)
            if dense.get("params") else None, "groups": report.get("groups"),
            "groups_pruned": report.get("groups_pruned"), "groups_excluded": len(report.get("groups_excluded", [])),
            "wall_time_s": report.get("wall_time_s"), "stages_s": report.get("stages_s")}


def _parse_accuracy(stdout: str) -> float | None:
    for line in stdout.splitlines():
        if line.startswith("accuracy "):
            try:
                return float(line.split()[1])
            except (IndexError, ValueError):
                return None
    return None


def sweep(entries: list[Entry], cfg: SweepConfig, results_path: Path, work: Path, *, fresh: bool = False,
          command: str | None = None, on_record: Callable[[dict[str, Any], int, int], None] | None = None
          ) -> dict[str, Any]:
    """Run every entry not already in `results_path` (all of them with `fresh`), saving after each.

    Before the first entry runs, the results file gets the sweep's `command` and the keys of the entries
    it plans (added to those of earlier sweeps into the same file), so that a sweep stopped early still
    says what made its records and what it did not reach. Other keys of the results file are kept."""
    results = _read_results(results_path)
    if fresh:
        results = {k: v for k, v in results.items() if k not in ("records", "commands", "planned")}
    settings = asdict(cfg)
    old = results.get("settings")
    if results.get("records") and old and any(old.get(k) != settings[k] for k in _RECORDED):
        raise CompressError(f"the records in {results_path} were made with other settings "
                            f"({ {k: old.get(k) for k in _RECORDED} }); pass --fresh or another --results")
    records = {r["key"]: r for r in results.get("records", [])}
    if command:
        results["commands"] = [c for c in results.get("commands", []) if c != command] + [command]
    planned = list(results.get("planned", []))
    results.update(planned=planned + [e.key for e in entries if e.key not in planned], settings=settings,
                   records=list(records.values()))
    write_atomic(results_path, (json.dumps(results, indent=1) + "\n").encode())
    work.mkdir(parents=True, exist_ok=True)
    todo = [e for e in entries if e.key not in records]
    for i, entry in enumerate(todo, 1):
        started = time.perf_counter()
        record = run_entry(entry, cfg, work)
        record["wall_s"] = round(time.perf_counter() - started, 1)
        records[entry.key] = record
        results = {**_read_results(results_path), "settings": settings, "records": list(records.values())}
        write_atomic(results_path, (json.dumps(results, indent=1) + "\n").encode())
        if on_record:
            on_record(record, i, len(todo))
    return {**_read_results(results_path), "settings": settings, "records": list(records.values())}


def _read_results(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    return json.loads(path.read_text())
