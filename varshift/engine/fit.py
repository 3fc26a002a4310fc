"""The ``fit`` demonstration: BN's ``gamma, beta`` trained with Adam, with and without dropout.

Both models learn to reproduce the clean input (identity target, Keras' ``mse``); the one trained
under dropout learns the shrunk scale ``gamma* = v / sqrt(Var_train + eps)``
(:func:`varshift.core.theory.gamma_star`). At test time its predictions move both because of the
variance shift and because of ``gamma``; the data-free correction of its running statistics
removes the first part only.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from varshift.core.dropout import DEFAULT_KIND, Dropout
from varshift.core.theory import corrected_variance, gamma_star
from varshift.engine.band import Band
from varshift.engine.bn import BNState, full_batches, split_stats
from varshift.engine.config import Plan
from varshift.engine.results import FitResult, FitRow, mean_row

FloatArray = NDArray[np.float64]

#: Keras' Adam defaults (``keras/src/optimizers/adam.py``), used by the ``fit`` demonstration.
ADAM_BETA_1 = 0.9
ADAM_BETA_2 = 0.999
ADAM_EPSILON = 1e-7


class AdamFit:
    """Adam on ``(gamma, beta)`` of two models (clean, dropout) with an identity target.

    Per batch, BN normalises with the batch statistics, ``zhat = (y - m)/sqrt(v + eps)``; the
    loss is Keras' ``mse`` (mean over rows and features), so with ``mean(zhat) = 0`` and
    ``mean(zhat²) = v/(v + eps)``: ``dL/dgamma = (2/F)(gamma v/(v+eps) - cov(x, y)/sqrt(v+eps))``
    and ``dL/dbeta = (2/F)(beta - mean(x))``. Adam as in ``keras/src/optimizers/adam.py``.
    """

    def __init__(self, features: int, lr: float) -> None:
        # theta[param, model, feature]: param 0 = gamma, 1 = beta; model 0 = clean, 1 = dropout.
        self.theta = np.zeros((2, 2, features))
        self.theta[0] = 1.0
        self.m = np.zeros_like(self.theta)
        self.v = np.zeros_like(self.theta)
        self.lr = lr
        self.t = 0

    def run(self, q: FloatArray, r: FloatArray) -> None:
        """K Adam steps with gradients ``g_k = q_k * theta - r_k`` (arrays ``(K, 2, 2, F)``)."""
        k = q.shape[0]
        steps = np.arange(self.t + 1, self.t + k + 1, dtype=np.float64)
        rates = self.lr * np.sqrt(1.0 - ADAM_BETA_2**steps) / (1.0 - ADAM_BETA_1**steps)
        theta, m, v = self.theta, self.m, self.v
        g = np.empty_like(theta)
        tmp = np.empty_like(theta)
        c1, c2 = 1.0 - ADAM_BETA_1, 1.0 - ADAM_BETA_2
        for i in range(k):  # Adam is a nonlinear recurrence: one step at a time
            np.multiply(theta, q[i], out=g)
            g -= r[i]
            np.subtract(g, m, out=tmp)
            tmp *= c1
            m += tmp
            np.multiply(g, g, out=tmp)
            tmp -= v
            tmp *= c2
            v += tmp
            np.sqrt(v, out=tmp)
            tmp += ADAM_EPSILON
            np.divide(m, tmp, out=tmp)
            tmp *= rates[i]
            theta -= tmp
        self.t += k


def fit_coefficients(
    x: FloatArray, y: FloatArray, sizes: tuple[int, ...], eps: float
) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray]:
    """Gradient coefficients ``(q, r)`` per batch, and the clean model's batch mean/variance."""
    mx, vx = split_stats(x, sizes)
    _, vy = split_stats(y, sizes)
    cov = _split_stats_cov(x, y, sizes)
    k, f = mx.shape
    scale = 2.0 / f
    q = np.empty((k, 2, 2, f))
    r = np.empty((k, 2, 2, f))
    q[:, 0, 0] = scale * vx / (vx + eps)
    q[:, 0, 1] = scale * vy / (vy + eps)
    q[:, 1] = scale
    r[:, 0, 0] = scale * vx / np.sqrt(vx + eps)
    r[:, 0, 1] = scale * cov / np.sqrt(vy + eps)
    r[:, 1, 0] = scale * mx
    r[:, 1, 1] = scale * mx
    return q, r, mx, vx


def _split_stats_cov(x: FloatArray, y: FloatArray, sizes: tuple[int, ...]) -> FloatArray:
    """Per-batch biased covariance of ``x`` and ``y`` (E, R, F) → ``(E·K, F)``."""
    e, f = x.shape[0], x.shape[-1]
    k_full = full_batches(sizes)
    b = sizes[0]
    out = []
    for lo, cnt, size in ((0, k_full, b), (k_full * b, len(sizes) - k_full, sizes[-1])):
        if cnt == 0:
            continue
        xs = x[:, lo : lo + cnt * size].reshape(e, cnt, size, f)
        ys = y[:, lo : lo + cnt * size].reshape(e, cnt, size, f)
        dx = xs - xs.mean(axis=2, keepdims=True)
        dy = ys - ys.mean(axis=2, keepdims=True)
        out.append((dx * dy).mean(axis=2))
    return np.concatenate(out, axis=1).reshape(-1, f)


def _predict(
    gamma: FloatArray, beta: FloatArray, x: float, mean: FloatArray, var: FloatArray, eps: float
) -> FloatArray:
    """BN at test time: ``gamma (x - mean)/sqrt(var + eps) + beta``."""
    return np.asarray(gamma * (x - mean) / np.sqrt(var + eps) + beta)


def _gamma_stars(c: FloatArray, v: FloatArray, dropout: Dropout, eps: float) -> FloatArray:
    """:func:`varshift.core.theory.gamma_star` per feature."""
    return np.array(
        [gamma_star(float(ci), float(vi), dropout, eps)[0] for ci, vi in zip(c, v, strict=True)]
    )


def fit_result(
    plan: Plan,
    c: FloatArray,
    v: FloatArray,
    band: Band,
    state: BNState,
    clean: BNState,
    fit: AdamFit,
) -> FitResult:
    """Predictions at test time for ``probe`` from the clean, dropout and corrected models."""
    dropout, preset, eps = plan.dropout, plan.preset, plan.preset.eps
    n = plan.batch * plan.positions
    gs = _gamma_stars(c, v, dropout, eps)
    gs_clean = _gamma_stars(c, v, Dropout(DEFAULT_KIND, 0.0), eps)
    (g_clean, g_drop), (b_clean, b_drop) = fit.theta
    probe = plan.probe
    seen = dropout.test_scale * probe  # what BN sees at test time after the dropout layer
    cm, cv = corrected_variance(state.running_mean, state.running_var, dropout, preset, n)
    pred_clean = _predict(g_clean, b_clean, probe, clean.running_mean, clean.running_var, eps)
    pred_drop = _predict(g_drop, b_drop, seen, state.running_mean, state.running_var, eps)
    pred_corr = _predict(g_drop, b_drop, seen, cm, cv, eps)
    em, ev = band.running_mean_expected, band.running_var_expected
    tm, tv = corrected_variance(em, ev, dropout, preset, n)
    th_drop = _predict(gs, c, seen, em, ev, eps)
    th_corr = _predict(gs, c, seen, tm, tv, eps)
    rows = tuple(
        FitRow(
            feature=str(j),
            probe=probe,
            gamma_star=float(gs[j]),
            beta_star=float(c[j]),
            gamma_star_clean=float(gs_clean[j]),
            gamma_clean=float(g_clean[j]),
            beta_clean=float(b_clean[j]),
            gamma_dropout=float(g_drop[j]),
            beta_dropout=float(b_drop[j]),
            running_mean_clean=float(clean.running_mean[j]),
            running_var_clean=float(clean.running_var[j]),
            corrected_running_mean=float(cm[j]),
            corrected_running_var=float(cv[j]),
            pred_clean=float(pred_clean[j]),
            pred_dropout=float(pred_drop[j]),
            pred_corrected=float(pred_corr[j]),
            pred_dropout_theory=float(th_drop[j]),
            pred_corrected_theory=float(th_corr[j]),
        )
        for j in range(plan.features)
    )
    return FitResult(rows=rows, mean=mean_row(rows, FitRow), lr=plan.lr)
