"""safetensors files (BN layers by key pairs, see :mod:`varshift.formats.tensors`); the
header's metadata is kept. Optional extra ``safetensors``."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from varshift.core.errors import InputFileError
from varshift.formats.base import (
    BNStats,
    Extra,
    Format,
    Origin,
    first_line,
    make_stats,
    write_bytes,
)
from varshift.formats.tensors import layers_from_tensors, numpy_convert, tensor_dict

EXTRA = Extra("safetensors", "safetensors", "safetensors")


def sniff(head: bytes, path: Path) -> bool:
    """An 8-byte little-endian header length that fits the file, then a JSON header."""
    if len(head) < 9 or head[8:9] != b"{":
        return False
    size = int.from_bytes(head[:8], "little")
    return 0 < size <= path.stat().st_size - 8


def read(path: Path, fmt: str) -> BNStats:
    """The BN layers among the file's tensors, with its metadata for the writer."""
    safetensors = EXTRA.load("reading .safetensors files")
    try:
        with safetensors.safe_open(str(path), framework="np") as fh:
            metadata = fh.metadata()
            arrays = {name: fh.get_tensor(name) for name in fh.keys()}
    except Exception as exc:  # SafetensorError, or a dtype numpy lacks (bfloat16)
        raise InputFileError(
            f"{path}: not a readable .safetensors file (truncated or corrupt, or a dtype "
            f"numpy lacks such as bfloat16?): {first_line(exc)}"
        ) from None
    layers, framework = layers_from_tensors(arrays, str(path), numpy_convert)
    extra = {"metadata": dict(metadata) if metadata else None}
    return make_stats(layers, fmt, path, framework, Origin(arrays, extra, lambda: dict(arrays)))


def write(stats: BNStats, path: Path, fmt: str) -> None:
    """Every tensor of a tensor-dict source with the changes applied (and a safetensors
    source's metadata), else the BN layers under PyTorch names."""
    st = EXTRA.load("writing .safetensors files", "safetensors.numpy")
    arrays = {k: np.ascontiguousarray(v) for k, v in tensor_dict(stats).items()}
    metadata = None
    if stats.origin is not None and stats.format == fmt:
        metadata = stats.origin.extra.get("metadata")
    write_bytes(path, st.save(arrays, metadata=metadata))


FORMAT = Format(
    name="safetensors",
    extensions=(".safetensors",),
    shown=".safetensors",
    read=read,
    write=write,
    sniff=sniff,
    extra=EXTRA,
)
