"""Compact end-of-command summaries."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

stdout = Console()


def print_run(out: str, report: dict[str, Any]) -> None:
    table = Table(title=f"{report['command']}: {out}", show_header=False, title_justify="left")
    table.add_row("model", f"{report['model']}  {tuple(report['input_size'])}")
    table.add_row("data", report["data"])
    table.add_row("accuracy (val)", f"{report['accuracy']:.4f}")
    table.add_row("FLOPs (fvcore, MACs)", f"{report['flops']:,}")
    table.add_row("params", f"{report['params']:,}")
    table.add_row("wall time", f"{report['wall_time_s']:.1f} s")
    stdout.print(table)
