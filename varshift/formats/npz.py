"""NumPy ``.npz`` archives of named arrays (BN layers by key pairs, see
:mod:`varshift.formats.tensors`). Read with ``np.load(allow_pickle=False)`` only."""

from __future__ import annotations

import io
import math
import zipfile
from pathlib import Path

import numpy as np

from varshift.core.errors import InputFileError
from varshift.formats.base import (
    BNStats,
    Format,
    Origin,
    first_line,
    make_stats,
    same_source,
    write_bytes,
    zip_names,
)
from varshift.formats.tensors import layers_from_tensors, numpy_convert, tensor_dict


def sniff(head: bytes, path: Path) -> bool:
    """A zip archive whose members are all ``.npy`` arrays."""
    names = zip_names(path) if head.startswith(b"PK") else None
    return bool(names) and all(n.endswith(".npy") for n in names or ())


def read(path: Path, fmt: str) -> BNStats:
    """The BN layers among the archive's arrays; refuses pickled object arrays."""
    try:
        with zipfile.ZipFile(path) as zf:
            compressed = any(i.compress_type != zipfile.ZIP_STORED for i in zf.infolist())
            for info in zf.infolist():
                _check_member(zf, info, path)
        with np.load(path, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise InputFileError(
                f"{path}: refusing to load: the archive holds pickled object arrays; varshift "
                "reads numeric arrays only (np.load(allow_pickle=False))"
            ) from None
        raise InputFileError(f"{path}: not a readable .npz archive: {first_line(exc)}") from None
    except (zipfile.BadZipFile, EOFError, OSError) as exc:
        raise InputFileError(
            f"{path}: not a readable .npz archive (truncated or corrupt?): {first_line(exc)}"
        ) from None
    layers, framework = layers_from_tensors(arrays, str(path), numpy_convert)
    origin = Origin(arrays, {"compressed": compressed}, lambda: dict(arrays))
    return make_stats(layers, fmt, path, framework, origin)


def _check_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path) -> None:
    """Refuse a member whose header declares more data than the member holds.

    ``np.load`` allocates the declared shape before reading, so a 200-byte member declaring
    10¹² elements would ask for 8 TB; the header is read first and checked against the
    member's size.
    """
    if not info.filename.endswith(".npy"):
        return
    with zf.open(info) as fh:
        try:
            version = np.lib.format.read_magic(fh)
            reader = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            shape, _, dtype = reader(fh)
        except (ValueError, OSError) as exc:
            raise InputFileError(
                f"{path}: {info.filename}: not a .npy array: {first_line(exc)}"
            ) from None
    if dtype.hasobject:
        return  # refused by np.load(allow_pickle=False) with the pickle message
    declared = math.prod(shape) * dtype.itemsize
    if declared > info.file_size:
        raise InputFileError(
            f"{path}: {info.filename}: declares shape {shape} ({declared:,} bytes) but holds "
            f"{info.file_size:,} bytes (corrupt or forged archive)"
        )


def write(stats: BNStats, path: Path, fmt: str) -> None:
    """Every tensor of a tensor-dict source with the changes applied (compressed as the source
    was), else the BN layers under PyTorch names."""
    arrays = tensor_dict(stats)
    compressed = False
    if stats.origin is not None and same_source(stats, fmt):
        compressed = bool(stats.origin.extra.get("compressed"))
    buffer = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buffer, **arrays)  # type: ignore[arg-type]
    write_bytes(path, buffer.getvalue())


FORMAT = Format(name="npz", extensions=(".npz",), shown=".npz", read=read, write=write, sniff=sniff)
