"""Terminal rendering: Rich tables on stdout, progress and messages on stderr.

Rich is imported when something is drawn on a terminal or a message is printed, not at
import time: a command whose output is piped never loads it.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from varshift.present.report import format_value
from varshift.present.table import Grid

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

#: Progress callback the library accepts: ``callback(done, total)``.
ProgressCallback = Callable[[int, int], None]


def stdout_console(width: int | None = None) -> Console:
    """The console results go to."""
    from rich.console import Console

    return Console(file=sys.stdout, width=width, soft_wrap=False)


def stderr_console(quiet: bool = False) -> Console:
    """The console messages go to; silent when ``quiet``."""
    from rich.console import Console

    return Console(file=sys.stderr, quiet=quiet, soft_wrap=True)


def message(text: str, quiet: bool = False) -> None:
    """Print ``text`` and a newline on stderr as it is (no markup), unless ``quiet``."""
    if not quiet:
        sys.stderr.write(text + "\n")
        sys.stderr.flush()


def frame_table(
    df: Any,
    title: str | None = None,
    caption: str | None = None,
    right_align_numbers: bool = True,
    *,
    compact: bool = False,
) -> Table:
    """A Rich table of ``df`` (a :class:`Grid` or a DataFrame) with the report's cell format.

    ``compact``: no vertical rules and a first column at least 7 wide (13 columns fit in 120).
    """
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    grid = Grid.of(df)
    table = Table(title=title, caption=caption, show_lines=False, header_style="bold")
    for col in grid.columns:
        numeric = right_align_numbers and all(
            v is None or (isinstance(v, int | float) and not isinstance(v, bool))
            for v in grid.column(col)
        )
        table.add_column(escape(str(col)), justify="right" if numeric else "left", no_wrap=numeric)
    for row in grid:
        table.add_row(*(escape(format_value(v)) or "—" for v in row))
    if compact:
        table.box = box.SIMPLE_HEAD
        table.columns[0].min_width = 7
    return table


def stderr_is_terminal() -> bool:
    """Whether stderr may be a terminal for Rich (a tty, or an environment that forces one)."""
    forced = ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE")
    return sys.stderr.isatty() or any(os.environ.get(k) for k in forced)


@contextmanager
def progress_bar(
    description: str, total: int, *, quiet: bool = False, delay: float = 0.5
) -> Iterator[ProgressCallback]:
    """Yield a ``callback(done, total)`` that drives a progress bar on stderr.

    The bar appears only if the work is still running after ``delay`` seconds, so short runs
    print nothing; it never appears when ``quiet`` or when stderr is not a terminal.
    """
    if quiet or not stderr_is_terminal():
        yield lambda done, total: None
        return
    console = stderr_console(quiet)
    if not console.is_terminal:
        yield lambda done, total: None
        return
    from rich.progress import (
        BarColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

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
