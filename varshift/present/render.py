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
        table.add_row(*(_cell(format_value(v)) for v in row))
    if compact:
        table.box = box.SIMPLE_HEAD
        table.columns[0].min_width = 7
    return table


#: Verdict words coloured on a terminal (plain when piped or ``NO_COLOR`` is set).
VERDICT_STYLES: dict[str, str] = {"REGRESSION": "bold red", "worse": "red", "better": "green"}


def _cell(text: str) -> Any:
    """A cell: a verdict word styled, anything else as markup-escaped text."""
    from rich.markup import escape

    style = VERDICT_STYLES.get(text)
    if style is None:
        return escape(text) or "—"
    from rich.text import Text

    return Text(text, style=style)


def _column_widths(grid: Grid, compact: bool) -> list[int]:
    """Each column's natural width in cells: its longest cell or header line."""
    from rich.cells import cell_len

    widths = []
    for i, col in enumerate(grid.columns):
        cells = [format_value(row[i]) or "—" for row in grid.rows]
        lines = [*str(col).split("\n"), *cells]
        widths.append(max(cell_len(x) for x in lines))
    if compact and widths:
        widths[0] = max(widths[0], 7)
    return widths


def column_chunks(
    grid: Grid, width: int, *, keys: int = 1, compact: bool = False
) -> list[list[str]]:
    """The columns of ``grid`` split so that each table fits ``width`` cells.

    Every chunk starts with the first ``keys`` columns (the name of each row); the others are
    dealt out in order, as many per chunk as fit, so nothing is dropped or cut. A column too
    wide even alone with the keys gets a chunk of its own (Rich wraps its text).
    """
    widths = _column_widths(grid, compact)
    keys = max(0, min(keys, len(grid.columns) - 1))
    base = 1 + sum(w + 3 for w in widths[:keys])  # a cell: padding 1 + text + padding 1 + edge
    chunks: list[list[str]] = []
    used = base
    current: list[str] = []
    for name, w in zip(grid.columns[keys:], widths[keys:], strict=True):
        if current and used + w + 3 > width:
            chunks.append(current)
            current, used = [], base
        current.append(name)
        used += w + 3
    chunks.append(current)
    head = list(grid.columns[:keys])
    return [head + chunk for chunk in chunks]


def print_table(
    console: Console,
    df: Any,
    *,
    title: str | None = None,
    caption: str | None = None,
    keys: int = 1,
    compact: bool = False,
) -> None:
    """Print ``df`` on ``console`` readable at its width: the whole table when it fits, else
    several tables of the key columns and as many others as fit (:func:`column_chunks`)."""
    grid = Grid.of(df)
    chunks = column_chunks(grid, console.width, keys=keys, compact=compact)
    for i, names in enumerate(chunks):
        part = grid if len(chunks) == 1 else grid.select(names)
        last = i == len(chunks) - 1
        shown_title = title if i == 0 else None
        shown_caption = caption if last else None
        if len(chunks) > 1 and not last:
            shown_caption = f"(continued: {i + 1}/{len(chunks)})"
        console.print(frame_table(part, title=shown_title, caption=shown_caption, compact=compact))


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
