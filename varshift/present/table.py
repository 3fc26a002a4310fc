"""A small column table for rendering without pandas (importing pandas costs ~0.4 s).

:class:`Grid` holds column names and rows of plain Python values. Its constructors infer each
column's type the way ``pandas.DataFrame`` does for the same records, so a report rendered
from a :class:`Grid` is byte-identical to one rendered from the DataFrame: a column of ints
and floats (or ints and missing values) holds floats, missing numbers are NaN, a column of
bools with a missing value keeps its objects, a column of strings has NaN for a missing one.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, is_dataclass
from typing import Any

_MISSING = object()


def _is_missing(v: Any) -> bool:
    return v is None or v is _MISSING or (isinstance(v, float) and math.isnan(v))


def _plain(v: Any) -> Any:
    """A NumPy scalar as the Python scalar pandas would give back."""
    if hasattr(v, "item") and not isinstance(v, str | bytes) and getattr(v, "ndim", 1) == 0:
        return v.item()
    return v


def infer_column(values: Sequence[Any]) -> list[Any]:
    """Values of one column, coerced as pandas coerces a column built from them."""
    vals = [_plain(v) for v in values]
    present = [v for v in vals if not _is_missing(v)]
    if not present:
        return [None if v is _MISSING else v for v in vals]
    if all(isinstance(v, bool) for v in present):
        if len(present) == len(vals):
            return vals
        return [math.nan if v is _MISSING else v for v in vals]
    if all(isinstance(v, str) for v in present):  # pandas' string dtype: missing is NaN
        return [math.nan if _is_missing(v) else v for v in vals]
    numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in present)
    if numeric:
        if len(present) == len(vals) and all(isinstance(v, int) for v in vals):
            return vals
        return [math.nan if _is_missing(v) else float(v) for v in vals]
    return [math.nan if v is _MISSING else v for v in vals]


def _as_record(row: Any) -> dict[str, Any]:
    if is_dataclass(row) and not isinstance(row, type):
        return asdict(row)
    return dict(row)


@dataclass(frozen=True)
class Grid:
    """Columns and rows of plain values: what a report renders (no pandas)."""

    columns: tuple[str, ...]
    rows: tuple[tuple[Any, ...], ...]

    @classmethod
    def from_columns(cls, data: Mapping[str, Sequence[Any]]) -> Grid:
        """From ``{column: values}``; each column typed as pandas would type it."""
        cols = [infer_column(v) for v in data.values()]
        return cls(tuple(str(k) for k in data), tuple(zip(*cols, strict=True)) if cols else ())

    @classmethod
    def from_records(cls, records: Iterable[Mapping[str, Any] | Any]) -> Grid:
        """From dataclass instances or mappings: columns in first-seen key order."""
        recs = [_as_record(r) for r in records]
        keys: dict[str, None] = {}
        for r in recs:
            keys.update(dict.fromkeys(r))
        return cls.from_columns({k: [r.get(k, _MISSING) for r in recs] for k in keys})

    @classmethod
    def of(cls, table: Any) -> Grid:
        """A :class:`Grid` as is, or the columns and rows of a ``pandas.DataFrame``."""
        if isinstance(table, Grid):
            return table
        return cls(
            tuple(str(c) for c in table.columns),
            tuple(tuple(row) for row in table.itertuples(index=False, name=None)),
        )

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        return iter(self.rows)

    def column(self, name: str) -> list[Any]:
        """The values of one column."""
        i = self.columns.index(name)
        return [row[i] for row in self.rows]

    def has_values(self, name: str) -> bool:
        """Whether column ``name`` exists and holds a non-missing value."""
        return name in self.columns and any(not _is_missing(v) for v in self.column(name))

    def select(self, names: Sequence[str]) -> Grid:
        """The named columns, in that order."""
        idx = [self.columns.index(n) for n in names]
        return Grid(tuple(names), tuple(tuple(row[i] for i in idx) for row in self.rows))

    def rename(self, names: Sequence[str]) -> Grid:
        """The same rows under new column names."""
        return Grid(tuple(names), self.rows)

    def records(self) -> list[dict[str, Any]]:
        """Rows as ``{column: value}``."""
        return [dict(zip(self.columns, row, strict=True)) for row in self.rows]

    def head(self, n: int) -> Grid:
        """The first ``n`` rows."""
        return Grid(self.columns, self.rows[:n])

    def merge_left(self, other: Grid, on: str) -> Grid:
        """``self`` with ``other``'s columns joined on column ``on`` (a left join, like pandas)."""
        right = {rec[on]: rec for rec in other.records()}
        extra = [c for c in other.columns if c != on]
        records = [
            {**rec, **{c: right.get(rec[on], {}).get(c, _MISSING) for c in extra}}
            for rec in self.records()
        ]
        return Grid.from_columns({c: [r[c] for r in records] for c in (*self.columns, *extra)})
