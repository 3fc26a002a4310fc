"""Replicates: each grid point simulated ``K`` times on independent streams (``--seeds K``).

A single Monte Carlo run gives an estimate and a standard error from its own internal spread.
Replicates measure the spread directly: grid point ``i`` runs ``K`` times, replicate ``r`` on the
stream :func:`replicate_seed` names, and :func:`pool_replicates` reports per quantity the mean
over seeds, the standard deviation over seeds and the standard error ``sd / sqrt(K)`` of the
mean, and whether the closed form lies inside ``mean ± 2·se``.

Streams come from the task, never from the worker: replicate ``r`` of point ``i`` draws from
``SeedSequence(entropy, spawn_key=(i,))`` for ``r = 0`` — the stream a one-seed sweep gives the
point, so ``--seeds 1`` changes nothing — and from that stream's child ``r``,
``SeedSequence(entropy, spawn_key=(i, r))``, for ``r >= 1``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from varshift.core.errors import ValidationError
from varshift.jobs.sweep import SimStats, SweepRow

#: Half-width of the band, in standard errors, that the closed form should lie in.
BAND = 2.0


def replicate_seed(
    root: np.random.SeedSequence, index: int, replicate: int
) -> np.random.SeedSequence:
    """The stream of replicate ``replicate`` of grid point ``index`` (see the module docstring).

    Examples
    --------
    >>> root = np.random.SeedSequence(7)
    >>> replicate_seed(root, 3, 0).spawn_key, replicate_seed(root, 3, 2).spawn_key
    ((3,), (3, 2))
    >>> replicate_seed(root, 3, 0).generate_state(2).tolist() == root.spawn(4)[3].generate_state(
    ...     2).tolist()
    True
    """
    key = (*root.spawn_key, index) + ((replicate,) if replicate else ())
    return np.random.SeedSequence(root.entropy, spawn_key=key, pool_size=root.pool_size)


@dataclass(frozen=True)
class ReplicateRow(SweepRow):
    """A sweep row pooled over ``seeds`` replicates.

    The ``sim_*`` estimates are means over the replicates and the ``sim_*_se`` their standard
    errors, ``sd / sqrt(seeds)`` (the spread over seeds, not one run's internal estimate);
    ``z_*`` compare those means with the closed forms. Added columns: ``seeds``, the standard
    deviations over seeds ``sim_*_sd`` (sample, ``ddof = 1``), and ``*_within_2se``: whether
    the closed form (``running_var``, ``recorded_ratio``) lies inside ``mean ± 2·se``.
    """

    seeds: int = 0
    sim_test_var_sd: float = math.nan
    sim_running_var_sd: float = math.nan
    sim_shift_ratio_sd: float = math.nan
    running_var_within_2se: bool = False
    recorded_ratio_within_2se: bool = False


def _z(value: float, expected: float, se: float) -> float:
    return (value - expected) / se if se > 0 else (0.0 if value == expected else math.inf)


def pool_replicates(rows: Sequence[SweepRow]) -> ReplicateRow:
    """Pool the simulated rows of one grid point's replicates into one row.

    Parameters
    ----------
    rows:
        At least two rows of the same grid point (same ``index``), each with its ``sim_*``
        fields set.

    Returns
    -------
    ReplicateRow
        Means, standard errors and standard deviations over the replicates; the mean of the
        per-replicate ``sim_shift_ratio`` (not the ratio of the means).

    Raises
    ------
    ValidationError
        Fewer than two rows, rows of different points, or rows without a simulation.
    """
    if len(rows) < 2:
        raise ValidationError(f"seeds must be at least 2 to pool replicates; got {len(rows)}")
    if len({r.index for r in rows}) != 1:
        raise ValidationError("replicates to pool must all belong to one grid point")
    values = {}
    for name in (f.name for f in SimStats.__dataclass_fields__.values()):
        if name.endswith("_se"):
            continue
        column = [getattr(r, f"sim_{name}") for r in rows]
        if any(v is None for v in column):
            raise ValidationError("replicates to pool must be simulated (sim_* set)")
        arr = np.asarray(column, dtype=np.float64)
        sd = float(arr.std(ddof=1))
        values[name] = (float(arr.mean()), sd, sd / math.sqrt(arr.size))
    first = asdict(rows[0])
    for name, (mean, sd, se) in values.items():
        first[f"sim_{name}"], first[f"sim_{name}_se"], first[f"sim_{name}_sd"] = mean, se, sd
    run, run_se = values["running_var"][0], values["running_var"][2]
    ratio, ratio_se = values["shift_ratio"][0], values["shift_ratio"][2]
    base = rows[0]
    first["z_running_var"] = _z(run, base.running_var, run_se)
    first["z_shift_ratio"] = _z(ratio, base.recorded_ratio, ratio_se)
    first["running_var_within_2se"] = abs(run - base.running_var) <= BAND * run_se
    first["recorded_ratio_within_2se"] = abs(ratio - base.recorded_ratio) <= BAND * ratio_se
    return ReplicateRow(**first, seeds=len(rows))


def pool_all(rows: Sequence[SweepRow], seeds: int) -> list[ReplicateRow]:
    """Pool consecutive runs of ``seeds`` rows (a point's replicates, in replicate order)."""
    if len(rows) % seeds:
        raise ValidationError(f"{len(rows)} rows do not split into replicates of {seeds}")
    return [pool_replicates(rows[i : i + seeds]) for i in range(0, len(rows), seeds)]
