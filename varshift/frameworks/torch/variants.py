"""Model variants that ``recalibrate`` scores beside its own result: the data-free ``correct``
and an ``update_bn``-style recalibration with dropout on; and :func:`seeded`, the RNG fork
that makes the dropout-on passes repeatable."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator
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
    """A deep copy; torch's own deprecation warning from copying an exported GraphModule's
    tree specs (``LeafSpec``) is not the user's concern."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        return copy.deepcopy(model)


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
