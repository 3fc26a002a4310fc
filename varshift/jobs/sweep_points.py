"""The Monte Carlo of a sweep, one grid point at a time, in one or several processes.

Point ``i`` draws from its own stream, ``np.random.SeedSequence(entropy).spawn(n_points)[i]``,
so a sweep gives the same numbers whether it runs in one process or in ``workers`` processes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from varshift import engine
from varshift.core.presets import resolve_preset
from varshift.core.topology import TOPOLOGIES

#: Progress callback: ``callback(done, total)``.
Progress = Callable[[int, int], None]

T = TypeVar("T")
U = TypeVar("U")


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
    from varshift.jobs.executor import LocalExecutor
    from varshift.jobs.store import run_tasks

    return run_tasks(LocalExecutor(workers), fn, tasks, progress=progress)


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
    p = task.point
    linear = TOPOLOGIES[p.topology].mixes
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
