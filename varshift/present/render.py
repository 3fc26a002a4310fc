"""Terminal rendering: Rich tables on stdout, progress and messages on stderr.

Rich is imported when something is drawn on a terminal or a message is printed, not at
import time: a command whose output is piped never loads it.
"""

from __future__ import annotations

import math
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

    style = None if os.environ.get("NO_COLOR") else VERDICT_STYLES.get(text)
    if style is None:
        return escape(text) or "—"
    from rich.text import Text

    return Text(text, style=style)


def verdict_message(text: str, quiet: bool = False) -> None:
    """:func:`message` with its verdict words coloured when stderr is a colour terminal
    (plain when piped, under ``NO_COLOR`` or with ``TERM=dumb``)."""
    if quiet or not stderr_is_terminal() or os.environ.get("NO_COLOR"):
        message(text, quiet)
        return
    from rich.text import Text

    line = Text(text)
    for word, style in VERDICT_STYLES.items():
        line.highlight_regex(rf"\b{word}\b", style)
    stderr_console().print(line, highlight=False)


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


def long_table(df: Any, title: str | None = None, caption: str | None = None) -> Table:
    """``df`` as one ``field | value`` block per row (key columns first), for a terminal too
    narrow for even the key columns beside one other."""
    from rich.table import Table

    grid = Grid.of(df)
    table = Table(title=title, caption=caption, header_style="bold")
    table.add_column("field", no_wrap=True)
    table.add_column("value", overflow="fold")
    for n, row in enumerate(grid):
        if n:
            table.add_section()
        for col, value in zip(grid.columns, row, strict=True):
            table.add_row(_cell(" ".join(str(col).split())), _cell(format_value(value)))
    return table


def print_table(
    console: Console,
    df: Any,
    *,
    title: str | None = None,
    caption: str | None = None,
    keys: int = 1,
    compact: bool = False,
) -> None:
    """Print ``df`` on ``console`` readable at its width.

    The whole table when it fits; else several tables, each of the key columns and as many
    others as fit (:func:`column_chunks`); when the key columns alone fill more than half the
    width, one ``field | value`` block per row (:func:`long_table`). Key columns are never
    dropped or cut, numbers never shortened.
    """
    grid = Grid.of(df)
    width = console.width
    key_width = 1 + sum(w + 3 for w in _column_widths(grid, compact)[:keys])
    chunks = column_chunks(grid, width, keys=keys, compact=compact)
    if len(chunks) > 1 and key_width > width // 2:
        console.print(long_table(grid, title=title, caption=caption))
        return
    for i, names in enumerate(chunks):
        part = grid if len(chunks) == 1 else grid.select(names)
        last = i == len(chunks) - 1
        shown_title = title if i == 0 else None
        shown_caption = caption if last else f"(continued: {i + 1}/{len(chunks)})"
        table = frame_table(part, title=shown_title, caption=shown_caption, compact=compact)
        for column in table.columns[:keys]:
            column.no_wrap = True  # a key is never wrapped or cut: other text wraps instead
        console.print(table)


class SmoothedRate:
    """An ETA from an exponentially smoothed rate, for progress that arrives unevenly.

    The work done and the time spent are both summed with weights that fall by ``e`` every
    ``tau`` seconds, and the rate is their ratio: the average reaches back about ``tau``
    seconds whatever the step sizes, so a burst of fast steps or one slow step moves the ETA
    little, while a lasting change of speed is followed within a few ``tau``.
    """

    def __init__(self, tau: float = 20.0) -> None:
        self.tau = tau
        self._work = 0.0
        self._time = 0.0
        self._last: tuple[float, float] | None = None

    def reset(self) -> None:
        """Forget everything: the next :meth:`update` starts a new measurement."""
        self._work, self._time, self._last = 0.0, 0.0, None

    @property
    def rate(self) -> float | None:
        """Units per second, or None before any time has passed."""
        return self._work / self._time if self._time > 0 else None

    def update(self, now: float, done: float) -> None:
        """Record that ``done`` units are complete at time ``now`` (seconds)."""
        if self._last is None:
            self._last = (now, done)
            return
        t0, d0 = self._last
        dt = now - t0
        if dt <= 0 or done < d0:
            return
        decay = math.exp(-dt / self.tau)
        self._work = decay * self._work + (done - d0)
        self._time = decay * self._time + dt
        self._last = (now, done)

    def remaining(self, total: float) -> float | None:
        """Seconds until ``total`` at the smoothed rate, or None before there is a rate."""
        rate = self.rate
        if self._last is None or rate is None or rate <= 0:
            return None
        return max(0.0, total - self._last[1]) / rate


def stderr_is_terminal() -> bool:
    """Whether stderr may be a terminal for Rich (a tty, or an environment that forces one)."""
    forced = ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE")
    return sys.stderr.isatty() or any(os.environ.get(k) for k in forced)


def _eta_column(eta: SmoothedRate) -> Any:
    """A Rich column showing the remaining time of :class:`SmoothedRate` (``-:--:--`` before
    there is a rate)."""
    from rich.progress import ProgressColumn
    from rich.text import Text

    class SmoothedRemaining(ProgressColumn):
        max_refresh = 0.5

        def render(self, task: Any) -> Text:
            left = eta.remaining(task.total) if task.total else None
            if left is None:
                return Text("-:--:--", style="progress.remaining")
            minutes, seconds = divmod(int(left + 0.5), 60)
            hours, minutes = divmod(minutes, 60)
            return Text(f"{hours}:{minutes:02d}:{seconds:02d}", style="progress.remaining")

    return SmoothedRemaining()


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
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    start = time.monotonic()
    eta = SmoothedRate()
    progress = Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        _eta_column(eta),
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
        eta.update(time.monotonic(), done)
        progress.update(task, completed=done, total=total_)

    try:
        yield update
    finally:
        if started:
            progress.stop()


def _count_column(eta: SmoothedRate, unit: str) -> Any:
    """``done/total unit`` (``done unit`` when the total is unknown) and the smoothed rate."""
    from rich.progress import ProgressColumn
    from rich.text import Text

    class CountAndRate(ProgressColumn):
        def render(self, task: Any) -> Text:
            done = int(task.completed)
            count = f"{done}/{int(task.total)}" if task.total else f"{done}"
            rate = eta.rate
            speed = f", {rate:.1f} {unit}/s" if rate else ""
            return Text(f"{count} {unit}{speed}", style="progress.download")

    return CountAndRate()


@contextmanager
def pass_progress(
    quiet: bool = False, *, delay: float = 1.0, unit: str = "batches"
) -> Iterator[Callable[[str, int, int | None], None]]:
    """Yield a ``callback(label, done, total)`` driving a bar on stderr over a series of passes.

    Each new ``label`` starts a new pass (the bar and its :class:`SmoothedRate` ETA restart).
    The bar appears once a pass has run for ``delay`` seconds, so short passes print nothing;
    a known ``total`` shows ``done/total``, the rate and the ETA, an unknown one a spinner and
    the count. Nothing is written when ``quiet`` or when stderr is not a terminal.
    """
    if quiet or not stderr_is_terminal():
        yield lambda label, done, total: None
        return
    console = stderr_console(quiet)
    if not console.is_terminal:
        yield lambda label, done, total: None
        return
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn

    eta = SmoothedRate()
    progress = Progress(
        SpinnerColumn(),
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        _count_column(eta, unit),
        _eta_column(eta),
        console=console,
        transient=True,
    )
    task = progress.add_task("", total=None)
    state: dict[str, Any] = {"label": None, "start": 0.0, "shown": False}

    def update(label: str, done: int, total: int | None) -> None:
        now = time.monotonic()
        if label != state["label"]:
            state["label"], state["start"] = label, now
            eta.reset()
            eta.update(now, 0)
            progress.reset(task, description=label, total=total, completed=0)
        if not state["shown"] and now - state["start"] > delay:
            progress.start()
            state["shown"] = True
        eta.update(now, done)
        progress.update(task, completed=done, total=total)

    try:
        yield update
    finally:
        if state["shown"]:
            progress.stop()
