"""Self-contained HTML reports: tables and inline SVG figures in one file.

The page loads nothing: no scripts, stylesheets, fonts or images from anywhere. Figures are
inline ``<svg>`` elements (text drawn as paths), the style sheet is inline, and every piece of
text is escaped. The only URLs in a page are the SVG and XLink namespace declarations.

Commands build a list of :class:`Section` and call :func:`write_html`::

    sections = [Section("Shift ratio", figures=(Figure(svg, "caption"),), tables=(Table(df),))]
    write_html(Path("report.html"), "varshift sweep", sections, metadata={...})
"""

from __future__ import annotations

import html
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from varshift.core.errors import ValidationError
from varshift.core.files import atomic_write
from varshift.present.report import format_value
from varshift.present.table import Grid

#: Tables longer than this show their first rows and say how many were left out.
MAX_TABLE_ROWS = 2000

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto;
       max-width: 1200px; padding: 0 1em; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { font-size: 1.25em; margin-top: 2em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
figure { margin: 1.2em 0; }
figure svg { max-width: 100%; height: auto; }
figcaption { font-size: 0.9em; color: #555; }
.table-wrap { overflow-x: auto; max-height: 40em; overflow-y: auto; }
table { border-collapse: collapse; font-size: 0.85em; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #ddd; padding: 0.2em 0.5em; text-align: right; white-space: nowrap; }
th { background: #f4f4f4; position: sticky; top: 0; }
td.text { text-align: left; }
caption { caption-side: top; text-align: left; font-size: 0.9em; color: #555; padding: 0.3em 0; }
pre { background: #f8f8f8; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
"""


@dataclass(frozen=True)
class Figure:
    """An inline figure: the text of one ``<svg>`` element and a caption."""

    svg: str
    caption: str = ""

    @classmethod
    def from_matplotlib(cls, fig: Any, caption: str = "") -> Figure:
        """Inline a matplotlib figure (via :func:`varshift.present.figures.svg_text`)."""
        from varshift.present.figures import svg_text

        return cls(svg_text(fig), caption)


@dataclass(frozen=True)
class Table:
    """A table from a :class:`~varshift.present.table.Grid` or a DataFrame, shown with the
    reports' cell format."""

    frame: Any
    caption: str = ""


@dataclass(frozen=True)
class Section:
    """A heading, paragraphs, then figures, then tables."""

    title: str
    paragraphs: tuple[str, ...] = ()
    figures: tuple[Figure, ...] = field(default=())
    tables: tuple[Table, ...] = field(default=())


def _check_svg(svg: str) -> str:
    text = svg.strip()
    low = text.lower()
    if not low.startswith("<svg"):
        raise ValidationError("figure must be an <svg> element (use figures.svg_text)")
    if "<script" in low or "<foreignobject" in low:
        raise ValidationError("figure must not contain scripts or foreign objects")
    return text


def table_html(df: Any, caption: str = "", max_rows: int = MAX_TABLE_ROWS) -> str:
    """An escaped ``<table>`` of ``df`` (numbers right-aligned, text left)."""
    df = Grid.of(df)
    shown = df.head(max_rows)
    note = ""
    if len(df) > max_rows:
        note = f" (first {max_rows} of {len(df)} rows)"
    parts = ['<div class="table-wrap"><table>']
    if caption or note:
        parts.append(f"<caption>{html.escape(caption + note)}</caption>")
    parts.append(
        "<thead><tr>" + "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns) + "</tr>"
        "</thead><tbody>"
    )
    for row in shown:
        cells = []
        for v in row:
            cls = "" if isinstance(v, int | float) and not isinstance(v, bool) else ' class="text"'
            cells.append(f"<td{cls}>{html.escape(format_value(v))}</td>")
        parts.append("<tr>" + "".join(cells) + "</tr>")
    parts.append("</tbody></table></div>")
    return "\n".join(parts)


def html_page(
    title: str,
    sections: Sequence[Section],
    metadata: Mapping[str, Any] | None = None,
) -> str:
    """One self-contained HTML page: title, sections, and the run metadata at the end.

    Parameters
    ----------
    title:
        Page title and top heading (escaped).
    sections:
        The content, in order.
    metadata:
        Run metadata (version, parameters, seed), shown as JSON in a closed ``<details>``.

    Returns
    -------
    str
        The page. It references no external resource: no scripts, links, fonts or images.
    """
    esc = html.escape
    body = [f"<h1>{esc(title)}</h1>"]
    for sec in sections:
        body.append(f"<section>\n<h2>{esc(sec.title)}</h2>")
        body.extend(f"<p>{esc(p)}</p>" for p in sec.paragraphs)
        for fig in sec.figures:
            cap = f"<figcaption>{esc(fig.caption)}</figcaption>" if fig.caption else ""
            body.append(f"<figure>\n{_check_svg(fig.svg)}\n{cap}</figure>")
        body.extend(table_html(t.frame, t.caption) for t in sec.tables)
        body.append("</section>")
    if metadata:
        meta = json.dumps(dict(metadata), indent=2, ensure_ascii=False, default=str)
        pre = esc(meta, quote=False)
        body.append(f"<details><summary>Run metadata</summary>\n<pre>{pre}</pre></details>")
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{esc(title)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )


def write_html(
    path: Path,
    title: str,
    sections: Sequence[Section],
    metadata: Mapping[str, Any] | None = None,
    *,
    force: bool = False,
) -> Path:
    """Write :func:`html_page` to ``path`` atomically; refuse to overwrite without ``force``.

    Raises
    ------
    OutputFileError
        If ``path`` exists and ``force`` is False, or its folder cannot be written.
    """
    return atomic_write(Path(path), html_page(title, sections, metadata), force=force)
