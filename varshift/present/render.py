"""Terminal rendering: Rich tables on stdout, progress and messages on stderr."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pandas as pd
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from varshift.present.report import format_value

#: Progress callback the library accepts: ``callback(done, total)``.
ProgressCallback = Callable[[int, int], None]


def stdout_console(width: int | None = None) -> Console:
    """The console results go to."""
    return Console(file=sys.stdout, width=width, soft_wrap=False)


def stderr_console(quiet: bool = False) -> Console:
    """The console messages go to; silent when ``quiet``."""
    return Console(file=sys.stderr, quiet=quiet, soft_wrap=True)


def frame_table(
    df: pd.DataFrame,
    title: str | None = None,
    caption: str | None = None,
    right_align_numbers: bool = True,
) -> Table:
    """A Rich table of ``df`` with the report's canonical cell format."""
    table = Table(title=title, caption=caption, show_lines=False, header_style="bold")
    for col in df.columns:
        numeric = right_align_numbers and all(
            v is None or (isinstance(v, int | float) and not isinstance(v, bool))
            for v in df[col].tolist()
        )
        table.add_column(escape(str(col)), justify="right" if numeric else "left", no_wrap=numeric)
    for row in df.itertuples(index=False, name=None):
        table.add_row(*(escape(format_value(v)) or "—" for v in row))
    return table


@contextmanager
def progress_bar(
    description: str, total: int, *, quiet: bool = False, delay: float = 0.5
) -> Iterator[ProgressCallback]:
    """Yield a ``callback(done, total)`` that drives a progress bar on stderr.

    The bar appears only if the work is still running after ``delay`` seconds, so short runs
    print nothing; it never appears when ``quiet`` or when stderr is not a terminal.
    """
    console = stderr_console(quiet)
    if quiet or not console.is_terminal:
        yield lambda done, total: None
        return
    start = time.monotonic()
    progress = Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )
    task = progress.add_task(description, total=total)
    started = False

    def update(done: int, total_: int) -> None:
        nonlocal started
        if not started and time.monotonic() - start > delay:
            progress.start()
            started = True
        progress.update(task, completed=done, total=total_)

    try:
        yield update
    finally:
        if started:
            progress.stop()
