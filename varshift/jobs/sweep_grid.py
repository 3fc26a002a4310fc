"""The grid of ``varshift sweep``: its configuration, validation and points, and the axes as
the command line writes them (``--rate 0.1:0.9:0.1``, :mod:`varshift.jobs.axes`).

Which axes apply follows the topology's registry record (:mod:`varshift.core.topology`): the
width, ``D`` and ``rho`` axes describe a topology that ``mixes`` its inputs through a linear unit.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

from varshift.core.dropout import DEFAULT_KIND, DROPOUT_KINDS
from varshift.core.errors import ValidationError
from varshift.core.presets import DEFAULT_FRAMEWORK, FRAMEWORKS
from varshift.core.topology import (
    DEFAULT_TOPOLOGY,
    THEORY_TOPOLOGIES,
    TOPOLOGIES,
    check_topology,
    with_field,
)
from varshift.core.validate import (
    MAX_WORK,
    check_choice,
    check_finite,
    check_int,
    check_range,
)
from varshift.jobs.axes import clean_number, parse_axis, parse_choices
from varshift.jobs.sweep_points import GridPoint

#: Grids with more points than this need ``force=True`` (``--force``).
MAX_POINTS = 10_000

#: The most points any grid may have, also with ``force``: each point's row, record and table
#: cell take ~2 KB, so this is ~2 GiB of memory.
HARD_MAX_POINTS = 2**20

#: The most values a simulated sweep may push through the engine in total (Σ over points and
#: replicates of steps × batch × values per row) without ``force``: the budget of one
#: simulation (:data:`varshift.core.validate.MAX_WORK`, tens of minutes on one core).
#: ``force`` lifts it; each point's simulation stays within the engine's own limits.
MAX_SWEEP_WORK = MAX_WORK


@dataclass(frozen=True)
class SweepConfig:
    """A grid of variance-shift evaluations.

    Each ``*s`` field is one axis; the grid is their Cartesian product, in the order dropout,
    framework, batch size, mean, variance, rho, width, D, rate (rate varies fastest).

    Attributes
    ----------
    rates:
        Dropout rates (probability of dropping), each in ``[0, 1)``.
    dropouts, frameworks:
        Dropout kinds (:data:`varshift.core.dropout.DROPOUT_KINDS`) and BatchNorm presets.
    batch_sizes:
        ``n``, elements reduced per channel in one batch.
    means, variances:
        Mean ``c`` and population variance ``v`` of the dropout input.
    topology:
        ``direct`` (dropout → BN, case (a)) or ``linear`` (dropout → linear unit → BN, case (b)
        in the paper's equicorrelated form).
    rhos:
        Linear only: pairwise correlation of the unit's inputs.
    widths:
        Linear only: inputs per unit ``d``. Empty: ``ceil(D)`` when ``Ds`` is given (the
        smallest width that admits that ``D``), else 1.
    Ds:
        Linear only: ``D = d cos²θ = (sum w)²/sum w²``. Empty: ``D = d * cos2``.
    cos2:
        ``cos²θ`` used when ``Ds`` is empty.
    beta:
        Half-width of uout's noise (uout ignores the rate).
    momentum:
        In each framework's own meaning; ``"default"`` keeps every framework's default.
    steps:
        ``T``, training updates of the running statistics.
    simulate:
        Also run the Monte Carlo at every point (needs :mod:`varshift.engine.simulate`).
    reps:
        ``direct`` topology: independent BN features simulated per point (each with its own
        data and noise); standard errors are their spread over ``sqrt(reps)``. The linear
        topology simulates one unit per point (see :func:`simulate_point`).
    workers:
        Processes for the Monte Carlo; the numbers do not depend on it.
    seeds:
        ``simulate``: replicates per grid point, each on its own stream; more than one reports
        the mean and spread over seeds (:mod:`varshift.jobs.replicates`).
    scheduler:
        ``simulate``: run on the Dask cluster at this address instead of local processes
        (:mod:`varshift.jobs.executor`); the numbers do not depend on it.
    max_points:
        Largest grid allowed without ``force``.
    """

    rates: tuple[float, ...] = (0.5,)
    dropouts: tuple[str, ...] = (DEFAULT_KIND,)
    frameworks: tuple[str, ...] = (DEFAULT_FRAMEWORK,)
    batch_sizes: tuple[int, ...] = (32,)
    means: tuple[float, ...] = (0.0,)
    variances: tuple[float, ...] = (1.0,)
    topology: str = DEFAULT_TOPOLOGY
    rhos: tuple[float, ...] = (0.0,)
    widths: tuple[int, ...] = ()
    Ds: tuple[float, ...] = ()
    cos2: float = 1.0
    beta: float = 0.1
    momentum: float | str | None = "default"
    steps: int = 1000
    simulate: bool = False
    reps: int = 256
    workers: int = 1
    max_points: int = MAX_POINTS
    force: bool = False
    seeds: int = 1
    scheduler: str | None = None

    @property
    def n_points(self) -> int:
        """Number of grid points (computed without building the grid)."""
        return math.prod(len(axis) for axis in self._product_axes())

    def _product_axes(self) -> tuple[Sequence[Any], ...]:
        """The axes whose Cartesian product is the grid, in grid order (rate varies fastest).

        Empty ``widths`` or ``Ds`` stand as one unset value, ``None`` (see :func:`grid_points`).
        """
        return (
            self.dropouts,
            self.frameworks,
            self.batch_sizes,
            self.means,
            self.variances,
            self.rhos,
            self.widths or (None,),
            self.Ds or (None,),
            self.rates,
        )


# --- the grid -------------------------------------------------------------------------------


def validated(config: SweepConfig) -> SweepConfig:
    """Check every axis once, before any work; return the config with normalised names."""
    check_topology(config.topology, THEORY_TOPOLOGIES)
    _check_axes(config)
    if config.seeds > 1 and not config.simulate:
        raise ValidationError(f"seeds > 1 needs simulate (--simulate); got seeds {config.seeds}")
    if not TOPOLOGIES[config.topology].mixes and (
        config.widths or config.Ds or any(r != 0.0 for r in config.rhos)
    ):
        owners = " or ".join(with_field("mixes"))
        raise ValidationError(
            f"width, D and rho describe the {owners} topology; got them with topology "
            f"{config.topology!r}"
        )
    n = config.n_points
    if n > HARD_MAX_POINTS:
        raise ValidationError(
            f"the grid has {n} points, more than the ceiling of {HARD_MAX_POINTS} (~2 KB of "
            "memory each, also with force=True); narrow an axis"
        )
    if n > config.max_points and not config.force:
        raise ValidationError(
            f"the grid has {n} points, more than the limit of {config.max_points}; "
            "pass force=True to run it anyway, or narrow an axis"
        )
    work = simulation_work(config)
    if work > MAX_SWEEP_WORK and not config.force:
        raise ValidationError(
            f"the simulated sweep would push {work:.3g} values through the engine (Σ steps × "
            f"batch × values per row over {n} points × {config.seeds} seed(s)); at most "
            f"{MAX_SWEEP_WORK:.3g}: pass force=True to run it anyway, or reduce steps, reps, "
            "batch sizes or the grid"
        )
    return replace(
        config,
        dropouts=tuple(check_choice("dropout", d, DROPOUT_KINDS) for d in config.dropouts),
        frameworks=tuple(check_choice("framework", f, FRAMEWORKS) for f in config.frameworks),
        batch_sizes=tuple(int(b) for b in config.batch_sizes),
        widths=tuple(int(w) for w in config.widths),
        rates=tuple(float(r) for r in config.rates),
        means=tuple(float(m) for m in config.means),
        variances=tuple(float(v) for v in config.variances),
        rhos=tuple(float(r) for r in config.rhos),
        Ds=tuple(float(d) for d in config.Ds),
    )


def simulation_work(config: SweepConfig) -> float:
    """The values a simulated sweep pushes through the engine: Σ over points and replicates of
    steps × batch × values per row (``reps`` features, or the linear unit's width); 0 without
    ``simulate``. In closed form, without building the grid."""
    if not config.simulate:
        return 0.0
    w_axis, d_axis = config.widths or (None,), config.Ds or (None,)
    if not TOPOLOGIES[config.topology].mixes:
        row_sum = float(config.reps * len(w_axis) * len(d_axis))
    elif config.widths:
        row_sum = float(len(d_axis) * sum(config.widths))
    else:
        row_sum = float(sum(max(1, math.ceil(d - 1e-9)) for d in config.Ds) or 1)
    rest = config.n_points / (len(config.batch_sizes) * len(w_axis) * len(d_axis))
    per_step = float(sum(config.batch_sizes)) * row_sum * rest
    return float(config.steps) * config.seeds * per_step


def _check_axes(config: SweepConfig) -> None:
    """Every axis non-empty and every value in its range (messages name the axis)."""
    for name, axis in (
        ("rate", config.rates),
        ("dropout", config.dropouts),
        ("framework", config.frameworks),
        ("batch_size", config.batch_sizes),
        ("mean", config.means),
        ("var", config.variances),
        ("rho", config.rhos),
    ):
        if not axis:
            raise ValidationError(f"{name} must have at least one value; got none")
    for r in config.rates:
        check_range("rate", r, 0.0, 1.0, closed="left")
    for m in config.means:
        check_finite("mean", m)
    for v in config.variances:
        check_range("var", v, 0.0, None)
    for w in config.widths:
        check_int("width", w, 1)
    for d in config.Ds:
        check_range("D", d, 0.0, None)
    for b in config.batch_sizes:
        check_int("batch_size", b, 1)
    check_range("cos2", config.cos2, 0.0, 1.0)
    check_range("beta", config.beta, 0.0, None)
    check_int("steps", config.steps, 0)
    check_int("reps", config.reps, 2)
    if config.simulate:
        check_int("steps", config.steps, 1)
    check_int("workers", config.workers, 1)
    check_int("seeds", config.seeds, 1)


def grid_points(config: SweepConfig) -> Iterator[GridPoint]:
    """The grid points of ``config`` in order (rate varies fastest), without evaluating them."""
    linear = TOPOLOGIES[config.topology].mixes
    product = itertools.product(*config._product_axes())
    for i, (drop, fw, n, c, v, rho, w, d, rate) in enumerate(product):
        if not linear:
            width, d_eff = 1, 1.0
        elif d is None:
            width = w if w is not None else 1
            d_eff = clean_number(width * config.cos2)
        else:
            width = w if w is not None else max(1, math.ceil(d - 1e-9))
            d_eff = d
        yield GridPoint(i, drop, fw, int(n), c, v, config.topology, rho, width, d_eff, rate)


def varying_axes(config: SweepConfig) -> tuple[str, ...]:
    """Names of the row columns that take more than one value in this grid."""
    axes = [
        ("dropout", config.dropouts),
        ("framework", config.frameworks),
        ("batch_size", config.batch_sizes),
        ("mean", config.means),
        ("var", config.variances),
        ("rho", config.rhos),
        ("width", config.widths),
        ("D", config.Ds or (config.widths if TOPOLOGIES[config.topology].mixes else ())),
        ("rate", config.rates),
    ]
    return tuple(name for name, values in axes if len(values) > 1)


def axes_config(
    *,
    rate: Sequence[str] | None = None,
    dropout: Sequence[str] | None = None,
    framework: Sequence[str] | None = None,
    batch_size: Sequence[str] | None = None,
    mean: Sequence[str] | None = None,
    var: Sequence[str] | None = None,
    std: Sequence[str] | None = None,
    topology: str | None = None,
    width: Sequence[str] | None = None,
    D: Sequence[str] | None = None,
    rho: Sequence[str] | None = None,
    **settings: Any,
) -> SweepConfig:
    """A :class:`SweepConfig` from axis texts as the command line takes them (``--rate``...).

    ``std`` replaces ``var`` (variances ``std²``); the topology defaults to ``linear`` when a
    width, ``D`` or ``rho`` axis is given; ``settings`` are the other fields of the config.
    """
    if std is not None and var is not None:
        raise ValidationError("give either --var or --std, not both")
    if std is not None:
        variances = tuple(check_range("--std", s, 0.0, None) ** 2 for s in parse_axis("--std", std))
    else:
        variances = parse_axis("--var", var or ["1"])
    linear_axes = width is not None or D is not None or rho is not None
    mixing = with_field("mixes")
    topo = topology if topology is not None else (mixing[0] if linear_axes else DEFAULT_TOPOLOGY)
    check_topology(topo, THEORY_TOPOLOGIES, "--topology")
    if linear_axes and not TOPOLOGIES[topo].mixes:
        raise ValidationError(
            f"--width, --D and --rho need --topology {' or '.join(mixing)}; got {topo}"
        )
    return SweepConfig(
        rates=parse_axis("--rate", rate or ["0.1:0.9:0.1"]),
        dropouts=parse_choices("--dropout", dropout or [DEFAULT_KIND], DROPOUT_KINDS),
        frameworks=parse_choices("--framework", framework or [DEFAULT_FRAMEWORK], FRAMEWORKS),
        batch_sizes=tuple(
            int(b) for b in parse_axis("--batch-size", batch_size or ["32"], integer=True)
        ),
        means=parse_axis("--mean", mean or ["0"]),
        variances=variances,
        topology=topo,
        rhos=parse_axis("--rho", rho or ["0"]),
        widths=tuple(int(w) for w in parse_axis("--width", width, integer=True)) if width else (),
        Ds=parse_axis("--D", D) if D else (),
        **settings,
    )
