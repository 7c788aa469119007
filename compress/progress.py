"""One console and progress-bar factory, so every long stage looks and logs the same way.

On a terminal a rich progress bar updates in place; in CI logs (no TTY) each finished epoch prints
one line instead of a stream of redraws. Under torchrun only rank 0 shows anything (`quiet`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)


def quiet(silent: bool = True) -> None:
    """Silence (or restore) this process's progress and messages: every rank but rank 0 is quiet."""
    console.quiet = silent


class EpochBar:
    """Progress over `total` steps of one epoch; `advance` updates the metrics shown beside the bar."""

    def __init__(self, progress: Progress | None, desc: str, total: int):
        self.progress, self.desc = progress, desc
        self.task = progress.add_task(desc, total=total, metrics="") if progress else None

    def advance(self, metrics: str | None = None) -> None:
        if self.progress is not None:
            fields = {} if metrics is None else {"metrics": metrics}
            self.progress.update(self.task, advance=1, **fields)

    def done(self, metrics: str) -> None:
        if self.progress is not None:
            self.progress.update(self.task, metrics=metrics)
        else:
            console.print(f"{self.desc}  {metrics}", highlight=False)


@contextmanager
def progress_bars(enabled: bool = True) -> Iterator[Progress | None]:
    if not console.is_terminal or not enabled or console.quiet:
        yield None
        return
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn(), TextColumn("{task.fields[metrics]}"))
    with Progress(*columns, console=console, transient=False) as progress:
        yield progress
