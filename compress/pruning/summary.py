"""The one-screen table `compress prune` ends with: dense vs pruned FLOPs, latency, params and accuracy."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table


def print_prune(out: str, report: dict[str, Any], console: Console | None = None) -> None:
    dense = report["dense"]
    table = Table(title=f"prune ({report['method']}, {report['scope']}, round-to {report['round_to']}): {out}",
                  title_justify="left")
    table.add_column("")
    table.add_column("dense", justify="right")
    table.add_column("pruned", justify="right")
    table.add_column("pruned ÷ dense", justify="right")
    flops_target = report.get("flops_ratio_target")
    table.add_row("FLOPs (fvcore, MACs)", f"{dense['flops']:,}", f"{report['flops']:,}",
                  f"{report['flops_ratio']:.3f}" + (f" (target {flops_target:g})" if flops_target is not None else ""))
    if report.get("latency_ratio_target") is not None:
        where = f"{report['latency_backend']}, {report['latency_threads']} thr, batch {report['latency_batch_size']}"
        table.add_row(f"latency ({where}), ms", f"{report['latency_dense_ms']:.3f}", f"{report['latency_ms']:.3f}",
                      f"{report['latency_ratio']:.3f} measured (target {report['latency_ratio_target']:g}, "
                      f"tables predicted {report['latency_ratio_predicted']:.3f})")
    table.add_row("params", f"{dense['params']:,}", f"{report['params']:,}",
                  f"{report['params'] / dense['params']:.3f}")
    table.add_row("accuracy (val)", f"{dense['accuracy']:.4f}", f"{report['accuracy']:.4f}",
                  f"{report['accuracy'] - dense['accuracy']:+.4f}")
    table.add_row("  before fine-tuning", "", f"{report['accuracy_before_finetune']:.4f}",
                  f"{report['accuracy_before_finetune'] - dense['accuracy']:+.4f}")
    stages = report.get("stages_s", {})
    timing = "  ".join(f"{k} {v:.1f}" for k, v in stages.items())
    table.add_row("wall time", "", f"{report['wall_time_s']:.1f} s", timing)
    table.add_row("groups pruned", "", f"{report['groups_pruned']} of {report['groups']}",
                  report.get("flops_ratio_note") or f"{report['allocation']} allocation")
    tokens = report.get("tokens")
    if tokens:
        table.add_row("tokens per block", "", " ".join(map(str, tokens["tokens_per_block"])),
                      f"keep ρ={tokens['keep_ratio']:g} before blocks {', '.join(map(str, tokens['stages']))}")
    (console or Console()).print(table)
