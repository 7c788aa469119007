"""`compress latency-study`: the acceptance experiments of pruning to a measured latency budget.

- **budget**: each model (random weights: latency does not depend on them) pruned with
  `--latency-ratio R` on ONNX Runtime CPU (threads and batch as given), then the dense and pruned
  models measured side by side by `compress bench` in a separate process: is the measured ratio
  within ±7% of R?
- **capacity**: each model pruned to `--flops-ratio F` (FLOPs-targeted, the issue's baseline: l1,
  local scope), its latency ratio L measured by `compress bench`; then pruned with `--latency-ratio L`
  (knapsack allocation over the measured latency tables); both measured against the dense model in
  one bench session: at equal measured latency, how much more of the dense FLOPs does the
  latency-targeted network keep, and how does speedup fidelity change?
- **accuracy** (compress/latency_accuracy.py): a trained parent pruned both ways to the same measured
  latency and fine-tuned alike: which keeps more accuracy?

Every prune goes through `compress.pipeline.prune_run` and every measurement through `compress bench`
(`python -m cli bench … --json`); runs with the same settings are reused. Results go to
docs/latency.json and the generated blocks of docs/latency.md.
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from compress.errors import CompressError
from compress.files import write_atomic, write_generated_block
from compress.latency_accuracy import AccuracySettings, accuracy_md, accuracy_rows
from compress.runs import reuse_or_run

BUDGET_MODELS = ("resnet50", "mobilenet_v2", "efficientnet_b0", "regnet_x_400mf", "convnext_tiny")
CAPACITY_MODELS = BUDGET_MODELS + ("resnet18", "densenet121", "mobilenet_v3_small")
PARTS = ("budget", "capacity", "accuracy")
DEFAULT_PARTS = ("budget", "capacity")
DATA = "synthetic:40"          # latency does not depend on the weights; a few images keep evaluation cheap
TOLERANCE = 0.07
console = Console(stderr=True)


@dataclass
class LatencyStudyConfig:
    parts: tuple[str, ...] = DEFAULT_PARTS
    budget_models: tuple[str, ...] = BUDGET_MODELS
    ratios: tuple[float, ...] = (0.5, 0.3)
    capacity_models: tuple[str, ...] = CAPACITY_MODELS
    flops_ratio: float = 0.26
    threads: tuple[int, ...] = (2, 1)      # capacity: the first is the headline, the others reported beside
    clock: str = "wall"                    # "cpu": thread CPU time (one thread only; immune to other processes)
    image_size: int = 224
    batch_size: int = 1
    method: str = "l1"
    flops_scope: str = "local"
    round_to: int = 8
    bench_duration: float = 3.0
    work: str = "runs/latency"
    docs: str = "docs"
    cache_dir: str | None = None
    fresh: bool = False
    accuracy: AccuracySettings = field(default_factory=AccuracySettings)

    def check(self) -> None:
        unknown = [p for p in self.parts if p not in PARTS]
        if unknown:
            raise CompressError(f"unknown --parts {unknown}; choose from {', '.join(PARTS)}")
        if any(not 0 < r <= 1 for r in (*self.ratios, self.flops_ratio)):
            raise CompressError("ratios must be in (0, 1]")
        if not self.threads or any(t < 1 for t in self.threads):
            raise CompressError("--threads needs positive thread counts")
        if self.clock not in ("wall", "cpu"):
            raise CompressError(f"--clock must be wall or cpu, got {self.clock!r}")
        if self.clock == "cpu" and set(self.threads) != {1}:
            raise CompressError("--clock cpu times the calling thread's CPU time, so it needs --threads 1")
        if "accuracy" in self.parts:
            self.accuracy.check()


def run_latency_study(config: LatencyStudyConfig) -> dict[str, Any]:
    config.check()
    work, docs = Path(config.work), Path(config.docs)
    started, load_start = time.perf_counter(), _loadavg()
    results: dict[str, Any] = {"config": asdict(config), "loadavg_start": load_start}
    json_path = docs / "latency.json"
    previous = json.loads(json_path.read_text()) if json_path.is_file() else {}
    results.update(kept_figures(previous, config))

    def save() -> None:              # after every model: an interrupted study keeps what it measured
        results.update(loadavg_end=_loadavg(), wall_s=round(time.perf_counter() - started, 1))
        write_atomic(json_path, (json.dumps(results, indent=1) + "\n").encode())
        _write_doc(results, docs / "latency.md")

    if "budget" in config.parts:
        for m in config.budget_models:
            results["budget"].append(_budget_model(config, m, work))
            save()
    if "capacity" in config.parts:
        for t in config.threads:
            rows = results["capacity"].setdefault(str(t), [])
            for m in config.capacity_models:
                rows.append(_capacity_model(config, m, t, work))
                save()
    if "accuracy" in config.parts:
        for row in accuracy_rows(config, work):
            results["accuracy"].append(row)
            save()
    save()
    return results


def kept_figures(previous: dict[str, Any], config: LatencyStudyConfig) -> dict[str, Any]:
    """The figures of an earlier latency.json that this run does not redo: a study can be run a few models
    (or one thread count) at a time, and each run adds to the document instead of erasing it."""
    redo_threads = {str(t) for t in config.threads} if "capacity" in config.parts else set()
    return {
        "budget": [m for m in previous.get("budget", [])
                   if "budget" not in config.parts or m["model"] not in config.budget_models],
        "capacity": {t: [m for m in rows if t not in redo_threads or m["model"] not in config.capacity_models]
                     for t, rows in previous.get("capacity", {}).items()},
        "accuracy": [] if "accuracy" in config.parts else previous.get("accuracy", []),
    }


# ---------------------------------------------------------------- runs


def _dense(config: LatencyStudyConfig, model: str, work: Path) -> Path:
    """A run directory of the dense model (random weights), the baseline every bench compares with."""
    from compress.flops import count_flops, count_params
    from compress.runs import write_run
    from compress.training import build_dense

    out = work / model / "dense"
    key = {"model": model, "image_size": config.image_size, "data": DATA}

    def make() -> dict[str, Any]:
        module, spec, _bundle = build_dense(model, DATA, image_size=config.image_size)
        report = {"command": "train", "model": model, "data": DATA, "seed": 0, "input_size": list(module.input_size),
                  "wall_time_s": 0.0, "accuracy": None, "epochs": 0, "flops": count_flops(module, module.input_size),
                  "params": count_params(module), "note": "random weights: a latency baseline"}
        write_run(out, module, spec, report)
        return report

    reuse_or_run(out, key, make, fresh=config.fresh)
    return out


def _prune(config: LatencyStudyConfig, model: str, out: Path, *, threads: int, flops_ratio: float | None = None,
           latency_ratio: float | None = None, scope: str = "global", round_to: int | None = None) -> dict[str, Any]:
    from compress.pipeline import prune_run

    round_to = round_to or config.round_to
    key = {"model": model, "image_size": config.image_size, "method": config.method, "flops_ratio": flops_ratio,
           "latency_ratio": latency_ratio, "threads": threads if latency_ratio else None,
           "batch_size": config.batch_size, "scope": scope, "round_to": round_to, "clock": config.clock}
    latency = {} if latency_ratio is None else {"latency_ratio": latency_ratio, "latency_backend": "onnxruntime",
                                                "latency_threads": threads, "latency_batch_size": config.batch_size,
                                                "latency_cache": config.cache_dir,
                                                "latency_clock": config.clock}
    console.rule(f"[bold]{model}: " + (f"--flops-ratio {flops_ratio} --round-to {round_to}" if flops_ratio else
                                       f"--latency-ratio {latency_ratio:.4f} ({threads} thread(s))"))
    report, _reused = reuse_or_run(out, key, lambda: prune_run(
        out, data=DATA, method=config.method, model=model, image_size=config.image_size, flops_ratio=flops_ratio,
        scope=scope, round_to=round_to, finetune_epochs=0, bn_recalibration=False, seed=0, batch_size=8,
        **latency), fresh=config.fresh)
    return report


def bench(runs: list[Path], threads: int, batch_size: int, duration: float, out: Path,
          clock: str = "wall") -> dict[str, Any]:
    """`compress bench` in a separate process (dense first), its JSON."""
    repo = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")])}
    args = [sys.executable, "-m", "cli", "bench", *map(str, runs), "--backend", "onnxruntime", "--threads",
            str(threads), "--clock", clock, "--batch-size", str(batch_size), "--duration", str(duration),
            "--json", str(out)]
    console.print(" ".join(["compress", *args[3:]]), highlight=False)
    done = subprocess.run(args, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise CompressError(f"compress bench failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.read_text())


def speedups_of(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    results = {r["target"]: r for r in doc["results"]}
    return {s["target"]: {**s, "median_ms": results[s["target"]]["median_ms"], "cv": results[s["target"]]["cv"],
                          "oversubscribed": results[s["target"]].get("oversubscribed")} for s in doc["speedups"]}


def _budget_model(config: LatencyStudyConfig, model: str, work: Path) -> dict[str, Any]:
    threads = config.threads[0]
    dense = _dense(config, model, work)
    runs = {r: work / model / f"latency-{r:g}-t{threads}" for r in config.ratios}
    reports, rows = {}, []
    for r, out in runs.items():
        try:
            reports[r] = _prune(config, model, out, threads=threads, latency_ratio=r)
        except CompressError as e:        # the pipeline's one-line refusal names the smallest reachable ratio
            if "unreachable" not in str(e):
                raise
            console.print(f"{model} at {r:g}: {e}", highlight=False)
            smallest = re.search(r"smallest reachable is ([0-9.]+)", str(e))
            rows.append({"ratio": r, "unreachable": True, "within": False,
                         "smallest_reachable": float(smallest.group(1)) if smallest else None})
    doc = bench([dense, *[runs[r] for r in reports]], threads, config.batch_size, config.bench_duration,
                work / model / f"bench-budget-t{threads}-{config.clock}.json", config.clock)
    ups = speedups_of(doc)
    dense_ms = next(r["median_ms"] for r in doc["results"] if r["target"] == str(dense))
    for r, rep in reports.items():
        up = ups[str(runs[r])]
        rows.append({"ratio": r, "measured": round(up["latency_ratio"], 4),
                     "error": round(up["latency_ratio"] / r - 1, 4), "within": abs(up["latency_ratio"] / r - 1)
                     <= TOLERANCE, "pipeline_measured": rep.get("latency_ratio"),
                     "predicted": rep.get("latency_ratio_predicted"), "flops_ratio": rep["flops_ratio"],
                     "fidelity": round(up["fidelity"], 4), "calibration_rounds": len(rep.get("calibration", [])),
                     "prune_s": rep["wall_time_s"], "table_s": rep.get("latency_table", {}).get("table_build_s"),
                     "pruned_ms": up["median_ms"], "cv": up["cv"], "oversubscribed": up["oversubscribed"]})
    rows.sort(key=lambda row: -row["ratio"])
    return {"model": model, "threads": threads, "dense_ms": dense_ms, "rows": rows,
            "loadavg": doc["host"].get("load_average_1m_before")}


def _capacity_model(config: LatencyStudyConfig, model: str, threads: int, work: Path) -> dict[str, Any]:
    dense = _dense(config, model, work)
    flops_run = work / model / f"flops-{config.flops_ratio:g}-{config.flops_scope}"
    flops_report = _prune(config, model, flops_run, threads=threads, flops_ratio=config.flops_ratio,
                          scope=config.flops_scope)
    first = bench([dense, flops_run], threads, config.batch_size, config.bench_duration,
                  work / model / f"bench-flops-t{threads}-{config.clock}.json", config.clock)
    level = round(speedups_of(first)[str(flops_run)]["latency_ratio"], 4)
    latency_run = work / model / f"latency-at-flops-{config.flops_ratio:g}-t{threads}"
    latency_report = _prune(config, model, latency_run, threads=threads, latency_ratio=level)
    # the same FLOPs target with widths at the channel block the latency tables found: how much of the
    # latency-targeted network's gain the block alone gives, and how much the allocation adds
    step = math.lcm(config.round_to, latency_report.get("latency_table", {}).get("channel_block", 1))
    blocked_run = work / model / f"flops-{config.flops_ratio:g}-{config.flops_scope}-r{step}"
    blocked_report = _prune(config, model, blocked_run, threads=threads, flops_ratio=config.flops_ratio,
                            scope=config.flops_scope, round_to=step) if step != config.round_to else None
    runs = [dense, flops_run, latency_run] + ([blocked_run] if blocked_report else [])
    doc = bench(runs, threads, config.batch_size, config.bench_duration,
                work / model / f"bench-capacity-t{threads}-{config.clock}.json", config.clock)
    ups = speedups_of(doc)
    f, lat = ups[str(flops_run)], ups[str(latency_run)]
    blocked = None
    if blocked_report:
        b = ups[str(blocked_run)]
        blocked = {"round_to": step, "flops_ratio": blocked_report["flops_ratio"],
                   "latency_ratio": round(b["latency_ratio"], 4), "fidelity": round(b["fidelity"], 4)}
    return {"model": model, "threads": threads, "latency_level": level, "flops_targeted_blocked": blocked,
            "flops_targeted": {"flops_ratio": flops_report["flops_ratio"],
                               "latency_ratio": round(f["latency_ratio"], 4), "fidelity": round(f["fidelity"], 4)},
            "latency_targeted": {"flops_ratio": latency_report["flops_ratio"],
                                 "latency_ratio": round(lat["latency_ratio"], 4), "fidelity": round(lat["fidelity"], 4),
                                 "predicted": latency_report.get("latency_ratio_predicted")},
            "flops_kept": round(latency_report["flops_ratio"] / flops_report["flops_ratio"], 4),
            "loadavg": doc["host"].get("load_average_1m_before")}


# ---------------------------------------------------------------- the document


BEGIN = "<!-- latency-study:{part}:begin (generated by `compress latency-study`; edits here are overwritten) -->"
END = "<!-- latency-study:{part}:end -->"


def _write_doc(results: dict[str, Any], path: Path) -> None:
    for part, body in (("budget", _budget_md), ("capacity", _capacity_md), ("accuracy", accuracy_md)):
        if results.get(part):
            write_generated_block(path, BEGIN.format(part=part), END.format(part=part), body(results),
                                  new_file="# Pruning to a measured latency budget\n")


def _budget_md(results: dict[str, Any]) -> str:
    rows = [r | {"model": m["model"], "dense_ms": m["dense_ms"]} for m in results["budget"] for r in m["rows"]]
    hits = sum(r["within"] for r in rows)
    c = results["config"]
    lines = [f"`--latency-ratio R` on onnxruntime, {c['threads'][0]} thread(s), {_clock(c)}, batch {c['batch_size']}, "
             f"{c['image_size']} px, method {c['method']}, round-to {c['round_to']}; measured afterwards by "
             f"`compress bench` (separate process, dense and pruned interleaved, {c['bench_duration']:g} s each). "
             f"**{hits} of {len(rows)} within ±{TOLERANCE:.0%}.**", "",
             "| model | dense ms | R | measured (bench) | error | in-pipeline measured | tables predicted | "
             "FLOPs ratio | fidelity | calibration rounds | prune s | table build s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("unreachable"):
            lines.append(f"| {r['model']} | {r['dense_ms']:.2f} | {r['ratio']:g} | unreachable ✗ (smallest "
                         f"reachable {_f(r['smallest_reachable'])}: every group at its narrowest) |" + " - |" * 8)
            continue
        lines.append(f"| {r['model']} | {r['dense_ms']:.2f} | {r['ratio']:g} | {r['measured']:.3f} | "
                     f"{r['error']:+.1%}{'' if r['within'] else ' ✗'} | {_f(r['pipeline_measured'])} | "
                     f"{_f(r['predicted'])} | {r['flops_ratio']:.3f} | {r['fidelity']:.2f} | {r['calibration_rounds']} "
                     f"| {r['prune_s']:.0f} | {_f(r['table_s'], '.0f')} |")
    lines += ["", _load_line(results)]
    return "\n".join(lines)


def _capacity_md(results: dict[str, Any]) -> str:
    c = results["config"]
    lines = []
    for threads, rows in results["capacity"].items():
        if not rows:
            continue
        kept = [r["flops_kept"] for r in rows]
        fid_f = [r["flops_targeted"]["fidelity"] for r in rows]
        fid_l = [r["latency_targeted"]["fidelity"] for r in rows]
        lines += [f"**{threads} thread(s), {_clock(c)}**: FLOPs kept at equal measured latency, latency-targeted ÷ "
                  "FLOPs-targeted: "
                  f"median **{statistics.median(kept):.2f}×** (min {min(kept):.2f}×); speedup fidelity median "
                  f"{statistics.median(fid_f):.2f} (FLOPs-targeted) → {statistics.median(fid_l):.2f} "
                  "(latency-targeted).", "",
                  "| model | FLOPs-targeted: FLOPs ratio | its latency ratio L | fidelity | latency-targeted "
                  "(--latency-ratio L): FLOPs ratio | its latency ratio | fidelity | FLOPs kept × | "
                  "FLOPs-targeted at the block's round-to: latency ratio | fidelity |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            f, lat, b = r["flops_targeted"], r["latency_targeted"], r.get("flops_targeted_blocked")
            blocked = f"{b['latency_ratio']:.3f} (round-to {b['round_to']}) | {b['fidelity']:.2f}" if b else "- | -"
            lines.append(f"| {r['model']} | {f['flops_ratio']:.3f} | {f['latency_ratio']:.3f} | {f['fidelity']:.2f} | "
                         f"{lat['flops_ratio']:.3f} | {lat['latency_ratio']:.3f} | {lat['fidelity']:.2f} | "
                         f"{r['flops_kept']:.2f} | {blocked} |")
        lines.append("")
    lines += [f"FLOPs-targeted: `--method {c['method']} --scope {c['flops_scope']} --flops-ratio "
              f"{c['flops_ratio']:g}`; latency-targeted: `--method {c['method']} --latency-ratio L` (knapsack "
              "allocation), L = the FLOPs-targeted network's latency ratio measured by `compress bench` at the "
              "same threads. The last two columns: the FLOPs target again with `--round-to` raised to the channel "
              "block the latency tables found on the target (bench/staircase.py), measured in the same bench "
              "session: what the block alone gives without a latency-aware allocation.", "", _load_line(results)]
    return "\n".join(lines)


def _clock(config: dict[str, Any]) -> str:
    return "thread CPU time" if config.get("clock") == "cpu" else "wall clock"


def _f(value, fmt: str = ".3f") -> str:
    return "-" if value is None else format(value, fmt)


def _load_line(results: dict[str, Any]) -> str:
    return (f"Host load average (1 min) at start {results.get('loadavg_start')}, at end {results.get('loadavg_end')}; "
            f"study wall time {results.get('wall_s', 0):.0f} s.")


def _loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None
