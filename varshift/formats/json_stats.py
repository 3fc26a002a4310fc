"""JSON statistics: ``{"layers": {name: {"mean": [...], "var": [...], "count": n}}}`` (keys
also under the long-form aliases, ``running_var``, ``gamma``, ...), or a list of csv-like
records (:mod:`varshift.formats.longform`). A writer keeps every other key and record."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from varshift.core.errors import InputFileError
from varshift.formats.base import (
    BNLayer,
    BNStats,
    FloatArray,
    Format,
    Origin,
    first_line,
    integer,
    make_stats,
    number,
    plain,
    same_source,
    write_bytes,
)
from varshift.formats.longform import (
    COLUMNS,
    REQUIRED,
    LongRows,
    columns,
    layers_from_long,
    read_text,
    record_values,
)


def read(path: Path, fmt: str) -> BNStats:
    """The layers of a ``{"layers": ...}`` document or a list of long-form records."""
    try:
        doc = json.loads(read_text(path))
    except json.JSONDecodeError as exc:
        raise InputFileError(f"{path}: not valid JSON (truncated?): {exc}") from None
    except RecursionError:
        raise InputFileError(
            f"{path}: JSON nested deeper than Python's recursion limit "
            f"({sys.getrecursionlimit()}); statistics files are a few levels deep"
        ) from None
    except ValueError as exc:  # an integer longer than sys.get_int_max_str_digits()
        raise InputFileError(f"{path}: not usable JSON: {first_line(exc)}") from None
    if isinstance(doc, list):
        return _read_records(doc, path, fmt)
    if not (isinstance(doc, dict) and isinstance(doc.get("layers"), dict)):
        raise InputFileError(
            f'{path}: expected {{"layers": {{name: {{"mean": [...], "var": [...]}}}}}} or a '
            'list of {"layer", "channel", "mean", "var"} records'
        )
    layers = {name: _layer(name, entry, str(path)) for name, entry in doc["layers"].items()}
    return make_stats(layers, fmt, path, None, Origin(doc, {"shape": "layers"}))


def _layer(name: str, entry: Any, where: str) -> BNLayer:
    """One ``layers`` entry: mean and var lists (or scalars), optional scale, bias, count."""
    here = f"{where}: layer {name!r}"
    if not isinstance(entry, dict):
        raise InputFileError(f"{here}: expected an object with mean and var")
    keys: dict[str, str] = {}
    values: dict[str, FloatArray] = {}
    for role in ("mean", "var", "scale", "bias", "count"):
        key = next((k for k in COLUMNS[role] if k in entry), None)
        if key is None:
            if role in ("mean", "var"):
                raise InputFileError(f"{here}: no {role} (key {role!r})")
            continue
        keys[role] = key
        raw = entry[key]
        if role == "count":
            values[role] = np.asarray([integer(raw, here, "count")])
            continue
        items = raw if isinstance(raw, list) else [raw]
        values[role] = np.asarray([number(v, here, role) for v in items], dtype=np.float64)
    for role in ("mean", "scale", "bias"):
        if role in values and values[role].shape != values["var"].shape:
            raise InputFileError(
                f"{here}: {role} has {values[role].size} values but var has {values['var'].size}"
            )
    count = values.get("count")
    return BNLayer(
        name=name,
        mean=values["mean"],
        var=values["var"],
        scale=values.get("scale"),
        bias=values.get("bias"),
        count=None if count is None else int(count[0]),
        dtype="float64",
        keys=MappingProxyType(keys),
    )


def _read_records(doc: list[Any], path: Path, fmt: str) -> BNStats:
    rows: LongRows = {}
    cols: dict[str, str] = {}
    for i, record in enumerate(doc):
        where = f"{path}: record {i}"
        if not isinstance(record, dict):
            raise InputFileError(f"{where}: expected an object with layer, channel, mean, var")
        if not cols:  # the first record names the keys, as a csv header does
            names = list(record)
            cols = {role: names[i] for role, i in columns(names, str(path)).items()}
        missing = [k for r, k in cols.items() if r in REQUIRED and k not in record]
        if missing:
            raise InputFileError(f"{where}: missing {', '.join(missing)}")
        values = record_values({r: record.get(k) for r, k in cols.items()}, where)
        channel = integer(record[cols["channel"]], where, "channel")
        rows.setdefault(str(record[cols["layer"]]), []).append((channel, i, values))
    layers, index = layers_from_long(rows, str(path), cols)
    origin = Origin(doc, {"shape": "records", "columns": cols, "index": index})
    return make_stats(layers, fmt, path, None, origin)


def write(stats: BNStats, path: Path, fmt: str) -> None:
    """The source document with the changed values replaced, else ``{"layers": ...}``."""
    doc = _updated(stats, str(path)) if same_source(stats, fmt) else _layers_doc(stats)
    write_bytes(path, (json.dumps(doc, indent=2) + "\n").encode())


def _updated(stats: BNStats, where: str) -> Any:
    """A copy of the source document with the changed values replaced."""
    assert stats.origin is not None
    doc = copy.deepcopy(stats.origin.data)
    extra = stats.origin.extra
    for layer in stats.layers.values():
        for role, values in (("mean", layer.mean), ("var", layer.var)):
            if extra["shape"] == "records":
                key = extra["columns"][role]
                for channel, value in enumerate(values.tolist()):
                    record = doc[extra["index"][(layer.name, channel)]]
                    if number(record[key], where, role) != value:
                        record[key] = value
            else:
                entry, key = doc["layers"][layer.name], layer.keys[role]
                old = entry[key] if isinstance(entry[key], list) else [entry[key]]
                if [number(v, where, role) for v in old] != values.tolist():
                    entry[key] = values.tolist()
    return doc


def _layers_doc(stats: BNStats) -> dict[str, Any]:
    """``{"layers": {name: {"mean", "var", "scale"?, "bias"?, "count"?}}}``."""
    layers: dict[str, Any] = {}
    for layer in stats.layers.values():
        entry: dict[str, Any] = {
            "mean": plain(layer.mean, layer.dtype),
            "var": plain(layer.var, layer.dtype),
        }
        if layer.scale is not None:
            entry["scale"] = plain(layer.scale, layer.dtype)
        if layer.bias is not None:
            entry["bias"] = plain(layer.bias, layer.dtype)
        if layer.count is not None:
            entry["count"] = layer.count
        layers[layer.name] = entry
    return {"layers": layers}


FORMAT = Format(name="json", extensions=(".json",), shown=".json", read=read, write=write)
