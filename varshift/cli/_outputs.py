"""``--plot DIR`` and ``--html FILE`` (and the ``--output`` check) for simulate, correct, check
and sweep: checks before any work, then the figures (PNG and SVG) and the self-contained page.

Matplotlib missing, an unwritable folder or an existing file without ``--force`` is a one-line
error (exit 2) raised before the command does its work; nothing is written until everything has
been checked (sweep knows its figures only after its work: it checks them then, before writing
any).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from varshift.core.errors import OutputFileError

if TYPE_CHECKING:
    from varshift.present.html import Section


@dataclass(frozen=True)
class Drawn:
    """One figure of a command: its file stem, the matplotlib figure and its caption."""

    stem: str
    figure: Any
    caption: str


def preflight(
    plot: Path | None,
    html: Path | None,
    stems: Sequence[str],
    *,
    force: bool,
    output: Path | None = None,
) -> None:
    """Fail before any work if the table, a figure or the page cannot be written.

    Checks that ``output`` (``--output``) does not exist unless ``force``; then, with ``--plot``
    or ``--html``, that matplotlib is installed, that the folders can be created and written,
    and that neither ``<plot>/<stem>.png|svg`` (see :func:`refuse_figures`) nor ``html`` exists
    unless ``force``.
    """
    if output is not None and output.exists() and not force:
        raise OutputFileError(f"--output {output}: already exists; pass --force to overwrite it")
    if plot is None and html is None:
        return
    from varshift.present.figures import check_output_folder, require_matplotlib

    require_matplotlib("--plot" if plot is not None else "--html")
    if plot is not None:
        check_output_folder(plot, "--plot")
        refuse_figures(plot, stems, force=force)
    if html is not None:
        check_output_folder(html.parent, "--html")
        _refuse("--html", html, force)


def refuse_figures(plot: Path, stems: Sequence[str], *, force: bool) -> None:
    """Fail if ``<plot>/<stem>.png|svg`` is a folder, or exists and ``force`` is off.

    Part of :func:`preflight`; on its own for a command whose figures are known only after its
    work (sweep), to be called before any figure is written.
    """
    for stem in stems:
        for ext in ("png", "svg"):
            _refuse("--plot", plot / f"{stem}.{ext}", force)


def _refuse(option: str, path: Path, force: bool) -> None:
    if path.is_dir():
        raise OutputFileError(f"{option} {path}: is a folder; expected a file name")
    if path.exists() and not force:
        raise OutputFileError(f"{option} {path}: already exists; pass --force to overwrite it")


def save_all(plot: Path, drawn: Sequence[Drawn]) -> list[Path]:
    """Write every figure as PNG and SVG into ``plot`` (checked by :func:`preflight`)."""
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
    """Write the page (checked by :func:`preflight`)."""
    from varshift.present.html import write_html

    return write_html(html, title, sections, metadata, force=True)


def inline(drawn: Sequence[Drawn]) -> tuple[Any, ...]:
    """The figures as :class:`varshift.present.html.Figure` elements (inline SVG with captions)."""
    from varshift.present.html import Figure

    return tuple(Figure.from_matplotlib(d.figure, d.caption) for d in drawn)


def flat_headers(df: pd.DataFrame) -> pd.DataFrame:
    """The terminal layout's two-line headers on one line, for a page."""
    return df.rename(columns=lambda c: " ".join(str(c).split()))
