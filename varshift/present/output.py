"""Where a command's rendered result goes: stdout or ``--output``, ``--plot`` figures and the
``--html`` page, each planned (checked) in an :class:`~varshift.core.files.OutputPlan` before
the first write.

Matplotlib missing, an unwritable folder or an existing file without ``--force`` is a one-line
error raised before the command does its work; a command whose figures are known only after
its work (sweep) plans them then, still before writing any.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from varshift.core.files import OutputPlan, Transaction, atomic_write
from varshift.present.report import render_text
from varshift.present.table import Grid

if TYPE_CHECKING:
    from varshift.present.html import Section


@dataclass(frozen=True)
class Drawn:
    """One figure of a command: its file stem, the matplotlib figure and its caption."""

    stem: str
    figure: Any
    caption: str


@dataclass(frozen=True)
class Visuals:
    """A command's ``--plot`` folder and ``--html`` page (either may be None)."""

    plot: Path | None = None
    html: Path | None = None

    @property
    def wanted(self) -> bool:
        """Whether any figure is needed."""
        return self.plot is not None or self.html is not None


def plan_visuals(plan: OutputPlan, visuals: Visuals, stems: Sequence[str]) -> None:
    """Check before any work that the figures and the page can be written, and plan them.

    With ``--plot`` or ``--html``: matplotlib is installed, the folders can be created and
    written, and neither ``<plot>/<stem>.png|svg`` nor the page exists unless ``force``.
    """
    plot, html = visuals.plot, visuals.html
    if plot is None and html is None:
        return
    from varshift.present.figures import check_output_folder, require_matplotlib

    require_matplotlib("--plot" if plot is not None else "--html")
    if plot is not None:
        check_output_folder(plot, "--plot")
        plan_figures(plan, plot, stems)
    if html is not None:
        check_output_folder(html.parent, "--html")
        plan.add(html, "--html")


def plan_figures(plan: OutputPlan, plot: Path, stems: Sequence[str]) -> None:
    """Plan ``<plot>/<stem>.png`` and ``.svg`` for each stem."""
    for stem in stems:
        for ext in ("png", "svg"):
            plan.add(plot / f"{stem}.{ext}", "--plot")


def save_all(plot: Path, drawn: Sequence[Drawn]) -> list[Path]:
    """Write every figure as PNG and SVG into ``plot`` (planned by :func:`plan_visuals`)."""
    from varshift.present.figures import save_figure

    written: list[Path] = []
    for d in drawn:
        written += save_figure(d.figure, plot, d.stem, force=True)
    return written


def write_page(
    html: Path,
    title: str,
    sections: Sequence[Section],
    metadata: Mapping[str, Any],
) -> Path:
    """Write the page (planned by :func:`plan_visuals`)."""
    from varshift.present.html import write_html

    return write_html(html, title, sections, metadata, force=True)


def write_visuals(
    visuals: Visuals,
    drawn: Sequence[Drawn],
    page: tuple[str, Callable[[], Sequence[Section]], Mapping[str, Any]] | None,
) -> list[Path]:
    """The figures into ``--plot``, then the page into ``--html``.

    ``page`` is the title, a function giving the sections and the metadata; the sections are
    made after the figure files are written: a figure's first drawing settles its layout, so
    this order keeps the files and the inline SVG the same from run to run and release to
    release.
    """
    written: list[Path] = []
    if visuals.plot is not None:
        written += save_all(visuals.plot, drawn)
    if visuals.html is not None and page is not None:
        title, sections, metadata = page
        written.append(write_page(visuals.html, title, sections(), metadata))
    return written


def outcome(tx: Transaction, paths: Sequence[Path]) -> list[str]:
    """``wrote a and b`` / ``unchanged a and b`` (a rerun's identical files, left in place) /
    both, for the ``paths`` a committed :class:`~varshift.core.files.Transaction` handled."""
    lines = []
    for verb in ("wrote", "unchanged"):
        mine = [str(p) for p in paths if tx.verb(p) == verb]
        if mine:
            lines.append(f"{verb} {' and '.join(mine)}")
    return lines


def inline(drawn: Sequence[Drawn]) -> tuple[Any, ...]:
    """The figures as :class:`varshift.present.html.Figure` elements (inline SVG with captions)."""
    from varshift.present.html import Figure

    return tuple(Figure.from_matplotlib(d.figure, d.caption) for d in drawn)


def flat_headers(df: Grid) -> Grid:
    """The terminal layout's two-line headers on one line, for a page."""
    return df.rename([" ".join(str(c).split()) for c in df.columns])


def on_terminal(fmt: str, output: Path | None) -> bool:
    """Whether the result is drawn as a Rich table (``table`` format, stdout a terminal)."""
    return fmt == "table" and output is None and sys.stdout.isatty()


def deliver(text: str, output: Path | None) -> None:
    """``text`` to ``output`` (planned by the caller) or to stdout."""
    if output is not None:
        atomic_write(output, text, force=True)
    else:
        sys.stdout.write(text)


def emit(
    df: Any,
    fmt: str,
    *,
    metadata: Mapping[str, Any] | None = None,
    title: str | None = None,
    caption: str | None = None,
    output: Path | None = None,
    table_df: Any = None,
    keys: int = 1,
) -> None:
    """Send a result to stdout (or ``output``, planned by the caller) in the chosen format.

    ``table`` is a Rich table on a terminal and Markdown when stdout is not one (or when
    writing to a file); ``table_df`` is an alternative layout for the human formats. On a
    terminal too narrow for the whole table its first ``keys`` columns name each row in every
    part (:func:`varshift.present.render.print_table`).
    """
    human = table_df if table_df is not None else df
    if on_terminal(fmt, output):
        from varshift.present.render import print_table, stdout_console

        print_table(stdout_console(), human, title=title, caption=caption, keys=keys)
        return
    if fmt in ("table", "md"):
        text = render_text(human, "md", metadata, title)
    else:
        text = render_text(df, fmt, metadata, title)
    deliver(text, output)
