"""Notebook views of results: ``to_frame()`` and ``_repr_html_()`` from a result's rows.

A result class lists :class:`TableResult` among its bases and says which rows it shows
(:meth:`TableResult.table_rows`) and their dataclass (:attr:`TableResult.row_type`): its
``to_frame()`` is a ``pandas.DataFrame`` with one column per field of that dataclass (also
when there are no rows), and Jupyter shows it as a small HTML table.

This is the one module below :mod:`varshift.present` that imports pandas, and only inside
:func:`frame` (pandas is an ordinary dependency, but ``import varshift`` and the command line's
numerics do not load it; ``tests/test_docs.py`` checks both). The command line never uses
these methods: its tables come from :mod:`varshift.present`.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import asdict, fields, is_dataclass
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import pandas as pd

#: ``_repr_html_`` shows at most this many rows (``to_frame()`` has them all).
MAX_HTML_ROWS = 60


def columns(row_type: type) -> list[str]:
    """The field names of a row dataclass, in order."""
    return [f.name for f in fields(row_type)]


def records(rows: Sequence[Any]) -> list[dict[str, Any]]:
    """One dict per dataclass row (field order)."""
    return [asdict(r) if is_dataclass(r) and not isinstance(r, type) else dict(r) for r in rows]


def frame(rows: Sequence[Any], row_type: type) -> pd.DataFrame:
    """The rows as a DataFrame with one column per field of ``row_type`` (imports pandas)."""
    import pandas as pd

    return pd.DataFrame.from_records(records(rows), columns=columns(row_type))


def _cell(value: Any) -> tuple[str, bool]:
    """A cell's text and whether it is a number (right-aligned)."""
    if value is None:
        return "", False
    if isinstance(value, bool):
        return str(value).lower(), False
    if isinstance(value, float):
        return ("" if math.isnan(value) else f"{value:.6g}"), True
    if isinstance(value, int):
        return str(value), True
    return str(value), False


def html_table(rows: Sequence[Any], row_type: type, caption: str = "") -> str:
    """A small escaped ``<table>`` of the rows (at most :data:`MAX_HTML_ROWS`)."""
    names = columns(row_type)
    shown = records(rows[:MAX_HTML_ROWS])
    if len(rows) > len(shown):
        caption = f"{caption} (first {len(shown)} of {len(rows)} rows; to_frame() has all)"
    parts = ["<table>"]
    if caption:
        parts.append(f"<caption>{html.escape(caption)}</caption>")
    head = "".join(f"<th>{html.escape(n)}</th>" for n in names)
    parts.append(f"<thead><tr>{head}</tr></thead><tbody>")
    for record in shown:
        cells = []
        for name in names:
            text, numeric = _cell(record.get(name))
            align = ' style="text-align: right"' if numeric else ""
            cells.append(f"<td{align}>{html.escape(text)}</td>")
        parts.append(f"<tr>{''.join(cells)}</tr>")
    parts.append("</tbody></table>")
    return "\n".join(parts)


class TableResult:
    """Mixin of result dataclasses: ``to_frame()`` and ``_repr_html_()`` from their rows."""

    __slots__ = ()

    #: The dataclass of the rows (the DataFrame's columns are its fields).
    row_type: ClassVar[type]

    def table_rows(self) -> Sequence[Any]:
        """The rows shown (one per layer, feature, rate or grid point)."""
        raise NotImplementedError

    def table_caption(self) -> str:
        """The HTML table's caption."""
        return type(self).__name__

    def to_frame(self) -> pd.DataFrame:
        """The rows as a ``pandas.DataFrame``, one column per field of :attr:`row_type`."""
        return frame(self.table_rows(), self.row_type)

    def _repr_html_(self) -> str:
        """Jupyter's view: the rows as an HTML table."""
        return html_table(self.table_rows(), self.row_type, self.table_caption())
