"""Orbax checkpoint folders of a Flax state (``ocp.StandardCheckpointer().save(path, state)``).

What Orbax writes (orbax-checkpoint 0.12, read from its source and from folders it wrote):

- ``_METADATA``: JSON, the tree (each leaf's key path and value type), ``use_ocdbt``,
  ``use_zarr3``, ``store_array_data_equal_to_fill_value``;
- ``_CHECKPOINT_METADATA``: JSON, the name of the handler that wrote it and timestamps;
- ``_sharding``, ``array_metadatas/process_*``: JSON, each array's sharding and chunking;
- ``manifest.ocdbt``, ``d/``, ``ocdbt.process_*/``: the arrays, zarr arrays in a TensorStore
  OCDBT database (or one zarr folder per array without OCDBT);
- ``commit_success.txt``: a marker naming the folder.

Accepted layouts: an *item folder*, the one holding ``_METADATA``: what
``StandardCheckpointer``/``PyTreeCheckpointer`` ``.save(path, nnx.state(model))`` writes, and
the item folder a ``CheckpointManager`` writes, ``ckpt/<step>/default``. A step folder
``ckpt/<step>`` (``_CHECKPOINT_METADATA`` and item folders, no ``_METADATA``) is recognised
and refused with its item folders named. Keys are the tree's key paths joined by ``/``, so an
``nnx.BatchNorm`` attribute ``bn1`` of ``nnx.state(model)`` gives ``bn1/mean/value``, read as
layer ``bn1`` (the trailing ``/value`` dropped), as in :mod:`varshift.formats.flax_msgpack`.

Reading runs no code from the folder. It needs orbax-checkpoint (which imports jax and
TensorStore), imported only when such a folder is given; the tree is restored without a
target, every jax array onto the local CPU (NumPy arrays and scalars as saved). Verified in
the orbax-checkpoint 0.12.8 source: a restore reads JSON (``json``/``simplejson``), the legacy
aggregate file ``checkpoint`` with msgpack (Flax's array ext types), and array data through
TensorStore (zarr, OCDBT); orbax contains no ``pickle`` and imports no name it finds in a
folder (the handler name in ``_CHECKPOINT_METADATA`` is only compared as a string, here and by
``CheckpointManager`` against its registry of classes). A missing data file is an error, not
zeros: Orbax stores chunks equal to the fill value too and restores with TensorStore's
missing-chunk check on.

Writing rewrites the whole folder: the restored tree with the changed mean/variance leaves
replaced by arrays of the same dtype and shape, saved by Orbax with the same handler
(``StandardCheckpointHandler`` or ``PyTreeCheckpointHandler`` with the source's
``use_ocdbt``/``use_zarr3``) into a temporary sibling folder that is renamed into place
(:func:`varshift.core.files.replacing_folder`). Every other leaf is the restored object itself,
so values, dtypes (float64 too: restored and saved with jax's x64 mode on), NumPy or jax array
type and typed PRNG keys are kept; the files are not byte-identical (Orbax writes
new timestamps and data-file names), and the recorded sharding of every jax array is the
local CPU it was restored onto (a restore with a target uses the target's sharding anyway).
Optional extra ``orbax``.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import shutil
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from varshift.core.errors import InputFileError, OutputFileError
from varshift.core.files import replacing_folder
from varshift.formats.base import (
    BNStats,
    Extra,
    Format,
    Origin,
    cast,
    first_line,
    make_stats,
    same_source,
)
from varshift.formats.flax_msgpack import linen_affine, tensor_keys, with_file_keys
from varshift.formats.tensors import Converted, layers_from_tensors

EXTRA = Extra("orbax", "orbax.checkpoint", "orbax-checkpoint")

#: The tree metadata of an item folder, and the step metadata Orbax writes beside it.
METADATA, STEP_METADATA = "_METADATA", "_CHECKPOINT_METADATA"
_STANDARD = "StandardCheckpointHandler"
_COMMIT_NOTE = "commit_success.txt"


def is_checkpoint(path: Path) -> bool:
    """A folder holding Orbax's ``_METADATA`` or ``_CHECKPOINT_METADATA`` file."""
    return (path / METADATA).is_file() or (path / STEP_METADATA).is_file()


#: After a failed read, TensorStore callbacks still finishing in other threads raise "Event
#: loop is closed" into ``sys.unraisablehook`` within milliseconds; :func:`_quiet` keeps its
#: filter until none came for this long (seconds), at most ``_SETTLE_MAX``.
_SETTLE, _SETTLE_MAX = 0.3, 2.0


def _stray(info: Any) -> bool:
    """An orbax leftover after a failed read: a TensorStore callback on orbax's closed event
    loop, or an orbax coroutine abandoned with its error."""
    if info.exc_type is RuntimeError and "Event loop is closed" in str(info.exc_value):
        return True
    code = getattr(info.object, "cr_code", None)
    return code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Orbax's absl log lines and warnings kept off stderr (varshift reports its own errors),
    and the leftovers of a failed read (:func:`_stray`) out of ``sys.unraisablehook``."""
    logger = logging.getLogger("absl")
    level, hook = logger.level, sys.unraisablehook
    last = [time.monotonic()]

    def unraisable(info: Any) -> None:
        if _stray(info):
            last[0] = time.monotonic()
        else:
            hook(info)

    logger.setLevel(logging.CRITICAL)
    sys.unraisablehook = unraisable
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    except BaseException:  # wait for the stragglers: _SETTLE after the error and the last one
        gc.collect()  # orbax's abandoned coroutines, in reference cycles with their frames
        failed = time.monotonic()
        while time.monotonic() < min(failed + _SETTLE_MAX, max(failed, last[0]) + _SETTLE):
            time.sleep(0.02)
        raise
    finally:
        logger.setLevel(level)
        sys.unraisablehook = hook


def _modules(doing: str) -> tuple[Any, Any]:
    """``(orbax.checkpoint, jax)``, or the install hint."""
    with _quiet():
        ocp = EXTRA.load(doing)
        return ocp, EXTRA.load(doing, "jax")


def _x64(jax: Any) -> Any:
    """jax's 64-bit mode for one block (``jax.enable_x64``; ``jax.experimental`` before)."""
    switch = getattr(jax, "enable_x64", None)
    return switch(True) if switch is not None else jax.experimental.enable_x64()


def _item_folder(path: Path) -> None:
    """Refuse what is not an item folder (naming the item folders of a step folder)."""
    if not path.is_dir():
        raise InputFileError(f"{path}: not an Orbax checkpoint folder (expected a folder)")
    if (path / METADATA).is_file():
        return
    items = sorted(p.name for p in path.iterdir() if (p / METADATA).is_file())
    if items:
        raise InputFileError(
            f"{path}: is an Orbax CheckpointManager step folder; give its item folder "
            f"({', '.join(str(path / item) for item in items)})"
        )
    raise InputFileError(f"{path}: has no {METADATA} file; not an Orbax checkpoint item folder")


def _restore(path: Path, ocp: Any, jax: Any) -> Any:
    """The tree of an item folder, every array on the local CPU (no target, no sharding file)."""
    array_metadata = ocp.metadata.ArrayMetadata
    cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    where = path.absolute()
    with ocp.PyTreeCheckpointer() as checkpointer:
        meta = checkpointer.metadata(where)
        tree = getattr(getattr(meta, "item_metadata", meta), "tree", None)
        if tree is None:  # orbax logs the cause and returns no metadata
            raise InputFileError(
                f"{path}: not a readable Orbax checkpoint (its tree metadata or array data is "
                "missing or corrupt)"
            )

        def restore_args(leaf: Any) -> Any:
            if isinstance(leaf, array_metadata) and leaf.sharding is not None:  # a jax.Array
                return ocp.ArrayRestoreArgs(sharding=cpu)
            return ocp.RestoreArgs()  # NumPy arrays and scalars as the type they were saved as

        return checkpointer.restore(where, restore_args=jax.tree.map(restore_args, tree))


def _reason(exc: BaseException) -> str:
    """The first line of an orbax error without TensorStore's spec dump, at most 200 chars."""
    text = first_line(exc).split(" See full TensorStore details", 1)[0]
    return text if len(text) <= 200 else f"{text[:200]}..."


def _key(path: tuple[Any, ...]) -> str:
    """A jax key path as ``/``-joined text (dict keys, sequence indices, attribute names)."""
    parts = []
    for entry in path:
        for attr in ("key", "idx", "name"):
            if hasattr(entry, attr):
                parts.append(str(getattr(entry, attr)))
                break
        else:
            parts.append(str(entry))
    return "/".join(parts)


def _convert(leaf: Any) -> Converted:
    """:data:`Converted` of a restored array (``bfloat16`` through ml_dtypes)."""
    try:
        arr = np.asarray(leaf)
        values = arr.astype(np.float64).reshape(-1)
    except Exception as exc:  # a typed PRNG key, a string leaf
        raise InputFileError(f"is not an array of real numbers ({first_line(exc)})") from None
    if arr.dtype.kind not in "biuf" and "float" not in arr.dtype.name:
        raise InputFileError(f"holds {arr.dtype} values; expected real numbers")
    return values, tuple(arr.shape), str(arr.dtype)


def _settings(path: Path) -> dict[str, Any]:
    """How the source was written: its handler's name and storage options (JSON files)."""
    settings: dict[str, Any] = {"handler": "", "use_ocdbt": True, "use_zarr3": False}
    try:
        tree = json.loads((path / METADATA).read_text())
        step = path / STEP_METADATA
        handler = json.loads(step.read_text()).get("item_handlers") if step.is_file() else None
    except (OSError, ValueError, AttributeError) as exc:
        raise InputFileError(f"{path}: unreadable Orbax metadata: {first_line(exc)}") from None
    if isinstance(tree, dict):
        for option in ("use_ocdbt", "use_zarr3"):
            if isinstance(tree.get(option), bool):
                settings[option] = tree[option]
    settings["handler"] = handler if isinstance(handler, str) else ""
    return settings


def read(path: Path, fmt: str) -> BNStats:
    """The BatchNorm layers (``P/mean`` + ``P/var`` leaves) of an Orbax checkpoint folder."""
    ocp, jax = _modules("reading Orbax checkpoint folders")
    _item_folder(path)
    settings = _settings(path)
    with _quiet(), _x64(jax):  # float64 jax arrays stay float64
        failure = None
        try:
            tree = _restore(path, ocp, jax)
            flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
        except InputFileError:
            raise
        except Exception as exc:  # orbax and TensorStore raise many types for a damaged folder
            failure = _reason(exc)
        if failure is not None:  # raised outside the except: orbax's frames are freed in _quiet
            raise InputFileError(
                f"{path}: not a readable Orbax checkpoint (truncated or corrupt?): {failure}"
            )
    leaves = {_key(key): leaf for key, leaf in flat}
    lookup = dict(tensor_keys(leaves))
    found = {key: leaves[f] for key, f in lookup.items()}
    layers, _ = layers_from_tensors(found, str(path), _convert)
    layers = {
        k: with_file_keys(linen_affine(v, found, _convert), lookup) for k, v in layers.items()
    }
    index = {key: i for i, key in enumerate(leaves)}
    origin = Origin([leaf for _, leaf in flat], {"treedef": treedef, "index": index, **settings})
    return make_stats(layers, fmt, path, "flax", origin)


def _refuse_foreign(path: Path) -> None:
    """With ``force``, only an Orbax checkpoint folder (or an empty folder) is replaced."""
    if path.is_dir() and any(path.iterdir()) and not is_checkpoint(path):
        raise OutputFileError(
            f"{path}: exists and is not an Orbax checkpoint folder; varshift replaces only a "
            "checkpoint folder, choose another output"
        )


def _replacements(stats: BNStats, jax: Any) -> dict[int, Any]:
    """Leaf index → the new array of each mean/variance that changed: the stored dtype and
    shape, a jax array on the restored leaf's sharding for a jax leaf (NumPy if jax would change the
    dtype), a NumPy array for a NumPy leaf."""
    assert stats.origin is not None
    leaves: list[Any] = stats.origin.data
    index: dict[str, int] = stats.origin.extra["index"]
    out: dict[int, Any] = {}
    for layer in stats.layers.values():
        for role, values in (("mean", layer.mean), ("var", layer.var)):
            i = index[layer.keys[role]]
            old = np.asarray(leaves[i])
            new = cast(values, old.dtype, old.shape)
            if np.array_equal(new, old, equal_nan=True):
                continue
            sharding = getattr(leaves[i], "sharding", None)
            placed = jax.device_put(new, sharding) if sharding is not None else new
            out[i] = placed if placed.dtype == new.dtype else new
    return out


def _save(folder: Path, tree: Any, settings: dict[str, Any], ocp: Any) -> None:
    """Save ``tree`` as a new Orbax folder with the source's handler and storage options."""
    if _STANDARD in settings["handler"]:
        handler = ocp.StandardCheckpointHandler(use_ocdbt=settings["use_ocdbt"])
        args = ocp.args.StandardSave(tree)
    else:
        handler = ocp.PyTreeCheckpointHandler(
            use_ocdbt=settings["use_ocdbt"], use_zarr3=settings["use_zarr3"]
        )
        args = ocp.args.PyTreeSave(tree)
    with ocp.Checkpointer(handler) as checkpointer:
        checkpointer.save(folder.absolute(), args=args)


def write(stats: BNStats, path: Path, fmt: str) -> None:
    """A new Orbax folder: the source tree with the changed mean/variance leaves replaced."""
    if not same_source(stats, fmt):
        raise OutputFileError(
            f"{path}: an Orbax checkpoint folder is written only from an Orbax checkpoint (a "
            "copy of its tree); choose a file output such as .msgpack or .npz"
        )
    assert stats.origin is not None
    ocp, jax = _modules("writing Orbax checkpoint folders")
    _refuse_foreign(path)
    leaves = list(stats.origin.data)
    with _x64(jax):
        for i, array in _replacements(stats, jax).items():
            leaves[i] = array
    tree = stats.origin.extra["treedef"].unflatten(leaves)
    with replacing_folder(path) as tmp, _quiet(), _x64(jax):
        failure = None
        try:
            _save(tmp, tree, dict(stats.origin.extra), ocp)
        except Exception as exc:
            failure = _reason(exc)
        if failure is not None:
            for partial in tmp.parent.glob(f"{tmp.name}.orbax-checkpoint-tmp*"):
                shutil.rmtree(partial, ignore_errors=True)
            raise OutputFileError(f"{path}: Orbax could not write it: {failure}")
        note = tmp / _COMMIT_NOTE
        if note.is_file():  # Orbax names the folder it committed: the temporary one
            note.write_text(f"Checkpoint commit was successful to {path.absolute()}")


FORMAT = Format(
    name="orbax",
    extensions=(),
    shown="an Orbax checkpoint folder",
    read=read,
    write=write,
    framework="flax",
    extra=EXTRA,
    folder=is_checkpoint,
)
