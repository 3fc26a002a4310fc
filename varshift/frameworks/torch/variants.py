"""Model variants that ``recalibrate`` scores beside its own result: the data-free ``correct``
and an ``update_bn``-style recalibration with dropout on; and :func:`seeded`, the RNG fork
that makes the dropout-on passes repeatable."""

from __future__ import annotations

import copy
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn

from varshift.core.dropout import Dropout
from varshift.core.errors import ValidationError
from varshift.core.presets import resolve_preset
from varshift.core.theory import corrected_variance
from varshift.frameworks.torch.graph import ModelGraph, batchnorm_layers
from varshift.frameworks.torch.stream import all_train, forward, placement

#: Seed of the dropout-on passes' masks (diagnose, and recalibrate's update_bn row).
DEFAULT_SEED = 0


def _np(t: torch.Tensor | None) -> np.ndarray[Any, np.dtype[np.float64]] | None:
    return None if t is None else t.detach().to(device="cpu", dtype=torch.float64).numpy().copy()


def copy_model(model: nn.Module) -> nn.Module:
    """A deep copy, equal to ``copy.deepcopy(model)``.

    A model built of plain modules (:func:`_plain_copy`) is copied directly, 1.5-3× faster
    than ``copy.deepcopy``'s generic walk (measured: the benchmark's 4-block 512-wide MLP,
    2.2-3.8 ms against 4.6-6.7 ms, much of it the 4.5 MB of weights; its CNN, 1.1-1.3 ms
    against 3.0-3.6 ms); anything else goes through ``copy.deepcopy``, whose deprecation
    warning from copying an exported GraphModule's tree specs (``LeafSpec``) is not the user's
    concern."""
    try:
        return _plain_copy(model)
    except _NotPlain:
        pass
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        return copy.deepcopy(model)


class _NotPlain(Exception):
    """The model holds something :func:`_plain_copy` does not copy exactly."""


#: Attribute values a module shares with its deep copy (deepcopy returns them as they are).
_ATOMS = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device)
_DICTS = (dict, OrderedDict)


def _none_or(copy_one: Callable[[Any], Any], value: Any) -> Any:
    return None if value is None else copy_one(value)


def _atom(value: Any) -> bool:
    if isinstance(value, tuple):
        return all(_atom(v) for v in value)
    return type(value) in _ATOMS


def _plain_copy(model: nn.Module) -> nn.Module:
    """What ``copy.deepcopy`` makes of ``model``, for a model whose modules pickle the
    standard way (``nn.Module.__getstate__``, no ``__deepcopy__``, ``__reduce_ex__``,
    ``__reduce__`` or ``__slots__`` of their own), whose other attributes are immutable
    scalars, strings, dtypes, devices and tuples or lists of them, empty hook dictionaries
    and the set of non-persistent buffer names, and whose parameters (exactly
    ``nn.Parameter``) and buffers (exactly ``torch.Tensor``, without gradient), all dense,
    contiguous leaves without attributes, share no storage except by being the same tensor.
    Raises :class:`_NotPlain` otherwise.

    Each module is rebuilt as deepcopy rebuilds it (``cls.__new__``, then the class's
    ``__setstate__`` of the copied state); a parameter is ``Parameter(p.data.clone(),
    p.requires_grad)``, its ``__deepcopy__``; tied weights and shared modules stay shared
    (one memo by ``id``).
    """
    return _PlainCopy().module(model)


class _PlainCopy:
    """One copy's memo (by ``id``, as deepcopy's) and the storages already copied."""

    def __init__(self) -> None:
        self.memo: dict[int, Any] = {}
        self.storages: set[int] = set()

    def tensor(self, t: torch.Tensor) -> torch.Tensor:
        done = self.memo.get(id(t))
        if done is not None:
            return done  # type: ignore[no-any-return]
        plain = (
            t.layout == torch.strided
            and t.is_leaf
            and not t.is_quantized
            and t.device.type in ("cpu", "cuda")
            and not t.__dict__
            and (type(t) is nn.Parameter or (type(t) is torch.Tensor and t.grad is None))
            and (t.is_contiguous() and t.storage_offset() == 0)
        )
        key = t.untyped_storage().data_ptr() if plain and t.numel() else None
        if not plain or (key is not None and key in self.storages):
            raise _NotPlain
        if key is not None:
            self.storages.add(key)
        with torch.no_grad():
            data = t.detach().clone(memory_format=torch.preserve_format)
        out = nn.Parameter(data, t.requires_grad) if type(t) is nn.Parameter else data
        if type(t) is torch.Tensor:
            out.requires_grad_(t.requires_grad)
        self.memo[id(t)] = out
        return out

    def module(self, m: nn.Module) -> nn.Module:
        done = self.memo.get(id(m))
        if done is not None:
            return done  # type: ignore[no-any-return]
        cls = type(m)
        if (
            cls.__getstate__ is not nn.Module.__getstate__
            or cls.__reduce_ex__ is not object.__reduce_ex__
            or cls.__reduce__ is not object.__reduce__
            or hasattr(cls, "__deepcopy__")
            or any("__slots__" in vars(k) for k in cls.__mro__[:-1])
        ):
            raise _NotPlain
        new = cls.__new__(cls)
        self.memo[id(m)] = new
        state: dict[str, Any] = {}
        for key, value in m.__getstate__().items():  # type: ignore[no-untyped-call]
            if key in ("_parameters", "_buffers") and type(value) in _DICTS:
                state[key] = type(value)((n, _none_or(self.tensor, t)) for n, t in value.items())
            elif key == "_modules" and type(value) in _DICTS:
                state[key] = type(value)((n, _none_or(self.module, c)) for n, c in value.items())
            elif key == "_non_persistent_buffers_set" and type(value) is set:
                state[key] = set(value)
            elif type(value) in _DICTS and not value:  # hooks: none registered
                state[key] = type(value)()
            elif type(value) is list and _atom(tuple(value)):  # e.g. a conv's padding
                state[key] = list(value)
            elif _atom(value):
                state[key] = value
            else:
                raise _NotPlain
        new.__setstate__(state)  # type: ignore[no-untyped-call]
        return new


@contextmanager
def seeded(seed: int, model: nn.Module | None = None) -> Iterator[None]:
    """Run the body with torch's RNG seeded by ``seed`` (CPU, and the CUDA devices the model
    is on), restoring the caller's RNG state afterwards (``torch.random.fork_rng``)."""
    devices: list[int] = []
    if model is not None:
        place = placement(model)[0]
        if place.type == "cuda":
            devices = [place.index or 0]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def correct_data_free(
    model: nn.Module, graph: ModelGraph, example: torch.Tensor | None = None
) -> tuple[nn.Module, tuple[str, ...]]:
    """A copy corrected as ``varshift correct --model`` would, data-free, by BN class: direct
    layers get the debiased direct formula, element-wise through-linear layers lose the
    dropout term with the Gaussian ``E[x²]`` of the feeding BN, every other layer (stacked,
    channel-wise, none) is left. ``example`` (a batch) gives the convolutions' input sizes.
    Channels that come out ≤ 0 are set to the layer's eps, with a note."""
    from varshift.core.structure import dropout_term, gaussian_second_moment
    from varshift.frameworks.torch.structure import layer_structures

    out = copy_model(model)
    bns = batchnorm_layers(out)
    buffers = [m.running_mean for m in bns.values() if m.running_mean is not None]
    if example is not None and buffers:
        example = example.to(buffers[0].device)
    structures = layer_structures(out, graph, example)
    preset = resolve_preset("torch")
    notes = []
    for path in graph.layers:
        m: Any = bns.get(path.layer)
        s = structures.get(path.layer)
        if m is None or path.dropout is None or s is None or not m.track_running_stats:
            continue
        stored_mean, stored_var = _np(m.running_mean), _np(m.running_var)
        assert stored_mean is not None and stored_var is not None
        if s.kind == "direct":
            dropout = Dropout(path.dropout.kind, path.dropout.rate)
            mean, var = corrected_variance(stored_mean, stored_var, dropout, preset)
        elif (
            s.kind == "through-linear"
            and s.dropout_kind == "bernoulli"
            and not s.channelwise
            and s.weight is not None
            and s.feeder is not None
            and s.rate is not None
        ):
            try:
                ex2 = gaussian_second_moment(s.activation, *s.feeder.output_moments())
                term = dropout_term(s.weight, ex2, s.rate, s.conv, s.layout)
            except (ValueError, ValidationError):
                continue
            if term.shape != stored_var.shape:
                continue
            mean, var = stored_mean, stored_var - term
        else:
            continue
        bad = ~(var > 0)
        if bad.any():
            notes.append(f"correct: {path.layer}: {int(bad.sum())} channel(s) ≤ 0 set to eps")
        var = np.where(bad, m.eps, var)
        with torch.no_grad():
            m.running_mean.copy_(torch.from_numpy(np.asarray(mean)).to(m.running_mean))
            m.running_var.copy_(torch.from_numpy(np.asarray(var)).to(m.running_var))
    return out, tuple(notes)


def first_inputs(data: Any) -> torch.Tensor | None:
    """The first batch's inputs (two samples), for the convolutions' input sizes."""
    for x, _ in data:
        return x[:2] if isinstance(x, torch.Tensor) else None
    return None


def update_bn_like(model: nn.Module, batches: Any, seed: int = DEFAULT_SEED) -> nn.Module:
    """A copy recalibrated as ``torch.optim.swa_utils.update_bn`` does: statistics reset,
    ``momentum=None`` (cumulative average of unbiased batch variances), every module in
    training mode — dropout **on**, so the shift is recorded again. The dropout masks come
    from ``seed``; the caller's global RNG state is left as it was."""
    out = copy_model(model)
    bns = batchnorm_layers(out)
    momenta = {}
    for name, m in bns.items():
        if m.track_running_stats:
            m.reset_running_stats()
            momenta[name] = m.momentum
            m.momentum = None
    with all_train(out), torch.no_grad(), seeded(seed, out):
        place = placement(out)
        for x, _ in batches:
            forward(out, x, place)
    for name, momentum in momenta.items():
        bns[name].momentum = momentum
    return out
