"""Grids of closed-form (and, optionally, simulated) variance shifts: ``varshift sweep``.

A sweep is the Cartesian product of a few axes — dropout kind, framework preset, batch size,
input mean and variance, correlation ``rho``, width ``d`` or ``D = d cos²θ``, and the dropout
rate — evaluated point by point. Each grid point gives one row of a tidy table: its coordinates,
then what :func:`varshift.core.theory.theory_table` computes there (train and test variance, shift
ratio ``Delta``, the expected stored running variance and its noise), then, with
``simulate=True``, the Monte Carlo estimates and their z-scores.

Axes are written as comma lists and inclusive ranges (:mod:`varshift.jobs.axes`); the Monte
Carlo per point, reproducible whatever the number of processes, is in
:mod:`varshift.jobs.sweep_points`.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from varshift.core.dropout import DROPOUT_KINDS, Dropout
from varshift.core.errors import ValidationError
from varshift.core.presets import FRAMEWORKS, Preset, resolve_preset
from varshift.core.theory import TheoryConfig, check_rho, shift_direct, theory_table
from varshift.core.validate import check_choice, check_finite, check_int, check_range
from varshift.jobs._meta import run_metadata
from varshift.jobs.axes import MAX_AXIS_VALUES, clean_number, parse_axis, parse_choices
from varshift.jobs.executor import make_executor
from varshift.jobs.store import ResultStore, run_tasks
from varshift.jobs.sweep_points import (
    GridPoint,
    Progress,
    SimStats,
    _ratio,
    _seed_sequence,
    _SimTask,
    map_points,
    simulate_point,
)

#: Grids with more points than this need ``force=True`` (``--force``).
MAX_POINTS = 10_000

__all__ = [
    "MAX_AXIS_VALUES",
    "MAX_POINTS",
    "GridPoint",
    "SimStats",
    "SweepConfig",
    "SweepResult",
    "SweepRow",
    "axes_config",
    "grid_points",
    "map_points",
    "parse_axis",
    "parse_choices",
    "run_sweep",
    "simulate_point",
    "sweep",
    "sweep_parameters",
]


# --- configuration and results --------------------------------------------------------------


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
    dropouts: tuple[str, ...] = ("bernoulli",)
    frameworks: tuple[str, ...] = ("torch",)
    batch_sizes: tuple[int, ...] = (32,)
    means: tuple[float, ...] = (0.0,)
    variances: tuple[float, ...] = (1.0,)
    topology: str = "direct"
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


@dataclass(frozen=True)
class SweepRow(GridPoint):
    """One row of the tidy sweep table: coordinates, closed forms, then (optionally) Monte Carlo.

    The coordinates are the fields of :class:`GridPoint`, first and in its order.
    Variances are population variances except ``stored_batch_var`` and ``running_var``, which
    follow the framework's stored convention (biased or unbiased batch variance).
    ``shift_ratio`` is ``Delta = test_var / train_var``; ``recorded_ratio = test_var /
    running_var`` is what the layer meets at test time after ``steps`` updates (it differs from
    ``Delta`` by the stored-variance bias ``(n-1)/n`` and the initial value's residual weight).
    ``sim_*`` are Monte Carlo estimates (:class:`SimStats`); ``z_running_var`` and
    ``z_shift_ratio`` compare them with ``running_var`` and ``recorded_ratio`` in standard
    errors. Every ``sim_*``/``z_*`` field is ``None`` when the sweep was not simulated.
    """

    keep: float
    kappa: float | None
    alpha: float | None
    steps: int
    train_var: float
    test_var: float
    shift_ratio: float
    inverse_ratio: float
    stored_batch_var: float
    running_var: float
    running_var_sd: float
    recorded_ratio: float
    sim_test_var: float | None = None
    sim_test_var_se: float | None = None
    sim_running_var: float | None = None
    sim_running_var_se: float | None = None
    sim_shift_ratio: float | None = None
    sim_shift_ratio_se: float | None = None
    z_running_var: float | None = None
    z_shift_ratio: float | None = None


#: Columns that exist only for a simulated sweep.
SIM_COLUMNS: tuple[str, ...] = tuple(
    f.name for f in fields(SweepRow) if f.name.startswith(("sim_", "z_"))
)


@dataclass(frozen=True)
class SweepResult:
    """A finished sweep.

    Attributes
    ----------
    config:
        What was evaluated.
    rows:
        One :class:`SweepRow` per grid point, in grid order.
    seed_entropy:
        The root entropy of the per-point random streams (``None`` without ``simulate``);
        passing it back as ``rng`` reproduces the run.
    varying:
        The axes with more than one value.
    metadata:
        Run metadata (set by :func:`run_sweep`).
    """

    config: SweepConfig
    rows: tuple[SweepRow, ...]
    seed_entropy: int | None = None
    varying: tuple[str, ...] = field(default=())
    metadata: Mapping[str, Any] = field(default_factory=dict, compare=False)

    def direct_ratios(
        self, dropout: str, mean: float, var: float
    ) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Case (a) — dropout directly before BN — at every rate of the sweep, sorted.

        The contrast of a linear sweep's figures: what any width gives at ``rho = 0``.
        Returns the rates and the shift ratios ``Delta``.
        """
        rates = tuple(sorted(self.config.rates))
        drops = [Dropout(dropout, r, self.config.beta) for r in rates]
        return rates, tuple(shift_direct(mean, var, d).ratio for d in drops)

    def records(self) -> list[dict[str, Any]]:
        """Rows as dicts in column order; the ``sim_*``/``z_*`` columns only when simulated."""
        out = [asdict(r) for r in self.rows]
        if not self.config.simulate:
            for rec in out:
                for key in SIM_COLUMNS:
                    del rec[key]
        return out


# --- the grid -------------------------------------------------------------------------------


def _validated(config: SweepConfig) -> SweepConfig:
    """Check every axis once, before any work; return the config with normalised names."""
    if config.topology not in ("direct", "linear"):
        raise ValidationError(f"topology must be one of direct, linear; got {config.topology!r}")
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
    if config.seeds > 1 and not config.simulate:
        raise ValidationError(f"seeds > 1 needs simulate (--simulate); got seeds {config.seeds}")
    if config.topology == "direct" and (
        config.widths or config.Ds or any(r != 0.0 for r in config.rhos)
    ):
        raise ValidationError(
            "width, D and rho describe the linear topology; got them with topology 'direct'"
        )
    n = config.n_points
    if n > config.max_points and not config.force:
        raise ValidationError(
            f"the grid has {n} points, more than the limit of {config.max_points}; "
            "pass force=True to run it anyway, or narrow an axis"
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


def grid_points(config: SweepConfig) -> Iterator[GridPoint]:
    """The grid points of ``config`` in order (rate varies fastest), without evaluating them."""
    linear = config.topology == "linear"
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


def _closed_form(point: GridPoint, preset: Preset, config: SweepConfig) -> SweepRow:
    theory = TheoryConfig(
        rates=(point.rate,),
        mean=point.mean,
        var=point.var,
        dropout=point.dropout,
        beta=config.beta,
        topology=point.topology,
        width=point.width,
        rho=point.rho,
        D=point.D if point.topology == "linear" else None,
        preset=preset,
        batch_size=point.batch_size,
        steps=config.steps,
    )
    (t,) = theory_table(theory)
    return SweepRow(
        **asdict(point),
        keep=t.keep,
        kappa=t.kappa,
        alpha=t.alpha,
        steps=t.steps,
        train_var=t.train_var,
        test_var=t.test_var,
        shift_ratio=t.shift_ratio,
        inverse_ratio=t.inverse_ratio,
        stored_batch_var=t.stored_batch_var,
        running_var=t.running_var,
        running_var_sd=t.running_var_sd,
        recorded_ratio=_ratio(t.test_var, t.running_var),
    )


def _with_sim(row: SweepRow, sim: SimStats) -> SweepRow:
    def z(value: float, expected: float, se: float) -> float:
        return (value - expected) / se if se > 0 else (0.0 if value == expected else math.inf)

    values = asdict(row)
    values.update({f"sim_{k}": v for k, v in asdict(sim).items()})
    values["z_running_var"] = z(sim.running_var, row.running_var, sim.running_var_se)
    values["z_shift_ratio"] = z(sim.shift_ratio, row.recorded_ratio, sim.shift_ratio_se)
    return SweepRow(**values)


def sweep(
    config: SweepConfig,
    rng: np.random.Generator | int | None = None,
    progress: Progress | None = None,
    *,
    store: str | Path | None = None,
    resume: bool = False,
) -> SweepResult:
    """Evaluate the variance shift at every point of the grid ``config`` describes.

    Parameters
    ----------
    config:
        The axes and settings; see :class:`SweepConfig`.
    rng:
        Seed or generator for the Monte Carlo (ignored without ``config.simulate``). Point
        ``i`` draws from ``SeedSequence(entropy).spawn(n)[i]``: the same seed gives the same
        result for any ``config.workers``.
    progress:
        ``progress(done, total)``, called as simulated points finish.
    store, resume:
        ``simulate``: append every result to this SQLite store as it finishes; with
        ``resume``, continue a store made by the same sweep (its seed too, when ``rng`` is
        ``None``), computing only what is missing (:mod:`varshift.jobs.store`).

    Returns
    -------
    SweepResult
        One row per grid point, in grid order.

    Raises
    ------
    ValidationError
        For an invalid axis value, or a grid larger than ``config.max_points`` without
        ``config.force``.
    MissingDependencyError
        For ``simulate=True`` while :mod:`varshift.engine.simulate` is not available.

    Examples
    --------
    >>> res = sweep(SweepConfig(rates=(0.2, 0.5)))
    >>> [round(r.shift_ratio, 12) for r in res.rows]
    [0.8, 0.5]
    """
    config = _validated(config)
    presets = {fw: resolve_preset(fw, config.momentum) for fw in config.frameworks}
    points = list(grid_points(config))
    for p in points:
        if p.topology == "linear":
            check_rho(p.rho, p.width)
            if p.D > p.width * (1 + 1e-12):
                raise ValidationError(
                    f"D must be <= width ({p.width}) since cos²θ <= 1; got D {p.D:g}"
                )
    rows = [_closed_form(p, presets[p.framework], config) for p in points]
    varying = _varying_axes(config)
    if not config.simulate:
        return SweepResult(config, tuple(rows), None, varying)
    rows, entropy = _simulated(config, points, rows, rng, store, resume, progress)
    return SweepResult(config, tuple(rows), entropy, varying)


# --- executor, replicates and store (issue 13): varshift.jobs.{executor,replicates,store} ----


def _simulated(
    config: SweepConfig,
    points: Sequence[GridPoint],
    rows: Sequence[SweepRow],
    rng: np.random.Generator | int | None,
    store: str | Path | None,
    resume: bool,
    progress: Progress | None,
) -> tuple[list[SweepRow], int]:
    """The rows with their Monte Carlo (pooled over replicates) and the root seed entropy."""
    from varshift.jobs.replicates import pool_all, replicate_seed  # builds on SweepRow

    root = _seed_sequence(rng)
    executor = make_executor(config.workers, config.scheduler)
    with contextlib.ExitStack() as stack:
        kept = None
        if store is not None:
            fingerprint = _fingerprint(config)
            kept = stack.enter_context(
                ResultStore.open(store, fingerprint, resume=resume, force=config.force)
            )
            assert isinstance(root.entropy, int)
            root = np.random.SeedSequence(kept.claim_seed(root.entropy, given=rng is not None))
        k = config.seeds
        tasks = [
            _SimTask(p, config.beta, config.momentum, config.steps, config.reps, seed)
            for p in points
            for seed in (replicate_seed(root, p.index, r) for r in range(k))
        ]
        decode = lambda d: SimStats(**d)  # noqa: E731
        sims = run_tasks(
            executor, simulate_point, tasks, decode=decode, store=kept, progress=progress
        )
    entropy = root.entropy
    assert isinstance(entropy, int)
    out = [_with_sim(r, s) for r, s in zip([r for r in rows for _ in range(k)], sims, strict=True)]
    return (list(pool_all(out, k)) if k > 1 else out), entropy


def _fingerprint(config: SweepConfig) -> dict[str, Any]:
    """What a store's results belong to: the sweep's parameters, not how it was run."""
    how = ("workers", "scheduler", "force", "max_points")
    return {
        "command": "sweep",
        "parameters": {k: v for k, v in asdict(config).items() if k not in how},
    }


def _varying_axes(config: SweepConfig) -> tuple[str, ...]:
    """Names of the row columns that take more than one value in this grid."""
    axes = [
        ("dropout", config.dropouts),
        ("framework", config.frameworks),
        ("batch_size", config.batch_sizes),
        ("mean", config.means),
        ("var", config.variances),
        ("rho", config.rhos),
        ("width", config.widths),
        ("D", config.Ds or (config.widths if config.topology == "linear" else ())),
        ("rate", config.rates),
    ]
    return tuple(name for name, values in axes if len(values) > 1)


# --- the job --------------------------------------------------------------------------------


def sweep_parameters(config: SweepConfig) -> dict[str, object]:
    """The parameters block of the run metadata (no worker count: it changes nothing)."""
    return {
        "rates": list(config.rates),
        "dropouts": list(config.dropouts),
        "frameworks": list(config.frameworks),
        "batch_sizes": list(config.batch_sizes),
        "means": list(config.means),
        "variances": list(config.variances),
        "topology": config.topology,
        "rhos": list(config.rhos),
        "widths": list(config.widths),
        "Ds": list(config.Ds),
        "cos2": config.cos2,
        "beta": config.beta,
        "momentum": config.momentum,
        "steps": config.steps,
        "simulate": config.simulate,
        "reps": config.reps if config.simulate else None,
        **({"seeds": config.seeds} if config.seeds > 1 else {}),
    }


def run_sweep(
    config: SweepConfig,
    seed: int | None = None,
    progress: Progress | None = None,
    *,
    store: str | Path | None = None,
    resume: bool = False,
) -> SweepResult:
    """:func:`sweep` with the run metadata (parameters, seed, seed entropy, point count).

    Examples
    --------
    >>> res = run_sweep(SweepConfig(rates=(0.2, 0.5)))
    >>> res.metadata["command"], res.metadata["points"]
    ('sweep', 2)
    """
    result = sweep(config, rng=seed, progress=progress, store=store, resume=resume)
    meta = run_metadata(
        "sweep",
        sweep_parameters(config),
        seed=seed,
        seed_entropy=result.seed_entropy,
        points=len(result.rows),
    )
    return replace(result, metadata=meta)


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
    topo = topology if topology is not None else ("linear" if linear_axes else "direct")
    if topo not in ("direct", "linear"):
        raise ValidationError(f"--topology must be one of direct, linear; got {topology!r}")
    if topo == "direct" and linear_axes:
        raise ValidationError("--width, --D and --rho need --topology linear; got direct")
    return SweepConfig(
        rates=parse_axis("--rate", rate or ["0.1:0.9:0.1"]),
        dropouts=parse_choices("--dropout", dropout or ["bernoulli"], DROPOUT_KINDS),
        frameworks=parse_choices("--framework", framework or ["torch"], FRAMEWORKS),
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
