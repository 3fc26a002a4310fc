"""The standard report suite: fixed scenarios whose metrics CI checks against a baseline.

Each scenario contributes two kinds of metric (long-form rows ``scenario, metric, value, sd,
better``):

* **closed-form** metrics from :func:`varshift.core.theory.theory_table` (population values for the
  scenario's parameters): deterministic, ``sd = 0``, so ``varshift check`` compares them within
  ``rtol``: a changed formula or preset shows up at once;
* **Monte-Carlo** metrics from :func:`varshift.engine.simulate.simulate`, chosen so that their
  noise is
  known across seeds: the mean over ``F`` independent BN features of the running-variance and
  running-mean z-scores (``sd = 1/sqrt(F)``: each z is standard normal when the engine and the
  theory agree), and the mean relative error of the debiased data-free correction against the
  measured test variance (``sd`` = the standard error of that mean over the features).

Features of the ``direct`` topology are independent (separate columns, separate masks), which
is what makes ``1/sqrt(F)`` and the standard error over features honest. ``linear`` scenarios
simulate a single unit (units of one layer share their inputs and are not independent).

The scenarios come from the registries: one per dropout kind (:data:`~varshift.core.dropout.KINDS`)
and one per framework preset (:data:`~varshift.core.presets.PRESETS`, plus the cumulative average
of a preset whose ``momentum=None`` selects it). Scenario ``i`` draws from
``SeedSequence(seed).spawn()[i]``, whichever executor runs it (:mod:`varshift.jobs.executor`:
``--workers``, ``--scheduler``), so the report is the same for any of them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np

from varshift.core.dropout import DEFAULT_KIND, KINDS
from varshift.core.presets import DEFAULT_FRAMEWORK, PRESETS, Preset, resolve_preset
from varshift.core.theory import TheoryConfig, theory_table
from varshift.core.topology import DEFAULT_TOPOLOGY, TOPOLOGIES
from varshift.core.validate import check_int
from varshift.jobs.executor import make_executor

#: The committed baseline's order of the framework scenarios that precede the linear ones
#: (scenario ``i`` draws from ``spawn()[i]``, so their positions are fixed); every other preset
#: of the registry follows the linear scenarios, in registry order. A new preset adds nothing here.
BASELINE_FRAMEWORK_ORDER: tuple[str, ...] = ("torch", "keras", "tf-keras", "flax")
#: The classic Keras demonstration (Normal(5, 2²), rate 0.2, batch 32, momentum 0.99) ran under
#: Keras 3 and again under multi-backend Keras 2.x: its two presets are part of the experiment.
CLASSIC_PRESETS: tuple[str, str] = ("keras", "keras2")

#: Columns of a suite report, in order.
COLUMNS: tuple[str, ...] = ("scenario", "metric", "value", "sd", "better")


@dataclass(frozen=True)
class Scenario:
    """One suite scenario: a dropout → BN set-up evaluated in closed form and simulated."""

    name: str
    rate: float
    preset: Preset
    dropout: str = DEFAULT_KIND
    beta: float = 0.1
    mean: float = 0.0
    std: float = 1.0
    batch_size: int = 32
    rows: int = 4000
    epochs: int = 10
    features: int = 32
    topology: str = DEFAULT_TOPOLOGY
    width: int = 1
    rho: float = 0.0
    cos2: float | None = None


@dataclass(frozen=True)
class MetricRow:
    """One row of the suite report."""

    scenario: str
    metric: str
    value: float
    sd: float
    better: str


def scenarios(quick: bool = False) -> tuple[Scenario, ...]:
    """The fixed scenario list. ``quick`` shrinks the simulations (for tests), not the list."""
    classic, classic2 = (resolve_preset(name) for name in CLASSIC_PRESETS)
    default = resolve_preset(DEFAULT_FRAMEWORK)
    out: list[Scenario] = [
        # The classic Keras demonstration: Normal(5, 2²), rate 0.2, batch 32, 10000 rows,
        # 100 epochs, momentum 0.99 (32 independent features instead of 5, for tight bands).
        Scenario("classic", 0.2, classic, mean=5.0, std=2.0, rows=10000, epochs=100),
    ]
    for rate in (0.1, 0.3, 0.5, 0.7, 0.9):
        out.append(Scenario(f"rate-{rate:g}", rate, default, mean=1.0, rows=2000, epochs=5))
    for kind in KINDS:
        out.append(
            Scenario(f"dropout-{kind}", 0.3, default, dropout=kind, beta=0.5, mean=1.0, epochs=5)
        )
    out += _framework_scenarios(BASELINE_FRAMEWORK_ORDER)
    linear = next(t.name for t in TOPOLOGIES.values() if t.mixes and t.theory)
    for width in (4, 64, 256):
        for rho in (0.0, 0.1, 0.5):
            out.append(
                Scenario(
                    f"{linear}-d{width}-rho{rho:g}",
                    0.5,
                    default,
                    topology=linear,
                    width=width,
                    rho=rho,
                    cos2=0.5,
                    rows=2000,
                    epochs=3,
                    features=1,
                )
            )
    # Later scenarios go last: scenario i simulates with SeedSequence(seed).spawn()[i], so
    # appending keeps every earlier metric. Every other preset of the registry (keras2, ...):
    out += _framework_scenarios(tuple(n for n in PRESETS if n not in BASELINE_FRAMEWORK_ORDER))
    # The classic demonstration as multi-backend Keras 2.x ran it (n/(n-1-eps) stored variance).
    out.append(
        Scenario(
            f"classic-{classic2.name}", 0.2, classic2, mean=5.0, std=2.0, rows=10000, epochs=100
        )
    )
    if quick:
        out = [replace(s, rows=min(s.rows, 1000), epochs=min(s.epochs, 3)) for s in out]
    return tuple(out)


def _framework_scenarios(names: tuple[str, ...]) -> list[Scenario]:
    """One scenario per preset, and one for its cumulative average where ``None`` selects it."""
    out = []
    for name in names:
        preset = resolve_preset(name)
        out.append(Scenario(f"framework-{name}", 0.3, preset, mean=1.0, batch_size=16))
        if preset.none_is_cumulative:
            cumulative = resolve_preset(name, None)
            out.append(
                Scenario(f"framework-{name}-cumulative", 0.3, cumulative, mean=1.0, batch_size=16)
            )
    return out


def _closed_form(s: Scenario, steps: int) -> list[MetricRow]:
    (row,) = theory_table(
        TheoryConfig(
            rates=(s.rate,),
            mean=s.mean,
            var=s.std**2,
            dropout=s.dropout,
            beta=s.beta,
            topology=s.topology,
            width=s.width,
            rho=s.rho,
            cos2=s.cos2,
            preset=s.preset,
            batch_size=s.batch_size,
            steps=steps,
        )
    )
    values = {
        "train_var": (row.train_var, "none"),
        "test_var": (row.test_var, "none"),
        "shift_ratio": (row.shift_ratio, "higher"),
        "running_var_expected": (row.running_var, "none"),
        "running_var_sd": (row.running_var_sd, "none"),
        "corrected_var_debiased": (row.corrected_var_debiased, "none"),
        "gamma_star": (row.gamma_star, "none"),
    }
    return [
        MetricRow(s.name, f"theory.{k}", float(v), 0.0, better)
        for k, (v, better) in values.items()
        if v is not None
    ]


def _simulated(s: Scenario, rng: np.random.Generator) -> list[MetricRow]:
    from varshift.engine import SimConfig, simulate

    config = SimConfig(
        rate=s.rate,
        dropout=s.dropout,
        beta=s.beta,
        preset=s.preset,
        batch_size=s.batch_size,
        samples=s.rows,
        epochs=s.epochs,
        features=s.features,
        mean=s.mean,
        std=s.std,
        topology=s.topology,
        width=s.width if TOPOLOGIES[s.topology].mixes else None,
        rho=s.rho,
        cos2=s.cos2,
    )
    result = simulate(config, rng=rng)
    f = len(result.features)
    z_var = np.array([r.z_var for r in result.features])
    z_mean = np.array([r.z_mean for r in result.features])
    rows = [
        MetricRow(s.name, "sim.z_running_var", float(z_var.mean()), 1 / math.sqrt(f), "none"),
        MetricRow(s.name, "sim.z_running_mean", float(z_mean.mean()), 1 / math.sqrt(f), "none"),
    ]
    errors = [r.error_debiased for r in result.features if r.error_debiased is not None]
    if len(errors) == f and f >= 8:
        e = np.asarray(errors, dtype=np.float64)
        rows.append(
            MetricRow(
                s.name,
                "sim.correction_error",
                float(e.mean()),
                float(e.std(ddof=1) / math.sqrt(f)),
                "none",
            )
        )
    return rows


def _steps(s: Scenario) -> int:
    return s.epochs * math.ceil(s.rows / s.batch_size)


@dataclass(frozen=True)
class _ScenarioTask:
    """One scenario and its own random stream: all a worker needs (picklable)."""

    scenario: Scenario
    seed: np.random.SeedSequence


def _evaluate(task: _ScenarioTask) -> list[MetricRow]:
    """A scenario's closed-form and Monte-Carlo rows (module-level: runs in any worker)."""
    s = task.scenario
    return _closed_form(s, _steps(s)) + _simulated(s, np.random.default_rng(task.seed))


def run_suite(
    seed: int = 0,
    *,
    quick: bool = False,
    progress: Callable[[int, int], None] | None = None,
    only: Sequence[str] | None = None,
    workers: int = 1,
    scheduler: str | None = None,
) -> list[MetricRow]:
    """Evaluate every scenario; scenario ``i`` simulates with ``SeedSequence(seed).spawn()[i]``.

    ``only`` restricts the run to the named scenarios (for tests). ``workers`` local processes
    or the Dask cluster at ``scheduler`` run the scenarios (:func:`varshift.jobs.executor.
    make_executor`); the rows, in scenario order, do not depend on either.
    """
    seed = check_int("seed", seed, 0)
    executor = make_executor(workers, scheduler)
    chosen = scenarios(quick)
    seeds = np.random.SeedSequence(seed).spawn(len(chosen))
    tasks = [
        _ScenarioTask(s, ss)
        for s, ss in zip(chosen, seeds, strict=True)
        if not only or s.name in only
    ]
    done = 0

    def arrived(index: int, value: object) -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, len(tasks))

    return [row for rows in executor.map(_evaluate, tasks, on_result=arrived) for row in rows]


def suite_metadata(seed: int, quick: bool) -> dict[str, object]:
    """The metadata block of a suite report: the scenarios' parameters and the seed."""
    from varshift import __version__

    return {
        "varshift": __version__,
        "command": "suite",
        "seed": seed,
        "quick": quick,
        "scenarios": {
            s.name: {
                "rate": s.rate,
                "dropout": s.dropout,
                "beta": s.beta,
                "framework": s.preset.name,
                "momentum": s.preset.momentum,
                "mean": s.mean,
                "std": s.std,
                "batch_size": s.batch_size,
                "rows": s.rows,
                "epochs": s.epochs,
                "features": s.features,
                "topology": s.topology,
                "width": s.width,
                "rho": s.rho,
                "cos2": s.cos2,
            }
            for s in scenarios(quick)
        },
    }


@dataclass(frozen=True)
class SuiteResult:
    """The suite's rows for one seed, with the report metadata."""

    seed: int
    quick: bool
    rows: tuple[MetricRow, ...]
    metadata: Mapping[str, object]


def suite_result(
    seed: int = 0,
    *,
    quick: bool = False,
    progress: Callable[[int, int], None] | None = None,
    workers: int = 1,
    scheduler: str | None = None,
) -> SuiteResult:
    """:func:`run_suite` over every scenario, with :func:`suite_metadata`: ``varshift suite``.

    The metadata holds no worker count or scheduler: they change nothing in the report.
    """
    rows = run_suite(seed, quick=quick, progress=progress, workers=workers, scheduler=scheduler)
    return SuiteResult(seed, quick, tuple(rows), suite_metadata(seed, quick))
