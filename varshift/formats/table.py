"""csv and tsv tables in the long form (:mod:`varshift.formats.longform`): columns
``layer, channel, mean, var`` and optional ``count``, ``scale``, ``bias``. A writer rewrites
only the cells whose value changed; every other cell, column and line ending is kept."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from varshift.core.errors import InputFileError
from varshift.formats.base import BNStats, Format, Origin, integer, make_stats, number, write_bytes
from varshift.formats.longform import (
    LongRows,
    columns,
    layers_from_long,
    long_records,
    read_text,
    record_values,
)

_DELIMITERS = {"csv": ",", "tsv": "\t"}


def read(path: Path, fmt: str) -> BNStats:
    """The layers of a csv (``fmt="csv"``) or tsv (``fmt="tsv"``) long-form table."""
    text = read_text(path)
    delimiter = _DELIMITERS[fmt]
    newline = "\r\n" if "\r\n" in text else "\n"
    try:
        records = list(csv.reader(io.StringIO(text, newline=""), delimiter=delimiter))
    except csv.Error as exc:  # e.g. a field over csv.field_size_limit() (131,072 characters)
        raise InputFileError(f"{path}: not a readable {fmt} table: {exc}") from None
    if not records or not any(records[0]):
        raise InputFileError(f"{path}: no header line; expected layer, channel, mean, var")
    header = records[0]
    cols = columns(header, str(path))
    rows: LongRows = {}
    for i, record in enumerate(records[1:], start=1):
        if not record:
            continue
        line = f"{path}: line {i + 1}"
        if len(record) < len(header):
            raise InputFileError(
                f"{line}: expected {len(header)} fields, got {len(record)} (truncated file?)"
            )
        values = record_values({r: record[c].strip() for r, c in cols.items()}, line)
        channel = integer(record[cols["channel"]], line, "channel")
        rows.setdefault(record[cols["layer"]], []).append((channel, i, values))
    keys = {role: header[i] for role, i in cols.items()}
    layers, index = layers_from_long(rows, str(path), keys)
    origin = Origin(
        records,
        {"delimiter": delimiter, "newline": newline, "columns": cols, "index": index},
    )
    return make_stats(layers, fmt, path, None, origin)


def write(stats: BNStats, path: Path, fmt: str) -> None:
    """The source table (csv or tsv) with the changed cells rewritten, else the long form."""
    if stats.origin is not None and stats.format in _DELIMITERS:
        extra = stats.origin.extra
        records = [list(r) for r in stats.origin.data]
        cols, index = extra["columns"], extra["index"]
        for layer in stats.layers.values():
            for role, values in (("mean", layer.mean), ("var", layer.var)):
                for channel, value in enumerate(values.tolist()):
                    cell = records[index[(layer.name, channel)]]
                    if number(cell[cols[role]], str(path), role) != value:
                        cell[cols[role]] = repr(value)
        newline = extra["newline"]
    else:
        records = long_records(stats)
        newline = "\n"
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer, delimiter=_DELIMITERS[fmt], lineterminator=newline)
    writer.writerows(records)
    write_bytes(path, buffer.getvalue().encode())


CSV = Format(name="csv", extensions=(".csv",), shown=".csv", read=read, write=write)
TSV = Format(name="tsv", extensions=(".tsv",), shown=".tsv", read=read, write=write)
