"""The long form shared by csv, tsv and json records: one row per (layer, channel).

Columns ``layer, channel, mean, var`` and optional ``count, scale, bias``, each also under the
aliases of :data:`COLUMNS` (``running_var``, ``moving_variance``, ``gamma``, ...).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from varshift.core.errors import InputFileError
from varshift.formats.base import BNLayer, BNStats, FloatArray, integer, number, plain

#: Column aliases of the csv/tsv/json long form.
COLUMNS: dict[str, tuple[str, ...]] = {
    "layer": ("layer", "name"),
    "channel": ("channel",),
    "mean": ("mean", "running_mean", "moving_mean"),
    "var": ("var", "running_var", "moving_variance", "variance"),
    "count": ("count", "num_batches_tracked"),
    "scale": ("scale", "weight", "gamma"),
    "bias": ("bias", "beta"),
}
REQUIRED = ("layer", "channel", "mean", "var")

#: Long-form rows grouped by layer: ``(channel, record index, numbers by role)``.
LongRows = dict[str, list[tuple[int, int, dict[str, float]]]]


def read_text(path: Path) -> str:
    """The file as UTF-8 text, newlines untranslated (``"\\r\\n"`` is kept)."""
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputFileError(f"{path}: not UTF-8 text: {exc.reason}") from None


def _shown_header(header: list[str], limit: int = 200) -> str:
    """The header as ``a, b, c``, cut to ``limit`` characters (a 300 KB line is not echoed)."""
    text = ", ".join(header) or "(none)"
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(header):,} columns, {len(text):,} characters)"


def columns(header: list[str], where: str) -> dict[str, int]:
    """Role → column index; the four required ones must be present."""
    lowered = [h.strip().lower() for h in header]
    found: dict[str, int] = {}
    for role, names in COLUMNS.items():
        for candidate in names:
            if candidate in lowered:
                found[role] = lowered.index(candidate)
                break
    missing = [r for r in REQUIRED if r not in found]
    if missing:
        raise InputFileError(
            f"{where}: missing column(s) {', '.join(missing)}; expected a header with layer, "
            f"channel, mean, var (optional count, scale, bias); got {_shown_header(header)}"
        )
    return found


def record_values(cells: Mapping[str, Any], where: str) -> dict[str, float]:
    """Numbers of one long-form record, role → raw cell (empty optional cells are left out)."""
    out: dict[str, float] = {}
    for role in ("mean", "var", "count", "scale", "bias"):
        if role not in cells:
            continue
        raw = cells[role]
        if role in ("count", "scale", "bias") and (raw is None or raw == ""):
            continue
        out[role] = float(
            integer(raw, where, role) if role == "count" else number(raw, where, role)
        )
    return out


def _long_column(
    entries: list[tuple[int, int, dict[str, float]]], role: str, where: str
) -> FloatArray | None:
    """One role's values of a layer in channel order; ``None`` if the column is absent."""
    values = [e[2].get(role) for e in entries]
    if all(v is None for v in values):
        return None
    if any(v is None for v in values):
        raise InputFileError(f"{where}: column {role} is empty for some channels")
    return np.asarray(values, dtype=np.float64)


def layers_from_long(
    rows: LongRows, where: str, keys: Mapping[str, str]
) -> tuple[dict[str, BNLayer], dict[tuple[str, int], int]]:
    """Build layers from long-form rows; return them and (layer, channel) → record index."""
    layers: dict[str, BNLayer] = {}
    index: dict[tuple[str, int], int] = {}
    role_keys = MappingProxyType({r: k for r, k in keys.items() if r not in ("layer", "channel")})
    for name, unsorted in rows.items():
        here = f"{where}: layer {name!r}"
        entries = sorted(unsorted, key=lambda e: e[0])
        channels = [e[0] for e in entries]
        if channels != list(range(len(entries))):
            raise InputFileError(
                f"{here}: channels must be 0..{len(entries) - 1}, each once; "
                f"got {_short_list(channels)}"
            )
        index.update({(name, channel): record for channel, record, _ in entries})
        mean, var = _long_column(entries, "mean", here), _long_column(entries, "var", here)
        assert mean is not None and var is not None  # required columns
        counts = _long_column(entries, "count", here)
        if counts is not None and np.unique(counts).size != 1:
            raise InputFileError(
                f"{here}: count differs between channels ({_short_list(counts.tolist())})"
            )
        layers[name] = BNLayer(
            name=name,
            mean=mean,
            var=var,
            scale=_long_column(entries, "scale", here),
            bias=_long_column(entries, "bias", here),
            count=None if counts is None else int(counts[0]),
            dtype="float64",
            keys=role_keys,
        )
    return layers, index


def _short_list(values: list[Any], limit: int = 8) -> str:
    shown = ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values[:limit])
    return f"[{shown}{', ...' if len(values) > limit else ''}]"


def long_records(stats: BNStats) -> list[list[Any]]:
    """The BN layers as long-form rows (header first): values as shortest stored-dtype text."""
    layers = list(stats.layers.values())
    optional = [
        role
        for role in ("count", "scale", "bias")
        if any(getattr(layer, role) is not None for layer in layers)
    ]
    records: list[list[Any]] = [["layer", "channel", "mean", "var", *optional]]
    for layer in layers:
        values = {"mean": plain(layer.mean, layer.dtype), "var": plain(layer.var, layer.dtype)}
        for role in ("scale", "bias"):
            if getattr(layer, role) is not None:
                values[role] = plain(getattr(layer, role), layer.dtype)
        for c in range(layer.channels):
            row: list[Any] = [layer.name, c, repr(values["mean"][c]), repr(values["var"][c])]
            for role in optional:
                if role == "count":
                    row.append("" if layer.count is None else layer.count)
                else:
                    row.append(repr(values[role][c]) if role in values else "")
            records.append(row)
    return records
