"""`compress study`: one dense parent, every method × FLOPs ratio × seed pruned with the same budget.

The study trains the parent once, prunes it with each method spec (e.g. `vpns`, `vpns:prompt=none`,
`depgraph`) at each ratio and seed through the same `compress prune` pipeline (same fine-tuning
epochs and learning rate for all), measures every deployable module's ONNX Runtime CPU latency at
batch 1 in one interleaved bench session, and writes a table (mean ± std over seeds), the raw
records and plots. Runs already done with the same settings are reused, so adding a method to
the list re-runs only that method; methods that are not registered are reported as missing.
"""

from __future__ import annotations

import os
import platform
import re
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from compress.errors import CompressError
from compress.progress import console
from compress.runs import NotRun, read_key, reuse_or_run
from compress.study_report import write_results

# Every method gets the same training after the dense parent: 2 epochs of search or sparse training (VPNs: 1
# warm-up + 1 score epoch; PASS: 2 hypernetwork epochs; DessiLBI: 2 path epochs) + the study's fine-tuning.
DEFAULT_METHODS = ("vpns", "vpns:prompt=none", "depgraph", "l1", "pass", "pass:prompt=none", "dessilbi:lbi-epochs=2",
                   "l1:sparse-reg=l1:sparse-train-epochs=2", "depgraph:sparse-reg=group-lasso:sparse-train-epochs=2")
# The papers' setting: every learned method with and without its prompt and with its search switched off
# (the controls), against L1 and DepGraph with progressive pruning, with and without sparse learning. These
# nine rows (54 cells) fit 90 minutes on 2 CPU cores with `--jobs 2 --channels-last`; DessiLBI and L1 sparse
# training join with --methods (the earlier GPU table had them).
PRETRAINED_METHODS = ("l1", "depgraph:iterative-steps=4", "depgraph:iterative-steps=4:sparse-train-epochs=2",
                      "vpns", "vpns:prompt=none", "vpns:score-epochs=0",
                      "pass", "pass:prompt=none", "pass:hypernet-epochs=0")
# Recorded in every run's key: 2 since `--prompt pad` is the reference's full-resolution frame (older "pad"
# runs used the shrinking prompt, now resize-pad, and must not be reused).
KEY_VERSION = 2


@dataclass
class StudyConfig:
    """The whole study; the defaults re-run in under an hour on two free CPU cores (docs/results.md)."""

    data: str = "fashion-mnist"
    model: str = "resnet20"
    weights: str | None = None          # pretrained weights the dense parent starts from (then fine-tuned on data)
    image_size: int | None = None       # input size (None: the dataset's own)
    subset: int = 6000                  # training images (seeded by the run's seed); val is the full split
    dense_epochs: int = 10
    dense_lr: float = 0.1
    finetune_epochs: int = 4            # the same for every method
    finetune_lr: float = 0.01
    batch_size: int = 128
    ratios: tuple[float, ...] = (0.5, 0.25)
    seeds: tuple[int, ...] = (0, 1, 2)
    methods: tuple[str, ...] = DEFAULT_METHODS
    scope: str = "global"
    round_to: int = 1
    work: str = "runs/study"
    docs: str = "docs"
    latency: bool = True
    latency_s: float = 0.5              # measured seconds per model (interleaved, thread CPU time)
    fresh: bool = False
    only_done: bool = False             # train nothing: report the runs already made, list the others
    jobs: int = 1                       # worker processes for the cells (compress.study_jobs)
    name: str = "results"               # docs/<name>.md, .json, .png
    title: str = "Results: structured pruning on Fashion-MNIST"

    def check(self) -> None:
        if self.subset is not None and self.subset < 100:
            raise CompressError(f"--subset must be at least 100 images, got {self.subset}")
        if self.dense_epochs < 1 or self.finetune_epochs < 0:
            raise CompressError("--dense-epochs must be ≥ 1 and --finetune-epochs ≥ 0")
        if not self.ratios or any(not 0 < r <= 1 for r in self.ratios):
            raise CompressError(f"--ratios must be in (0, 1], got {list(self.ratios)}")
        if not self.seeds:
            raise CompressError("--seeds needs at least one seed")
        if not self.methods:
            raise CompressError("--methods needs at least one method")
        if self.jobs < 1:
            raise CompressError(f"--jobs must be ≥ 1, got {self.jobs}")


# `compress study --preset NAME`: whole studies by name (explicit flags override their fields).
PRESETS: dict[str, StudyConfig] = {
    # ResNet-20 trained from scratch on the downstream data (docs/results.md).
    "scratch": StudyConfig(),
    # The papers' setting (docs/results-pretrained.md): an ImageNet backbone (EfficientNet-Lite0, offline
    # weights) fine-tuned on Fashion-MNIST at 64 px, grey replicated to RGB, then pruned.
    "pretrained": StudyConfig(model="efficientnet_lite0", weights="imagenet", image_size=64, subset=4000,
                              dense_epochs=3, dense_lr=0.05, finetune_epochs=3, finetune_lr=0.01, ratios=(0.5, 0.3),
                              methods=PRETRAINED_METHODS, work="runs/study-pretrained", name="results-pretrained",
                              title="Results: pruning an ImageNet-pretrained backbone for Fashion-MNIST"),
}


def preset(which: str, /, **overrides: Any) -> StudyConfig:
    """The study named `which` with `overrides` (fields left None keep the preset's value)."""
    if which not in PRESETS:
        raise CompressError(f"unknown study preset {which!r}; choose one of {', '.join(PRESETS)}")
    return replace(PRESETS[which], **{k: v for k, v in overrides.items() if v is not None})


@dataclass(frozen=True)
class MethodSpec:
    """`name[:option=value[:option=value…]]`, e.g. `vpns:prompt=none:score-epochs=2`, `l1:sparse-reg=l1:
    sparse-train-epochs=2` (options of the prune pipeline's stages, such as sparse training, go to `stage`)."""

    label: str
    name: str
    options: dict[str, Any] = field(default_factory=dict, hash=False)
    stage: dict[str, Any] = field(default_factory=dict, hash=False)

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9.=-]+", "_", self.label).replace("=", "-")


def parse_method(text: str, registry: dict[str, type]) -> MethodSpec:
    """Parse a method spec; options are typed by the method's own declarations (or the pipeline stage's).
    An unregistered method parses (it will be reported as missing); an unknown option of a known method
    is an error."""
    from compress.sparse import SPARSE_OPTIONS

    name, *pairs = [p.strip() for p in text.strip().split(":")]
    if not name:
        raise CompressError(f"empty method name in --methods entry {text!r}")
    declared = {o.dest: o for o in registry[name].options} if name in registry else None
    stage_declared = {o.dest: o for o in SPARSE_OPTIONS}
    options: dict[str, Any] = {}
    stage: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        dest = key.strip().lstrip("-").replace("-", "_")
        if not sep or not dest:
            raise CompressError(f"method option {pair!r} in {text!r} must look like option=value")
        if dest in stage_declared:
            stage[dest] = _typed(stage_declared[dest], raw, text)
        elif declared is None:
            options[dest] = raw
        elif dest not in declared:
            raise CompressError(f"method {name} has no option {key!r} (in --methods entry {text!r})")
        else:
            options[dest] = _typed(declared[dest], raw, text)
    return MethodSpec(label=text.strip(), name=name, options=options, stage=stage)


def _typed(option, raw: str, text: str) -> Any:
    kind = option.type
    try:
        if isinstance(kind, tuple):
            if raw not in kind:
                raise ValueError(f"choose one of {', '.join(kind)}")
            return raw
        if kind is bool:
            if raw.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError("use true or false")
            return raw.lower() in ("1", "true", "yes")
        return kind(raw)
    except ValueError as exc:
        raise CompressError(f"bad value {raw!r} for {option.flag} in --methods entry {text!r}: {exc}") from None


# ---------------------------------------------------------------- running


def run_study(config: StudyConfig) -> dict[str, Any]:
    """Run (or complete) the study and write docs/results.{md,json} and the plot; returns results.json."""
    from compress.methods.base import discover

    config.check()
    registry = discover()
    specs = [parse_method(m, registry) for m in config.methods]
    missing = [s.label for s in specs if s.name not in registry]
    present = [s for s in specs if s.name in registry]
    for label in missing:
        console.print(f"[yellow]method {label!r} is not registered here: reported as missing[/]")
    work = Path(config.work)
    started, cpu_started, load_start = time.perf_counter(), time.process_time(), _loadavg()

    dense_dir = work / "dense"
    try:
        dense = _dense_parent(config, dense_dir)
    except NotRun:
        raise CompressError(f"--only-done: no dense parent under {dense_dir} was made with these settings") from None
    cells = [(s, r, seed) for s in present for r in config.ratios for seed in config.seeds]
    in_workers = None
    if config.jobs > 1 and not config.only_done:
        from compress.study_jobs import run_cells

        in_workers = run_cells(config, cells, dense_dir, work)
    records, not_run = _records(config, cells, dense_dir, work, in_workers and in_workers.made)

    from compress.runtime import current

    rt = current()
    latency = _measure_latency(config, dense_dir, records) if config.latency and rt.is_main else {}
    dense["latency_ms"] = latency.get(str(dense_dir))
    for r in records:
        r["latency_ms"] = latency.get(r["run"])

    results = {
        "config": asdict(config), "dense": dense, "records": records, "missing": missing, "not_run": not_run,
        "summary": summarize(records, specs, config.ratios, dense),
        "host": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                 "cpus": os.cpu_count(), "torch_threads": _torch_threads(), "device": _device_name(rt),
                 "loadavg_start": load_start, "loadavg_end": _loadavg(),
                 **({"workers": in_workers.workers, "worker_threads": in_workers.threads} if in_workers else {})},
        "study_wall_s": round(time.perf_counter() - started, 1),
        "study_cpu_s": round(time.process_time() - cpu_started + (in_workers.cpu_s if in_workers else 0.0), 1),
        "runs_done": sum(not r["reused"] for r in records), "runs_reused": sum(r["reused"] for r in records),
    }
    if rt.is_main:
        write_results(results, Path(config.docs))
    return results


def _records(config: StudyConfig, cells: list[tuple], dense_dir: Path, work: Path,
             made: set[str] | None) -> tuple[list[dict], list[str]]:
    """Every cell's record, made here one after another — or, when `--jobs` workers made them (`made`: the
    run directories they trained), read back; plus the cells not made (`--only-done`)."""
    read_back = made is not None
    lookup = replace(config, only_done=True) if read_back else config
    records, not_run = [], []
    for i, (spec, ratio, seed) in enumerate(cells, 1):
        if not read_back:
            console.rule(f"[bold]study {i}/{len(cells)}: {spec.label} · flops ratio {ratio:g} · seed {seed}")
        try:
            r = _prune(lookup, spec, ratio, seed, dense_dir, work)
        except NotRun:
            not_run.append(f"{spec.label} @ {ratio:g} seed {seed}")
            console.print("  not run (--only-done)")
            continue
        r["reused"] = r["reused"] and r["run"] not in (made or ())
        records.append(r)
        if not read_back:
            console.print(f"  acc {r['accuracy']:.4f} (before fine-tune {r['accuracy_before_finetune']:.4f})  "
                          f"flops ratio {r['flops_ratio']:.3f}  {took(r)}")
    return records, not_run


def took(record: dict[str, Any]) -> str:
    """A cell's time for the progress line: its wall time, or that it was reused."""
    return "reused" if record["reused"] else f"{record['wall_time_s']:.0f} s"


def _dense_parent(config: StudyConfig, out: Path) -> dict[str, Any]:
    from compress.training import train_run

    key = {"model": config.model, "data": config.data, "subset": config.subset, "epochs": config.dense_epochs,
           "lr": config.dense_lr, "batch_size": config.batch_size, "seed": 0,
           **{k: v for k, v in (("weights", config.weights), ("image_size", config.image_size)) if v is not None}}

    def train() -> dict[str, Any]:
        console.rule(f"[bold]study: dense parent {config.model} on {config.data}")
        return train_run(config.model, config.data, out, epochs=config.dense_epochs, lr=config.dense_lr,
                         batch_size=config.batch_size, seed=0, subset=config.subset, weights=config.weights,
                         image_size=config.image_size, resume="auto")

    report, reused = reuse_or_run(out, key, train, fresh=config.fresh, only_done=config.only_done)
    if reused:
        console.print(f"dense parent reused from {out} (accuracy {report['accuracy']:.4f})")
    return {"run": str(out), "accuracy": report["accuracy"], "flops": report["flops"], "params": report["params"],
            "wall_time_s": report["wall_time_s"], "reused": reused}


def _prune(config: StudyConfig, spec: MethodSpec, ratio: float, seed: int, dense_dir: Path,
           work: Path) -> dict[str, Any]:
    from compress.pipeline import prune_run

    out = work / spec.slug / f"r{ratio:g}" / f"s{seed}"
    key = {"source": str(dense_dir), "dense": read_key(dense_dir), "method": spec.name, "options": spec.options,
           "ratio": ratio, "seed": seed, "finetune_epochs": config.finetune_epochs, "lr": config.finetune_lr,
           "batch_size": config.batch_size, "subset": config.subset, "scope": config.scope,
           "round_to": config.round_to, "key_version": KEY_VERSION, **({"stage": spec.stage} if spec.stage else {})}
    report, reused = reuse_or_run(out, key, lambda: prune_run(
        out, data=config.data, method=spec.name, flops_ratio=ratio, source=dense_dir, scope=config.scope,
        round_to=config.round_to, finetune_epochs=config.finetune_epochs, seed=seed, lr=config.finetune_lr,
        batch_size=config.batch_size, subset=config.subset, method_options=spec.options, resume="auto",
        **spec.stage), fresh=config.fresh, only_done=config.only_done)
    stages = report.get("stages_s", {})
    search_s = stages.get("search")
    if search_s is not None and "sparse_train" in stages:
        search_s += stages["sparse_train"]          # sparse training is part of the ranking's cost
    return {"run": str(out), "method": spec.label, "method_name": spec.name, "options": {**spec.options, **spec.stage},
            "flops_ratio_target": ratio, "seed": seed, "accuracy": report["accuracy"],
            "accuracy_before_finetune": report["accuracy_before_finetune"], "flops": report["flops"],
            "params": report["params"], "flops_ratio": report["flops_ratio"], "wall_time_s": report["wall_time_s"],
            "search_s": search_s, "finetune_s": stages.get("finetune"),
            "search_epoch_s": search_epoch_seconds(report), "reused": reused,
            "mask_jaccard": (report.get("mask_overlap") or {}).get("jaccard_kept")}


def search_epoch_seconds(report: dict[str, Any]) -> float | None:
    """Training time of one search epoch (evaluation excluded), for the methods that search by training:
    VPNs' mask search, PASS' hypernetwork search, the DessiLBI path, sparse training."""
    if isinstance(report.get("sparse_train"), dict) and report["sparse_train"].get("epoch_s") is not None:
        return float(report["sparse_train"]["epoch_s"])
    for name in ("mask_search", "hypernet_search", "lbi"):
        stage = report.get("search", {}).get(name)
        if isinstance(stage, dict):
            value = stage.get("epoch_s", stage.get("epoch_time_s"))
            if value is not None:
                return float(value)
    return None


def _measure_latency(config: StudyConfig, dense_dir: Path, records: list[dict]) -> dict[str, float]:
    """Median batch-1 ONNX Runtime CPU latency (ms) of every model, interleaved in one session (one
    thread, thread CPU time: stable on a shared machine)."""
    from bench.measure import Settings
    from bench.session import benchmark
    from bench.targets import resolve_targets

    paths = [str(dense_dir)] + [r["run"] for r in records]
    console.rule(f"[bold]study: ONNX Runtime latency of {len(paths)} models (batch 1, 1 thread)")
    settings = Settings(threads=1, clock="cpu", warmup_s=0.1, min_time_s=config.latency_s, min_iters=20)
    last = [0.0]

    def progress(label: str, fraction: float) -> None:
        if fraction - last[0] >= 0.25 or fraction >= 1.0:
            console.print(f"  {label}: {fraction:.0%}")
            last[0] = fraction

    run = benchmark(resolve_targets(paths), backends=["onnxruntime"], batch_sizes=(1,), settings=settings,
                    progress=progress)
    by_label = {t.label: str(t.path) for t in run.targets}
    return {by_label[r.target]: round(r.summary.median_ms, 4) for r in run.results}


def _loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def _device_name(rt) -> str:
    """Where the training ran, for the results page (a GPU's name, not only "cuda:0")."""
    import torch

    if rt.device.type == "cuda":
        return f"{rt.device} ({torch.cuda.get_device_name(rt.device)})"
    return str(rt.device)


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


# ---------------------------------------------------------------- summary and outputs


def _mean_std(values: list[float | None]) -> tuple[float | None, float | None]:
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def summarize(records: list[dict], specs: list[MethodSpec], ratios, dense: dict) -> list[dict]:
    """One row per method × ratio: mean and sample std over seeds."""
    rows = []
    for spec in specs:
        for ratio in ratios:
            rs = [r for r in records if r["method"] == spec.label and r["flops_ratio_target"] == ratio]
            row: dict[str, Any] = {"method": spec.label, "flops_ratio_target": ratio, "n": len(rs)}
            if not rs:
                row["missing"] = True
                rows.append(row)
                continue
            for key in ("accuracy", "accuracy_before_finetune", "flops_ratio", "flops", "params", "latency_ms",
                        "search_s", "search_epoch_s", "finetune_s", "wall_time_s", "mask_jaccard"):
                row[key], row[f"{key}_std"] = _mean_std([r.get(key) for r in rs])
            if row["latency_ms"] and dense.get("latency_ms"):
                row["speedup"] = dense["latency_ms"] / row["latency_ms"]
            rows.append(row)
    return rows


def parse_list(text: str, kind=float) -> tuple:
    try:
        return tuple(kind(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise CompressError(f"expected a comma list of {kind.__name__} values, got {text!r}") from None


__all__ = ["DEFAULT_METHODS", "PRESETS", "PRETRAINED_METHODS", "MethodSpec", "NotRun", "StudyConfig", "parse_list",
           "parse_method", "preset", "run_study", "search_epoch_seconds", "summarize", "write_results"]
