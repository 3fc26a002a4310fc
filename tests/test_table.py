"""The pandas-free table renders every report byte for byte as the DataFrame of the same rows
did (pandas is the oracle): column types are inferred the way pandas infers them."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
import pytest

from varshift.present.report import render_text
from varshift.present.table import Grid

RECORDS: dict[str, list[dict[str, Any]]] = {
    "ints and floats": [{"a": 1, "b": 2.5}, {"a": 2, "b": 3}],
    "ints with a missing value": [{"a": 1, "b": 10_000_000_000}, {"a": None, "b": 7}],
    "bools with a missing value": [{"flag": True}, {"flag": None}, {"flag": False}],
    "strings and None": [{"s": "x"}, {"s": None}],
    "mixed text and numbers": [{"feature": 0, "v": 1.0}, {"feature": "mean", "v": math.nan}],
    "numpy scalars": [{"a": np.float64(0.1), "b": np.int64(3), "c": np.bool_(True)}],
    "missing keys": [{"a": 1, "b": "x"}, {"a": 2}, {"c": 0.5}],
    "all missing": [{"a": None}, {"a": None}],
    "big and tiny floats": [{"x": 1e-300, "y": 123456789012.0}, {"x": -0.0, "y": math.inf}],
}


@pytest.mark.parametrize("name", sorted(RECORDS))
@pytest.mark.parametrize("fmt", ["csv", "json", "md"])
def test_a_grid_renders_as_the_dataframe_did(name: str, fmt: str) -> None:
    records = RECORDS[name]
    meta = {"command": "test"}
    want = render_text(pd.DataFrame.from_records(records), fmt, meta, "title")
    assert render_text(Grid.from_records(records), fmt, meta, "title") == want


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


@pytest.mark.parametrize("name", sorted(RECORDS))
def test_grid_values_have_the_types_pandas_gives_back(name: str) -> None:
    records = RECORDS[name]
    df = pd.DataFrame.from_records(records)
    grid = Grid.from_records(records)
    assert grid.columns == tuple(df.columns)
    for got_row, want_row in zip(grid, df.itertuples(index=False, name=None), strict=True):
        for got, want in zip(got_row, want_row, strict=True):
            if _missing(want):  # None or NaN, by pandas version: rendered alike
                assert _missing(got), (got, want)
            else:
                assert got == want and type(got) is type(want), (got, want)


def test_columns_from_lists_are_typed_like_a_dataframe_column() -> None:
    data = {"q": ["keep", "count"], "rate 0.2": [0.8, 44]}
    grid = Grid.from_columns(data)
    df = pd.DataFrame(data)
    assert render_text(grid, "md") == render_text(df, "md")
    assert grid.column("rate 0.2") == [0.8, 44.0] and isinstance(grid.column("rate 0.2")[1], float)
