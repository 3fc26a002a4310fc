"""Grids of closed-form (and, optionally, simulated) variance shifts: ``varshift sweep``.

A sweep is the Cartesian product of a few axes — dropout kind, framework preset, batch size,
input mean and variance, correlation ``rho``, width ``d`` or ``D = d cos²θ``, and the dropout
rate — evaluated point by point. Each grid point gives one row of a tidy table: its coordinates,
then what :func:`varshift.core.theory.theory_table` computes there (train and test variance, shift
ratio ``Delta``, the expected stored running variance and its noise), then, with
``simulate=True``, the Monte Carlo estimates and their z-scores.

Axes are written as comma lists and inclusive ranges (:func:`parse_axis`)::

    0.1:0.9:0.1     0.1, 0.2, ..., 0.9 (stop included within float tolerance)
    1:64:x2         1, 2, 4, ..., 64 (geometric)
    1,4,16,64       a list; items may themselves be ranges

Reproducibility of the Monte Carlo: point ``i`` draws from its own stream,
``np.random.SeedSequence(entropy).spawn(n_points)[i]``, so a sweep gives the same numbers
whether it runs in one process or in ``workers`` processes.
"""

from __future__ import annotations

import contextlib
import importlib
import itertools
import math
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from varshift.core.dropout import DROPOUT_KINDS, Dropout
from varshift.core.errors import MissingDependencyError, ValidationError
from varshift.core.presets import FRAMEWORKS, Preset, resolve_preset
from varshift.core.theory import TheoryConfig, check_rho, shift_direct, theory_table
from varshift.core.validate import check_choice, check_finite, check_int, check_range
from varshift.jobs.executor import LocalExecutor, make_executor
from varshift.jobs.store import ResultStore, run_tasks

#: Grids with more points than this need ``force=True`` (``--force``).
MAX_POINTS = 10_000

#: No single axis may expand to more values than this, forced or not.
MAX_AXIS_VALUES = 1_000_000

#: Progress callback: ``callback(done, total)``.
Progress = Callable[[int, int], None]

T = TypeVar("T")
U = TypeVar("U")

_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_RANGE = re.compile(rf"^({_NUMBER}):({_NUMBER})(?::([xX*]?)({_NUMBER}))?$")


# --- axis parsing ---------------------------------------------------------------------------


def _clean(x: float) -> float:
    """Drop the float noise of ``a + i*step`` (``0.30000000000000004`` → ``0.3``)."""
    return float(f"{x:.12g}")


def _parse_number(name: str, text: str, spec: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValidationError(
            f"{name} must be numbers, comma lists or ranges start:stop:step; got {spec!r}"
        ) from None
    if not math.isfinite(value):
        raise ValidationError(f"{name} must be finite; got {spec!r}")
    return value


def _expand_range(name: str, item: str, max_values: int) -> list[float]:
    """Values of one ``start:stop[:step]`` or ``start:stop:xfactor`` item, stop included."""
    m = _RANGE.match(item)
    if m is None:
        raise ValidationError(
            f"{name} range must be start:stop:step or start:stop:xfactor; got {item!r}"
        )
    start, stop = float(m.group(1)), float(m.group(2))
    geometric = bool(m.group(3))
    step = float(m.group(4)) if m.group(4) is not None else 1.0
    if not all(math.isfinite(x) for x in (start, stop, step)):
        raise ValidationError(f"{name} range must have finite bounds and step; got {item!r}")
    if geometric:
        if start <= 0 or stop <= 0 or step <= 0 or step == 1:
            raise ValidationError(
                f"{name} range {item!r} is empty: a geometric range needs start, stop > 0 and "
                "a factor > 0 other than 1"
            )
        ratio = math.log(stop / start) / math.log(step)
        count = math.floor(ratio + 1e-9) + 1
        if ratio < -1e-9:
            count = 0
    else:
        if step == 0:
            raise ValidationError(f"{name} range {item!r} is empty: the step must not be 0")
        ratio = (stop - start) / step
        count = math.floor(ratio + 1e-9) + 1 if ratio > -1e-9 else 0
    if count <= 0:
        direction = "start > stop with a positive step" if step > 0 else "start < stop"
        if geometric:
            direction = "the factor moves away from stop"
        raise ValidationError(f"{name} range {item!r} is empty: {direction}")
    if count > max_values:
        raise ValidationError(
            f"{name} range {item!r} has {count} values; at most {max_values} per axis"
        )
    out = [_clean(start * step**i if geometric else start + i * step) for i in range(count)]
    # The stop value, reached within float tolerance, is written exactly as given.
    if abs(out[-1] - stop) <= 1e-9 * max(1.0, abs(stop)):
        out[-1] = stop
    return out


def parse_axis(
    name: str,
    specs: str | Iterable[str],
    *,
    integer: bool = False,
    max_values: int = MAX_AXIS_VALUES,
) -> tuple[float, ...]:
    """Expand comma lists and inclusive ranges into the values of one grid axis.

    Parameters
    ----------
    name:
        How the axis is named in error messages (the CLI passes ``--rate``, ...).
    specs:
        One string or several (a repeated option); each is a comma list whose items are
        numbers, arithmetic ranges ``start:stop:step`` (``start:stop`` means step 1) or
        geometric ranges ``start:stop:xfactor``. ``stop`` is included when the step reaches it
        within a relative tolerance of 1e-9.
    integer:
        Require integer values (widths, batch sizes); they are returned as floats all the same.
    max_values:
        Refuse an axis that expands to more values than this.

    Returns
    -------
    tuple of float
        The values in the order given, without repeats.

    Raises
    ------
    ValidationError
        For an empty range (``0.5:0.1:0.1``, a step of 0), a malformed item or a non-integer
        value where an integer is required.

    Examples
    --------
    >>> parse_axis("--rate", "0.1:0.5:0.1")
    (0.1, 0.2, 0.3, 0.4, 0.5)
    >>> parse_axis("--D", ["1,4", "16:64:x4"])
    (1.0, 4.0, 16.0, 64.0)
    """
    texts = [specs] if isinstance(specs, str) else list(specs)
    if not texts:
        raise ValidationError(f"{name} must have at least one value; got none")
    seen: dict[float, None] = {}
    for spec in texts:
        for raw in spec.split(","):
            item = raw.strip()
            if not item:
                raise ValidationError(f"{name} has an empty item; got {spec!r}")
            if ":" in item:
                values = _expand_range(name, item, max_values)
            else:
                values = [_parse_number(name, item, spec)]
            for v in values:
                if integer and v != round(v):
                    raise ValidationError(f"{name} must be integers; got {v:g} in {spec!r}")
                seen.setdefault(float(round(v)) if integer else v, None)
            if len(seen) > max_values:
                raise ValidationError(f"{name} has more than {max_values} values")
    return tuple(seen)


def parse_choices(name: str, specs: str | Iterable[str], choices: Sequence[str]) -> tuple[str, ...]:
    """Expand a comma list of names (``all`` means every choice), validated and without repeats.

    Examples
    --------
    >>> parse_choices("--framework", "torch,keras", ("torch", "keras", "flax"))
    ('torch', 'keras')
    """
    texts = [specs] if isinstance(specs, str) else list(specs)
    seen: dict[str, None] = {}
    for spec in texts:
        for raw in spec.split(","):
            item = raw.strip()
            if item.lower() == "all":
                seen.update(dict.fromkeys(choices))
                continue
            seen.setdefault(check_choice(name, item, choices), None)
    if not seen:
        raise ValidationError(f"{name} must have at least one value; got none")
    return tuple(seen)


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
class GridPoint:
    """The coordinates of one grid point; ``index`` is its position in the product."""

    index: int
    dropout: str
    framework: str
    batch_size: int
    mean: float
    var: float
    topology: str
    rho: float
    width: int
    D: float
    rate: float


@dataclass(frozen=True)
class SimStats:
    """Monte Carlo estimates at one grid point, each with its standard error (``*_se``).

    The simulation runs ``reps`` independent BN features (each its own dataset column and
    noise) for ``steps`` updates; estimates are means over features and standard errors their
    spread over features divided by ``sqrt(reps)``.

    Attributes
    ----------
    test_var:
        The population variance BN sees at test time (dropout off), measured on the data.
    running_var:
        The stored running variance after ``steps`` updates (the preset's stored convention).
    shift_ratio:
        ``test_var / running_var`` (ratio of the means): the real variance over the recorded
        one, what the layer experiences at test time; its standard error by the delta method.
    """

    test_var: float
    test_var_se: float
    running_var: float
    running_var_se: float
    shift_ratio: float
    shift_ratio_se: float


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
    """

    config: SweepConfig
    rows: tuple[SweepRow, ...]
    seed_entropy: int | None = None
    varying: tuple[str, ...] = field(default=())

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
            "pass --force to run it anyway, or narrow an axis"
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
            d_eff = _clean(width * config.cos2)
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


def _ratio(num: float, den: float) -> float:
    if den == 0.0:
        return math.nan if num == 0.0 else math.inf
    return num / den


def _seed_sequence(rng: np.random.Generator | int | None) -> np.random.SeedSequence:
    """The root of the per-point streams: from an int seed, fresh entropy, or drawn from ``rng``."""
    if isinstance(rng, np.random.Generator):
        return np.random.SeedSequence(int(rng.integers(0, 2**63)))
    return np.random.SeedSequence(rng)


def map_points(
    fn: Callable[[T], U],
    tasks: Sequence[T],
    *,
    workers: int = 1,
    progress: Progress | None = None,
) -> list[U]:
    """``[fn(t) for t in tasks]``, in order, over ``workers`` processes.

    ``fn`` must be a module-level function and the tasks picklable. Workers are started with the
    ``spawn`` method (no inherited threads or state), and results come back in task order
    whatever the worker count; ``progress(done, total)`` is called as they arrive.
    """
    return run_tasks(LocalExecutor(workers), fn, tasks, progress=progress)


def _simulate_engine() -> Any:
    """The Monte Carlo engine, or a clear error while it is not part of varshift."""
    try:
        simulate = importlib.import_module("varshift.engine.simulate")
    except ModuleNotFoundError as exc:
        if exc.name != "varshift.engine.simulate":
            raise
        raise MissingDependencyError(
            "--simulate is not available yet: the Monte Carlo engine (varshift.engine.simulate) is "
            "not part of this version; run the sweep without --simulate for the closed forms"
        ) from None
    return simulate


@dataclass(frozen=True)
class _SimTask:
    """Everything one worker needs for one grid point: picklable, seeded per point."""

    point: GridPoint
    beta: float
    momentum: float | str | None
    steps: int
    reps: int
    seed: np.random.SeedSequence


def simulate_point(task: _SimTask) -> SimStats:
    """Monte Carlo at one grid point, drawing only from ``task.seed`` (module-level: picklable).

    Runs :func:`varshift.engine.simulate.simulate` on synthetic normal inputs of the point's
    mean and variance for ``steps`` updates.

    * ``direct``: ``reps`` BN features, each with its own data column and noise, so they are
      independent replicates; standard errors are their spread over ``sqrt(reps)``.
    * ``linear``: one unit of the point's width, ``rho`` and ``cos²θ = D / width`` (units of
      one layer share their inputs, so more of them would not be independent). Its standard
      errors are the engine's noise band of the running variance combined with the sampling
      noise of the finite dataset (``Var[s²] ≈ 2 var²/(N-1)``, exact for normal outputs).
    """
    engine = _simulate_engine()
    p = task.point
    linear = p.topology == "linear"
    config = engine.SimConfig(
        rate=p.rate,
        dropout=p.dropout,
        beta=task.beta,
        preset=resolve_preset(p.framework, task.momentum),
        batch_size=p.batch_size,
        steps=task.steps,
        features=1 if linear else task.reps,
        mean=p.mean,
        std=math.sqrt(p.var),
        topology=p.topology,
        width=p.width if linear else None,
        rho=p.rho if linear else 0.0,
        cos2=min(1.0, p.D / p.width) if linear else None,
    )
    result = engine.simulate(config, rng=np.random.default_rng(task.seed))
    test = np.array([r.test_var for r in result.features], dtype=np.float64)
    run = np.array([r.running_var for r in result.features], dtype=np.float64)
    mt, mr = float(test.mean()), float(run.mean())
    if linear:
        (row,) = result.features
        data = 2.0 / max(result.summary.rows - 1, 1)
        st = mt * math.sqrt(data)
        sr = math.sqrt(row.running_var_sd**2 + mr * mr * data)
        cov = 0.0
    else:
        k = test.size
        st, sr = float(test.std(ddof=1)) / math.sqrt(k), float(run.std(ddof=1)) / math.sqrt(k)
        cov = float(np.cov(test, run, ddof=1)[0, 1]) / k
    ratio = _ratio(mt, mr)
    # Delta method for a ratio of means: Var(a/b) ≈ (a/b)² (Va/a² + Vb/b² - 2 Cab/(a b)).
    rel = (st / mt) ** 2 + (sr / mr) ** 2 - 2 * cov / (mt * mr) if mt and mr else math.nan
    return SimStats(mt, st, mr, sr, ratio, abs(ratio) * math.sqrt(max(rel, 0.0)))


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
    _simulate_engine()
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


# --- plot-ready data (no matplotlib here) -----------------------------------------------------


@dataclass(frozen=True)
class RateCurve:
    """One curve of a shift-ratio-against-rate panel; ``sim``/``sim_se`` are optional points."""

    label: str
    rates: tuple[float, ...]
    ratio: tuple[float, ...]
    sim: tuple[float, ...] | None = None
    sim_se: tuple[float, ...] | None = None


@dataclass(frozen=True)
class RatePanel:
    """One panel: curves (one per width/D) and the case-(a) curve for contrast."""

    title: str
    curves: tuple[RateCurve, ...]
    contrast: RateCurve | None = None


@dataclass(frozen=True)
class RateFigure:
    """The panels of one shift-ratio figure; ``key`` tells it apart in a file name."""

    key: str
    title: str
    panels: tuple[RatePanel, ...]


def _num(x: float) -> str:
    return f"{x:g}"


def rate_figures(result: SweepResult) -> list[RateFigure]:
    """Group a sweep's rows into shift-ratio-against-rate figures.

    One figure per (dropout, mean, var); one panel per ``rho``; one curve per (width, D). The
    closed-form ratio does not depend on the framework or batch size, so only the first of each
    is drawn. Each linear panel also carries case (a) — dropout directly before BN, which is
    what any width gives at ``rho = 0`` — for contrast. Empty when fewer than two rates.
    """
    config = result.config
    if len(config.rates) < 2:
        return []
    fw, n = config.frameworks[0], config.batch_sizes[0]
    rows = [r for r in result.rows if r.framework == fw and r.batch_size == n]
    groups: dict[tuple[str, float, float], list[SweepRow]] = {}
    for r in rows:
        groups.setdefault((r.dropout, r.mean, r.var), []).append(r)
    figures = []
    for (drop, c, v), members in groups.items():
        panels = []
        by_rho: dict[float, list[SweepRow]] = {}
        for r in members:
            by_rho.setdefault(r.rho, []).append(r)
        for rho, prow in by_rho.items():
            curves = []
            by_unit: dict[tuple[int, float], list[SweepRow]] = {}
            for r in prow:
                by_unit.setdefault((r.width, r.D), []).append(r)
            for (width, d_eff), crow in by_unit.items():
                crow = sorted(crow, key=lambda r: r.rate)
                if config.topology == "direct":
                    label = "dropout → BN"
                elif config.widths and config.Ds:
                    label = f"d = {width}, D = {_num(d_eff)}"
                else:
                    label = f"D = {_num(d_eff)}"
                curves.append(
                    RateCurve(
                        label,
                        tuple(r.rate for r in crow),
                        tuple(r.shift_ratio for r in crow),
                    )
                )
            contrast = None
            if config.topology == "linear":
                rates = tuple(sorted(config.rates))
                drops = [Dropout(drop, r, config.beta) for r in rates]
                contrast = RateCurve(
                    "case (a): ρ = 0 at any D",
                    rates,
                    tuple(shift_direct(c, v, d).ratio for d in drops),
                )
            title = f"ρ = {_num(rho)}" if config.topology == "linear" else "dropout → BN"
            panels.append(RatePanel(title, tuple(curves), contrast))
        title = f"{drop} dropout, input mean {_num(c)}, variance {_num(v)}"
        key = "" if len(groups) == 1 else f"{drop}_mean{_num(c)}_var{_num(v)}"
        figures.append(RateFigure(key, title, tuple(panels)))
    return figures
