"""A rich progress bar for model loads."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn


@contextlib.contextmanager
def load_progress(console: Console, *, quiet: bool = False) -> Iterator[Callable[[str, float], None] | None]:
    """Yields progress(name, fraction) that draws one bar per model being loaded."""
    if quiet:
        yield None
        return
    tasks: dict[str, TaskID] = {}
    with Progress(TextColumn("loading {task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                  TimeElapsedColumn(), console=console, transient=True) as bar:
        def progress(name: str, fraction: float) -> None:
            if name not in tasks:
                tasks[name] = bar.add_task(name, total=1.0)
            bar.update(tasks[name], completed=fraction)

        yield progress
