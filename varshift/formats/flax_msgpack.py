"""Flax state checkpoints serialised with ``flax.serialization`` msgpack (``.msgpack``).

``flax.serialization.to_bytes(tree)`` writes a msgpack map of the state dict; every array leaf
is msgpack ExtType code 1 (code 3 for a NumPy scalar) whose payload is
``msgpack.packb((shape, dtype name, C-order bytes))`` (``flax/serialization.py``,
``_ndarray_to_bytes``). For Flax NNX the tree is ``nnx.to_pure_dict(nnx.state(model, ...))``,
so a BatchNorm attribute ``bn1`` gives the keys ``bn1/mean``, ``bn1/var`` (``nnx.BatchStat``)
and ``bn1/scale``, ``bn1/bias`` (``nnx.Param``); a Linen variables dict keeps the statistics
under ``batch_stats/<name>/`` and the affine parameters under ``params/<name>/``.

The file is read with the ``msgpack`` package alone (flax is never imported, nothing is
unpickled). The writer splices the re-encoded mean and variance leaves into a copy of the
source bytes at the offsets they were read from: the same shape and dtype give a payload of the
same length, so every other byte of the file stays as it was. Optional extra ``flax``
(msgpack).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, NamedTuple, TypeVar

import numpy as np

from varshift.core.errors import InputFileError, OutputFileError
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
    write_bytes,
)
from varshift.formats.tensors import Converted, layers_from_tensors

EXTRA = Extra("flax", "msgpack", "msgpack")

T = TypeVar("T")

#: flax.serialization._MsgpackExtType: ndarray = 1, npscalar = 3.
_NDARRAY, _NPSCALAR = 1, 3
_MAP_MARKERS = frozenset([*range(0x80, 0x90), 0xDE, 0xDF])
_ARRAY_MARKERS = frozenset([*range(0x90, 0xA0), 0xDC, 0xDD])
_STR_MARKERS = frozenset([*range(0xA0, 0xC0), 0xD9, 0xDA, 0xDB])


class Leaf(NamedTuple):
    """One array leaf of the tree: its key, where its msgpack object lies in the file, its ext."""

    key: str
    start: int
    end: int
    code: int
    payload: bytes


def sniff(head: bytes, path: Path) -> bool:
    """A msgpack map whose first key is a string (a fixmap or map16/32, then a str marker)."""
    if len(head) < 2 or head[0] not in _MAP_MARKERS:
        return False
    skip = {0xDE: 3, 0xDF: 5}.get(head[0], 1)
    return len(head) > skip and head[skip] in _STR_MARKERS


def _walk(unpacker: Any, data: bytes, path: str, leaves: dict[str, Leaf]) -> None:
    """Record every ExtType leaf under ``path`` (keys joined by ``/``) with its byte range."""
    marker = data[unpacker.tell()]
    if marker in _MAP_MARKERS:
        for _ in range(unpacker.read_map_header()):
            key = unpacker.unpack()
            _walk(unpacker, data, f"{path}/{key}" if path else str(key), leaves)
    elif marker in _ARRAY_MARKERS:
        for i in range(unpacker.read_array_header()):
            _walk(unpacker, data, f"{path}/{i}" if path else str(i), leaves)
    else:
        start = unpacker.tell()
        value = unpacker.unpack()
        code = getattr(value, "code", None)
        if code in (_NDARRAY, _NPSCALAR):
            leaves[path] = Leaf(path, start, unpacker.tell(), int(code), bytes(value.data))


def _leaves(data: bytes, path: Path, msgpack: Any) -> dict[str, Leaf]:
    """The array leaves of a flax msgpack file, by ``/``-joined key path."""
    if not data or data[0] not in _MAP_MARKERS:
        raise InputFileError(f"{path}: not a Flax msgpack checkpoint (the top level is no map)")
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False, max_buffer_size=len(data) + 1)
    unpacker.feed(data)
    leaves: dict[str, Leaf] = {}
    try:
        _walk(unpacker, data, "", leaves)
    except (ValueError, IndexError, msgpack.UnpackException) as exc:  # OutOfData is one
        raise InputFileError(
            f"{path}: not a readable msgpack file (truncated or corrupt?): {first_line(exc)}"
        ) from None
    if unpacker.tell() != len(data):
        raise InputFileError(f"{path}: {len(data) - unpacker.tell()} bytes after the msgpack map")
    return leaves


def _decode(leaf: Leaf, msgpack: Any, where: str) -> np.ndarray:
    """The array of an ext leaf (``flax.serialization._ndarray_from_bytes``)."""
    try:
        shape, dtype_name, buffer = msgpack.unpackb(leaf.payload, raw=True)
        name = dtype_name.decode()
        if name == "bfloat16":
            raise InputFileError(f"{where}: {leaf.key}: bfloat16 arrays are not supported")
        return np.frombuffer(buffer, dtype=np.dtype(name)).reshape(shape)
    except InputFileError:
        raise
    except Exception as exc:  # a payload that is not (shape, dtype, bytes)
        raise InputFileError(f"{where}: {leaf.key}: not a flax array: {first_line(exc)}") from None


def _encode(array: np.ndarray, msgpack: Any, code: int) -> Any:
    """The ext leaf flax writes for ``array`` (``_ndarray_to_bytes``)."""
    payload = msgpack.packb((array.shape, array.dtype.name, array.tobytes("C")), use_bin_type=True)
    return msgpack.ExtType(code, payload)


def tensor_keys(leaves: Iterable[str]) -> Iterator[tuple[str, str]]:
    """``(lookup key, file key)``: a trailing ``/value`` (``nnx.State`` trees, older ``nnx.State``
    dicts) dropped."""
    for key in leaves:
        yield (key[: -len("/value")] if key.endswith("/value") else key), key


def read(path: Path, fmt: str) -> BNStats:
    """The BatchNorm layers (``P/mean`` + ``P/var`` leaves) of a Flax msgpack checkpoint."""
    msgpack = EXTRA.load("reading .msgpack files")
    data = path.read_bytes()
    leaves = _leaves(data, path, msgpack)
    lookup = dict(tensor_keys(leaves))
    found = {key: leaves[f] for key, f in lookup.items()}  # decoded only when a layer needs it

    def convert(leaf: Leaf) -> Converted:
        arr = _decode(leaf, msgpack, str(path))
        return arr.astype(np.float64).reshape(-1), tuple(arr.shape), str(arr.dtype)

    layers, _ = layers_from_tensors(found, str(path), convert)
    layers = {k: with_file_keys(linen_affine(v, found, convert), lookup) for k, v in layers.items()}
    return make_stats(layers, fmt, path, "flax", Origin(data, {"leaves": leaves}))


def linen_affine(
    layer: BNLayer, found: Mapping[str, T], convert: Callable[[T], Converted]
) -> BNLayer:
    """A Linen layer ``batch_stats/P`` takes its scale and bias from ``params/P``."""
    if not layer.name.startswith("batch_stats/") or layer.scale is not None:
        return layer
    rest = layer.name[len("batch_stats/") :]
    keys = dict(layer.keys)
    affine: dict[str, Any] = {}
    for role in ("scale", "bias"):
        key = f"params/{rest}/{role}"
        if key in found:
            values, _, _ = convert(found[key])
            if values.size == layer.channels:
                affine[role], keys[role] = values, key
    return replace(layer, keys=MappingProxyType(keys), **affine)


def with_file_keys(layer: BNLayer, lookup: Mapping[str, str]) -> BNLayer:
    """The layer's keys as the file spells them (``bn1/mean/value`` for older State dicts)."""
    keys = {role: lookup.get(key, key) for role, key in layer.keys.items()}
    return replace(layer, keys=MappingProxyType(keys))


def write(stats: BNStats, path: Path, fmt: str) -> None:
    """The source bytes with the changed mean/variance leaves spliced in; from another format,
    a new flax msgpack map ``{layer: {mean, var, scale?, bias?}}`` (float32 unless stored
    otherwise)."""
    msgpack = EXTRA.load("writing .msgpack files")
    if not same_source(stats, fmt):
        write_bytes(path, _fresh(stats, msgpack))
        return
    assert stats.origin is not None
    data: bytes = stats.origin.data
    leaves: dict[str, Leaf] = stats.origin.extra["leaves"]
    edits: list[tuple[Leaf, bytes]] = []
    for layer in stats.layers.values():
        for role, values in (("mean", layer.mean), ("var", layer.var)):
            leaf = leaves[layer.keys[role]]
            old = _decode(leaf, msgpack, stats.where)
            new = cast(values, old.dtype, old.shape)
            if np.array_equal(new, old, equal_nan=True):
                continue
            packed = msgpack.packb(_encode(new, msgpack, leaf.code), use_bin_type=True)
            if len(packed) != leaf.end - leaf.start:  # cannot happen: same shape and dtype
                raise OutputFileError(f"{path}: {layer.keys[role]} would change its size")
            edits.append((leaf, packed))
    out = bytearray(data)
    for leaf, packed in edits:
        out[leaf.start : leaf.end] = packed
    write_bytes(path, bytes(out))


def _fresh(stats: BNStats, msgpack: Any) -> bytes:
    """A new NNX-style msgpack map of the BN layers (a ``/`` in a layer name nests)."""
    tree: dict[str, Any] = {}
    for layer in stats.layers.values():
        try:
            dtype = np.dtype(layer.dtype)
        except TypeError:
            dtype = np.dtype(np.float32)
        node = tree
        for part in layer.name.split("/"):
            node = node.setdefault(part, {})
        for role in ("bias", "mean", "scale", "var"):  # nnx.State's sorted key order
            values = getattr(layer, role)
            if values is not None:
                node[role] = _encode(np.asarray(values).astype(dtype), msgpack, _NDARRAY)
    return bytes(msgpack.packb(tree, use_bin_type=True))


FORMAT = Format(
    name="flax",
    extensions=(".msgpack",),
    shown=".msgpack",
    read=read,
    write=write,
    sniff=sniff,
    framework="flax",
    extra=EXTRA,
)
