"""Loading a PyTorch model and its data safely, with one-line errors.

What runs code and what does not:

- ``factory="pkg.mod:fn"`` imports ``pkg.mod`` and calls ``fn(**args)``: this **runs the
  user's code** (as ``python -c`` would).
- a checkpoint is read with ``torch.load(weights_only=True)``: tensors only, never unpickles
  other objects; a training checkpoint's ``state_dict``/``model_state_dict``/``model`` entry is
  used; the load is strict and a mismatch names the missing and unexpected keys.
- a ``.pt2`` ``torch.export`` archive (graph and weights) is read with ``torch.export.load``:
  no user code runs; its BatchNorm and dropout ops become modules
  (:func:`module_from_export`) so every pass can see them.
- data files (npy, npz, safetensors, csv) are read with ``allow_pickle=False``; only
  ``data="pkg.mod:fn"`` (an iterable of batches, e.g. a ``DataLoader``) runs code.
"""

from __future__ import annotations

import copy
import io
import pickle
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import fx, nn

from varshift.core.errors import InputFileError, ValidationError
from varshift.frameworks.torch.data import Batches, as_batches, load_batches
from varshift.frameworks.torch.graph import batchnorm_layers
from varshift.frameworks.torch.imports import (
    first_line,
    parse_model_args,
    resolve_import_path,
    short,
)

__all__ = [
    "Batches",
    "LoadedModel",
    "as_batches",
    "checkpoint_bytes",
    "load_batches",
    "load_model",
    "module_from_export",
    "parse_model_args",
    "resolve_import_path",
]

#: Entries of a training checkpoint that may hold the model's state dict, in order of preference.
STATE_KEYS: tuple[str, ...] = ("state_dict", "model_state_dict", "model", "net")

# --- models ------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class LoadedModel:
    """A model ready for the data passes, and what is needed to write it back.

    Attributes
    ----------
    module:
        The ``nn.Module`` (for a ``.pt2`` archive: a ``GraphModule`` with BN/dropout modules).
    source:
        How it was loaded, for messages and reports (``pkg.mod:fn`` or the archive's file name).
    runs_code:
        True when loading ran user code (a factory import path).
    checkpoint:
        The checkpoint whose weights were loaded, or ``None``.
    container:
        Key path to the state dict inside the checkpoint (``()``: the top level).
    original:
        The checkpoint object as loaded (tensors only), rewritten with new BN buffers on save.
    exported:
        The ``torch.export.ExportedProgram`` of a ``.pt2`` archive, else ``None``.
    archive:
        The ``.pt2`` file it came from (re-read when writing: a deep copy of an exported
        program no longer validates), else ``None``.
    """

    module: nn.Module
    source: str
    runs_code: bool
    checkpoint: Path | None = None
    container: tuple[str, ...] = ()
    original: Any = None
    exported: Any = None
    archive: Path | None = None


def is_export_archive(text: str | Path) -> bool:
    """True for a path naming a ``torch.export`` archive (``.pt2``)."""
    return str(text).lower().endswith(".pt2")


def load_model(
    factory: str | Path,
    args: Mapping[str, Any] | None = None,
    checkpoint: str | Path | None = None,
    container: tuple[str, ...] | None = None,
) -> LoadedModel:
    """Build or load the model and load its weights.

    Parameters
    ----------
    factory:
        ``"pkg.mod:fn"`` (imported and called with ``args``: runs user code) or a ``.pt2``
        ``torch.export`` archive (no user code runs).
    args:
        Keyword arguments of the factory.
    checkpoint:
        A state dict or training checkpoint, read with ``torch.load(weights_only=True)`` and
        loaded strictly; ``None`` keeps the factory's (or archive's) weights.
    container:
        Key path of the state dict inside ``checkpoint`` (a checkpoint holding several);
        ``None``: the top level or the first of :data:`STATE_KEYS`.

    Raises
    ------
    ValidationError
        The import path fails, the factory raises or returns no ``nn.Module``.
    InputFileError
        A file is missing, unreadable, unsafe (pickled objects) or does not match the model.
    """
    if is_export_archive(factory):
        loaded = _load_export(Path(factory))
    else:
        fn = resolve_import_path(str(factory), "--model")
        try:
            module = fn(**dict(args or {}))
        except Exception as exc:  # the user's factory may raise anything
            raise ValidationError(
                f"--model {factory!r}: the factory raised {first_line(exc)}"
            ) from None
        if not isinstance(module, nn.Module):
            raise ValidationError(
                f"--model {factory!r}: the factory must return a torch.nn.Module; "
                f"got {type(module).__name__}"
            )
        loaded = LoadedModel(module, str(factory), runs_code=True)
    if checkpoint is None:
        return loaded
    path = Path(checkpoint)
    original = read_checkpoint(path)
    if container is None:
        container = find_state_dict(original, path)
    state = original
    for key in container:
        state = state[key]
    load_state_strict(loaded.module, state, path, loaded.source)
    return LoadedModel(
        loaded.module,
        loaded.source,
        loaded.runs_code,
        path,
        container,
        original,
        loaded.exported,
        loaded.archive,
    )


def read_checkpoint(path: Path) -> Any:
    """``torch.load(path, weights_only=True)`` with one-line errors."""
    if not path.is_file():
        raise InputFileError(f"{path}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise InputFileError(
            f"{path}: refusing to load: the file contains pickled objects other than tensors; "
            "save the state dict (torch.save(model.state_dict(), path))"
        ) from None
    except Exception as exc:  # torch reports a damaged archive in many ways
        raise InputFileError(
            f"{path}: not a readable PyTorch checkpoint: {first_line(exc)}"
        ) from None


def _is_state(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and bool(obj)
        and all(isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items())
    )


def find_state_dict(obj: Any, path: Path) -> tuple[str, ...]:
    """Key path to the state dict: the top level, or one of :data:`STATE_KEYS`."""
    if _is_state(obj):
        return ()
    if isinstance(obj, Mapping):
        for key in STATE_KEYS:
            if _is_state(obj.get(key)):
                return (key,)
    raise InputFileError(
        f"{path}: no state dict found (expected a mapping of names to tensors, or one under "
        f"{', '.join(STATE_KEYS)})"
    )


def load_state_strict(module: nn.Module, state: Mapping[str, Any], path: Path, source: str) -> None:
    """``module.load_state_dict(state, strict=True)``, naming missing/unexpected/misshapen keys."""
    expected = module.state_dict()
    if all(k.startswith("module.") for k in state) and not any(
        k.startswith("module.") for k in expected
    ):
        state = {k.removeprefix("module."): v for k, v in state.items()}  # saved from DataParallel
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys {short(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {short(unexpected)}")
        if shapes:
            parts.append(f"shape mismatch {short(shapes, 3)} (file vs model)")
        raise InputFileError(f"{path}: does not match the model from {source}: {'; '.join(parts)}")
    try:
        module.load_state_dict(state, strict=True)
    except Exception as exc:  # dtype or custom load hooks
        raise InputFileError(f"{path}: cannot load into {source}: {first_line(exc)}") from None


def _load_export(path: Path) -> LoadedModel:
    if not path.is_file():
        raise InputFileError(f"{path}: no such file")
    try:
        program = torch.export.load(path)
    except Exception as exc:  # a damaged or foreign archive
        raise InputFileError(
            f"{path}: not a readable torch.export archive: {first_line(exc)}"
        ) from None
    module = module_from_export(program)
    return LoadedModel(module, path.name, runs_code=False, exported=program, archive=path)


class _ExportedBatchNorm(nn.modules.batchnorm._BatchNorm):
    """A BatchNorm of any rank rebuilt from an exported graph's ``batch_norm`` op."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2-D input (got {input.dim()}-D)")


class _FeatureDropout(nn.modules.dropout._DropoutNd):
    """Channel-wise dropout of any rank (``aten.feature_dropout``)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return torch.feature_dropout(input, self.p, self.training)


_EXPORT_DROPOUT: dict[str, Callable[[float], nn.Module]] = {
    "dropout": nn.Dropout,
    "feature_dropout": _FeatureDropout,
    "alpha_dropout": nn.AlphaDropout,
    "feature_alpha_dropout": nn.FeatureAlphaDropout,
}


def module_from_export(program: Any) -> fx.GraphModule:
    """The exported program as a ``GraphModule`` whose BatchNorm and dropout ops are modules.

    ``aten.batch_norm`` (and ``_native_batch_norm_legit_no_training``) become BatchNorm
    modules named after their parameters (``features.3``), sharing the exported tensors, so the
    state dict keys are unchanged; ``aten.dropout`` and friends become dropout modules named
    after their graph node. The graph itself is not otherwise changed.
    """
    gm: fx.GraphModule = program.module()
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        op = node.target._schema.name.split("::")[-1]
        if op in ("batch_norm", "_native_batch_norm_legit_no_training"):
            _replace_batchnorm(gm, node, op)
        elif op in _EXPORT_DROPOUT:
            name = _free_name(gm, node.name)
            gm.add_submodule(name, _EXPORT_DROPOUT[op](float(node.args[1])))
            with graph.inserting_before(node):
                new = graph.call_module(name, (node.args[0],))
            node.replace_all_uses_with(new)
            graph.erase_node(node)
    graph.eliminate_dead_code()
    gm.recompile()
    return gm


def _free_name(gm: nn.Module, base: str) -> str:
    name, i = base, 0
    while hasattr(gm, name):
        i += 1
        name = f"{base}_{i}"
    return name


def _replace_batchnorm(gm: fx.GraphModule, node: fx.Node, op: str) -> None:
    x, weight, bias, mean, var = node.args[:5]
    if op == "batch_norm":
        momentum, eps = node.args[6], node.args[7]
    else:
        momentum, eps = node.args[5], node.args[6]
    if not isinstance(mean, fx.Node) or mean.op != "get_attr":
        raise InputFileError(f"exported BatchNorm {node.name} has no stored running statistics")
    prefix = str(mean.target).rpartition(".")[0]
    running_mean = gm.get_buffer(str(mean.target))
    bn = _ExportedBatchNorm(
        running_mean.numel(),
        eps=float(cast(float, eps)),
        momentum=float(cast(float, momentum)),
        affine=weight is not None,
    )
    if isinstance(weight, fx.Node):
        bn.weight = nn.Parameter(_attr(gm, weight), requires_grad=False)
    if isinstance(bias, fx.Node):
        bn.bias = nn.Parameter(_attr(gm, bias), requires_grad=False)
    bn.running_mean = running_mean
    bn.running_var = _attr(gm, var)
    tracked = f"{prefix}.num_batches_tracked" if prefix else "num_batches_tracked"
    try:
        bn.num_batches_tracked = gm.get_buffer(tracked)
    except AttributeError:
        bn.num_batches_tracked = None
    bn.eval()
    _set_submodule(gm, prefix, bn)
    graph = gm.graph
    with graph.inserting_before(node):
        new = graph.call_module(prefix, (x,))
    if op == "batch_norm":
        node.replace_all_uses_with(new)
    else:  # returns (out, save_mean, save_rstd): only out is used in inference
        for user in list(node.users):
            user.replace_all_uses_with(new)
            graph.erase_node(user)
    graph.erase_node(node)


def _attr(gm: fx.GraphModule, node: Any) -> torch.Tensor:
    target = str(node.target)
    owner, _, leaf = target.rpartition(".")
    value = getattr(gm.get_submodule(owner) if owner else gm, leaf)
    if not isinstance(value, torch.Tensor):
        raise InputFileError(f"exported attribute {target} is not a tensor")
    return value.data if isinstance(value, nn.Parameter) else value


def _set_submodule(gm: nn.Module, name: str, module: nn.Module) -> None:
    owner, _, leaf = name.rpartition(".")
    parent = gm.get_submodule(owner) if owner else gm
    if leaf in parent._modules:
        del parent._modules[leaf]
    for store in (parent._parameters, parent._buffers):
        store.pop(leaf, None)
    if hasattr(parent, leaf):
        delattr(parent, leaf)
    parent.add_module(leaf, module)


def checkpoint_bytes(loaded: LoadedModel, module: nn.Module) -> bytes:
    """The bytes of the input written back with ``module``'s BatchNorm buffers.

    A checkpoint keeps its structure (training state, other entries) with only the BatchNorm
    buffers replaced (same dtype); without one, the state dict of ``module``; a ``.pt2``
    archive is saved again with the new buffers.
    """
    buffers = {
        f"{name}.{key}": t
        for name, bn in batchnorm_layers(module).items()
        for key, t in bn.named_buffers(recurse=False)
        if t is not None
    }
    buffer = io.BytesIO()
    if loaded.archive is not None and loaded.original is None:
        program = torch.export.load(loaded.archive)
        for key, value in buffers.items():
            if key in program.state_dict:
                program.state_dict[key].copy_(value)
        torch.export.save(program, buffer)
        return buffer.getvalue()
    if loaded.original is None:
        torch.save(module.state_dict(), buffer)
        return buffer.getvalue()
    out = copy.copy(loaded.original)
    node = out
    for key in loaded.container:
        node[key] = copy.copy(node[key])
        node = node[key]
    prefixed = all(k.startswith("module.") for k in node) and node
    for key, value in buffers.items():
        stored = f"module.{key}" if prefixed else key
        if stored in node:
            node[stored] = value.detach().to(device="cpu", dtype=node[stored].dtype).clone()
    torch.save(out, buffer)
    return buffer.getvalue()


# --- data --------------------------------------------------------------------------------------
