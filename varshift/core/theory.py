"""Closed forms of the Dropout → BatchNorm variance shift.

Notation (DESIGN §2): dropout ``rate`` r, keep ``q = 1 - r``; the dropout input of one feature
has mean ``c`` and (population) variance ``v``; ``kappa = E[m²]/E[m]²`` for multiplicative
noise ``m``. All variances here are *population* variances unless a name says ``stored``.

References
----------
Li, Chen, Hu, Yang. "Understanding the Disharmony between Dropout and Batch Normalization by
Variance Shift", CVPR 2019 (arXiv 1801.05134): eq. (4)–(6) case (a), eq. (12) case (b).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, overload

import numpy as np
from numpy.typing import ArrayLike, NDArray

from varshift.core.dropout import DEFAULT_KIND, Dropout, InputMoments
from varshift.core.ema import ema_residual, ema_weight_sums
from varshift.core.errors import ValidationError
from varshift.core.presets import Preset
from varshift.core.topology import (
    DEFAULT_TOPOLOGY,
    THEORY_TOPOLOGIES,
    check_topology,
)
from varshift.core.topology import TOPOLOGIES as TOPOLOGY_RECORDS
from varshift.core.validate import check_finite, check_int, check_magnitude, check_range

FloatArray = NDArray[np.float64]


@dataclass(frozen=True)
class Shift:
    """Train- and test-time moments of what the BatchNorm layer sees, and their ratio.

    Attributes
    ----------
    train_mean, train_var:
        Mean and population variance of the BN input in training mode (dropout on).
    test_mean, test_var:
        The same at test time (dropout off).
    ratio:
        ``Delta = test_var / train_var``; ``nan`` when both are 0.
    """

    train_mean: float
    train_var: float
    test_mean: float
    test_var: float

    @property
    def ratio(self) -> float:
        """Shift ratio ``Delta = Var_test / Var_train`` (≤ 1 for multiplicative noise)."""
        if self.train_var == 0.0:
            return math.nan if self.test_var == 0.0 else math.inf
        return self.test_var / self.train_var

    @property
    def inverse_ratio(self) -> float:
        """``1 / Delta``: by how much the stored variance overstates the test variance."""
        if self.test_var == 0.0:
            return math.nan if self.train_var == 0.0 else math.inf
        return self.train_var / self.test_var


def _check_mean_var(c: float, v: float) -> tuple[float, float]:
    return check_magnitude("mean", c), check_magnitude("var", v, nonnegative=True)


def shift_direct(c: float, v: float, dropout: Dropout) -> Shift:
    """Case (a): dropout directly before BN, one feature with input mean ``c``, variance ``v``.

    Notes
    -----
    Bernoulli (inverted) dropout with keep ``q``: ``Var_train = (1/q)(c² + v) - c²`` and
    ``Var_test = v`` (Li et al. eq. 4–6); generally ``Var_train = kappa (c² + v) - c²``. Means
    do not shift, except under alpha dropout (``E = a q c``) and vanilla dropout (both ``q c``).

    Examples
    --------
    >>> s = shift_direct(0.0, 1.0, Dropout("bernoulli", 0.5))
    >>> (s.train_var, s.test_var, s.ratio)
    (2.0, 1.0, 0.5)
    """
    c, v = _check_mean_var(c, v)
    train_mean, train_var = dropout.train_mean_var(c, v)
    k = dropout.test_scale
    return Shift(train_mean, train_var, k * c, k * k * v)


def _slope(dropout: Dropout) -> float:
    """``Cov(y_i, y_j) = slope² Cov(x_i, x_j)`` for i ≠ j (independent masks): E[m], or ``a q``."""
    if dropout.multiplicative:
        return dropout.mask_moments()[0]
    a, _, _ = dropout._alpha_affine()
    return a * dropout.keep


def shift_linear(
    means: ArrayLike,
    cov: ArrayLike,
    weights: ArrayLike,
    dropout: Dropout,
) -> tuple[FloatArray, FloatArray]:
    """Case (b), general form: dropout (element-wise) → linear map ``W`` → BN.

    Parameters
    ----------
    means:
        ``(d,)`` input means ``c_i``.
    cov:
        ``(d, d)`` input covariance ``S`` (symmetric positive semi-definite).
    weights:
        ``(d,)`` weights of one unit, or ``(k, d)`` for k units.
    dropout:
        The dropout before the linear map.

    Returns
    -------
    train_var, test_var:
        Arrays of shape ``()`` or ``(k,)``: population variances of each unit's output.

    Notes
    -----
    ``Var_test = w'Sw``; with independent masks ``Var_train = s² w'Sw + sum_i w_i² (V_i - s² S_ii)``
    where ``V_i`` is case (a)'s training variance of input i and ``s = E[m]``. For ``E[m] = 1``
    this is DESIGN's ``w'Sw + (kappa - 1) sum_i w_i² (c_i² + S_ii)``.
    """
    c = np.asarray(means, dtype=np.float64)
    s = np.asarray(cov, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    d = c.shape[0] if c.ndim == 1 else -1
    if c.ndim != 1 or s.shape != (d, d) or w.shape[-1] != d or w.ndim > 2:
        raise ValidationError(
            f"shapes must be means (d,), cov (d, d), weights (d,) or (k, d); got "
            f"{c.shape}, {s.shape}, {w.shape}"
        )
    if not (np.all(np.isfinite(c)) and np.all(np.isfinite(s)) and np.all(np.isfinite(w))):
        raise ValidationError("means, cov and weights must be finite")
    diag = np.diag(s)
    if np.any(diag < 0):
        raise ValidationError("cov must have a non-negative diagonal")
    per_input = np.array(
        [dropout.train_mean_var(ci, vi)[1] for ci, vi in zip(c, diag, strict=True)]
    )
    slope = _slope(dropout)
    wsw = np.einsum("...i,ij,...j->...", w, s, w)
    extra = (w * w) @ (per_input - slope**2 * diag)
    k = dropout.test_scale
    return slope**2 * wsw + extra, k * k * wsw


def check_rho(rho: float, width: int) -> float:
    """Validate an equicorrelation ``rho`` for ``width`` inputs: ``[-1/(d-1), 1]`` (PSD range)."""
    r = check_finite("rho", rho)
    low = -1.0 / (width - 1) if width > 1 else -math.inf
    if r > 1.0 or r < low - 1e-12:
        lo = f"{low:.6g}" if width > 1 else "-inf"
        raise ValidationError(
            f"rho must be in [{lo}, 1] for width {width} (the covariance must be positive "
            f"semi-definite); got {rho}"
        )
    return r


def shift_equicorrelated(
    c: float,
    v: float,
    dropout: Dropout,
    *,
    rho: float,
    D: float,
    width: int | None = None,
) -> Shift:
    """Case (b) in the paper's equicorrelated form (Li et al. eq. 12).

    All inputs share mean ``c`` and variance ``v`` with pairwise correlation ``rho``; the unit's
    weights enter only through ``D = d cos²θ = (sum w)² / sum w²``. Variances are per unit of
    ``sum w²``.

    Notes
    -----
    ``Delta = (v + v rho (D-1)) / ((1/q)(c² + v) - c² + v rho (D-1))`` for bernoulli. With
    ``rho = 0`` it equals case (a) for every width; it tends to 1 as ``D`` grows only when
    ``rho > 0``.

    Examples
    --------
    >>> round(shift_equicorrelated(0.0, 1.0, Dropout("bernoulli", 0.5), rho=0.0, D=50).ratio, 12)
    0.5
    """
    c, v = _check_mean_var(c, v)
    d_eff = check_range("D", D, 0.0, None)
    if width is not None:
        width = check_int("width", width, 1)
        if d_eff > width * (1 + 1e-12):
            raise ValidationError(f"D must be <= width ({width}) since cos²θ <= 1; got {D}")
    r = check_rho(rho, width if width is not None else max(1, math.ceil(d_eff)))
    corr = v * (1.0 + r * (d_eff - 1.0))
    if corr < -1e-12 * max(v, 1.0):
        raise ValidationError(
            f"rho must be >= -1/(D-1) = {-1.0 / (d_eff - 1.0):.6g} so that the unit's variance "
            f"is non-negative; got {rho}"
        )
    corr = max(corr, 0.0)
    one = shift_direct(c, v, dropout)
    slope = _slope(dropout)
    k = dropout.test_scale
    train_var = slope**2 * corr + (one.train_var - slope**2 * v)
    # With sum w² = 1 and sum w >= 0, the unit's mean is c sum w = c sqrt(D).
    total = math.sqrt(d_eff)
    return Shift(slope * c * total, train_var, k * c * total, k * k * corr)


# --- running statistics ---------------------------------------------------------------------


def sample_variance_variance(var: float, mu4: float, n: int, *, unbiased: bool = True) -> float:
    """Variance of the sample variance of ``n`` iid draws.

    Unbiased (÷ (n-1)): ``mu4/n - var² (n-3)/(n(n-1))``; the biased one (÷ n) scales this by
    ``((n-1)/n)²``. ``mu4`` is the central fourth moment.

    Examples
    --------
    >>> round(sample_variance_variance(1.0, 3.0, 11), 12)  # normal: 2 var²/(n-1)
    0.2
    """
    n = check_int("batch_size", n, 2)
    out = mu4 / n - var * var * (n - 3) / (n * (n - 1))
    return out if unbiased else out * ((n - 1) / n) ** 2


def residual_weight(preset: Preset, steps: int) -> float:
    """Weight ``alpha^T`` the initial value (0 or 1) keeps after ``T`` updates (0 if cumulative)."""
    return ema_residual(preset.alpha, check_int("steps", steps, 0))


def updates_to_forget(preset: Preset, tol: float = 0.01) -> int | None:
    """Smallest ``T`` with ``alpha^T < tol``: updates until the initial value weighs < 1%.

    ``None`` if it is never forgotten (``alpha = 1``, e.g. torch momentum 0).

    Examples
    --------
    >>> from varshift.core.presets import resolve_preset
    >>> updates_to_forget(resolve_preset("keras"))
    459
    """
    check_range("tol", tol, 0.0, 1.0, closed="neither")
    if preset.cumulative:
        return 1
    assert preset.alpha is not None
    if preset.alpha == 0.0:
        return 1
    if preset.alpha >= 1.0:
        return None
    t = math.floor(math.log(tol) / math.log(preset.alpha)) + 1
    return t


@dataclass(frozen=True)
class RunningStats:
    """Expected running mean and variance after ``steps`` updates, with their noise.

    Attributes
    ----------
    expected_mean, mean_sd:
        ``E[R_T]`` of the running mean (starts at 0) and its standard deviation.
    expected_var, var_sd:
        ``E[R_T]`` of the stored running variance (starts at 1) and its standard deviation.
    batch_var_mean, batch_var_sd:
        Mean and sd of one stored batch variance ``s`` (unbiased or biased per preset).
    residual:
        ``alpha^T``, the weight the initial values still carry.
    """

    expected_mean: float
    mean_sd: float
    expected_var: float
    var_sd: float
    batch_var_mean: float
    batch_var_sd: float
    residual: float


def running_stats(
    out: InputMoments,
    preset: Preset,
    batch_size: int,
    steps: int,
) -> RunningStats:
    """Expected stored running statistics for a BN input with moments ``out``.

    Parameters
    ----------
    out:
        Raw moments of what BN sees in training (the dropout output), per element.
    preset:
        The framework convention (decay, biased/unbiased stored variance).
    batch_size:
        ``n``, elements reduced per channel in one batch (N, or N·H·W for images).
    steps:
        ``T``, the number of training-mode updates.

    Notes
    -----
    ``E[R_T] = alpha^T R_0 + (1 - alpha^T) E[s]`` with ``E[s] = Var`` (unbiased) or
    ``(n-1)/n Var`` (biased); for independent batches
    ``Var[R_T] = (1-alpha)/(1+alpha) (1 - alpha^(2T)) Var[s]`` (``Var[s]/T`` for the cumulative
    average). Assumes the n elements of a batch are independent.
    """
    n = preset.check_batch(check_int("batch_size", batch_size, 1))
    steps = check_int("steps", steps, 0)
    var = out.var
    es_factor = preset.stored_factor(n)
    es = var * es_factor
    # Var of the stored estimator = Var of the unbiased one times (E[stored]/Var)².
    vs = sample_variance_variance(var, out.mu4, n) * es_factor**2 if n > 1 else 0.0
    resid, sq = ema_weight_sums(preset.alpha, steps)
    return RunningStats(
        expected_mean=(1 - resid) * out.mean,
        mean_sd=math.sqrt(sq * var / n),
        expected_var=resid * 1.0 + (1 - resid) * es,
        var_sd=math.sqrt(sq * max(vs, 0.0)),
        batch_var_mean=es,
        batch_var_sd=math.sqrt(max(vs, 0.0)),
        residual=resid,
    )


# --- data-free correction -----------------------------------------------------------------------


@overload
def corrected_variance(
    stored_mean: float,
    stored_var: float,
    dropout: Dropout,
    preset: Preset,
    batch_size: int | None = None,
    *,
    method: str = "debiased",
    target: str = "framework",
) -> tuple[float, float]: ...


@overload
def corrected_variance(
    stored_mean: ArrayLike,
    stored_var: ArrayLike,
    dropout: Dropout,
    preset: Preset,
    batch_size: int | None = None,
    *,
    method: str = "debiased",
    target: str = "framework",
) -> tuple[FloatArray, FloatArray]: ...


def corrected_variance(
    stored_mean: ArrayLike,
    stored_var: ArrayLike,
    dropout: Dropout,
    preset: Preset,
    batch_size: int | None = None,
    *,
    method: str = "debiased",
    target: str = "framework",
) -> tuple[FloatArray, FloatArray] | tuple[float, float]:
    """Data-free correction of a BN's stored statistics when it directly follows dropout.

    Parameters
    ----------
    stored_mean, stored_var:
        The running mean and running variance as the framework stored them.
    dropout, preset:
        The dropout before the BN and the framework convention that stored the statistics.
    batch_size:
        ``n`` for the debiasing step of biased presets; ``None`` skips it.
    method:
        ``debiased``: undo the stored bias ``V n/(n-1)``, invert, re-apply it. ``naive``: invert
        the stored value directly (the common notebook correction).
    target:
        ``framework``: what the same framework would have stored without dropout;
        ``population``: the population variance the layer sees at test time.

    Returns
    -------
    mean, var:
        Corrected running mean and variance: Python floats when both inputs are scalars
        (``float``, ``int``, NumPy scalars), else float64 arrays of the broadcast shape (a 0-d
        array stays a 0-d array). The variance may be ≤ 0 when the stored value is
        inconsistent with the dropout rate; callers clip or reject it.

    Notes
    -----
    Bernoulli: ``v = q (V + mu²) - mu²`` (the inverse of case (a)); in general
    ``v = (V + mu²)/kappa - mu²``.

    Examples
    --------
    >>> from varshift.core.presets import resolve_preset
    >>> torch = resolve_preset("torch")
    >>> corrected_variance(0.0, 2.0, Dropout("bernoulli", 0.5), torch)
    (0.0, 1.0)
    >>> corrected_variance([0.0, 1.0], [2.0, 5.0], Dropout("bernoulli", 0.5), torch)[1]
    array([1., 2.])
    """
    mu = np.asarray(stored_mean, dtype=np.float64)
    var = np.asarray(stored_var, dtype=np.float64)
    if method not in ("debiased", "naive"):
        raise ValidationError(f"method must be one of debiased, naive; got {method!r}")
    if target not in ("framework", "population"):
        raise ValidationError(f"target must be one of framework, population; got {target!r}")
    factor = 1.0
    if batch_size is not None:
        n = preset.check_batch(check_int("batch_size", batch_size, 1))
        factor = preset.stored_factor(n)
    if method == "naive":
        m, v = dropout.test_from_train(mu, var)  # type: ignore[arg-type]
        rebias = 1.0
    else:
        m, v = dropout.test_from_train(mu, var / factor)  # type: ignore[arg-type]
        rebias = factor if target == "framework" else 1.0
    mean = np.asarray(m, dtype=np.float64)
    out = np.asarray(np.asarray(v, dtype=np.float64) * rebias)  # a 0-d product is a scalar
    if mean.shape != out.shape:  # a scalar mean with per-channel variances, or the reverse
        mean, out = (np.array(a) for a in np.broadcast_arrays(mean, out))
    if np.isscalar(stored_mean) and np.isscalar(stored_var):
        return float(mean), float(out)
    return mean, out


def gamma_star(
    c: float, v: float, dropout: Dropout, eps: float = 0.0, *, shift: Shift | None = None
) -> tuple[float, float]:
    """Least-squares optimum ``(gamma*, beta*)`` of a BN trained to reproduce its clean input.

    The model is ``gamma (y - E y)/sqrt(Var_train + eps) + beta`` on the dropout output ``y``
    and the target is the dropout input ``x`` (large-batch limit):
    ``gamma* = Cov(x, y)/sqrt(Var_train + eps)`` (``v / sqrt(Var_train)`` for bernoulli) and
    ``beta* = c``.

    ``shift`` replaces case (a) by another topology's shift (e.g.
    :func:`shift_equicorrelated`): ``Var_train`` is then its training variance and the clean
    variance its test variance undone by the test-time scale (``Var_test / k²``).

    Examples
    --------
    >>> gamma_star(0.0, 1.0, Dropout("bernoulli", 0.5))[0] == 1 / 2**0.5
    True
    """
    c, v = _check_mean_var(c, v)
    if shift is None:
        shift, clean_var = shift_direct(c, v, dropout), v
    else:
        clean_var = shift.test_var / dropout.test_scale**2
    denom = math.sqrt(shift.train_var + eps)
    return (_slope(dropout) * clean_var / denom if denom > 0 else 0.0), c


# --- the `varshift theory` table ------------------------------------------------------------------

#: Topologies the closed forms cover (:mod:`varshift.core.topology`); the old name.
TOPOLOGIES: tuple[str, ...] = THEORY_TOPOLOGIES


@dataclass(frozen=True)
class TheoryConfig:
    """Everything ``varshift theory`` evaluates, for one or several rates.

    ``topology="linear"`` is case (b) in the paper's equicorrelated form: ``width`` inputs with
    pairwise correlation ``rho`` and ``D = width * cos2`` (or ``D`` given directly).
    """

    rates: tuple[float, ...]
    mean: float = 0.0
    var: float = 1.0
    dropout: str = DEFAULT_KIND
    beta: float = 0.1
    topology: str = DEFAULT_TOPOLOGY
    width: int = 1
    rho: float = 0.0
    cos2: float | None = None
    D: float | None = None
    preset: Preset | None = None
    batch_size: int = 32
    steps: int = 1000


@dataclass(frozen=True)
class TheoryRow:
    """One rate's closed-form results (see :func:`theory_table`). Variances are population ones
    unless named ``stored``/``running``; ``None`` marks a quantity undefined for the case."""

    dropout: str
    rate: float
    keep: float
    beta: float | None
    kappa: float | None
    mean: float
    var: float
    topology: str
    width: int
    rho: float
    D: float
    train_mean: float
    train_var: float
    test_var: float
    shift_ratio: float
    inverse_ratio: float
    framework: str
    alpha: float | None
    batch_size: int
    steps: int
    stored_batch_var: float
    stored_batch_var_sd: float
    running_var: float
    running_var_sd: float
    band_exact: bool
    residual_weight: float
    updates_to_1pct: int | None
    corrected_var_debiased: float | None
    corrected_var_naive: float | None
    gamma_star: float


def theory_table(config: TheoryConfig) -> list[TheoryRow]:
    """Evaluate every closed form of DESIGN §2 for each rate in ``config``.

    Per rate: the train and test variance and their ratio; the expected stored running variance
    after ``steps`` updates of ``batch_size`` with its noise sd; the initial-value residual; the
    data-free correction of the stationary stored variance (population target; exact inverse
    of the forward formula when ``debiased``); and ``gamma*``.

    Examples
    --------
    >>> row = theory_table(TheoryConfig(rates=(0.5,)))[0]
    >>> (row.train_var, row.test_var, row.shift_ratio)
    (2.0, 1.0, 0.5)
    """
    from varshift.core.presets import DEFAULT_FRAMEWORK, resolve_preset

    if not config.rates:
        raise ValidationError("rate must be given at least once")
    preset = config.preset or resolve_preset(DEFAULT_FRAMEWORK)
    c = check_magnitude("mean", config.mean)
    v = check_magnitude("var", config.var, nonnegative=True)
    check_topology(config.topology, THEORY_TOPOLOGIES)
    width = check_int("width", config.width, 1)
    n = preset.check_batch(check_int("batch_size", config.batch_size, 1))
    steps = check_int("steps", config.steps, 0)
    linear = TOPOLOGY_RECORDS[config.topology].mixes
    if linear:
        if config.D is not None:
            d_eff = check_range("D", config.D, 0.0, None)
        else:
            cos2 = 1.0 if config.cos2 is None else check_range("cos2", config.cos2, 0.0, 1.0)
            d_eff = width * cos2
        rho = check_rho(config.rho, width)
    else:
        d_eff, rho = 1.0, 0.0
    case = _Case(config, preset, c, v, width, rho, d_eff, n, steps, linear)
    return [_theory_row(case, rate) for rate in config.rates]


class _Case(NamedTuple):
    """A :class:`TheoryConfig` validated, with everything but the rate resolved."""

    config: TheoryConfig
    preset: Preset
    mean: float
    var: float
    width: int
    rho: float
    D: float
    batch_size: int
    steps: int
    linear: bool


def _theory_row(case: _Case, rate: float) -> TheoryRow:
    """One rate's row of :func:`theory_table`."""
    config, preset, c, v, n = case.config, case.preset, case.mean, case.var, case.batch_size
    drop = Dropout(config.dropout, rate, config.beta)
    if case.linear:
        shift = shift_equicorrelated(c, v, drop, rho=case.rho, D=case.D, width=case.width)
        # Gaussian kurtosis for the unit's output: exact only as the width grows (CLT).
        out = InputMoments.from_central(
            shift.train_mean, shift.train_var, 0.0, 3 * shift.train_var**2
        )
        exact = False
    else:
        shift = shift_direct(c, v, drop)
        out = drop.train_moments(InputMoments.normal(c, v))
        exact = True
    run = running_stats(out, preset, n, case.steps)
    deb = naive = None
    if not case.linear:
        _, dv = corrected_variance(
            shift.train_mean, run.batch_var_mean, drop, preset, n, target="population"
        )
        _, nv = corrected_variance(
            shift.train_mean, run.batch_var_mean, drop, preset, n, method="naive"
        )
        deb, naive = float(dv), float(nv)
    return TheoryRow(
        dropout=drop.kind,
        rate=drop.rate,
        keep=drop.keep,
        beta=drop.beta if drop.spec.uses_beta else None,
        kappa=drop.kappa if drop.multiplicative else None,
        mean=c,
        var=v,
        topology=config.topology,
        width=case.width,
        rho=case.rho,
        D=case.D,
        train_mean=shift.train_mean,
        train_var=shift.train_var,
        test_var=shift.test_var,
        shift_ratio=shift.ratio,
        inverse_ratio=shift.inverse_ratio,
        framework=preset.name,
        alpha=preset.alpha,
        batch_size=n,
        steps=case.steps,
        stored_batch_var=run.batch_var_mean,
        stored_batch_var_sd=run.batch_var_sd,
        running_var=run.expected_var,
        running_var_sd=run.var_sd,
        band_exact=exact,
        residual_weight=run.residual,
        updates_to_1pct=updates_to_forget(preset),
        corrected_var_debiased=deb,
        corrected_var_naive=naive,
        gamma_star=gamma_star(c, v, drop, preset.eps, shift=shift)[0],
    )
