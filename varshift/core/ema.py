"""The running average every BatchNorm keeps, and the weights it gives each batch.

One update, in every framework once its momentum is read as a decay ``alpha`` (the weight of
the old value; :class:`varshift.core.presets.Preset`)::

    R_t = alpha R_{t-1} + (1 - alpha) s_t          (EMA)
    R_t = R_{t-1} + (s_t - R_{t-1}) / t            (cumulative average, alpha = None)

After ``T`` updates ``R_T = w_0 R_0 + sum_t w_t s_t`` with the residual ``w_0 = alpha^T`` and
batch weights ``w_t = (1 - alpha) alpha^(T-t)`` (EMA) or ``1/T`` (cumulative, ``w_0 = 0``).
The closed forms need two sums of these weights: the residual (how much of the initial value
is left) and ``sum_t w_t²`` (how much of one batch's noise is left); this module is their home.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray


def ema_residual(alpha: float | None, steps: int) -> float:
    """Weight ``alpha^T`` the initial value keeps after ``T = steps`` updates.

    ``alpha=None`` (cumulative average): 1 before the first update, 0 after it.

    Examples
    --------
    >>> ema_residual(0.5, 3)
    0.125
    >>> ema_residual(None, 3)
    0.0
    """
    if alpha is None:
        return 1.0 if steps == 0 else 0.0
    return float(alpha**steps)


def ema_weight_sums(alpha: float | None, steps: int) -> tuple[float, float]:
    """``(residual, sum of squared batch weights)`` of the running average after ``steps``.

    Parameters
    ----------
    alpha:
        Decay (weight of the old value), or ``None`` for the cumulative average.
    steps:
        ``T``, the number of updates (``>= 0``).

    Returns
    -------
    residual, squared:
        ``alpha^T`` and ``sum_t w_t² = (1-alpha)/(1+alpha) (1 - alpha^(2T))`` (EMA) or
        ``1/T`` (cumulative). For independent batches with ``Var[s_t] = V`` the running value
        has ``Var[R_T] = squared * V``.

    Examples
    --------
    >>> ema_weight_sums(0.5, 1)
    (0.5, 0.25)
    >>> ema_weight_sums(None, 4)
    (0.0, 0.25)
    """
    if steps == 0:
        return 1.0, 0.0
    if alpha is None:
        return 0.0, 1.0 / steps
    a = alpha
    # R_T = a^T R_0 + (1-a) sum_k a^k s_{T-k}: squared weights sum to (1-a)²(1-a^{2T})/(1-a²).
    sq = (1 - a) / (1 + a) * (1 - a ** (2 * steps)) if a < 1.0 else 0.0
    return a**steps, sq


def ema_batch_weights(
    alpha: float | None, steps: int, index: NDArray[np.integer]
) -> NDArray[np.float64]:
    """Weights ``w_t`` of the updates numbered ``index`` (0-based) in a run of ``steps`` updates.

    ``(1 - alpha) alpha^(steps - 1 - index)`` for the EMA, ``1/steps`` for the cumulative
    average; the last update (``index = steps - 1``) weighs ``1 - alpha``.

    Examples
    --------
    >>> ema_batch_weights(0.5, 3, np.arange(3)).tolist()
    [0.125, 0.25, 0.5]
    """
    g = np.asarray(index)
    if alpha is None:
        return np.full(g.shape, 1.0 / steps)
    return (1.0 - alpha) * np.power(alpha, (steps - 1 - g).astype(np.float64))


def ema_weight_sums_at(
    alpha: float | None, steps: NDArray[np.floating]
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """:func:`ema_weight_sums` for an array of update counts (a running value's trajectory).

    Examples
    --------
    >>> resid, sq = ema_weight_sums_at(0.5, np.array([0.0, 1.0, 2.0]))
    >>> resid.tolist(), sq.tolist()
    ([1.0, 0.5, 0.25], [0.0, 0.25, 0.3125])
    """
    t = np.asarray(steps, dtype=np.float64)
    if alpha is None:
        return np.where(t == 0, 1.0, 0.0), np.where(t == 0, 0.0, 1.0 / np.maximum(t, 1.0))
    a = alpha
    return np.power(a, t), (1.0 - a) / (1.0 + a) * (1.0 - np.power(a, 2.0 * t))
