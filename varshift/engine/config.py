"""The simulation's configuration (:class:`SimConfig`) and its validated, resolved :class:`Plan`.

Validation happens once, here, at the boundary: :func:`make_plan` checks every field of a
:class:`SimConfig` (messages name the parameter, the value and the rule) and resolves the
defaults that depend on the topology, the recorded data or the weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
from numpy.typing import ArrayLike, NDArray

from varshift.core.dropout import DEFAULT_KIND, Dropout
from varshift.core.errors import ValidationError
from varshift.core.presets import DEFAULT_FRAMEWORK, PRESETS, Preset
from varshift.core.theory import check_rho
from varshift.core.topology import (
    DEFAULT_TOPOLOGY,
    ENGINE_TOPOLOGIES,
    Topology,
    check_topology,
    with_field,
)
from varshift.core.topology import TOPOLOGIES as _RECORDS
from varshift.core.validate import (
    MAX_ELEMENTS,
    MAX_WORK,
    check_budget,
    check_choice,
    check_finite,
    check_int,
    check_magnitude,
    check_range,
)
from varshift.engine.inputs import INPUT_DISTS

FloatArray = NDArray[np.float64]

#: The topologies the engine runs (:data:`varshift.core.topology.ENGINE_TOPOLOGIES`).
TOPOLOGIES: tuple[str, ...] = ENGINE_TOPOLOGIES

DEFAULT_SAMPLES = 10_000
DEFAULT_FEATURES = 5
DEFAULT_WIDTH = 64
DEFAULT_SPATIAL = (4, 4)


@dataclass(frozen=True)
class SimConfig:
    """Everything one simulation run needs (validated by :func:`varshift.engine.simulate`).

    Attributes
    ----------
    rate, dropout, beta:
        Dropout rate (probability of dropping), kind (see :mod:`varshift.core.dropout`) and uout's
        half-width.
    preset:
        The BatchNorm convention (:func:`varshift.core.presets.resolve_preset`).
    batch_size:
        Rows per mini-batch (the last batch of an epoch may be smaller, see ``drop_last``).
    samples:
        Dataset rows. ``None``: 10000 for synthetic inputs, all rows of ``data`` when given; a
        number with ``data`` draws that many rows from ``data`` with replacement.
    epochs, steps:
        Passes over the dataset, or (if ``steps`` is set, which wins) the exact number of batches.
    drop_last:
        Drop the smaller last batch of each epoch instead of training on it.
    features:
        BN features: columns (``direct``), linear units (``linear``) or channels (``conv``).
        ``None``: 5, or what ``data``/``weights`` imply.
    input_dist, mean, std:
        Synthetic inputs: ``normal`` ``N(mean, std²)``, ``uniform`` with that mean and standard
        deviation, or ``relu``: ``max(0, z)`` with ``z ~ N(mean, std²)`` (what follows
        BN → ReLU; ``mean``/``std`` are the pre-activation's).
    data:
        Recorded dropout inputs instead of synthetic ones: ``(rows, features)`` for ``direct``,
        ``(rows, width)`` for ``linear``, ``(rows, C, H, W)`` for ``conv``.
    topology:
        ``direct`` (dropout → BN), ``linear`` (dropout → linear map of ``width`` inputs → BN over
        its ``features`` outputs) or ``conv`` (``(N, C, H, W)`` inputs, BN per channel over
        ``N·H·W``).
    width, rho, cos2, weights:
        ``linear`` only: inputs per unit (default 64), their pairwise correlation, the target
        ``cos²θ = (sum w)²/(d sum w²)`` of every unit's weights (``None``: i.i.d. normal
        weights), or explicit ``(features, width)`` weights.
    spatial, channelwise:
        ``conv`` only: ``(H, W)`` of each channel map (default 4×4) and whether one mask value
        covers a whole channel map of a sample (PyTorch ``Dropout2d``, Keras ``SpatialDropout2D``).
    fit, lr, probe:
        Also train BN's ``gamma, beta`` with Adam (learning rate ``lr``) to reproduce the clean
        input, with and without dropout, and predict the output for input ``probe`` at test time.
    chunk_elements:
        About how many numbers one streamed chunk holds (memory knob, not a result knob).
    """

    rate: float = 0.2
    dropout: str = DEFAULT_KIND
    beta: float = 0.1
    preset: Preset = PRESETS[DEFAULT_FRAMEWORK]
    batch_size: int = 32
    samples: int | None = None
    epochs: int = 10
    steps: int | None = None
    drop_last: bool = False
    features: int | None = None
    input_dist: str = "normal"
    mean: float = 0.0
    std: float = 1.0
    data: FloatArray | None = field(default=None, compare=False, repr=False)
    topology: str = DEFAULT_TOPOLOGY
    width: int | None = None
    rho: float = 0.0
    cos2: float | None = None
    weights: FloatArray | None = field(default=None, compare=False, repr=False)
    spatial: tuple[int, int] | None = None
    channelwise: bool = False
    fit: bool = False
    lr: float = 1e-3
    probe: float = 1.0
    chunk_elements: int = 1 << 18  # cache-sized chunks: faster than 1 << 20 (bench/)

    def __post_init__(self) -> None:
        """Refuse a preset given by name: a :class:`Preset` is needed (``PRESETS[name]``)."""
        got: object = self.preset
        if not isinstance(got, Preset):
            hint = (
                f"PRESETS[{got!r}]" if isinstance(got, str) and got in PRESETS else "PRESETS[name]"
            )
            raise ValidationError(
                f"preset must be a Preset (from varshift.core.presets, e.g. {hint}; names: "
                f"{', '.join(PRESETS)}); got {got!r}"
            )


class Plan(NamedTuple):
    """A validated, fully resolved :class:`SimConfig` (built by :func:`make_plan`)."""

    dropout: Dropout
    preset: Preset
    topology: str
    input_dist: str
    mean: float
    std: float
    rows: int  # N, dataset rows
    features: int  # F, BN features
    width: int  # d (linear); features otherwise
    spatial: tuple[int, int]  # (1, 1) unless conv
    channelwise: bool
    batch: int  # b, rows per full batch
    last: int  # rows in the smaller last batch (0: none / dropped)
    full_batches: int  # full batches per epoch
    steps: int  # T
    rho: float
    cos2: float | None
    data: FloatArray | None
    resample: bool
    weights: FloatArray | None
    fit: bool
    lr: float
    probe: float
    chunk_rows: int

    @property
    def topo(self) -> Topology:
        """The topology's registry record (:mod:`varshift.core.topology`)."""
        return _RECORDS[self.topology]

    @property
    def positions(self) -> int:
        """P: elements per channel in one row (H·W for conv, else 1)."""
        return self.spatial[0] * self.spatial[1]

    @property
    def per_epoch(self) -> int:
        """Batches per epoch."""
        return self.full_batches + (1 if self.last else 0)

    @property
    def used_rows(self) -> int:
        """Rows trained on per epoch."""
        return self.full_batches * self.batch + self.last

    @property
    def epochs(self) -> int:
        """Epochs started (the last may be partial when ``steps`` is set)."""
        return -(-self.steps // self.per_epoch)

    @property
    def row_shape(self) -> tuple[int, ...]:
        """Shape of one dataset row (the dropout input of one sample)."""
        if self.topo.spatial:
            return (self.features, *self.spatial)
        return (self.width,)

    @property
    def mask_shape(self) -> tuple[int, ...]:
        """Shape of one row's dropout noise (channel-wise: one value per channel)."""
        if self.topo.spatial and self.channelwise:
            return (self.features, 1, 1)
        return self.row_shape


def check_array(name: str, value: ArrayLike) -> FloatArray:
    """``value`` as a non-empty, finite float64 array (the message names ``name``)."""
    arr = np.asarray(value)
    if arr.dtype.kind not in "fiub":
        raise ValidationError(f"{name} must be numeric; got dtype {arr.dtype}")
    out = np.asarray(arr, dtype=np.float64)
    if out.size == 0:
        raise ValidationError(f"{name} must not be empty; got shape {out.shape}")
    bad = int(np.count_nonzero(~np.isfinite(out)))
    if bad:
        raise ValidationError(f"{name} must be finite; got {bad} NaN or infinite value(s)")
    return out


def _match(name: str, given: int | None, implied: int, source: str) -> int:
    if given is not None and given != implied:
        raise ValidationError(f"{name} must be {implied} to match {source}; got {given}")
    return implied


class _Shape(NamedTuple):
    """The dataset's layout as resolved so far (features and width may still be defaults)."""

    data: FloatArray | None
    rows: int
    features: int | None
    width: int | None
    spatial: tuple[int, int]


def _check_topology_options(config: SimConfig, topo: Topology) -> None:
    """Options that belong to one topology must not be set for another."""
    mixing, spatial = " or ".join(with_field("mixes")), " or ".join(with_field("spatial"))
    if config.channelwise and not topo.spatial:
        raise ValidationError(f"channelwise masks need the {spatial} topology; got {topo.name}")
    if not topo.mixes and (config.rho != 0.0 or config.cos2 is not None):
        raise ValidationError(f"rho and cos2 apply to the {mixing} topology only")
    if not topo.mixes and (config.weights is not None or config.width is not None):
        raise ValidationError(f"width and weights apply to the {mixing} topology only")
    if not topo.spatial and config.spatial is not None:
        raise ValidationError(f"spatial applies to the {spatial} topology only")


def _conv_data_shape(config: SimConfig, data: FloatArray) -> tuple[int, tuple[int, int]]:
    """Channels and ``(H, W)`` of recorded ``(rows, C, H, W)`` conv inputs."""
    if data.ndim != 4:
        raise ValidationError(
            f"data must be 4-D (rows, channels, height, width) for the conv topology; "
            f"got shape {data.shape}"
        )
    features = _match("features", config.features, data.shape[1], "the data's channels")
    sh, sw = int(data.shape[2]), int(data.shape[3])
    if config.spatial is not None and tuple(config.spatial) != (sh, sw):
        raise ValidationError(
            f"spatial must be {sh}x{sw} to match the data; got "
            f"{config.spatial[0]}x{config.spatial[1]}"
        )
    return features, (sh, sw)


def _shape_from_data(config: SimConfig, topo: Topology, data: FloatArray) -> _Shape:
    """Features, width and spatial size implied by recorded inputs."""
    features, width, spatial = config.features, config.width, (1, 1)
    if topo.spatial:
        features, spatial = _conv_data_shape(config, data)
    else:
        if data.ndim == 1:
            data = data[:, None]
        if data.ndim != 2:
            cols = "width" if topo.mixes else "features"
            raise ValidationError(
                f"data must be 2-D (rows, {cols}) for the {topo.name} topology; "
                f"got shape {data.shape}"
            )
        if topo.mixes:
            width = _match("width", width, data.shape[1], "the data's columns")
        else:
            features = _match("features", features, data.shape[1], "the data's columns")
    rows = data.shape[0] if config.samples is None else config.samples
    return _Shape(data, rows, features, width, spatial)


def _synthetic_shape(config: SimConfig, topo: Topology) -> _Shape:
    """Rows and spatial size of synthetic inputs."""
    rows = DEFAULT_SAMPLES if config.samples is None else config.samples
    spatial = (1, 1)
    if topo.spatial:
        sp = DEFAULT_SPATIAL if config.spatial is None else config.spatial
        spatial = (check_int("height", sp[0], 1), check_int("width_px", sp[1], 1))
    return _Shape(None, rows, config.features, config.width, spatial)


class _Linear(NamedTuple):
    """The ``linear`` topology's resolved unit: explicit weights or target ``cos2``, and ``rho``."""

    weights: FloatArray | None
    features: int | None
    width: int
    cos2: float | None
    rho: float


def _linear_unit(config: SimConfig, shape: _Shape) -> _Linear:
    """Validate the linear map's weights, width, ``cos2`` and ``rho``."""
    features, width, weights = shape.features, shape.width, None
    if config.weights is not None:
        weights = check_array("weights", config.weights)
        if weights.ndim == 1:
            weights = weights[None, :]
        if weights.ndim != 2:
            raise ValidationError(
                f"weights must be 2-D (features, width) or 1-D (width,); got shape {weights.shape}"
            )
        features = _match("features", features, weights.shape[0], "the weights' rows")
        width = _match("width", width, weights.shape[1], "the weights' columns")
        if config.cos2 is not None:
            raise ValidationError("give either weights or cos2, not both")
    width = check_int("width", DEFAULT_WIDTH if width is None else width, 1)
    cos2 = None
    if config.cos2 is not None:
        cos2 = check_range("cos2", config.cos2, 0.0, 1.0)
        if width == 1 and cos2 != 1.0:
            raise ValidationError(f"cos2 must be 1 for width 1 (one weight); got {cos2:g}")
    if shape.data is not None and config.rho != 0.0:
        raise ValidationError("rho applies to synthetic inputs; data bring their own")
    return _Linear(weights, features, width, cos2, check_rho(config.rho, width))


class _Layout(NamedTuple):
    """The dataset's resolved layout and, for ``linear``, its unit."""

    data: FloatArray | None
    rows: int
    features: int
    width: int
    spatial: tuple[int, int]
    rho: float = 0.0
    cos2: float | None = None
    weights: FloatArray | None = None


def _layout(config: SimConfig, topo: Topology) -> _Layout:
    """Validate the data or synthetic shape, the linear unit, and resolve the defaults."""
    data = None if config.data is None else check_array("data", config.data)
    if data is None:
        shape = _synthetic_shape(config, topo)
    else:
        shape = _shape_from_data(config, topo, data)
    rows = check_int("samples", shape.rows, 1)
    unit = _linear_unit(config, shape) if topo.mixes else None
    given = shape.features if unit is None else unit.features
    features = check_int("features", DEFAULT_FEATURES if given is None else given, 1)
    if unit is None:
        return _Layout(shape.data, rows, features, features, shape.spatial)
    return _Layout(
        shape.data, rows, features, unit.width, shape.spatial, unit.rho, unit.cos2, unit.weights
    )


def _epoch_batches(
    config: SimConfig, preset: Preset, batch: int, rows: int, positions: int
) -> tuple[int, int]:
    """Full batches per epoch and rows of the smaller last one (0: none, or dropped)."""
    if batch > rows:
        raise ValidationError(f"batch_size must be <= samples ({rows}); got {batch}")
    preset.check_batch(batch * positions, "batch_size")
    full, rest = divmod(rows, batch)
    last = 0 if config.drop_last else rest
    need = preset.estimator.min_batch
    if last and last * positions < need:
        raise ValidationError(
            f"the last batch of each epoch would hold {last} row ({rows} samples, batch_size "
            f"{batch}); {preset.name} stores the {preset.estimator.name} variance, which needs "
            f">= {need} elements: use drop_last (--drop-last) or another batch size"
        )
    return full, last


def _check_budget(rows: int, row_elems: int, batch: int, steps: int) -> None:
    """Refuse, before anything runs, a simulation that would not fit in memory or would run
    for hours (``MAX_ELEMENTS``, ``MAX_WORK`` of :mod:`varshift.core.validate`)."""
    check_budget(
        "the samples in memory (samples × values per row)",
        rows * row_elems,
        MAX_ELEMENTS,
        "reduce --samples, --features, --width or --spatial",
    )
    check_budget(
        "the work (steps × batch × values per row)",
        steps * batch * row_elems,
        MAX_WORK,
        "reduce --epochs, --steps or the batch and row size",
    )


def make_plan(config: SimConfig) -> Plan:
    """Validate ``config`` at the boundary and resolve its defaults.

    Raises
    ------
    ValidationError
        If a field is out of range or inconsistent with another (the message names it).
    """
    dropout = Dropout(config.dropout, config.rate, config.beta)
    preset = config.preset
    topology = check_topology(config.topology, TOPOLOGIES)
    topo = _RECORDS[topology]
    input_dist = check_choice("input_dist", config.input_dist, INPUT_DISTS)
    mean = check_magnitude("mean", config.mean)
    std = check_magnitude("std", config.std, nonnegative=True)
    batch = check_int("batch_size", config.batch_size, 1)
    epochs = check_int("epochs", config.epochs, 1)
    steps = None if config.steps is None else check_int("steps", config.steps, 1)
    chunk = check_int("chunk_elements", config.chunk_elements, 1)
    _check_topology_options(config, topo)

    layout = _layout(config, topo)
    features, width, spatial, rows = layout.features, layout.width, layout.spatial, layout.rows
    full, last = _epoch_batches(config, preset, batch, rows, spatial[0] * spatial[1])
    per_epoch = full + (1 if last else 0)
    if config.fit and not topo.fit:
        fits = " or ".join(with_field("fit"))
        raise ValidationError(f"fit needs the {fits} topology; got {topology}")
    lr = check_range("lr", config.lr, 0.0, None, closed="neither")
    probe = check_finite("probe", config.probe)

    row_elems = math.prod((features, *spatial)) if topo.spatial else width + features
    total_steps = epochs * per_epoch if steps is None else steps
    _check_budget(rows, row_elems, batch, total_steps)
    return Plan(
        dropout=dropout,
        preset=preset,
        topology=topology,
        input_dist=input_dist,
        mean=mean,
        std=std,
        rows=rows,
        features=features,
        width=width,
        spatial=spatial,
        channelwise=bool(config.channelwise),
        batch=batch,
        last=last,
        full_batches=full,
        steps=total_steps,
        rho=layout.rho,
        cos2=layout.cos2,
        data=layout.data,
        resample=layout.data is not None and config.samples is not None,
        weights=layout.weights,
        fit=bool(config.fit),
        lr=lr,
        probe=probe,
        chunk_rows=max(batch, (chunk // max(row_elems, 1)) // batch * batch),
    )
