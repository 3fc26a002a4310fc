"""Dropout kinds: sampling, and the moments the closed forms need.

Every kind is written as what it does to one element ``x`` in training; at test time dropout
is the identity, except non-inverted ("vanilla") dropout which scales by the keep probability.

==========  =======================================================  ==================
kind        training output                                          ``kappa``
==========  =======================================================  ==================
bernoulli   ``x * a / q``, ``a ~ Bernoulli(q)`` (every framework)    ``1/q``
vanilla     ``x * a`` (test: ``q * x``)                              ``1/q``
gaussian    ``x * m``, ``m ~ Normal(1, r/q)`` (Keras GaussianDropout) ``1/q``
uout        ``x * (1 + u)``, ``u ~ Uniform(-beta, beta)`` (Li et al.) ``1 + beta²/3``
alpha       ``a * (x*k + alpha'*(1-k)) + b``, ``k ~ Bernoulli(q)``   (not multiplicative)
==========  =======================================================  ==================

``kappa = E[m²] / E[m]²`` is the relative second moment of the multiplicative noise. Alpha
dropout uses PyTorch's and Keras' constants (``aten/src/ATen/native/Dropout.cpp``,
``keras/src/layers/regularization/alpha_dropout.py``): ``alpha' = -1.7580993408473766``,
``a = ((1 - r)(1 + r alpha'²))^(-1/2)``, ``b = -a alpha' r``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from varshift.core.errors import ValidationError
from varshift.core.presets import keep_from_rate
from varshift.core.validate import check_choice, check_finite, check_range

#: SELU ``scale * alpha``, negated: the value alpha dropout assigns to a dropped unit.
ALPHA_PRIME = -1.7580993408473766

FloatArray = NDArray[np.floating]

#: ``E[m^k]``, k = 1..4, of a multiplicative noise ``m``.
Moments4 = tuple[float, float, float, float]


@dataclass(frozen=True)
class InputMoments:
    """Raw moments ``E[x^k]``, k = 1..4, of one feature of the dropout input.

    Examples
    --------
    >>> m = InputMoments.normal(2.0, 9.0)
    >>> (m.mean, m.var, m.mu4)
    (2.0, 9.0, 243.0)
    """

    m1: float
    m2: float
    m3: float
    m4: float

    @property
    def mean(self) -> float:
        """``c = E[x]``."""
        return self.m1

    @property
    def var(self) -> float:
        """``v = Var[x]`` (population variance)."""
        return self.m2 - self.m1**2

    @property
    def mu4(self) -> float:
        """Central fourth moment ``E[(x - c)^4]``."""
        m1 = self.m1
        return self.m4 - 4 * m1 * self.m3 + 6 * m1**2 * self.m2 - 3 * m1**4

    def scaled(self, k: float) -> InputMoments:
        """Moments of ``k * x``."""
        return InputMoments(k * self.m1, k**2 * self.m2, k**3 * self.m3, k**4 * self.m4)

    @classmethod
    def normal(cls, mean: float, var: float) -> InputMoments:
        """Moments of ``Normal(mean, var)``."""
        c = check_finite("mean", mean)
        v = check_range("var", var, 0.0, None)
        return cls(c, c**2 + v, c**3 + 3 * c * v, c**4 + 6 * c**2 * v + 3 * v**2)

    @classmethod
    def from_central(cls, mean: float, var: float, mu3: float, mu4: float) -> InputMoments:
        """Moments from the mean, variance and third and fourth central moments."""
        c = mean
        return cls(
            c,
            var + c**2,
            mu3 + 3 * c * var + c**3,
            mu4 + 4 * c * mu3 + 6 * c**2 * var + c**4,
        )

    @classmethod
    def uniform(cls, mean: float, var: float) -> InputMoments:
        """Moments of the uniform distribution with this mean and variance."""
        c = check_finite("mean", mean)
        v = check_range("var", var, 0.0, None)
        half = math.sqrt(3.0 * v)
        lo, hi = c - half, c + half
        if half == 0.0:
            return cls(c, c**2, c**3, c**4)
        raw = [(hi ** (k + 1) - lo ** (k + 1)) / ((k + 1) * (hi - lo)) for k in range(1, 5)]
        return cls(*raw)

    @classmethod
    def relu_normal(cls, mean: float, var: float) -> InputMoments:
        """Moments of ``max(0, z)``, ``z ~ Normal(mean, var)`` (what follows BN → ReLU).

        Uses ``E[w^j 1{w > a}] = a^(j-1) phi(a) + (j-1) E[w^(j-2) 1{w > a}]`` for a standard
        normal ``w`` and ``a = -mean/sd``.
        """
        mu = check_finite("mean", mean)
        v = check_range("var", var, 0.0, None)
        sd = math.sqrt(v)
        if sd == 0.0:
            z = max(mu, 0.0)
            return cls(z, z**2, z**3, z**4)
        a = -mu / sd
        # Standard normal pdf and upper tail in closed form (importing scipy.stats costs ~0.8 s).
        phi = math.exp(-0.5 * a * a) / math.sqrt(2.0 * math.pi)
        tail = [0.5 * math.erfc(a / math.sqrt(2.0)), phi]
        for j in range(2, 5):
            tail.append(a ** (j - 1) * phi + (j - 1) * tail[j - 2])
        raw = [
            sum(math.comb(k, j) * mu ** (k - j) * sd**j * tail[j] for j in range(k + 1))
            for k in range(1, 5)
        ]
        return cls(*raw)

    @classmethod
    def from_samples(cls, x: FloatArray) -> InputMoments:
        """Empirical raw moments of a sample (computed in float64)."""
        y = np.asarray(x, dtype=np.float64).ravel()
        if y.size == 0:
            raise ValidationError("samples must not be empty; got 0 values")
        y2 = y * y
        return cls(
            float(y.mean()), float(y2.mean()), float((y2 * y).mean()), float((y2 * y2).mean())
        )


# --- the kinds, as data ---------------------------------------------------------------------------


def _draw_keep(d: Dropout, rng: np.random.Generator, out: FloatArray) -> FloatArray:
    return d.sample_keep(rng, out)


def _draw_inverted(d: Dropout, rng: np.random.Generator, out: FloatArray) -> FloatArray:
    d.sample_keep(rng, out)
    return np.divide(out, d.keep, out=out)


def _draw_normal(d: Dropout, rng: np.random.Generator, out: FloatArray) -> FloatArray:
    sd = math.sqrt(d.rate / d.keep)
    rng.standard_normal(dtype=out.dtype.type, out=out)
    out *= sd
    out += 1.0
    return out


def _draw_uniform(d: Dropout, rng: np.random.Generator, out: FloatArray) -> FloatArray:
    rng.random(dtype=out.dtype.type, out=out)
    out *= 2.0
    out -= 1.0
    out *= d.beta
    out += 1.0
    return out


def _gaussian_moments(q: float, r: float, beta: float) -> Moments4:
    s2 = r / q
    return (1.0, 1.0 + s2, 1.0 + 3 * s2, 1.0 + 6 * s2 + 3 * s2**2)


def _uout_moments(q: float, r: float, beta: float) -> Moments4:
    b2 = beta**2
    return (1.0, 1.0 + b2 / 3, 1.0 + b2, 1.0 + 2 * b2 + b2**2 / 5)


def _indicator_cumulants(s: float, mean: float, q: float, r: float) -> Moments4:
    """Mean and cumulants ``k2, k3, k4`` of ``s`` times a Bernoulli(q) keep indicator."""
    qr = q * r
    return mean, s**2 * qr, s**3 * qr * (1.0 - 2.0 * q), s**4 * qr * (1.0 - 6.0 * qr)


@dataclass(frozen=True)
class KindSpec:
    """One dropout kind: what it draws and the moments the closed forms need.

    Every function field takes the keep probability ``q``, the rate ``r = 1 - q`` and uout's
    half-width ``beta``, whether or not the kind uses them.

    Attributes
    ----------
    name:
        The ``--dropout`` name.
    description:
        One line for help and docs.
    uses_rate, uses_beta:
        Whether the noise depends on the rate and on ``beta`` (uout: ``beta`` only).
    moments:
        ``E[m^k]``, k = 1..4, of the multiplicative noise ``m``; ``None`` when the kind is not
        multiplicative (alpha dropout).
    variance:
        ``Var[m]``, written without cancellation; ``None`` with ``moments``.
    indicator_scale:
        ``s`` when the noise is ``s`` times the keep indicator (bernoulli ``1/q``, vanilla 1);
        ``None`` for the other kinds.
    test_scale_is_keep:
        True if the layer multiplies by ``q`` at test time (non-inverted dropout); else identity.
    cumulants:
        Mean and cumulants ``k2, k3, k4`` of the drawn noise ``xi`` (``m``, or the keep
        indicator for alpha dropout), written without cancellation.
    draw:
        Fills ``out`` with the noise of :meth:`Dropout.sample_noise` (``m``, or the keep
        indicator for alpha dropout), one uniform or normal per element in ``out``'s order.
    """

    name: str
    description: str
    uses_rate: bool
    uses_beta: bool
    moments: Callable[[float, float, float], Moments4] | None
    variance: Callable[[float, float, float], float] | None
    indicator_scale: Callable[[float], float] | None
    test_scale_is_keep: bool
    cumulants: Callable[[float, float, float], Moments4]
    draw: Callable[[Dropout, np.random.Generator, FloatArray], FloatArray]


KINDS: dict[str, KindSpec] = {
    spec.name: spec
    for spec in (
        KindSpec(
            "bernoulli",
            "inverted dropout, x a / q with a ~ Bernoulli(q) (every framework's default)",
            uses_rate=True,
            uses_beta=False,
            moments=lambda q, r, b: (1.0, 1.0 / q, 1.0 / q**2, 1.0 / q**3),
            variance=lambda q, r, b: r / q,
            indicator_scale=lambda q: 1.0 / q,
            test_scale_is_keep=False,
            cumulants=lambda q, r, b: _indicator_cumulants(1.0 / q, 1.0, q, r),
            draw=_draw_inverted,
        ),
        KindSpec(
            "vanilla",
            "non-inverted dropout, x a in training and q x at test time",
            uses_rate=True,
            uses_beta=False,
            moments=lambda q, r, b: (q, q, q, q),
            variance=lambda q, r, b: q * r,
            indicator_scale=lambda q: 1.0,
            test_scale_is_keep=True,
            cumulants=lambda q, r, b: _indicator_cumulants(1.0, q, q, r),
            draw=_draw_keep,
        ),
        KindSpec(
            "gaussian",
            "multiplicative Normal(1, r/q) noise (Keras GaussianDropout)",
            uses_rate=True,
            uses_beta=False,
            moments=_gaussian_moments,
            variance=lambda q, r, b: r / q,
            indicator_scale=None,
            test_scale_is_keep=False,
            cumulants=lambda q, r, b: (1.0, r / q, 0.0, 0.0),
            draw=_draw_normal,
        ),
        KindSpec(
            "uout",
            "x (1 + u), u ~ Uniform(-beta, beta) (Li et al.); ignores the rate",
            uses_rate=False,
            uses_beta=True,
            moments=_uout_moments,
            variance=lambda q, r, b: b**2 / 3,
            indicator_scale=None,
            test_scale_is_keep=False,
            cumulants=lambda q, r, b: (1.0, b**2 / 3.0, 0.0, -2.0 * b**2 * b**2 / 15.0),
            draw=_draw_uniform,
        ),
        KindSpec(
            "alpha",
            "alpha dropout: dropped units set to SELU's negative saturation, then an affine fix",
            uses_rate=True,
            uses_beta=False,
            moments=None,
            variance=None,
            indicator_scale=None,
            test_scale_is_keep=False,
            cumulants=lambda q, r, b: _indicator_cumulants(1.0, q, q, r),
            draw=_draw_keep,
        ),
    )
}

#: The dropout kind names, in registry order (the ``--dropout`` choices).
DROPOUT_KINDS: tuple[str, ...] = tuple(KINDS)
#: The default ``--dropout``: inverted Bernoulli dropout, every framework's ``Dropout``.
DEFAULT_KIND: str = "bernoulli"


@dataclass(frozen=True)
class Dropout:
    """One dropout kind at one rate.

    Parameters
    ----------
    kind:
        ``bernoulli`` (inverted; every framework's default), ``vanilla`` (non-inverted),
        ``gaussian``, ``uout`` or ``alpha``.
    rate:
        Probability of dropping a unit, in ``[0, 1)``. Ignored by ``uout``, whose noise is set
        by ``beta`` alone.
    beta:
        Half-width of uout's uniform noise, ``u ~ Uniform(-beta, beta)``; ``beta >= 0``.
    """

    kind: str = "bernoulli"
    rate: float = 0.5
    beta: float = 0.1

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", check_choice("dropout", self.kind, DROPOUT_KINDS))
        check_range("rate", self.rate, 0.0, 1.0, closed="left")
        check_range("beta", self.beta, 0.0, None)

    @property
    def spec(self) -> KindSpec:
        """The registry record of this kind (:data:`KINDS`)."""
        return KINDS[self.kind]

    @property
    def keep(self) -> float:
        """Keep probability ``q = 1 - rate``."""
        return keep_from_rate(self.rate)

    @property
    def multiplicative(self) -> bool:
        """True if the training output is ``x * m`` with ``m`` independent of ``x``."""
        return self.spec.moments is not None

    def _not_multiplicative(self) -> ValidationError:
        return ValidationError(
            f"dropout {self.kind!r} is not multiplicative; it has no mask moments"
        )

    def mask_moments(self) -> Moments4:
        """Raw moments ``E[m^k]``, k = 1..4, of the multiplicative noise ``m``."""
        moments = self.spec.moments
        if moments is None:
            raise self._not_multiplicative()
        return moments(self.keep, self.rate, self.beta)

    def mask_variance(self) -> float:
        """``Var[m]``, written without cancellation: ``r/q`` (bernoulli, gaussian), ``q r``
        (vanilla), ``beta²/3`` (uout)."""
        variance = self.spec.variance
        if variance is None:
            raise self._not_multiplicative()
        return variance(self.keep, self.rate, self.beta)

    def noise_cumulants(self) -> Moments4:
        """Mean and cumulants ``k2, k3, k4`` of the noise :meth:`sample_noise` draws: ``m`` for
        the multiplicative kinds, the keep indicator (``Bernoulli(q)``) for alpha dropout."""
        return self.spec.cumulants(self.keep, self.rate, self.beta)

    @property
    def kappa(self) -> float:
        """``kappa = E[m²] / E[m]²``; for bernoulli ``1/q``. Alpha dropout has none."""
        e1, e2, _, _ = self.mask_moments()
        return e2 / e1**2

    @property
    def test_scale(self) -> float:
        """The factor dropout applies at test time: ``q`` for vanilla, 1 otherwise."""
        return self.keep if self.spec.test_scale_is_keep else 1.0

    def _alpha_affine(self) -> tuple[float, float, float]:
        """``(a, b, d)``: kept units map to ``a x + b``, dropped ones to ``d = a alpha' + b``."""
        q, r = self.keep, self.rate
        a = 1.0 / math.sqrt(q * (1.0 + r * ALPHA_PRIME**2))
        b = -a * ALPHA_PRIME * r
        return a, b, a * ALPHA_PRIME + b

    def train_moments(self, x: InputMoments) -> InputMoments:
        """Raw moments of the training-mode output for input moments ``x``."""
        if self.multiplicative:
            e = self.mask_moments()
            return InputMoments(e[0] * x.m1, e[1] * x.m2, e[2] * x.m3, e[3] * x.m4)
        q, r = self.keep, self.rate
        a, b, d = self._alpha_affine()
        xs = (1.0, x.m1, x.m2, x.m3, x.m4)
        raw = [
            q * sum(math.comb(k, j) * a**j * xs[j] * b ** (k - j) for j in range(k + 1)) + r * d**k
            for k in range(1, 5)
        ]
        return InputMoments(*raw)

    def test_moments(self, x: InputMoments) -> InputMoments:
        """Raw moments of the test-mode output (identity, or ``q x`` for vanilla)."""
        return x.scaled(self.test_scale)

    def train_mean_var(self, c: float, v: float) -> tuple[float, float]:
        """Mean and population variance of the training output for input mean ``c``, variance ``v``.

        Only the first two input moments matter. Bernoulli: ``(c, (1/q)(c² + v) - c²)``,
        evaluated as ``E[m²] v + Var[m] c²`` to avoid cancellation when ``c² >> v``.
        """
        if self.multiplicative:
            e1, e2, _, _ = self.mask_moments()
            return e1 * c, e2 * v + self.mask_variance() * c * c
        m = self.train_moments(InputMoments(c, c * c + v, 0.0, 0.0))
        return m.m1, m.m2 - m.m1**2

    def test_from_train(self, mean: float, var: float) -> tuple[float, float]:
        """Invert :meth:`train_mean_var`: the test-time mean and variance the layer will see.

        ``mean``/``var`` are the population mean and variance of the training-mode output.
        Multiplicative kinds: ``(mean, (V + mu²)/kappa - mu²)``, evaluated as
        ``(E[m]² V - Var[m] mu²) / E[m²]``; alpha dropout solves its affine mixture for the input
        moments. The result may be negative for inconsistent inputs; the caller decides what to
        do with that.
        """
        if self.multiplicative:
            e1, e2, _, _ = self.mask_moments()
            return mean, (e1 * e1 * var - self.mask_variance() * mean * mean) / e2
        q, r = self.keep, self.rate
        a, b, d = self._alpha_affine()
        second = var + mean * mean
        c = (mean - q * b - r * d) / (q * a)
        x2 = (second - r * d * d - q * b * b - 2 * q * a * b * c) / (q * a * a)
        return c, x2 - c * c

    @property
    def indicator_scale(self) -> float | None:
        """``s`` when the noise is ``s`` times the keep indicator: ``1/q`` (bernoulli), 1 (vanilla);
        ``None`` for the other kinds."""
        scale = self.spec.indicator_scale
        return None if scale is None else scale(self.keep)

    def sample_keep(self, rng: np.random.Generator, out: FloatArray) -> FloatArray:
        """Draw the keep indicator (1.0 kept, 0.0 dropped, ``P(kept) = q``) into ``out``.

        One uniform per element, in ``out``'s order, as :meth:`sample_noise` draws them; filling a
        reused buffer in place skips allocating (and page-faulting) a fresh array per call.
        """
        rng.random(dtype=out.dtype.type, out=out)
        return np.less(out, self.keep, out=out)

    def sample_noise(
        self,
        shape: tuple[int, ...],
        rng: np.random.Generator,
        dtype: type = np.float64,
        *,
        out: FloatArray | None = None,
    ) -> FloatArray:
        """Draw the noise for ``shape`` elements: ``m`` (multiplicative) or the keep indicator.

        ``out``: a float array of that shape and ``dtype`` to draw into instead of a new one.
        """
        if out is None:
            out = np.empty(shape, dtype=dtype)
        return self.spec.draw(self, rng, out)

    def apply(self, x: FloatArray, noise: FloatArray) -> FloatArray:
        """Training-mode output for input ``x`` and noise from :meth:`sample_noise`."""
        if self.multiplicative:
            return x * noise
        a, b, d = self._alpha_affine()
        return np.where(noise > 0, a * x + b, d).astype(np.result_type(x, noise))

    def sample(self, x: FloatArray, rng: np.random.Generator) -> FloatArray:
        """Training-mode output with fresh element-wise noise."""
        xa = np.asarray(x)
        dtype = np.float32 if xa.dtype == np.float32 else np.float64
        return self.apply(xa, self.sample_noise(xa.shape, rng, dtype))


def make_dropout(kind: str = "bernoulli", rate: float = 0.5, beta: float = 0.1) -> Dropout:
    """Build a validated :class:`Dropout`."""
    return Dropout(kind=kind, rate=rate, beta=beta)
