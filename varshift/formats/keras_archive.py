"""Keras ``.keras`` archives (``model.save("x.keras")``, Keras 3 and tf-keras 2.13+).

A zip holding ``config.json`` (the model's architecture), ``metadata.json`` (``keras_version``,
``date_saved``) and ``model.weights.h5``, the same HDF5 layout as a ``.weights.h5`` file
(keras-team/keras ``keras/src/saving/saving_lib.py``: ``_CONFIG_FILENAME``,
``_METADATA_FILENAME``, ``_VARS_FNAME + ".h5"``). Only ``zipfile``, ``json`` and h5py read it:
no model is built and no layer's code (Lambda, custom objects) is executed.

A corrected archive has the same members in the same order with the same :class:`ZipInfo`
(name, date, compression, attributes) and comment; every member but ``model.weights.h5`` is
copied unchanged, and in that one only the changed statistics datasets are rewritten in place.
Optional extra ``keras`` (h5py).
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from typing import Any

from varshift.core.errors import InputFileError, OutputFileError
from varshift.core.files import replacing
from varshift.formats.base import (
    BNStats,
    Format,
    Origin,
    first_line,
    make_stats,
    same_source,
    zip_names,
)
from varshift.formats.keras_h5 import EXTRA, read_layers, rewrite_layers
from varshift.formats.keras_legacy_h5 import bn_configs, framework_of

CONFIG = "config.json"
METADATA = "metadata.json"
WEIGHTS = "model.weights.h5"


def sniff(head: bytes, path: Path) -> bool:
    """A zip archive with ``config.json`` and ``model.weights.h5``."""
    names = zip_names(path) if head.startswith(b"PK") else None
    return names is not None and CONFIG in names and WEIGHTS in names


def _json_member(zf: zipfile.ZipFile, name: str, where: str) -> Any:
    try:
        return json.loads(zf.read(name).decode("utf-8"))
    except KeyError:
        return None
    except (ValueError, UnicodeDecodeError):
        raise InputFileError(f"{where}: {name} is not valid JSON") from None


def read(path: Path, fmt: str) -> BNStats:
    """The BatchNormalization layers of the archive's ``model.weights.h5``."""
    h5py = EXTRA.load("reading .keras archives")
    where = str(path)
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            if WEIGHTS not in names:
                raise InputFileError(
                    f"{where}: no {WEIGHTS} in the archive: not a .keras file (members: "
                    f"{', '.join(names[:5]) or 'none'})"
                )
            weights = zf.read(WEIGHTS)
            config = _json_member(zf, CONFIG, where)
            metadata = _json_member(zf, METADATA, where) or {}
    except (zipfile.BadZipFile, OSError) as exc:
        raise InputFileError(f"{where}: not a readable zip archive: {first_line(exc)}") from None
    try:
        fh = h5py.File(io.BytesIO(weights), "r")
    except OSError as exc:
        raise InputFileError(
            f"{where}: {WEIGHTS} is not a readable HDF5 file: {first_line(exc)}"
        ) from None
    with fh:
        layers = read_layers(fh, f"{where}:{WEIGHTS}", h5py)
    version = str(metadata.get("keras_version", "")) if isinstance(metadata, dict) else ""
    configs = bn_configs(config) if config is not None else {}
    framework = framework_of(version, "", configs.values()) if version else "keras"
    return make_stats(layers, fmt, path, framework, Origin(None))


def write(stats: BNStats, path: Path, fmt: str) -> None:
    """The source archive with ``model.weights.h5``'s changed datasets rewritten."""
    if not same_source(stats, fmt) or stats.source is None:
        raise OutputFileError(
            f"{path}: a .keras output needs a .keras input (varshift rewrites a copy of it); "
            "choose .pt, .npz, .safetensors, .csv or .json"
        )
    h5py = EXTRA.load("writing .keras archives")
    with zipfile.ZipFile(stats.source) as zin, replacing(path) as tmp:
        with zipfile.ZipFile(tmp, "w") as zout:
            zout.comment = zin.comment
            for info in zin.infolist():
                data = zin.read(info)
                if info.filename == WEIGHTS:
                    buffer = io.BytesIO(data)
                    with h5py.File(buffer, "r+") as fh:
                        rewrite_layers(fh, stats.layers)
                    data = buffer.getvalue()
                zout.writestr(info, data)


FORMAT = Format(
    name="keras-archive",
    extensions=(".keras",),
    shown=".keras",
    read=read,
    write=write,
    sniff=sniff,
    framework=None,  # Keras 3 unless metadata.json names a tf-keras version (framework_of)
    extra=EXTRA,
)
