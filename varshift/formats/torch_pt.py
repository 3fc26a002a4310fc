"""PyTorch checkpoints (``.pt``, ``.pth``; ``.ckpt``, ``.bin``, ``.tar`` by content).

A state dict's ``P.running_mean``/``P.running_var`` (with ``P.weight``, ``P.bias``,
``P.num_batches_tracked``), at the top level or nested in a training checkpoint under
``state_dict``, ``model``, ... Read with ``torch.load(weights_only=True)`` only, so a file
cannot run code when it is read. Optional extra ``torch``.
"""

from __future__ import annotations

import copy
import io
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from varshift.core.errors import InputFileError, OutputFileError
from varshift.formats.base import (
    BNStats,
    Extra,
    Format,
    Origin,
    first_line,
    make_stats,
    same_source,
    write_bytes,
    zip_names,
)
from varshift.formats.tensors import Converted, layers_from_tensors, tensor_dict

EXTRA = Extra("torch", "torch", "PyTorch")

#: Keys under which training checkpoints keep the model's state dict, in order of preference.
_CONTAINERS = ("state_dict", "model_state_dict", "model", "module", "net", "network")

_UNSAFE_PICKLE = (
    "refusing to load: the file contains pickled objects other than tensors; varshift only "
    "loads weights_only checkpoints (save the state dict: torch.save(model.state_dict(), path))"
)


def sniff(head: bytes, path: Path) -> bool:
    """A torch zip archive (with ``data.pkl``) or torch's legacy (pre-1.6) pickle magic."""
    if head.startswith(b"\x80\x02\x8a\n"):
        return True
    names = zip_names(path) if head.startswith(b"PK") else None
    return names is not None and any(n == "data.pkl" or n.endswith("/data.pkl") for n in names)


def _load_quietly(torch: Any, path: Path) -> Any:
    """``torch.load(weights_only=True)`` to the CPU; torch's warnings are dropped when the load
    fails (varshift's one-line error says what matters) and re-issued when it succeeds."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        obj = torch.load(path, map_location="cpu", weights_only=True)
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return obj


def read(path: Path, fmt: str) -> BNStats:
    """The BN layers of a state dict or training checkpoint (``weights_only`` loading)."""
    torch = EXTRA.load("reading .pt files")
    try:
        obj = _load_quietly(torch, path)
    except pickle.UnpicklingError:
        raise InputFileError(f"{path}: {_UNSAFE_PICKLE}") from None
    except Exception as exc:  # torch reports a damaged archive in many ways
        raise InputFileError(
            f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): {first_line(exc)}"
        ) from None
    if not isinstance(obj, Mapping):
        raise InputFileError(
            f"{path}: expected a state dict (a mapping of names to tensors); got "
            f"{type(obj).__name__}"
        )
    container = _find_container(obj)
    state = _get_path(obj, container)
    tensors = {k: v for k, v in state.items() if isinstance(k, str) and torch.is_tensor(v)}

    def convert(t: Any) -> Converted:
        if t.layout != torch.strided or t.device.type == "meta":
            kind = "meta" if t.device.type == "meta" else str(t.layout).removeprefix("torch.")
            raise InputFileError(f"is a {kind} tensor; expected a dense tensor with values")
        if t.is_complex():
            shown = str(t.dtype).removeprefix("torch.")
            raise InputFileError(f"holds {shown} values; expected real numbers")
        values = t.detach().to(device="cpu", dtype=torch.float64).numpy().reshape(-1)
        return values, tuple(t.shape), str(t.dtype).removeprefix("torch.")

    layers, framework = layers_from_tensors(tensors, str(path), convert)
    origin = Origin(obj, {"container": container}, lambda: _state_arrays(state))
    where = "/".join(str(k) for k in container)
    return make_stats(layers, fmt, path, framework, origin, where)


def _has_bn_keys(obj: Any) -> bool:
    return isinstance(obj, Mapping) and any(
        isinstance(k, str) and k.endswith(("running_mean", "running_var")) for k in obj
    )


def _find_container(obj: Any) -> tuple[Any, ...]:
    """The key path to the state dict inside a training checkpoint (``()``: the top level)."""
    if not isinstance(obj, Mapping) or _has_bn_keys(obj):
        return ()
    for key in _CONTAINERS:
        if _has_bn_keys(obj.get(key)):
            return (key,)
    for key, value in obj.items():
        if _has_bn_keys(value):
            return (key,)
    for key, value in obj.items():
        if isinstance(value, Mapping):
            for key2, value2 in value.items():
                if _has_bn_keys(value2):
                    return (key, key2)
    return ()


def _get_path(obj: Any, path: tuple[Any, ...]) -> Any:
    for key in path:
        obj = obj[key]
    return obj


def _state_arrays(state: Mapping[Any, Any]) -> dict[str, NDArray[Any]]:
    """Every tensor of the state dict as a NumPy array (for exports to npz or safetensors)."""
    torch = EXTRA.load("reading .pt files")
    arrays: dict[str, NDArray[Any]] = {}
    for key, t in state.items():
        if isinstance(key, str) and torch.is_tensor(t):
            if t.dtype == torch.bfloat16:
                raise OutputFileError(
                    f"{key}: bfloat16 tensors cannot be stored without PyTorch; write a .pt"
                )
            arrays[key] = t.detach().cpu().numpy()
    return arrays


def write(stats: BNStats, path: Path, fmt: str) -> None:
    """The source checkpoint with the changed tensors replaced, else every tensor as a state
    dict (from a tensor-dict source) or the BN layers under PyTorch names."""
    torch = EXTRA.load("writing .pt files")
    if same_source(stats, fmt):
        assert stats.origin is not None
        container: tuple[Any, ...] = stats.origin.extra["container"]
        obj = _replace_tensors(torch, stats, stats.origin.data, container)
    else:
        obj = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in tensor_dict(stats).items()}
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_bytes(path, buffer.getvalue())


def _replace_tensors(torch: Any, stats: BNStats, obj: Any, container: tuple[Any, ...]) -> Any:
    """A copy of the checkpoint with the changed tensors replaced (same dtype and shape).

    Only the containers on the path to the state dict are copied (``copy.copy`` keeps their
    type and attributes such as the state dict's ``_metadata``); every other object is shared.
    """
    state = _get_path(obj, container)
    updates: dict[str, Any] = {}
    for layer in stats.layers.values():
        for role, values in (("mean", layer.mean), ("var", layer.var)):
            key = layer.keys.get(role)
            if key is None or not torch.is_tensor(state.get(key)):
                continue
            old = state[key]
            new = torch.from_numpy(np.asarray(values, dtype=np.float64).reshape(tuple(old.shape)))
            new = new.to(dtype=old.dtype)
            if not torch.equal(new, old):
                updates[key] = new
    if not updates:
        return obj

    def rebuild(node: Any, rest: tuple[Any, ...]) -> Any:
        out = copy.copy(node)
        if rest:
            out[rest[0]] = rebuild(node[rest[0]], rest[1:])
        else:
            out.update(updates)
        return out

    return rebuild(obj, container)


FORMAT = Format(
    name="torch",
    extensions=(".pt", ".pth"),
    shown=".pt/.pth",
    read=read,
    write=write,
    sniff=sniff,
    framework="torch",
    extra=EXTRA,
)
