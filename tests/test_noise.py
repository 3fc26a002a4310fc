"""Dropout kinds: sampling agrees with the moments the theory uses (Monte Carlo, derived SEs)."""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
from scipy import stats

from varshift.core.dropout import ALPHA_PRIME, DROPOUT_KINDS, KINDS, Dropout, InputMoments
from varshift.core.errors import ValidationError

# Each Monte-Carlo check is a z-test with this many standard errors. There are ~60 such
# comparisons in this module: a two-sided 4.5-sigma band gives a family-wise false-alarm
# rate below 60 * 6.8e-6 = 4e-4 with the seeds fixed.
Z = 4.5
N = 400_000


def _raw_moment_z(samples: np.ndarray, k: int, expected: float) -> float:
    """z-score of the sample mean of ``x^k`` against ``expected``; SE from ``x^(2k)``."""
    xk = samples.astype(np.float64) ** k
    se = math.sqrt(max(float(xk.var()), 1e-300) / xk.size)
    return (float(xk.mean()) - expected) / se


def test_input_moments_of_the_normal_are_the_textbook_ones() -> None:
    c, v = 1.5, 4.0
    m = InputMoments.normal(c, v)
    assert (m.m1, m.m2, m.m3, m.m4) == (
        1.5,
        1.5**2 + 4,
        1.5**3 + 3 * 1.5 * 4,
        1.5**4 + 6 * 1.5**2 * 4 + 3 * 16,
    )
    assert m.mean == c and m.var == v and m.mu4 == pytest.approx(3 * v**2)


@pytest.mark.parametrize(
    ("factory", "sampler"),
    [
        (
            InputMoments.uniform,
            lambda rng, c, v: rng.uniform(c - math.sqrt(3 * v), c + math.sqrt(3 * v), N),
        ),
        (
            InputMoments.relu_normal,
            lambda rng, c, v: np.maximum(0.0, rng.normal(c, math.sqrt(v), N)),
        ),
    ],
    ids=["uniform", "relu_normal"],
)
def test_other_input_distributions_match_monte_carlo(factory, sampler) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(11)
    for c, v in [(0.0, 1.0), (0.7, 2.0), (-1.0, 0.5)]:
        m = factory(c, v)
        x = sampler(rng, c, v)
        for k, expected in enumerate((m.m1, m.m2, m.m3, m.m4), start=1):
            assert abs(_raw_moment_z(x, k, expected)) < Z, (c, v, k)


def test_relu_normal_mean_has_the_closed_form() -> None:
    # E[max(0, z)] = mu Phi(mu/s) + s phi(mu/s)
    mu, s = 0.3, 1.7
    expected = mu * stats.norm.cdf(mu / s) + s * stats.norm.pdf(mu / s)
    assert InputMoments.relu_normal(mu, s * s).mean == pytest.approx(expected, rel=1e-12)


def test_mask_moments_are_the_closed_forms() -> None:
    q = 0.8
    assert Dropout("bernoulli", 0.2).mask_moments() == pytest.approx((1, 1 / q, 1 / q**2, 1 / q**3))
    assert Dropout("vanilla", 0.2).mask_moments() == pytest.approx((q, q, q, q))
    s2 = 0.2 / 0.8  # Keras GaussianDropout: sd = sqrt(rate / (1 - rate))
    assert Dropout("gaussian", 0.2).mask_moments() == pytest.approx(
        (1, 1 + s2, 1 + 3 * s2, 1 + 6 * s2 + 3 * s2**2)
    )
    b = 0.3  # uout: u ~ U(-b, b): E[u²] = b²/3, E[u⁴] = b⁴/5
    assert Dropout("uout", beta=b).mask_moments() == pytest.approx(
        (1, 1 + b**2 / 3, 1 + b**2, 1 + 2 * b**2 + b**4 / 5)
    )


def test_kappa_per_kind() -> None:
    assert Dropout("bernoulli", 0.2).kappa == pytest.approx(1 / 0.8)
    assert Dropout("vanilla", 0.2).kappa == pytest.approx(1 / 0.8)
    assert Dropout("gaussian", 0.2).kappa == pytest.approx(1 / 0.8)
    assert Dropout("uout", beta=0.3).kappa == pytest.approx(1 + 0.09 / 3)


@pytest.mark.parametrize("kind", DROPOUT_KINDS)
@pytest.mark.parametrize(("c", "v", "rate"), [(0.0, 1.0, 0.5), (5.0, 4.0, 0.2), (-1.0, 0.25, 0.7)])
def test_training_output_moments_match_monte_carlo(
    kind: str, c: float, v: float, rate: float
) -> None:
    drop = Dropout(kind, rate, beta=0.4)
    rng = np.random.default_rng(zlib.crc32(repr((kind, c, v, rate)).encode()))
    y = drop.sample(rng.normal(c, math.sqrt(v), N), rng)
    m = drop.train_moments(InputMoments.normal(c, v))
    for k, expected in enumerate((m.m1, m.m2, m.m3, m.m4), start=1):
        assert abs(_raw_moment_z(y, k, expected)) < Z, (kind, k)


def test_alpha_dropout_matches_the_framework_formula() -> None:
    # aten/src/ATen/native/Dropout.cpp: a = 1/sqrt((alpha² p + 1)(1 - p)),
    # kept x -> a x + alpha a p, dropped -> a (-alpha + alpha p), alpha = 1.7580993408473766.
    p = 0.3
    alpha = 1.7580993408473766
    a = 1 / math.sqrt((alpha**2 * p + 1) * (1 - p))
    drop = Dropout("alpha", p)
    x = np.array([2.0, 2.0])
    out = drop.apply(x, np.array([1.0, 0.0]))
    assert out[0] == pytest.approx(a * 2.0 + alpha * a * p, rel=1e-15)
    assert out[1] == pytest.approx(a * (-alpha + alpha * p), rel=1e-15)
    assert ALPHA_PRIME == -alpha


def test_alpha_dropout_keeps_a_standard_input_standard() -> None:
    mean, var = Dropout("alpha", 0.4).train_mean_var(0.0, 1.0)
    assert mean == pytest.approx(0.0, abs=1e-15) and var == pytest.approx(1.0, rel=1e-12)


@pytest.mark.parametrize("kind", DROPOUT_KINDS)
def test_test_from_train_inverts_train_mean_var(kind: str) -> None:
    drop = Dropout(kind, 0.35, beta=0.25)
    for c, v in [(0.0, 1.0), (3.0, 0.5), (-2.0, 7.0)]:
        mean, var = drop.train_mean_var(c, v)
        tm, tv = drop.test_from_train(mean, var)
        k = drop.test_scale
        assert tm == pytest.approx(k * c, abs=1e-12)
        assert tv == pytest.approx(k * k * v, rel=1e-10, abs=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"kind": "spatial"},
            "dropout must be one of bernoulli, vanilla, gaussian, uout, alpha; got 'spatial'",
        ),
        ({"rate": 1.0}, r"rate must be in \[0, 1\); got 1"),
        ({"rate": -0.2}, r"rate must be in \[0, 1\); got -0.2"),
        ({"beta": -0.1}, r"beta must be >= 0; got -0.1"),
    ],
)
def test_bad_dropout_parameters(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        Dropout(**kwargs)  # type: ignore[arg-type]


def test_rate_zero_is_the_identity() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=1000)
    for kind in ("bernoulli", "vanilla", "gaussian"):
        np.testing.assert_array_equal(Dropout(kind, 0.0).sample(x, rng), x)


# --- the kind registry ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_kind_has_every_field(kind: str) -> None:
    spec = KINDS[kind]
    assert spec.name == kind and spec.description
    assert isinstance(spec.uses_rate, bool) and isinstance(spec.uses_beta, bool)
    assert (spec.moments is None) == (spec.variance is None)
    assert callable(spec.draw)
    d = Dropout(kind, 0.3, 0.2)
    assert d.spec is spec
    if spec.moments is not None:
        e1, e2, _, _ = d.mask_moments()
        assert d.mask_variance() == pytest.approx(e2 - e1 * e1, rel=1e-12)


def test_kind_fields_are_the_documented_ones() -> None:
    q, r, b = 0.7, 0.3, 0.2
    assert KINDS["bernoulli"].moments(q, r, b) == (1.0, 1 / q, 1 / q**2, 1 / q**3)  # type: ignore[misc]
    assert KINDS["vanilla"].moments(q, r, b) == (q, q, q, q)  # type: ignore[misc]
    assert [k for k, s in KINDS.items() if s.uses_beta] == ["uout"]
    assert [k for k, s in KINDS.items() if not s.uses_rate] == ["uout"]
    assert [k for k, s in KINDS.items() if s.moments is None] == ["alpha"]
    assert [k for k, s in KINDS.items() if s.test_scale_is_keep] == ["vanilla"]
    assert Dropout("bernoulli", 0.3).indicator_scale == 1 / 0.7
    assert Dropout("vanilla", 0.3).indicator_scale == 1.0
    assert Dropout("gaussian", 0.3).indicator_scale is None


def test_dropout_choices_are_the_registry_keys() -> None:
    from varshift.cli._common import DropoutKind

    assert [k.value for k in DropoutKind] == list(KINDS) == list(DROPOUT_KINDS)


@pytest.mark.parametrize("kind", list(KINDS))
def test_noise_cumulants_agree_with_the_raw_moments(kind: str) -> None:
    d = Dropout(kind, 0.3, 0.2)
    if d.multiplicative:
        e1, e2, e3, e4 = d.mask_moments()
    else:  # alpha dropout draws the keep indicator a ~ Bernoulli(q): E[a^k] = q
        e1 = e2 = e3 = e4 = d.keep
    k2 = e2 - e1**2
    k3 = e3 - 3 * e1 * e2 + 2 * e1**3
    mu4 = e4 - 4 * e1 * e3 + 6 * e1**2 * e2 - 3 * e1**4
    assert d.noise_cumulants() == pytest.approx((e1, k2, k3, mu4 - 3 * k2**2), rel=1e-9, abs=1e-12)
