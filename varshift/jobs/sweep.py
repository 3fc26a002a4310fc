"""Grids of closed-form (and, optionally, simulated) variance shifts: ``varshift sweep``.

A sweep is the Cartesian product of a few axes — dropout kind, framework preset, batch size,
input mean and variance, correlation ``rho``, width ``d`` or ``D = d cos²θ``, and the dropout
rate — evaluated point by point. Each grid point gives one row of a tidy table: its coordinates,
then what :func:`varshift.core.theory.theory_table` computes there (train and test variance, shift
ratio ``Delta``, the expected stored running variance and its noise), then, with
``simulate=True``, the Monte Carlo estimates and their z-scores.

Axes are written as comma lists and inclusive ranges (:mod:`varshift.jobs.axes`); the grid
(:class:`SweepConfig`, its validation and points, the axes as the command line writes them) is
in :mod:`varshift.jobs.sweep_grid`; the Monte Carlo per point, reproducible whatever the number
of processes, is in :mod:`varshift.jobs.sweep_points`. Every public name stays importable here.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from varshift.core.dropout import Dropout
from varshift.core.errors import ValidationError
from varshift.core.frames import TableResult
from varshift.core.presets import Preset, resolve_preset
from varshift.core.theory import TheoryConfig, check_rho, shift_direct, theory_table
from varshift.core.topology import TOPOLOGIES
from varshift.core.validate import check_seed
from varshift.jobs._meta import run_metadata
from varshift.jobs.axes import MAX_AXIS_VALUES, parse_axis, parse_choices
from varshift.jobs.executor import make_executor
from varshift.jobs.store import ResultStore, run_tasks
from varshift.jobs.sweep_grid import (
    MAX_POINTS,
    SweepConfig,
    axes_config,
    grid_points,
    validated,
    varying_axes,
)
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

__all__ = [
    "MAX_AXIS_VALUES",
    "MAX_POINTS",
    "GridPoint",
    "SimStats",
    "SweepConfig",
    "SweepResult",
    "SweepRow",
    "axes_config",
    "check_store_options",
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
class SweepResult(TableResult):
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

    ``to_frame()``: one row per grid point, the columns of :class:`SweepRow` (pandas); in a
    notebook the result shows as that table.
    """

    config: SweepConfig
    rows: tuple[SweepRow, ...]
    seed_entropy: int | None = None
    varying: tuple[str, ...] = field(default=())
    metadata: Mapping[str, Any] = field(default_factory=dict, compare=False)

    row_type: ClassVar[type] = SweepRow

    def table_rows(self) -> tuple[SweepRow, ...]:
        """One row per grid point."""
        return self.rows

    def table_caption(self) -> str:
        """What the table shows."""
        return f"varshift sweep: {len(self.rows)} grid point(s)"

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
        D=point.D if TOPOLOGIES[point.topology].mixes else None,
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
    if rng is not None and not isinstance(rng, np.random.Generator):
        check_seed(rng)
    config = validated(config)
    presets = {fw: resolve_preset(fw, config.momentum) for fw in config.frameworks}
    points = list(grid_points(config))
    for p in points:
        if TOPOLOGIES[p.topology].mixes:
            check_rho(p.rho, p.width)
            if p.D > p.width * (1 + 1e-12):
                raise ValidationError(
                    f"D must be <= width ({p.width}) since cos²θ <= 1; got D {p.D:g}"
                )
    rows = [_closed_form(p, presets[p.framework], config) for p in points]
    varying = varying_axes(config)
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


def check_store_options(config: SweepConfig, store: str | Path | None, resume: bool) -> None:
    """``resume`` needs a ``store``, and a store keeps Monte Carlo results: it needs
    ``simulate`` (checked before any work)."""
    if resume and store is None:
        raise ValidationError("--resume needs --store PATH, the store to continue")
    if store is not None and not config.simulate:
        raise ValidationError("--store keeps Monte Carlo results: it needs --simulate")


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
