"""Closed forms: written out as arithmetic here, checked by invariants and by Monte Carlo."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from varshift.core.dropout import Dropout, InputMoments
from varshift.core.errors import ValidationError
from varshift.core.presets import resolve_preset
from varshift.core.theory import (
    TheoryConfig,
    corrected_variance,
    gamma_star,
    residual_weight,
    running_stats,
    sample_variance_variance,
    shift_direct,
    shift_equicorrelated,
    shift_linear,
    theory_table,
    updates_to_forget,
)

MULTIPLICATIVE = ("bernoulli", "vanilla", "gaussian")  # kinds whose noise depends on the rate
rates = st.floats(0.0, 0.95)
means = st.floats(-10, 10)
variances = st.floats(1e-3, 100)


# --- case (a) -------------------------------------------------------------------------------


def test_case_a_is_the_mission_formula() -> None:
    c, v, q = 5.0, 4.0, 0.8
    s = shift_direct(c, v, Dropout("bernoulli", 0.2))
    assert s.train_var == pytest.approx((1 / q) * (c**2 + v) - c**2)  # = 11.25
    assert s.train_var == pytest.approx(11.25)
    assert s.test_var == v
    assert s.ratio == pytest.approx(4.0 / 11.25)
    assert s.inverse_ratio == pytest.approx(11.25 / 4.0)
    assert s.train_mean == s.test_mean == c


def test_vanilla_dropout_shifts_like_inverted_dropout() -> None:
    c, v, q = 2.0, 3.0, 0.6
    vanilla = shift_direct(c, v, Dropout("vanilla", 0.4))
    assert vanilla.train_var == pytest.approx(q * (c**2 + v) - (q * c) ** 2)
    assert vanilla.test_var == pytest.approx(q**2 * v)
    assert vanilla.ratio == pytest.approx(shift_direct(c, v, Dropout("bernoulli", 0.4)).ratio)


def test_uout_and_gaussian_closed_forms() -> None:
    c, v, b = 1.0, 2.0, 0.3
    assert shift_direct(c, v, Dropout("uout", beta=b)).train_var == pytest.approx(
        (1 + b**2 / 3) * (c**2 + v) - c**2
    )
    assert shift_direct(c, v, Dropout("gaussian", 0.3)).train_var == pytest.approx(
        (c**2 + v) / 0.7 - c**2
    )


@pytest.mark.parametrize("kind", MULTIPLICATIVE)
@given(c=means, v=variances, rate=rates)
def test_train_variance_is_at_least_test_variance(
    kind: str, c: float, v: float, rate: float
) -> None:
    s = shift_direct(c, v, Dropout(kind, rate))
    assert s.train_var >= s.test_var * (1 - 1e-12)
    assert s.ratio <= 1 + 1e-12


@given(c=means, v=variances)
def test_no_shift_at_rate_zero(c: float, v: float) -> None:
    for kind in MULTIPLICATIVE:
        s = shift_direct(c, v, Dropout(kind, 0.0))
        assert s.train_var == pytest.approx(s.test_var, rel=1e-12, abs=1e-12)
        assert s.ratio == pytest.approx(1.0)


@pytest.mark.parametrize("kind", MULTIPLICATIVE)
@given(c=means, v=variances, r1=rates, r2=rates)
def test_shift_grows_with_the_rate(kind: str, c: float, v: float, r1: float, r2: float) -> None:
    lo, hi = sorted((r1, r2))
    assert shift_direct(c, v, Dropout(kind, hi)).ratio <= shift_direct(
        c, v, Dropout(kind, lo)
    ).ratio * (1 + 1e-12)


@pytest.mark.parametrize("kind", ("bernoulli", "vanilla", "gaussian", "uout", "alpha"))
@given(c=means, v=variances, rate=rates, k=st.floats(0.1, 10))
def test_scaling_the_input_by_k_scales_variances_by_k_squared(
    kind: str, c: float, v: float, rate: float, k: float
) -> None:
    drop = Dropout(kind, rate, beta=0.2)
    base, scaled = shift_direct(c, v, drop), shift_direct(k * c, k * k * v, drop)
    assert scaled.test_var == pytest.approx(k * k * base.test_var, rel=1e-9)
    if drop.multiplicative:  # alpha dropout's affine constants break the scaling on purpose
        assert scaled.train_var == pytest.approx(k * k * base.train_var, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("kind", ("bernoulli", "vanilla", "gaussian", "uout", "alpha"))
@pytest.mark.parametrize("framework", ("torch", "keras"))
@given(c=means, v=variances, rate=rates, n=st.integers(2, 256))
def test_correction_inverts_the_forward_formula(
    kind: str, framework: str, c: float, v: float, rate: float, n: int
) -> None:
    drop, preset = Dropout(kind, rate, beta=0.2), resolve_preset(framework)
    s = shift_direct(c, v, drop)
    stored = s.train_var * preset.stored_factor(n)  # what the framework records on average
    mean, pop = corrected_variance(s.train_mean, stored, drop, preset, n, target="population")
    _, fw = corrected_variance(s.train_mean, stored, drop, preset, n, target="framework")
    scale = max(1.0, c * c, abs(s.train_var))
    assert float(mean) == pytest.approx(s.test_mean, abs=1e-9 * scale)
    assert float(pop) == pytest.approx(s.test_var, abs=1e-9 * scale)
    assert float(fw) == pytest.approx(s.test_var * preset.stored_factor(n), abs=1e-9 * scale)


def test_naive_correction_over_subtracts_for_a_biased_preset() -> None:
    # Keras stores ((n-1)/n) Var_train. Naive: q (V + mu²) - mu². Debiased (framework target):
    # ((n-1)/n) [q (V n/(n-1) + mu²) - mu²]. The naive one is lower by r mu² / n.
    c, v, r, n = 5.0, 4.0, 0.2, 32
    q = 1 - r
    keras = resolve_preset("keras")
    stored = ((1 / q) * (c**2 + v) - c**2) * (n - 1) / n
    _, naive = corrected_variance(c, stored, Dropout("bernoulli", r), keras, n, method="naive")
    _, deb = corrected_variance(c, stored, Dropout("bernoulli", r), keras, n)
    assert float(naive) == pytest.approx(q * (stored + c**2) - c**2)
    assert float(deb) == pytest.approx((n - 1) / n * v)
    assert float(deb) - float(naive) == pytest.approx(r * c**2 / n)
    # For an unbiased preset the two coincide.
    torch = resolve_preset("torch")
    _, a = corrected_variance(c, 11.25, Dropout("bernoulli", r), torch, n, method="naive")
    _, b = corrected_variance(c, 11.25, Dropout("bernoulli", r), torch, n)
    assert float(a) == pytest.approx(float(b)) == pytest.approx(v)


def test_correction_returns_floats_for_scalars_and_arrays_for_arrays() -> None:
    torch, drop = resolve_preset("torch"), Dropout("bernoulli", 0.5)
    # q (V + mu²) - mu² with q = 0.5, mu = 1, V = 5: 2; the mean does not move
    for mu, var in ((1.0, 5.0), (1, 5), (np.float32(1.0), np.float64(5.0))):
        out = corrected_variance(mu, var, drop, torch)
        assert type(out[0]) is float and type(out[1]) is float
        assert out == (1.0, 2.0)
    mean, var = corrected_variance(np.array(1.0), np.array(5.0), drop, torch)
    assert isinstance(var, np.ndarray) and var.shape == () and float(var) == 2.0
    mean, var = corrected_variance(1.0, [5.0, 3.0], drop, torch)  # broadcast: arrays
    assert isinstance(mean, np.ndarray) and mean.tolist() == [1.0, 1.0]
    assert isinstance(var, np.ndarray) and var.tolist() == [2.0, 1.0]


def test_correction_is_vectorised_over_channels() -> None:
    mu = np.array([0.0, 1.0, -2.0])
    var = np.array([2.0, 3.0, 8.0])
    _, out = corrected_variance(mu, var, Dropout("bernoulli", 0.5), resolve_preset("torch"))
    np.testing.assert_allclose(out, 0.5 * (var + mu**2) - mu**2)


# --- case (b) -------------------------------------------------------------------------------


def _equicorrelated(d: int, c: float, v: float, rho: float) -> tuple[np.ndarray, np.ndarray]:
    return np.full(d, c), v * ((1 - rho) * np.eye(d) + rho * np.ones((d, d)))


@pytest.mark.parametrize("kind", ("bernoulli", "gaussian", "uout", "alpha", "vanilla"))
@settings(max_examples=60)
@given(
    w=st.lists(st.floats(-3, 3), min_size=2, max_size=8).filter(
        lambda w: sum(x * x for x in w) > 1e-2
    ),
    c=means,
    v=variances,
    rho_frac=st.floats(0, 1),
    rate=rates,
)
def test_equation_12_equals_the_general_form(
    kind: str, w: list[float], c: float, v: float, rho_frac: float, rate: float
) -> None:
    d = len(w)
    rho = -1 / (d - 1) + rho_frac * (1 + 1 / (d - 1))  # anywhere in the PSD range
    weights = np.array(w)
    if weights.sum() < 0:
        weights = -weights
    drop = Dropout(kind, rate, beta=0.3)
    means_, cov = _equicorrelated(d, c, v, rho)
    train, test = shift_linear(means_, cov, weights, drop)
    norm = float(weights @ weights)
    D = float(weights.sum()) ** 2 / norm
    eq12 = shift_equicorrelated(c, v, drop, rho=min(rho, 1.0), D=D, width=d)
    scale = max(1.0, c * c + v)
    assert float(test) / norm == pytest.approx(eq12.test_var, abs=1e-9 * scale)
    assert float(train) / norm == pytest.approx(eq12.train_var, abs=1e-9 * scale)


def test_equation_12_written_out() -> None:
    c, v, q, rho, D = 1.0, 2.0, 0.6, 0.3, 40.0
    expected = (v + v * rho * (D - 1)) / ((1 / q) * (c**2 + v) - c**2 + v * rho * (D - 1))
    s = shift_equicorrelated(c, v, Dropout("bernoulli", 1 - q), rho=rho, D=D, width=64)
    assert s.ratio == pytest.approx(expected, rel=1e-12)


@given(c=means, v=variances, rate=rates, d=st.integers(1, 4096), cos2=st.floats(0, 1))
def test_rho_zero_gives_case_a_at_every_width(
    c: float, v: float, rate: float, d: int, cos2: float
) -> None:
    drop = Dropout("bernoulli", rate)
    wide = shift_equicorrelated(c, v, drop, rho=0.0, D=d * cos2, width=d)
    assert wide.ratio == pytest.approx(shift_direct(c, v, drop).ratio, rel=1e-9)


def test_width_helps_only_with_positive_correlation() -> None:
    drop = Dropout("bernoulli", 0.5)
    ratios = [
        shift_equicorrelated(0.0, 1.0, drop, rho=0.1, D=D).ratio for D in (1, 4, 16, 64, 1024)
    ]
    assert ratios == sorted(ratios) and ratios[-1] > 0.98
    negative = [shift_equicorrelated(0.0, 1.0, drop, rho=-0.001, D=D).ratio for D in (1, 4, 16, 64)]
    assert negative == sorted(negative, reverse=True)


def test_general_form_takes_a_weight_matrix() -> None:
    rng = np.random.default_rng(3)
    d, k = 6, 4
    a = rng.normal(size=(d, d))
    cov = a @ a.T
    means_ = rng.normal(size=d)
    w = rng.normal(size=(k, d))
    drop = Dropout("bernoulli", 0.3)
    train, test = shift_linear(means_, cov, w, drop)
    assert train.shape == test.shape == (k,)
    for j in range(k):
        wj = w[j]
        expected = wj @ cov @ wj + (1 / 0.7 - 1) * np.sum(wj**2 * (means_**2 + np.diag(cov)))
        assert train[j] == pytest.approx(expected, rel=1e-12)
        assert test[j] == pytest.approx(wj @ cov @ wj, rel=1e-12)


def test_general_form_matches_monte_carlo() -> None:
    rng = np.random.default_rng(5)
    d, n = 5, 400_000
    means_ = np.array([0.5, -1.0, 2.0, 0.0, 1.0])
    a = rng.normal(size=(d, d)) * 0.5
    cov = a @ a.T + np.eye(d) * 0.2
    w = rng.normal(size=d)
    drop = Dropout("bernoulli", 0.4)
    x = rng.multivariate_normal(means_, cov, size=n)
    z = drop.sample(x, rng) @ w
    train, _ = shift_linear(means_, cov, w, drop)
    # SE of a sample variance: sqrt((mu4 - var²)/n), mu4 estimated from the same sample.
    zc = z - z.mean()
    se = math.sqrt((np.mean(zc**4) - np.mean(zc**2) ** 2) / n)
    assert abs(z.var() - float(train)) < 4.5 * se


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rho": -0.5, "D": 4.0, "width": 4}, r"rho must be in \[-0.333333, 1\] for width 4"),
        ({"rho": 1.5, "D": 4.0, "width": 4}, r"rho must be in .* got 1.5"),
        ({"rho": 0.1, "D": 8.0, "width": 4}, r"D must be <= width \(4\)"),
        ({"rho": 0.0, "D": -1.0}, r"D must be >= 0; got -1"),
    ],
)
def test_bad_case_b_parameters(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        shift_equicorrelated(0.0, 1.0, Dropout("bernoulli", 0.5), **kwargs)  # type: ignore[arg-type]


# --- running statistics ---------------------------------------------------------------------


def test_sample_variance_variance_for_a_normal_is_two_sigma4_over_n_minus_1() -> None:
    for n in (2, 5, 32):
        assert sample_variance_variance(3.0, 3 * 9.0, n) == pytest.approx(2 * 9.0 / (n - 1))
        biased = sample_variance_variance(3.0, 27.0, n, unbiased=False)
        assert biased == pytest.approx(2 * 9.0 / (n - 1) * ((n - 1) / n) ** 2)


def test_expected_running_variance_written_out() -> None:
    # Keras: alpha 0.99, biased; Normal(5, 2²) through dropout 0.2; n=32; T=1000 updates.
    train_var = (25 + 4) / 0.8 - 25
    rs = running_stats(
        Dropout("bernoulli", 0.2).train_moments(InputMoments.normal(5, 4)),
        resolve_preset("keras"),
        32,
        1000,
    )
    a = 0.99
    assert rs.expected_var == pytest.approx(a**1000 * 1 + (1 - a**1000) * train_var * 31 / 32)
    assert rs.expected_mean == pytest.approx((1 - a**1000) * 5)
    assert rs.residual == pytest.approx(a**1000)


def test_updates_to_forget_and_residual() -> None:
    keras = resolve_preset("keras")
    t = updates_to_forget(keras)
    assert t == 459 and 0.99**458 >= 0.01 > 0.99**459
    assert updates_to_forget(resolve_preset("torch")) == 44  # 0.9^44 < 0.01 <= 0.9^43
    assert updates_to_forget(resolve_preset("torch", None)) == 1
    assert updates_to_forget(resolve_preset("torch", 0.0)) is None
    assert residual_weight(keras, 10) == pytest.approx(0.99**10)
    assert residual_weight(resolve_preset("torch", None), 3) == 0.0


@pytest.mark.parametrize(
    ("framework", "momentum"), [("torch", "default"), ("keras", 0.9), ("torch", None)]
)
def test_running_variance_and_its_noise_match_monte_carlo(framework: str, momentum: object) -> None:
    """Independent replicate training runs of T updates; batch stats computed from fresh data."""
    preset = resolve_preset(framework, momentum)  # type: ignore[arg-type]
    drop = Dropout("bernoulli", 0.3)
    c, v, n, steps, reps = 1.0, 2.0, 8, 60, 4000
    rng = np.random.default_rng(17)
    mean_r = np.zeros(reps)
    var_r = np.ones(reps)
    for t in range(1, steps + 1):
        y = drop.sample(rng.normal(c, math.sqrt(v), (reps, n)), rng)
        bm = y.mean(axis=1)
        bv = y.var(axis=1, ddof=1 if preset.unbiased else 0)
        w = 1 / t if preset.cumulative else 1 - preset.alpha  # type: ignore[operator]
        mean_r += w * (bm - mean_r)
        var_r += w * (bv - var_r)
    rs = running_stats(drop.train_moments(InputMoments.normal(c, v)), preset, n, steps)
    # The replicates are independent: the mean over reps has SE sd/sqrt(reps); the sample sd of
    # reps replicates has SE ≈ sd * sqrt((kurtosis - 1) / (4 reps)), kurtosis estimated here.
    for got, expected, sd in (
        (var_r, rs.expected_var, rs.var_sd),
        (mean_r, rs.expected_mean, rs.mean_sd),
    ):
        assert abs(got.mean() - expected) < 4.5 * sd / math.sqrt(reps)
        kurt = float(np.mean((got - got.mean()) ** 4) / got.var() ** 2)
        assert abs(got.std(ddof=1) - sd) < 4.5 * sd * math.sqrt((kurt - 1) / (4 * reps))


def test_gamma_star_is_v_over_the_train_sd() -> None:
    c, v, q = 5.0, 4.0, 0.8
    g, b = gamma_star(c, v, Dropout("bernoulli", 0.2))
    assert g == pytest.approx(v / math.sqrt((1 / q) * (c**2 + v) - c**2))
    assert b == c


def test_gamma_star_is_the_least_squares_optimum() -> None:
    rng = np.random.default_rng(2)
    c, v, n = 5.0, 4.0, 1_000_000
    drop = Dropout("bernoulli", 0.2)
    x = rng.normal(c, 2.0, n)
    y = drop.sample(x, rng)
    yhat = (y - y.mean()) / y.std()
    g_fit, b_fit = np.polyfit(yhat, x, 1)
    g, b = gamma_star(c, v, drop)
    # OLS slope SE: sd(residual) / sqrt(n) with a unit-variance regressor.
    resid_sd = float(np.std(x - (g_fit * yhat + b_fit)))
    assert abs(g_fit - g) < 4.5 * resid_sd / math.sqrt(n)
    assert abs(b_fit - b) < 4.5 * resid_sd / math.sqrt(n)


# --- the theory table -----------------------------------------------------------------------


def test_theory_table_rows_follow_the_closed_forms() -> None:
    rows = theory_table(
        TheoryConfig(rates=(0.1, 0.5), mean=5.0, var=4.0, preset=resolve_preset("keras"))
    )
    assert [r.rate for r in rows] == [0.1, 0.5]
    for r in rows:
        q = 1 - r.rate
        train = (25 + 4) / q - 25
        assert r.train_var == pytest.approx(train)
        assert r.shift_ratio == pytest.approx(4 / train)
        assert r.stored_batch_var == pytest.approx(train * 31 / 32)
        assert r.corrected_var_debiased == pytest.approx(4.0)
        assert r.corrected_var_naive == pytest.approx(q * (train * 31 / 32 + 25) - 25)
        assert r.updates_to_1pct == 459
        assert r.gamma_star == pytest.approx(4 / math.sqrt(train + 1e-3))


def test_theory_table_linear_rows() -> None:
    rows = theory_table(TheoryConfig(rates=(0.5,), topology="linear", width=64, rho=0.1, cos2=0.5))
    D = 32.0
    assert rows[0].D == D
    assert rows[0].shift_ratio == pytest.approx((1 + 0.1 * (D - 1)) / (2 + 0.1 * (D - 1)))
    assert rows[0].corrected_var_debiased is None and not rows[0].band_exact


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mean": math.nan}, r"mean must be a finite number; got nan"),
        ({"var": -1.0}, r"var must be >= 0; got -1"),
        ({"width": 0, "topology": "linear"}, r"width must be an integer >= 1; got 0"),
        ({"rho": -0.5, "width": 4, "topology": "linear"}, r"rho must be in \[-0.333333, 1\]"),
        ({"beta": -1.0, "dropout": "uout"}, r"beta must be >= 0; got -1"),
        ({"batch_size": 1}, r"batch_size must be >= 2 for torch"),
        ({"dropout": "zoneout"}, r"dropout must be one of"),
        ({"topology": "conv"}, r"topology must be one of direct, linear; got 'conv'"),
    ],
)
def test_bad_theory_config(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        theory_table(TheoryConfig(rates=(0.5,), **kwargs))  # type: ignore[arg-type]


# --- the topology registry ----------------------------------------------------------------------


def test_topology_registry_and_choices() -> None:
    from varshift.cli._common import Topology
    from varshift.core.theory import TOPOLOGIES as THEORY_OLD_NAME
    from varshift.core.topology import ENGINE_TOPOLOGIES, THEORY_TOPOLOGIES, TOPOLOGIES

    for name, topo in TOPOLOGIES.items():
        assert topo.name == name and topo.description
        assert isinstance(topo.theory, bool) and isinstance(topo.engine, bool)
    assert THEORY_TOPOLOGIES == THEORY_OLD_NAME == ("direct", "linear")
    assert ENGINE_TOPOLOGIES == ("direct", "linear", "conv")
    assert [t.value for t in Topology] == list(ENGINE_TOPOLOGIES)


def test_theory_refuses_a_topology_it_does_not_cover() -> None:
    with pytest.raises(
        ValidationError, match=r"^topology must be one of direct, linear; got 'conv'$"
    ):
        theory_table(TheoryConfig(rates=(0.5,), topology="conv"))


def test_the_theory_tables_gamma_star_is_gamma_star() -> None:
    # direct: the table's γ* is gamma_star's at the preset's eps, here for vanilla's test scale.
    preset = resolve_preset("keras")
    row = theory_table(
        TheoryConfig(rates=(0.3,), mean=1.0, var=2.0, dropout="vanilla", preset=preset)
    )[0]
    q = 0.7
    train_var = q * (1.0 + 2.0) - q * q * 1.0  # E[(a x)²] - E[a x]², a ~ Bernoulli(q)
    assert row.gamma_star == pytest.approx(q * 2.0 / math.sqrt(train_var + 1e-3), rel=1e-12)
