"""PyTorch checkpoints (``.pt``, ``.pth``; ``.ckpt``, ``.bin``, ``.tar`` by content).

A state dict's ``P.running_mean``/``P.running_var`` (with ``P.weight``, ``P.bias``,
``P.num_batches_tracked``), at the top level or nested in a training checkpoint under
``state_dict``, ``model``, ... A checkpoint may hold several (timm's ``state_dict`` and
``state_dict_ema``; Lightning's ``state_dict`` and ``callbacks/<EMA callback>/<key>``): each is
read, its layers named ``LABEL:LAYER`` (:attr:`BNStats.containers`), and the writer replaces
the changed tensors in the state dict each layer came from. Read with
``torch.load(weights_only=True)`` only, so a file cannot run code when it is read. Optional
extra ``torch``.
"""

from __future__ import annotations

import copy
import io
import pickle
from collections.abc import Mapping
from dataclasses import replace
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

#: How deep nested mappings are searched for state dicts (``callbacks/EMA/state_dict``: 3).
_MAX_DEPTH = 4

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
    paths = _find_containers(obj)
    several = len(paths) > 1
    layers: dict[str, Any] = {}
    containers: dict[str, str] = {}
    frameworks: set[str | None] = set()
    for container in paths:
        label = _label(container)
        where = f"{path} ({label})" if several else str(path)
        found, framework = _container_layers(torch, _get_path(obj, container), where)
        frameworks.add(framework)
        for name, layer in found.items():
            if several:
                name = f"{label}:{name}"
                layer = replace(layer, name=name)
                containers[name] = label
            layers[name] = layer
    extra = {"paths": {_label(c): c for c in paths}}
    origin = Origin(obj, extra, lambda: _state_arrays(_get_path(obj, paths[0]), path, paths))
    framework = next(iter(frameworks)) if len(frameworks) == 1 else None
    shown = ", ".join(_label(c) for c in paths)
    return make_stats(layers, fmt, path, framework, origin, shown, containers)


def _container_layers(torch: Any, state: Any, where: str) -> tuple[dict[str, Any], str | None]:
    """The BN layers of one state dict (dense real tensors only) and the framework implied."""
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

    return layers_from_tensors(tensors, where, convert)


def _has_bn_keys(obj: Any) -> bool:
    return isinstance(obj, Mapping) and any(
        isinstance(k, str) and k.endswith(("running_mean", "running_var")) for k in obj
    )


def _label(container: tuple[Any, ...]) -> str:
    """How reports and ``--key`` name a state dict: its key path joined by ``/``."""
    return "/".join(str(k) for k in container)


def _find_containers(obj: Any) -> list[tuple[Any, ...]]:
    """The key paths of every state dict with BN statistics, in file order (``[()]``: the top
    level, also when none is found).

    Nested mappings are searched to :data:`_MAX_DEPTH` levels (a Lightning checkpoint keeps an
    EMA callback's state dict under ``callbacks/<callback>/<key>``); a mapping met twice (the
    same object saved under two keys) is read once.
    """
    if not isinstance(obj, Mapping) or _has_bn_keys(obj):
        return [()]
    found: list[tuple[Any, ...]] = []
    seen: set[int] = set()

    def walk(node: Mapping[Any, Any], here: tuple[Any, ...]) -> None:
        for key, value in node.items():
            if not isinstance(value, Mapping) or id(value) in seen:
                continue
            seen.add(id(value))
            if _has_bn_keys(value):
                found.append((*here, key))
            elif len(here) + 1 < _MAX_DEPTH:
                walk(value, (*here, key))

    walk(obj, ())
    return found or [()]


def _get_path(obj: Any, path: tuple[Any, ...]) -> Any:
    for key in path:
        obj = obj[key]
    return obj


def _state_arrays(
    state: Mapping[Any, Any], path: Path, paths: list[tuple[Any, ...]]
) -> dict[str, NDArray[Any]]:
    """Every tensor of the state dict as a NumPy array (for exports to npz or safetensors);
    refused for a checkpoint with several state dicts (``paths``), which one flat tensor file
    cannot keep apart."""
    if len(paths) > 1:
        shown = ", ".join(_label(c) for c in paths)
        raise OutputFileError(
            f"{path} holds several state dicts with BatchNorm statistics ({shown}); one tensor "
            "file cannot keep them apart: write a .pt/.pth (or a .json/.csv of the statistics)"
        )
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
        obj = _replace_tensors(torch, stats, stats.origin.data, stats.origin.extra["paths"])
    else:
        obj = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in tensor_dict(stats).items()}
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_bytes(path, buffer.getvalue())


def _replace_tensors(
    torch: Any, stats: BNStats, obj: Any, paths: Mapping[str, tuple[Any, ...]]
) -> Any:
    """A copy of the checkpoint with the changed tensors replaced (same dtype and shape), in
    each state dict (``paths``: label → key path) its layers were read from.

    Only the containers on the path to a changed state dict are copied (``copy.copy`` keeps
    their type and attributes such as the state dict's ``_metadata``); every other object is
    shared.
    """
    updates: dict[str, dict[str, Any]] = {}
    for name, layer in stats.layers.items():
        label = stats.containers.get(name, stats.container)
        state = _get_path(obj, paths[label])
        for role, values in (("mean", layer.mean), ("var", layer.var)):
            key = layer.keys.get(role)
            if key is None or not torch.is_tensor(state.get(key)):
                continue
            old = state[key]
            new = torch.from_numpy(np.asarray(values, dtype=np.float64).reshape(tuple(old.shape)))
            new = new.to(dtype=old.dtype)
            if not torch.equal(new, old):
                updates.setdefault(label, {})[key] = new

    def rebuild(node: Any, rest: tuple[Any, ...], changed: dict[str, Any]) -> Any:
        out = copy.copy(node)
        if rest:
            out[rest[0]] = rebuild(node[rest[0]], rest[1:], changed)
        else:
            out.update(changed)
        return out

    for label, changed in updates.items():
        obj = rebuild(obj, paths[label], changed)
    return obj


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
