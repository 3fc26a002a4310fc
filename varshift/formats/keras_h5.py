"""Keras 3 ``.weights.h5`` files (HDF5; ``.h5``, ``.hdf5``).

Each ``layers/…/batch_normalization[_k]/vars`` group holds gamma?, beta?, moving_mean,
moving_variance (trainable variables first): the last two datasets are the statistics. The
optimizer's iteration count stands in for the update count. A Keras output rewrites a copy of
a Keras input. Optional extra ``keras`` (h5py).
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from varshift.core.errors import InputFileError, OutputFileError
from varshift.core.files import replacing
from varshift.formats.base import (
    BNLayer,
    BNStats,
    Extra,
    Format,
    Origin,
    cast,
    first_line,
    make_stats,
    same_source,
)

EXTRA = Extra("keras", "h5py", "h5py")

#: Keras 3 names a layer's group after its class: BatchNormalization → batch_normalization[_k].
_KERAS_BN = re.compile(r"^(sync_)?batch_normalization(_\d+)?$")


def hdf5_signature(head: bytes) -> bool:
    """Whether the first bytes are the HDF5 signature."""
    return head.startswith(b"\x89HDF\r\n\x1a\n")


def legacy_root(fh: Any) -> Any:
    """The group of a legacy Keras HDF5 file that holds ``layer_names`` (``model_weights`` of
    a full-model save, else the root), or ``None`` for any other HDF5 file."""
    for group in (fh.get("model_weights"), fh):
        if group is not None and any(re.fullmatch(r"layer_names\d*", k) for k in group.attrs):
            return group
    return None


def is_legacy(path: Path) -> bool:
    """Whether an HDF5 file is a legacy Keras one (``False`` when h5py is missing)."""
    try:
        import h5py
    except ImportError:
        return False
    try:
        with h5py.File(path, "r") as fh:
            return legacy_root(fh) is not None
    except OSError:
        return False


def sniff(head: bytes, path: Path) -> bool:
    """The HDF5 signature, unless the file is a legacy Keras one (format ``keras-legacy``)."""
    return hdf5_signature(head) and not is_legacy(path)


def _natural_key(text: str) -> list[Any]:
    """``batch_normalization_10`` after ``batch_normalization_2``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def open_hdf5(path: Path, purpose: str) -> Any:
    """``path`` opened read-only with h5py (the extra loaded for ``purpose``).

    Raises
    ------
    InputFileError
        Not a readable HDF5 file.
    """
    h5py = EXTRA.load(purpose)
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise InputFileError(
            f"{path}: not a readable HDF5 file (truncated or corrupt?): {first_line(exc)}"
        ) from None


def read(path: Path, fmt: str) -> BNStats:
    """The BatchNormalization layers of a Keras 3 weights file, in natural name order."""
    h5py = EXTRA.load("reading .weights.h5 files")
    with open_hdf5(path, "reading .weights.h5 files") as fh:
        layers = read_layers(fh, str(path), h5py)
    return make_stats(layers, fmt, path, "keras", Origin(None))


def read_layers(fh: Any, where: str, h5py: Any) -> dict[str, BNLayer]:
    """The BN layers of an open Keras 3 weights file (also the ``.keras`` archive's member).

    Raises
    ------
    InputFileError
        No ``layers`` group, or a BN ``vars`` group that is not 2 to 4 variables.
    """
    root = fh.get("layers")
    if root is None:
        root = fh.get("_layer_checkpoint_dependencies")  # Keras 2.13 spelling
    if root is None:
        raise InputFileError(
            f"{where}: no 'layers' group: not a Keras 3 .weights.h5 file (a legacy Keras "
            "model.save('x.h5') file is read as format keras-legacy)"
        )
    groups: list[str] = []
    root.visititems(
        lambda name, obj: (
            groups.append(name)
            if isinstance(obj, h5py.Group) and _KERAS_BN.match(name.rsplit("/", 1)[-1])
            else None
        )
    )
    count, count_key = _keras_iterations(fh)
    layers: dict[str, BNLayer] = {}
    for rel in sorted(groups, key=_natural_key):
        group = root[rel]
        if "vars" not in group:
            continue
        layer = _keras_layer(group["vars"], where, count, count_key)
        name = layer.name if layer.name not in layers else group["vars"].name
        layers[name] = replace(layer, name=name)
    return layers


def _keras_iterations(fh: Any) -> tuple[int | None, str | None]:
    """The optimizer's iteration count (its first variable), if the file stores one."""
    key = "optimizer/vars/0"
    ds = fh.get(key)
    if ds is None or ds.shape != () or not np.issubdtype(ds.dtype, np.integer):
        return None, None
    return int(ds[()]), "/" + key


def _keras_layer(group: Any, where: str, count: int | None, count_key: str | None) -> BNLayer:
    """A BN ``vars`` group: gamma?, beta?, moving_mean, moving_variance (trainable first)."""
    label = group.attrs.get("name", group.name)
    name = label.decode() if isinstance(label, bytes) else str(label)
    indices = sorted(group.keys(), key=_natural_key)
    if not 2 <= len(indices) <= 4:
        raise InputFileError(
            f"{where}: layer {name!r}: expected 2 to 4 variables (gamma, beta, moving_mean, "
            f"moving_variance) in {group.name}; found {len(indices)}"
        )
    datasets = [_dataset(group, i, where, name) for i in indices]
    for ds in datasets:
        if ds.attrs.get("dtype") == "bfloat16":
            raise InputFileError(
                f"{where}: layer {name!r}: bfloat16 variables ({ds.name}) are not supported"
            )
    mean_ds, var_ds = datasets[-2], datasets[-1]
    if mean_ds.shape != var_ds.shape:
        raise InputFileError(
            f"{where}: layer {name!r}: moving_mean has shape {mean_ds.shape} but "
            f"moving_variance has shape {var_ds.shape}"
        )
    keys = {"mean": mean_ds.name, "var": var_ds.name}
    scale = bias = None
    if len(datasets) == 4:  # with 3 the first is gamma or beta: the file does not say which
        scale, bias = (np.asarray(d[()], dtype=np.float64).reshape(-1) for d in datasets[:2])
        keys["scale"], keys["bias"] = datasets[0].name, datasets[1].name
    if count_key is not None:
        keys["count"] = count_key
    return BNLayer(
        name=name,
        mean=np.asarray(mean_ds[()], dtype=np.float64).reshape(-1),
        var=np.asarray(var_ds[()], dtype=np.float64).reshape(-1),
        scale=scale,
        bias=bias,
        count=count,
        dtype=str(var_ds.dtype),
        keys=MappingProxyType(keys),
    )


#: The most values one BN variable may hold (a BN layer has one per channel).
MAX_VARIABLE_VALUES = 2**27


def _dataset(group: Any, key: str, where: str, name: str) -> Any:
    """``group[key]`` if it is a hard-linked dataset of real floats of a sane size.

    Soft and external links are refused (an external link reads another file, a soft link
    can loop or point outside the layer); so are string, compound and integer datasets.
    """
    import h5py

    link = group.get(key, getlink=True)
    here = f"{where}: layer {name!r}: {group.name}/{key}"
    if not isinstance(link, h5py.HardLink):
        raise InputFileError(
            f"{here}: is a link ({type(link).__name__}); varshift reads stored datasets only"
        )
    ds = group[key]
    if not isinstance(ds, h5py.Dataset):
        raise InputFileError(f"{here}: is a group; expected a dataset of numbers")
    if ds.dtype.kind != "f" and ds.attrs.get("dtype") != "bfloat16":
        raise InputFileError(f"{here}: holds {ds.dtype} values; expected floating-point numbers")
    if ds.size > MAX_VARIABLE_VALUES:
        raise InputFileError(
            f"{here}: holds {ds.size:,} values; a BN variable holds at most "
            f"{MAX_VARIABLE_VALUES:,} (one per channel)"
        )
    return ds


def rewrite_copy(stats: BNStats, path: Path, fmt: str, kind: str, purpose: str) -> None:
    """Write ``path`` as a copy of the HDF5 source of ``stats`` (a ``kind`` file) with the
    changed statistics datasets rewritten in place; ``purpose`` names the extra's use."""
    if not same_source(stats, fmt) or stats.source is None:
        raise OutputFileError(
            f"{path}: a {kind} output needs a {kind} input (varshift rewrites a copy of it); "
            "choose .pt, .npz, .safetensors, .csv or .json"
        )
    h5py = EXTRA.load(purpose)
    with replacing(path) as tmp:
        shutil.copyfile(stats.source, tmp)
        with h5py.File(tmp, "r+") as fh:
            rewrite_layers(fh, stats.layers)


def write(stats: BNStats, path: Path, fmt: str) -> None:
    """A copy of the Keras source file with the changed statistics datasets rewritten."""
    rewrite_copy(stats, path, fmt, "Keras .weights.h5", "writing .weights.h5 files")


def rewrite_layers(fh: Any, layers: Mapping[str, BNLayer]) -> None:
    """Rewrite in place, in an open HDF5 file, the mean and variance datasets (``keys``) whose
    values changed after casting to their stored dtype; every other byte is left alone."""
    for layer in layers.values():
        for role, values in (("mean", layer.mean), ("var", layer.var)):
            ds = fh[layer.keys[role]]
            new = cast(values, ds.dtype, ds.shape)
            if not np.array_equal(new, ds[()], equal_nan=True):
                ds[...] = new


FORMAT = Format(
    name="keras",
    extensions=(".h5", ".hdf5"),
    shown=".weights.h5",
    read=read,
    write=write,
    sniff=sniff,
    framework="keras",
    extra=EXTRA,
)
