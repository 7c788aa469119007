"""`compress latency-study --parts accuracy`: accuracy at equal measured latency.

For each method and seed, a trained parent (the Fashion-MNIST study's ResNet-20: the dense run of
`compress study`) is pruned to `--flops-ratio F` and fine-tuned; `compress bench` measures its latency
ratio L on the target. The parent is pruned again with `--latency-ratio L` and the same fine-tuning
budget (epochs, learning rate, training subset, seed), and one more bench measures both against the
parent side by side. At the same measured latency, which keeps more accuracy? Latency does not depend
on the weights, so only this part needs a trained parent and real data.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compress.errors import CompressError
from compress.runs import reuse_or_run


@dataclass
class AccuracySettings:
    parent: str | None = None            # a trained run directory (compress study's runs/study/dense)
    data: str = "fashion-mnist"
    methods: tuple[str, ...] = ("l1", "pass")
    seeds: tuple[int, ...] = (0, 1, 2)
    flops_ratio: float = 0.5            # at 0.25 the FLOPs target's 8-channel layers beat the latency floor
    subset: int = 3000                   # training images for the search and fine-tuning (val: the full split)
    finetune_epochs: int = 2
    lr: float = 0.01
    batch_size: int = 128

    def check(self) -> None:
        if self.parent is None or not (Path(self.parent) / "report.json").is_file():
            raise CompressError("--parts accuracy needs --parent DIR, a trained run (e.g. the dense run of "
                                f"`compress study`, runs/study/dense); got {self.parent!r}")
        if not 0 < self.flops_ratio <= 1 or self.finetune_epochs < 0 or not self.seeds or not self.methods:
            raise CompressError("--parts accuracy needs a FLOPs ratio in (0, 1], ≥ 0 fine-tuning epochs, seeds "
                                "and methods")


def accuracy_rows(config, work: Path) -> Iterator[dict[str, Any]]:
    """One row per method and seed as each is measured (see module doc); `config` is the LatencyStudyConfig."""
    from compress.latency_study import bench, speedups_of

    acc: AccuracySettings = config.accuracy
    parent = Path(acc.parent).resolve()
    threads = config.threads[0]
    for method in acc.methods:
        for seed in acc.seeds:
            base = work / "accuracy" / method / f"s{seed}"
            flops_report = _prune(config, parent, base / f"flops-{acc.flops_ratio:g}", method, seed,
                                  flops_ratio=acc.flops_ratio)
            first = bench([parent, base / f"flops-{acc.flops_ratio:g}"], threads, config.batch_size,
                          config.bench_duration, base / "bench-flops.json", config.clock)
            level = round(speedups_of(first)[str(base / f"flops-{acc.flops_ratio:g}")]["latency_ratio"], 4)
            try:
                latency_report = _prune(config, parent, base / "latency", method, seed, latency_ratio=level)
            except CompressError as e:    # the FLOPs-targeted widths may sit below the latency target's floor
                if "unreachable" not in str(e):
                    raise
                yield {"method": method, "seed": seed, "latency_level": level, "unreachable": str(e)}
                continue
            doc = bench([parent, base / f"flops-{acc.flops_ratio:g}", base / "latency"], threads, config.batch_size,
                        config.bench_duration, base / "bench-both.json", config.clock)
            ups = speedups_of(doc)
            yield {"method": method, "seed": seed, "latency_level": level,
                   "flops_targeted": _arm(flops_report, ups[str(base / f"flops-{acc.flops_ratio:g}")]),
                   "latency_targeted": _arm(latency_report, ups[str(base / "latency")])}


def _prune(config, parent: Path, out: Path, method: str, seed: int, *, flops_ratio: float | None = None,
           latency_ratio: float | None = None) -> dict[str, Any]:
    from compress.pipeline import prune_run

    acc: AccuracySettings = config.accuracy
    key = {"parent": str(parent), "method": method, "seed": seed, "flops_ratio": flops_ratio,
           "latency_ratio": latency_ratio, "threads": config.threads[0], "clock": config.clock,
           "subset": acc.subset, "finetune_epochs": acc.finetune_epochs, "lr": acc.lr, "round_to": config.round_to}
    latency = {} if latency_ratio is None else {
        "latency_ratio": latency_ratio, "latency_backend": "onnxruntime", "latency_threads": config.threads[0],
        "latency_batch_size": config.batch_size, "latency_cache": config.cache_dir, "latency_clock": config.clock}
    report, _reused = reuse_or_run(out, key, lambda: prune_run(
        out, data=acc.data, method=method, source=parent, flops_ratio=flops_ratio, round_to=config.round_to,
        finetune_epochs=acc.finetune_epochs, seed=seed, lr=acc.lr, batch_size=acc.batch_size, subset=acc.subset,
        **latency), fresh=config.fresh)
    return report


def _arm(report: dict[str, Any], up: dict[str, Any]) -> dict[str, Any]:
    return {"accuracy": report["accuracy"], "accuracy_before_finetune": report.get("accuracy_before_finetune"),
            "flops_ratio": report["flops_ratio"], "latency_ratio": round(up["latency_ratio"], 4),
            "prune_s": report["wall_time_s"]}


def accuracy_md(results: dict[str, Any]) -> str:
    """The generated block: per method the mean accuracy of both arms over seeds, then every run."""
    c, acc = results["config"], results["config"]["accuracy"]
    refused = [r for r in results["accuracy"] if r.get("unreachable")]
    rows = [r for r in results["accuracy"] if not r.get("unreachable")]
    lines = [f"Parent `{acc['parent']}` on {acc['data']}; per seed: `--flops-ratio {acc['flops_ratio']:g}` (scope "
             f"global, rank allocation) vs `--latency-ratio L` (knapsack), L = the FLOPs-targeted network's latency "
             f"ratio measured by `compress bench` (onnxruntime, {c['threads'][0]} thread(s), "
             f"{'thread CPU time' if c['clock'] == 'cpu' else 'wall clock'}, batch {c['batch_size']}); both "
             f"fine-tuned {acc['finetune_epochs']} epoch(s) at lr {acc['lr']:g} on {acc['subset']} training images, "
             f"round-to {c['round_to']}; accuracy on the full validation split.", "",
             "| method | seeds | FLOPs-targeted accuracy | latency-targeted accuracy | Δ (latency − FLOPs) | "
             "latency-targeted better in | latency ratio (FLOPs-t. / latency-t.) | "
             "FLOPs ratio (FLOPs-t. / latency-t.) |",
             "|---|---|---|---|---|---|---|---|"]
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        f = [r["flops_targeted"]["accuracy"] for r in mine]
        lat = [r["latency_targeted"]["accuracy"] for r in mine]
        delta = [b - a for a, b in zip(f, lat, strict=True)]
        wins = sum(d > 0 for d in delta)
        lines.append(f"| {method} | {len(mine)} | {_pm(f)} | {_pm(lat)} | {statistics.mean(delta) * 100:+.2f} pts | "
                     f"{wins} of {len(mine)} | {_mean(mine, 'flops_targeted', 'latency_ratio'):.3f} / "
                     f"{_mean(mine, 'latency_targeted', 'latency_ratio'):.3f} | "
                     f"{_mean(mine, 'flops_targeted', 'flops_ratio'):.3f} / "
                     f"{_mean(mine, 'latency_targeted', 'flops_ratio'):.3f} |")
    lines += ["", "| method | seed | L | FLOPs-targeted: FLOPs, latency, acc before / after FT | latency-targeted: "
              "FLOPs, latency, acc before / after FT |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['seed']} | {r['latency_level']:.3f} | {_cell(r['flops_targeted'])} | "
                     f"{_cell(r['latency_targeted'])} |")
    lines += [f"| {r['method']} | {r['seed']} | {r['latency_level']:.3f} | - | {r['unreachable']} |" for r in refused]
    return "\n".join(lines)


def _pm(values: list[float]) -> str:
    spread = f" ± {statistics.stdev(values) * 100:.2f}" if len(values) > 1 else ""
    return f"{statistics.mean(values) * 100:.2f}{spread}%"


def _mean(rows: list[dict[str, Any]], arm: str, key: str) -> float:
    return statistics.mean(r[arm][key] for r in rows)


def _cell(arm: dict[str, Any]) -> str:
    before = arm.get("accuracy_before_finetune")
    before = "-" if before is None else f"{before * 100:.2f}%"
    return f"{arm['flops_ratio']:.3f}, {arm['latency_ratio']:.3f}, {before} / {arm['accuracy'] * 100:.2f}%"
