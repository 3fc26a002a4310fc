"""Theory beside the simulation: the expected running statistics and their exact noise band.

Every expectation is computed from the *drawn dataset* (its rows are the population batches are
drawn from, without replacement within an epoch) with the dropout noise integrated out exactly,
so the finite dataset itself does not inflate z-scores:

* ``E[s] = f_n (sigma_y² - Var[batch mean])``, with ``f_n = n/(n-1)`` (unbiased) or 1, where
  ``Var[batch mean]`` includes the finite-population factor ``(N-b)/(N-1)``;
* ``E[R_T] = alpha^T R_0 + sum_t w_t E[s_t]`` over the actual schedule (full and last batches);
* ``Var[R_T] = sum_t w_t² Var[s_t]``, corrected for the rows being drawn *without replacement*
  within an epoch: the first-order (per-row) part of ``s_t`` is a permutation statistic, so its
  exact permutation variance replaces the independent-batch one. This matters as soon as the
  average spans a good part of an epoch (Keras' 0.99, torch's cumulative average).
* ``Var[s]`` is exact for rows drawn i.i.d. from the dataset, for every topology: a batch of
  ``b`` rows has ``s = mean_r(Q_r)/P - (mean_r D_r)²/P²`` with per-row
  ``Q_r = sum_p (y_rp - mu)²`` and ``D_r = sum_p (y_rp - mu)``, whose conditional moments
  given the row are integrated over the noise in closed form (independent elements, a shared
  channel-wise mask, or a linear unit's sum of independently masked inputs). For ``direct`` it
  is ``mu4/n - sigma⁴ (n-3)/(n(n-1))`` (:func:`varshift.core.theory.sample_variance_variance`).

The band of the running mean is exact; that of the running variance neglects the weak
(``O(1/n)`` relative) correlation of the second-order parts of ``s_t`` between batches of one
epoch.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numpy.typing import NDArray

from varshift.core.dropout import Dropout
from varshift.engine.bn import ema_weights, stored_over_biased
from varshift.engine.config import Plan

FloatArray = NDArray[np.float64]


# --- the schedule's weights ---------------------------------------------------------------------


class Schedule(NamedTuple):
    """Weight sums of the running average over the run's schedule (data-free)."""

    residual: float  # weight of R_0
    w1: tuple[float, float]  # sum of weights of full / last batches
    w2: tuple[float, float]  # sum of squared weights
    perm: dict[str, float]  # permutation corrections, see schedule()


#: Coefficient pairs whose permutation corrections :func:`band` needs.
_PAIRS = (("m", "m"), ("v", "v"), ("d", "d"), ("v", "d"))


def _step_coefficients(
    plan: Plan, g: NDArray[np.int64], is_last: NDArray[np.bool_]
) -> tuple[FloatArray, NDArray[np.int64], dict[str, FloatArray]]:
    """For steps ``g``: weights ``w_t``, rows ``b_t`` and the per-row coefficients ``m, v, d``."""
    total, preset, p = plan.steps, plan.preset, plan.positions
    n_full, n_last = plan.batch * p, max(plan.last, 1) * p
    f_full, f_last = stored_over_biased(preset, n_full), stored_over_biased(preset, max(n_last, 2))
    if preset.alpha is None:
        w = np.full(g.shape, 1.0 / total)
    else:
        w = ema_weights(preset.alpha, (total - 1 - g).astype(np.float64))
    rows = np.where(is_last, plan.last, plan.batch)
    n = rows * p
    coef = {"m": w / n, "v": w * np.where(is_last, f_last, f_full) / n}
    coef["d"] = coef["v"] / n
    return w, rows, coef


def schedule(plan: Plan, block: int = 1 << 15) -> Schedule:
    """Sum the running-average weights ``w_t`` over the schedule, in bounded memory.

    EMA: ``w_t = (1-alpha) alpha^(T-t)``; cumulative: ``1/T``. For per-row coefficients
    ``m_t = w_t/n_t`` (running mean), ``v_t = w_t f_t/n_t`` and ``d_t = w_t f_t/n_t²`` (running
    variance, see :func:`band`) the correction of pair ``(a, b)`` is
    ``sum_t b_t a_t b_t - sum_epochs (sum_{t in epoch} b_t a_t)(sum_{t in epoch} b_t b_t)``
    (``b_t`` rows in batch t). ``block`` steps at a time: its dozen arrays stay near 4 MB
    whatever the number of steps (``bench/``: peak memory at 1000 epochs as at 10).
    """
    total, per_epoch, preset = plan.steps, plan.per_epoch, plan.preset
    w1 = [0.0, 0.0]
    w2 = [0.0, 0.0]
    direct = dict.fromkeys(_PAIRS, 0.0)
    epochs = dict.fromkeys(_PAIRS, 0.0)
    carry_epoch = -1
    carry = {"m": 0.0, "v": 0.0, "d": 0.0}

    def close(sums: dict[str, FloatArray]) -> None:
        for a, b in _PAIRS:
            epochs[(a, b)] += float((sums[a] * sums[b]).sum())

    for start in range(0, total, block):
        g = np.arange(start, min(total, start + block))
        epoch = g // per_epoch
        is_last = (g % per_epoch) == plan.full_batches
        w, rows, coef = _step_coefficients(plan, g, is_last)
        for cls, mask in enumerate((~is_last, is_last)):
            w1[cls] += float(w[mask].sum())
            w2[cls] += float((w[mask] ** 2).sum())
        for a, b in _PAIRS:
            direct[(a, b)] += float((rows * coef[a] * coef[b]).sum())
        per = {
            k: np.bincount(epoch - epoch[0], weights=rows * c).astype(np.float64)
            for k, c in coef.items()
        }
        if epoch[0] == carry_epoch:
            for k in per:
                per[k][0] += carry[k]
        elif carry_epoch >= 0:
            close({k: np.array([v], dtype=np.float64) for k, v in carry.items()})
        close({k: v[:-1] for k, v in per.items()})
        carry = {k: float(v[-1]) for k, v in per.items()}
        carry_epoch = int(epoch[-1])
    close({k: np.array([v], dtype=np.float64) for k, v in carry.items()})
    residual = 0.0 if preset.alpha is None else float(preset.alpha**total)
    perm = {f"{a}{b}": direct[(a, b)] - epochs[(a, b)] for a, b in _PAIRS}
    return Schedule(residual=residual, w1=(w1[0], w1[1]), w2=(w2[0], w2[1]), perm=perm)


# --- the dropout noise, integrated out per row ------------------------------------------------


def noise_cumulants(dropout: Dropout) -> tuple[float, float, float, float]:
    """Mean and cumulants ``k2, k3, k4`` of the scalar noise ``xi`` in ``y = a(x) + b(x) xi``.

    Multiplicative kinds: ``xi = m`` (``a = 0``, ``b = x``); alpha dropout: ``xi ~ Bernoulli(q)``,
    ``a = d`` (the dropped value), ``b = A x + B - d``. The kind's registry record holds them,
    written without cancellation (:meth:`varshift.core.dropout.Dropout.noise_cumulants`): from
    the raw moments, ``k4 = E m⁴ - 4 E m³ E m - 3 (E m²)² + 12 E m² (E m)² - 6 (E m)⁴`` would
    lose every digit at small rates.
    """
    return dropout.noise_cumulants()


class _RowMoments(NamedTuple):
    """Per dataset row and BN feature, conditional on the row's inputs ``x`` (noise integrated
    out): ``G = E[Y|x]`` with ``Y`` the row's sum of the feature's P BN-input elements, and for
    ``D = Y - P mu`` and ``Q = sum_p (y_p - mu)²``: ``E[Q]``, ``E[Q²]``, ``E[D²]``, ``E[D⁴]``,
    ``E[Q D²]``. ``mu`` is the population mean of one element."""

    g: FloatArray
    mu: FloatArray
    eq: FloatArray
    eq2: FloatArray
    ed2: FloatArray
    ed4: FloatArray
    eqd2: FloatArray


def _moments_from_cumulants(
    k1: FloatArray, k2: FloatArray, k3: FloatArray, k4: FloatArray
) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray]:
    """Raw moments ``E[Z^j]``, j = 1..4, from cumulants."""
    k1s = k1 * k1
    return (
        k1,
        k2 + k1s,
        k3 + 3.0 * k2 * k1 + k1s * k1,
        k4 + 4.0 * k3 * k1 + 3.0 * k2 * k2 + 6.0 * k2 * k1s + k1s * k1s,
    )


def _element_affine(dropout: Dropout, x: FloatArray) -> tuple[FloatArray, FloatArray]:
    """``(E[y|x], b(x))`` of one dropout output element ``y = a(x) + b(x) xi``."""
    xbar = noise_cumulants(dropout)[0]
    if dropout.multiplicative:
        return xbar * x, x
    a, b, d = dropout._alpha_affine()
    beta = a * x + b - d
    return d + xbar * beta, beta


def _element_mean(plan: Plan, data: FloatArray, weights: FloatArray | None) -> FloatArray:
    """``mu``: population mean of one BN-input element per feature (``E[y|x]`` is affine)."""
    axes = plan.topo.reduce_axes
    g_mean = _element_affine(plan.dropout, data.mean(axis=axes))[0]
    if plan.topo.mixes:
        assert weights is not None
        return np.asarray(g_mean @ weights.T)
    return g_mean


def _row_moments(
    plan: Plan, data: FloatArray, weights: FloatArray | None, mu: FloatArray
) -> _RowMoments:
    """Exact conditional moments of each row's contribution to a batch's statistics.

    Elements of a row are ``y_p = a_p + b_p xi_p`` (:func:`noise_cumulants`); they are
    independent given ``x`` except under channel-wise masks, where one ``xi`` is shared. For
    ``linear`` the single element per row is ``u = sum_i w_i y_i``, whose cumulants are
    ``sum_i w_i^j b_i^j k_j`` (independent masks). ``mu`` is :func:`_element_mean`.
    """
    _, k2, k3, k4 = noise_cumulants(plan.dropout)
    g_el, beta = _element_affine(plan.dropout, data)
    n_rows, f, p = data.shape[0], plan.features, plan.positions
    if plan.topo.mixes:
        assert weights is not None
        g_unit = g_el @ weights.T
        b2, w2 = beta * beta, weights * weights
        cum = [
            g_unit - mu,
            b2 @ w2.T * k2,
            (b2 * beta) @ (w2 * weights).T * k3,
            (b2 * b2) @ (w2 * w2).T * k4,
        ]
        return _independent_rows(g_unit, mu, *(c[:, :, None] for c in cum))
    g_el = g_el.reshape(n_rows, f, p)
    beta = beta.reshape(n_rows, f, p)
    g = g_el.sum(axis=2)
    dev = g_el - mu[:, None]
    if not plan.channelwise:
        b2 = beta * beta
        return _independent_rows(g, mu, dev, b2 * k2, b2 * beta * k3, b2 * b2 * k4)
    # One xi per (row, channel): D = A0 + A1 eta, Q = B0 + B1 eta + B2 eta², eta = xi - E[xi].
    c4 = k4 + 3.0 * k2 * k2  # E[eta⁴]
    a0, a1 = dev.sum(axis=2), beta.sum(axis=2)
    b0, b1, b2 = (dev * dev).sum(axis=2), 2.0 * (dev * beta).sum(axis=2), (beta * beta).sum(axis=2)
    a0s, a1s = a0 * a0, a1 * a1
    return _RowMoments(
        g=g,
        mu=mu,
        eq=b0 + b2 * k2,
        eq2=b0 * b0 + (b1 * b1 + 2.0 * b0 * b2) * k2 + 2.0 * b1 * b2 * k3 + b2 * b2 * c4,
        ed2=a0s + a1s * k2,
        ed4=a0s * a0s + 6.0 * a0s * a1s * k2 + 4.0 * a0 * a1s * a1 * k3 + a1s * a1s * c4,
        eqd2=b0 * a0s
        + (b0 * a1s + 2.0 * b1 * a0 * a1 + b2 * a0s) * k2
        + (b1 * a1s + 2.0 * b2 * a0 * a1) * k3
        + b2 * a1s * c4,
    )


def _independent_rows(
    g: FloatArray, mu: FloatArray, k1: FloatArray, k2: FloatArray, k3: FloatArray, k4: FloatArray
) -> _RowMoments:
    """:class:`_RowMoments` for elements independent given ``x``; ``k_j`` are ``(N, F, P)``
    cumulants of ``Z_p = y_p - mu``."""
    if k1.shape[2] == 1:  # one element per row: Q = D², so every moment is E[Z²] or E[Z⁴]
        _, z2, _, z4 = _moments_from_cumulants(k1[:, :, 0], k2[:, :, 0], k3[:, :, 0], k4[:, :, 0])
        return _RowMoments(g=g, mu=mu, eq=z2, eq2=z4, ed2=z2, ed4=z4, eqd2=z4)
    e1, e2, e3, e4 = _moments_from_cumulants(k1, k2, k3, k4)
    s1, s2, s3, s4 = (e.sum(axis=2) for e in (e1, e2, e3, e4))
    s11, s22 = (e1 * e1).sum(axis=2), (e2 * e2).sum(axis=2)
    s31, s21, s211 = (e3 * e1).sum(axis=2), (e2 * e1).sum(axis=2), (e2 * e1 * e1).sum(axis=2)
    kk1, kk2, kk3, kk4 = (k.sum(axis=2) for k in (k1, k2, k3, k4))  # cumulants of D add up
    pairs2 = s2 * s2 - s22  # sum_{p != q} e2_p e2_q
    return _RowMoments(
        g=g,
        mu=mu,
        eq=s2,
        eq2=s4 + pairs2,
        ed2=s2 + s1 * s1 - s11,
        ed4=_moments_from_cumulants(kk1, kk2, kk3, kk4)[3],
        eqd2=s4
        + pairs2
        + 2.0 * (s3 * s1 - s31)
        + s2 * (s1 * s1 - s11)
        - 2.0 * s1 * s21
        + 2.0 * s211,
    )


class _RowSums:
    """Streaming means over dataset rows of :class:`_RowMoments`, with population variances of
    ``g``, ``eq``, ``ed2`` and the covariance of ``eq`` and ``ed2`` (Chan et al.'s update)."""

    MEANS = ("g", "eq", "ed2", "ed4", "eq2", "eqd2")
    SPREAD = ("g", "eq", "ed2")

    def __init__(self, features: int) -> None:
        self.count = 0
        self.mean = {k: np.zeros(features) for k in self.MEANS}
        self.m2 = {k: np.zeros(features) for k in self.SPREAD}
        self.c = np.zeros(features)

    def add(self, rm: _RowMoments) -> None:
        k = rm.g.shape[0]
        total = self.count + k
        w = self.count * k / total
        cols = {name: getattr(rm, name) for name in self.MEANS}
        # With one element per row several moments are one array (Q = D²): reduce each once.
        means: dict[int, FloatArray] = {}
        devs: dict[int, FloatArray] = {}
        squares: dict[int, FloatArray] = {}
        for col in cols.values():
            if id(col) not in means:
                means[id(col)] = col.mean(axis=0)
        for name in self.SPREAD:
            col = cols[name]
            if id(col) not in devs:
                devs[id(col)] = col - means[id(col)]
                squares[id(col)] = (devs[id(col)] ** 2).sum(axis=0)
        delta = {}
        for name, col in cols.items():
            delta[name] = means[id(col)] - self.mean[name]
            if name in self.SPREAD:
                self.m2[name] = self.m2[name] + squares[id(col)] + delta[name] ** 2 * w
            self.mean[name] = self.mean[name] + delta[name] * (k / total)
        dq, dd = devs[id(cols["eq"])], devs[id(cols["ed2"])]
        cross = squares[id(cols["eq"])] if dq is dd else (dq * dd).sum(axis=0)
        self.c = self.c + cross + delta["eq"] * delta["ed2"] * w
        self.count = total

    @property
    def var(self) -> dict[str, FloatArray]:
        return {k: v / self.count for k, v in self.m2.items()}

    @property
    def cov(self) -> FloatArray:
        return self.c / self.count


# --- the band ----------------------------------------------------------------------------------


class Band(NamedTuple):
    """Theory's expectations and noise sds of a run's statistics, per feature ``(F,)``.

    ``mu`` is the population mean of one BN-input element in training; ``batch_var_*`` describe
    one stored batch variance of a full batch; ``running_*`` the final running statistics.
    """

    mu: FloatArray
    batch_var_expected: FloatArray
    batch_var_sd: FloatArray
    running_mean_expected: FloatArray
    running_mean_sd: FloatArray
    running_var_expected: FloatArray
    running_var_sd: FloatArray


def _row_sums(plan: Plan, data: FloatArray, weights: FloatArray | None, mu: FloatArray) -> _RowSums:
    """:class:`_RowMoments` of every dataset row, summed in bounded memory like the run."""
    acc = _RowSums(plan.features)
    for start in range(0, plan.rows, plan.chunk_rows):
        acc.add(_row_moments(plan, data[start : start + plan.chunk_rows], weights, mu))
    return acc


def band(plan: Plan, data: FloatArray, weights: FloatArray | None, sched: Schedule) -> Band:
    """Theory's expectations and noise sds of the running statistics, per feature.

    With per-row ``Q_r``, ``D_r`` (:class:`_RowMoments`), a batch of ``b`` rows has biased
    variance ``s = mean_r(Q_r)/P - (mean_r D_r)²/P²``. For rows drawn i.i.d. from the dataset:
    ``Var[s] = Var Q/(P² b) + (E D⁴ + (2b-3)(E D²)²)/(P⁴ b³) - 2 Cov(Q, D²)/(P³ b²)`` (for
    ``P = 1`` this is the classic ``(b-1)²/b³ mu4 - (b-1)(b-3)/b³ sigma⁴``), times ``f²`` if
    stored unbiased. The expectation uses the exact without-replacement variance of the batch
    mean; the band swaps the i.i.d. variance of the per-row part of ``s``,
    ``(f/n)(Q_r - D_r²/n)`` projected on the row, for its permutation variance.
    """
    big_n, p, preset = plan.rows, plan.positions, plan.preset
    mu = _element_mean(plan, data, weights)
    acc = _row_sums(plan, data, weights, mu)
    var_g, var_h, var_k, cov_hk = acc.var["g"], acc.var["eq"], acc.var["ed2"], acc.cov
    m_eq, m_ed2, m_ed4 = acc.mean["eq"], acc.mean["ed2"], acc.mean["ed4"]
    var_q = acc.mean["eq2"] - m_eq * m_eq
    cov_qd2 = acc.mean["eqd2"] - m_eq * m_ed2
    sigma2 = m_eq / p
    mean_nc = m_ed2 - var_g  # E[Var(Y|x)]
    fpc_scale = 1.0 / (big_n - 1) if big_n > 1 else 0.0

    classes = ((plan.batch, 0), (plan.last, 1)) if plan.last else ((plan.batch, 0),)
    expected_s: dict[int, FloatArray] = {}
    var_s: dict[int, FloatArray] = {}
    for b, cls in classes:
        n = b * p
        f = stored_over_biased(preset, max(n, 2))
        f2 = f**2
        var_mean = (var_g * (big_n - b) * fpc_scale + mean_nc) / (b * p * p)
        expected_s[cls] = (sigma2 - var_mean) * f
        var_s[cls] = f2 * (
            var_q / (p * p * b)
            + (m_ed4 + (2 * b - 3) * m_ed2 * m_ed2) / (p**4 * b**3)
            - 2.0 * cov_qd2 / (p**3 * b * b)
        )
    exp_var = sched.residual + sum(sched.w1[c] * expected_s[c] for _, c in classes)
    perm_var = var_h * sched.perm["vv"] + var_k * sched.perm["dd"] - 2.0 * cov_hk * sched.perm["vd"]
    var_var = sum(sched.w2[c] * var_s[c] for _, c in classes) + fpc_scale * perm_var
    var_mean_t = (
        sum(sched.w2[c] * m_ed2 / (b * p * p) for b, c in classes)
        + var_g * fpc_scale * sched.perm["mm"]
    )
    return Band(
        mu=mu,
        batch_var_expected=expected_s[0],
        batch_var_sd=np.sqrt(np.maximum(var_s[0], 0.0)),
        running_mean_expected=(1.0 - sched.residual) * mu,
        running_mean_sd=np.sqrt(np.maximum(var_mean_t, 0.0)),
        running_var_expected=np.asarray(exp_var, dtype=np.float64),
        running_var_sd=np.sqrt(np.maximum(var_var, 0.0)),
    )
