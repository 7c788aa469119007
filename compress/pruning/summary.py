"""The one-screen table `compress prune` ends with: dense vs pruned FLOPs, params and accuracy."""

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
    target = report["flops_ratio_target"]
    table.add_row("FLOPs (fvcore, MACs)", f"{dense['flops']:,}", f"{report['flops']:,}",
                  f"{report['flops_ratio']:.3f}" + (f" (target {target:g})" if target is not None else ""))
    table.add_row("params", f"{dense['params']:,}", f"{report['params']:,}",
                  f"{report['params'] / dense['params']:.3f}")
    table.add_row("accuracy (val)", f"{dense['accuracy']:.4f}", f"{report['accuracy']:.4f}",
                  f"{report['accuracy'] - dense['accuracy']:+.4f}")
    table.add_row("  before fine-tuning", "", f"{report['accuracy_before_finetune']:.4f}",
                  f"{report['accuracy_before_finetune'] - dense['accuracy']:+.4f}")
    stages = report.get("stages_s", {})
    timing = "  ".join(f"{k} {v:.1f}" for k, v in stages.items())
    table.add_row("wall time", "", f"{report['wall_time_s']:.1f} s", timing)
    table.add_row("groups pruned", "", f"{report['groups_pruned']} of {report['groups']}", report["flops_ratio_note"])
    tokens = report.get("tokens")
    if tokens:
        table.add_row("tokens per block", "", " ".join(map(str, tokens["tokens_per_block"])),
                      f"keep ρ={tokens['keep_ratio']:g} before blocks {', '.join(map(str, tokens['stages']))}")
    (console or Console()).print(table)
