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
from typing import Any

import pandas as pd

from varshift.core.errors import OutputFileError, ValidationError
from varshift.core.files import atomic_write

FORMATS: tuple[str, ...] = ("table", "csv", "json", "md")

#: Every float in a report is written with this format (10 significant digits).
FLOAT_FORMAT = "{:.10g}"


def to_frame(rows: Iterable[Any]) -> pd.DataFrame:
    """One row per dataclass instance or mapping, columns in field order."""
    records = [asdict(r) if is_dataclass(r) and not isinstance(r, type) else dict(r) for r in rows]
    return pd.DataFrame.from_records(records)


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


def frame_records(df: pd.DataFrame) -> list[dict[str, Any]]:
    """Rows as JSON-ready dicts (floats rounded to :data:`FLOAT_FORMAT`, NaN → null)."""
    return [
        {str(k): _jsonable(v) for k, v in zip(df.columns, row, strict=True)}
        for row in df.itertuples(index=False, name=None)
    ]


def to_csv(df: pd.DataFrame) -> str:
    """CSV text with the canonical cell format and ``\\n`` line endings."""
    lines = [",".join(_csv_cell(str(c)) for c in df.columns)]
    for row in df.itertuples(index=False, name=None):
        lines.append(",".join(_csv_cell(format_value(v)) for v in row))
    return "\n".join(lines) + "\n"


def _csv_cell(text: str) -> str:
    if any(ch in text for ch in ',"\n'):
        return '"' + text.replace('"', '""') + '"'
    return text


def to_markdown(df: pd.DataFrame, title: str | None = None) -> str:
    """A GitHub-flavoured Markdown table (via pandas/tabulate) with the canonical cell format."""
    shown = df.copy()
    for col in shown.columns:
        shown[col] = [format_value(v) for v in shown[col]]
    body = shown.to_markdown(index=False, disable_numparse=True)
    head = f"## {title}\n\n" if title else ""
    return f"{head}{body}\n"


def to_json(df: pd.DataFrame, metadata: Mapping[str, Any] | None = None) -> str:
    """``{"metadata": ..., "rows": [...]}`` with sorted metadata keys and 2-space indent."""
    doc = {"metadata": _jsonable(dict(metadata or {})), "rows": frame_records(df)}
    return json.dumps(doc, indent=2, sort_keys=False, allow_nan=False) + "\n"


def render_text(
    df: pd.DataFrame, fmt: str, metadata: Mapping[str, Any] | None = None, title: str | None = None
) -> str:
    """The text of ``df`` in a machine format: ``csv``, ``json`` or ``md``."""
    if fmt == "csv":
        return to_csv(df)
    if fmt == "json":
        return to_json(df, metadata)
    if fmt == "md":
        return to_markdown(df, title)
    raise ValidationError(f"format must be one of csv, json, md for text output; got {fmt!r}")


def write_report(
    df: pd.DataFrame,
    folder: Path,
    stem: str,
    metadata: Mapping[str, Any],
    *,
    title: str | None = None,
    force: bool = False,
    formats: Sequence[str] = ("csv", "md", "json"),
) -> list[Path]:
    """Write ``<stem>.csv``, ``<stem>.md`` and ``<stem>.json`` under ``folder``; return the paths.

    All targets are checked before any is written, so a refusal leaves nothing half-done.
    """
    targets = [Path(folder) / f"{stem}.{fmt}" for fmt in formats]
    if not force:
        for t in targets:
            if t.exists():
                raise OutputFileError(f"{t}: already exists; pass --force to overwrite it")
    written = []
    for fmt, target in zip(formats, targets, strict=True):
        text = render_text(df, fmt, metadata, title)
        if fmt == "md":
            text = text + "\n" + _metadata_markdown(metadata)
        written.append(atomic_write(target, text, force=True))
    return written


def _metadata_markdown(metadata: Mapping[str, Any]) -> str:
    lines = ["<details><summary>run metadata</summary>", "", "```json"]
    lines.append(json.dumps(_jsonable(dict(metadata)), indent=2))
    lines += ["```", "", "</details>", ""]
    return "\n".join(lines)
