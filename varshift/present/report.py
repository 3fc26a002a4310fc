"""Tabular reports: DataFrames from results; deterministic CSV/Markdown/JSON; atomic files.

Reports never recompute numerics: they format what the library returned. Determinism: fixed
column order (the order of the rows' keys), one float format (:data:`FLOAT_FORMAT`), no
timestamps or absolute paths in the data; run metadata (version, parameters, seed) goes in a
separate ``metadata`` block.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from varshift.core.errors import ValidationError
from varshift.core.files import OutputPlan, atomic_write
from varshift.present.table import Grid

if TYPE_CHECKING:
    import pandas as pd

#: What the renderers accept: a :class:`Grid` or a ``pandas.DataFrame``.
Tabular = Any

FORMATS: tuple[str, ...] = ("table", "csv", "json", "md")

#: Every float in a report is written with this format (10 significant digits).
FLOAT_FORMAT = "{:.10g}"


def to_frame(rows: Iterable[Any]) -> pd.DataFrame:
    """One row per dataclass instance or mapping, columns in field order (a DataFrame).

    The command line renders :func:`to_table` instead, which needs no pandas.
    """
    import pandas as pd

    records = [asdict(r) if is_dataclass(r) and not isinstance(r, type) else dict(r) for r in rows]
    return pd.DataFrame.from_records(records)


def to_table(rows: Iterable[Any]) -> Grid:
    """One row per dataclass instance or mapping, as a :class:`Grid` typed like :func:`to_frame`."""
    return Grid.from_records(rows)


def format_value(value: Any) -> str:
    """The canonical text of one cell: floats via :data:`FLOAT_FORMAT`, ``None``/NaN as empty."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        return FLOAT_FORMAT.format(value)
    if hasattr(value, "item") and not isinstance(value, str):
        return format_value(value.item())
    return str(value)


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, str):
        value = value.item()
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        return float(FLOAT_FORMAT.format(value))
    return value


def frame_records(df: Tabular) -> list[dict[str, Any]]:
    """Rows as JSON-ready dicts (floats rounded to :data:`FLOAT_FORMAT`, NaN → null)."""
    grid = Grid.of(df)
    return [{k: _jsonable(v) for k, v in zip(grid.columns, row, strict=True)} for row in grid]


def to_csv(df: Tabular) -> str:
    """CSV text with the canonical cell format and ``\\n`` line endings."""
    grid = Grid.of(df)
    lines = [",".join(_csv_cell(c) for c in grid.columns)]
    for row in grid:
        lines.append(",".join(_csv_cell(format_value(v)) for v in row))
    return "\n".join(lines) + "\n"


def _csv_cell(text: str) -> str:
    if any(ch in text for ch in ',"\n'):
        return '"' + text.replace('"', '""') + '"'
    return text


def md_cell(text: str) -> str:
    """Text safe inside a Markdown table cell: backslashes and pipes escaped, line breaks as
    ``<br>``.

    Examples
    --------
    >>> print(md_cell("|diff| > 0.1"))
    \\|diff\\| > 0.1
    """
    out = text.replace("\\", "\\\\").replace("|", "\\|")
    return out.replace("\r\n", "<br>").replace("\n", "<br>").replace("\r", "<br>")


def pipe_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-flavoured Markdown pipe table of text cells, every column left-aligned.

    The layout is tabulate's ``pipe`` format with ``disable_numparse=True`` (what
    ``DataFrame.to_markdown(index=False)`` wrote before; the tests compare the two): cells are
    stripped, a column is as wide as its widest cell or its header plus two, widths count code
    points. Cells are expected to be escaped already (:func:`md_cell`).

    Examples
    --------
    >>> print(pipe_table(["a", "value"], [["x", "1.5"]]))
    | a   | value   |
    |:----|:--------|
    | x   | 1.5     |
    """
    body = [[cell.strip() for cell in row] for row in rows]
    widths = [len(h) + 2 for h in headers]
    for row in body:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    rule = "|" + "|".join((":" if body else "-") + "-" * (w + 1) for w in widths) + "|"
    return "\n".join([line(headers), rule, *(line(row) for row in body)])


def to_markdown(df: Tabular, title: str | None = None) -> str:
    """A GitHub-flavoured Markdown table (:func:`pipe_table`) with the canonical cell format."""
    grid = Grid.of(df)
    cells = [[md_cell(format_value(v)) for v in row] for row in grid]
    # A header stacked over two lines for the terminal ("train var\ntheory") reads as one line.
    headers = [md_cell(" ".join(str(c).split("\n"))) for c in grid.columns]
    body = pipe_table(headers, cells)
    head = f"## {title}\n\n" if title else ""
    return f"{head}{body}\n"


def to_json(df: Tabular, metadata: Mapping[str, Any] | None = None) -> str:
    """``{"metadata": ..., "rows": [...]}`` with sorted metadata keys and 2-space indent."""
    doc = {"metadata": _jsonable(dict(metadata or {})), "rows": frame_records(df)}
    return json.dumps(doc, indent=2, sort_keys=False, allow_nan=False) + "\n"


def render_text(
    df: Tabular, fmt: str, metadata: Mapping[str, Any] | None = None, title: str | None = None
) -> str:
    """The text of ``df`` in a machine format: ``csv``, ``json`` or ``md``."""
    if fmt == "csv":
        return to_csv(df)
    if fmt == "json":
        return to_json(df, metadata)
    if fmt == "md":
        return to_markdown(df, title)
    raise ValidationError(f"format must be one of csv, json, md for text output; got {fmt!r}")


def report_texts(
    df: Tabular,
    metadata: Mapping[str, Any],
    *,
    title: str | None = None,
    formats: Sequence[str] = ("csv", "md", "json"),
) -> list[str]:
    """The text of each report file: the table in each format; Markdown ends with the metadata."""
    texts = []
    for fmt in formats:
        text = render_text(df, fmt, metadata, title)
        if fmt == "md":
            text = text + "\n" + _metadata_markdown(metadata)
        texts.append(text)
    return texts


def report_paths(
    folder: Path, stem: str, formats: Sequence[str] = ("csv", "md", "json")
) -> list[Path]:
    """``<folder>/<stem>.<format>`` for each format."""
    return [Path(folder) / f"{stem}.{fmt}" for fmt in formats]


def write_report(
    df: Tabular,
    folder: Path,
    stem: str,
    metadata: Mapping[str, Any],
    *,
    title: str | None = None,
    force: bool = False,
    formats: Sequence[str] = ("csv", "md", "json"),
) -> list[Path]:
    """Write ``<stem>.csv``, ``<stem>.md`` and ``<stem>.json`` under ``folder``; return the paths.

    All targets are checked before any is written (:class:`~varshift.core.files.OutputPlan`),
    so a refusal leaves nothing half-done.
    """
    targets = OutputPlan(force=force).add_all(report_paths(folder, stem, formats))
    texts = report_texts(df, metadata, title=title, formats=formats)
    return [atomic_write(t, text, force=True) for t, text in zip(targets, texts, strict=True)]


def _metadata_markdown(metadata: Mapping[str, Any]) -> str:
    lines = ["<details><summary>run metadata</summary>", "", "```json"]
    lines.append(json.dumps(_jsonable(dict(metadata)), indent=2))
    lines += ["```", "", "</details>", ""]
    return "\n".join(lines)
