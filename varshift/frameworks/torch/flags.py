"""The flags of :func:`~varshift.frameworks.torch.passes.diagnose`, with thresholds from noise.

A median stored/eval variance ratio is ``shifted`` when it lies more than :data:`FLAG_SE`
standard errors from 1, and ``shift re-baked`` when stored/dropout-on lies within
:data:`FLAG_SE` standard errors of 1. The standard error of a ratio of two estimates is the
root sum of squares of their relative standard errors:

* the data pass (``eval_var``): measured from the spread between batches
  (:meth:`~varshift.frameworks.torch.stream.ChannelMoments.var_rel_se`), or with fewer than
  ``ChannelMoments.MIN_BATCHES`` batches the Gaussian ``sqrt(2/(N - 1))`` over the ``N``
  samples (conservative for convolutions, whose pixels add information);
* the dropout-on pass (``dropout_on_var``): the spread of its batch variances over ``sqrt(B)``,
  or the Gaussian ``sqrt(2/((b - 1) B))`` for ``B`` batches of ``b`` samples;
* the stored running variance, only when the training batch size ``b`` is given: an EMA with
  weight ``α = momentum`` of batch variances whose relative variance is ``2/(b - 1)``
  (Gaussian, one value per sample) has relative variance ``α/(2 - α) · 2/(b - 1)``; with
  ``momentum=None`` (a cumulative average over ``T = num_batches_tracked`` batches) ``2/((b -
  1) T)``. Without ``b`` only the data passes' errors are counted, and the flags say so.

The error of one channel's ratio is used for the median over channels: conservative, as
channels share their samples and their errors are correlated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from varshift.core.presets import resolve_preset
from varshift.core.theory import updates_to_forget

#: Standard errors a ratio must lie from 1 to be flagged ``shifted`` (or within, ``re-baked``).
FLAG_SE = 4.0


@dataclass(frozen=True)
class Tolerances:
    """Relative thresholds of one layer's flags (``FLAG_SE`` standard errors each).

    ``shift``: of stored/eval; ``rebake``: of stored/dropout-on (``nan`` without that pass);
    ``stored_counted``: whether the stored statistics' EMA noise is part of both.
    """

    shift: float
    rebake: float
    stored_counted: bool


def _median_finite(values: Any) -> float | None:
    if values is None:
        return None
    a = np.asarray(values, dtype=np.float64)
    a = a[np.isfinite(a)]
    return float(np.median(a)) if a.size else None


def stored_rel_se(
    momentum: float | None, train_batch_size: int | None, tracked: int | None
) -> float | None:
    """Relative standard error of a stored running variance (Gaussian, see the module notes),
    ``None`` when the training batch size is not known."""
    if train_batch_size is None or train_batch_size < 2:
        return None
    per_batch = 2.0 / (train_batch_size - 1)
    if momentum is None:
        return math.sqrt(per_batch / tracked) if tracked else None
    return math.sqrt(momentum / (2.0 - momentum) * per_batch)


def tolerances(
    eval_se: Any,
    on_se: Any,
    samples: int,
    batches: int,
    stored_se: float | None,
) -> Tolerances:
    """The thresholds from the measured relative standard errors (``None``: not measured, then
    the Gaussian fall-backs of the module notes)."""
    data = _median_finite(eval_se)
    if data is None:
        data = math.sqrt(2.0 / max(samples - 1, 1))
    on = _median_finite(on_se)
    if on is None and batches > 0:
        per_batch = max(samples / batches - 1.0, 1.0)
        on = math.sqrt(2.0 / per_batch / batches)
    stored = stored_se or 0.0
    shift = FLAG_SE * math.hypot(data, stored)
    rebake = math.nan if on is None else FLAG_SE * math.hypot(on, stored)
    return Tolerances(shift, rebake, stored_se is not None)


def _finite_median(num: Any, den: Any) -> float | None:
    """Median of the finite ``num / den`` (a NaN in a corrupt buffer is skipped), ``None`` if
    there is none."""
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.asarray(num / den, dtype=np.float64)
    r = r[np.isfinite(r)]
    return float(np.median(r)) if r.size else None


def layer_flags(
    path: Any,
    m: Any,
    stored_var: Any,
    eval_var: Any,
    on_var: Any,
    audit: tuple[str, ...],
    tol: Tolerances,
    stored_mean: Any,
) -> tuple[str, ...]:
    """The flags of one BatchNorm ``m`` (see the module notes for ``shifted``/``re-baked``).

    ``stored_var``/``stored_mean``: its running statistics as float64 arrays. Ratios are
    taken over live channels only (eval-mode variance >= eps): a dead channel's ratio is
    0/0 or x/0, and it is counted in its own flag instead.
    """
    flags: list[str] = []
    if not m.track_running_stats:
        return ("track_running_stats=False: batch statistics at test time",)
    tracked = m.num_batches_tracked
    count = None if tracked is None else int(tracked)
    if not np.any(stored_mean) and np.all(stored_var == 1.0):
        flags.append("initial values")
    elif count is not None and m.momentum is not None:
        needed = updates_to_forget(resolve_preset("torch", float(m.momentum)))
        if needed is not None and count < needed:
            flags.append(f"unconverged ({count} < {needed} updates)")
    live = eval_var >= m.eps
    ratio = _finite_median(stored_var[live], eval_var[live])
    if ratio is not None and abs(ratio - 1.0) > tol.shift:
        flags.append("shifted")
        if on_var is not None and path.dropout is not None:
            rebaked = _finite_median(stored_var[live], on_var[live])
            if rebaked is not None and abs(rebaked - 1.0) <= tol.rebake:
                flags.append("shift re-baked")
    dead = int(np.sum(~live))
    if dead:
        flags.append(f"{dead} dead channel(s)")
    if path.layer in audit or (path.dropout is not None and path.dropout.name in audit):
        flags.append("mode audit: training in eval()")
    return tuple(flags)
