"""The framework-neutral formulas of the graph-aware correction (varshift.core.structure),
against independent oracles: numerical integration, a hand-written per-position loop."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy.integrate import trapezoid

from varshift.core.errors import ValidationError
from varshift.core.structure import (
    ACTIVATIONS,
    ConvGeometry,
    FeederBN,
    LayerStructure,
    dropout_term,
    gaussian_second_moment,
    sensitivity,
)


def integrated(f, mean: float, var: float) -> float:
    """E[f(z)²], z ~ Normal(mean, var), by the trapezoid rule over ±14 sd (independent)."""
    sd = math.sqrt(var)
    z = np.linspace(mean - 14 * sd, mean + 14 * sd, 400_001)
    pdf = np.exp(-0.5 * ((z - mean) / sd) ** 2) / (sd * math.sqrt(2 * math.pi))
    return float(trapezoid(f(z) ** 2 * pdf, z))  # scipy's: np.trapezoid needs numpy >= 2


CASES = [(-2.0, 0.25), (0.0, 1.0), (0.7, 1.0), (3.0, 4.0), (-0.3, 9.0)]


@pytest.mark.parametrize(("mean", "var"), CASES)
def test_relu_closed_form_matches_integration(mean: float, var: float) -> None:
    got = gaussian_second_moment("relu", np.array([mean]), np.array([var]))[0]
    assert got == pytest.approx(integrated(lambda z: np.maximum(z, 0.0), mean, var), rel=1e-7)


@pytest.mark.parametrize("name", ["tanh", "gelu", "silu", "sigmoid", "softplus", "mish"])
@pytest.mark.parametrize(("mean", "var"), CASES)
def test_smooth_activations_by_quadrature(name: str, mean: float, var: float) -> None:
    fn = {
        "tanh": np.tanh,
        "gelu": lambda z: 0.5 * z * (1 + np.vectorize(math.erf)(z / math.sqrt(2))),
        "silu": lambda z: z / (1 + np.exp(-z)),
        "sigmoid": lambda z: 1 / (1 + np.exp(-z)),
        "softplus": lambda z: np.log1p(np.exp(-np.abs(z))) + np.maximum(z, 0),
        "mish": lambda z: z * np.tanh(np.log1p(np.exp(-np.abs(z))) + np.maximum(z, 0)),
    }[name]
    got = gaussian_second_moment(name, np.array([mean]), np.array([var]))[0]
    assert got == pytest.approx(integrated(fn, mean, var), rel=1e-6)


def test_kinked_activations_by_quadrature_within_stated_accuracy() -> None:
    """Kinks (hardtanh, relu6, leaky ReLU): the grid rule stays within 1e-4 (module doc)."""
    for name, fn in [
        ("leaky_relu", lambda z: np.where(z > 0, z, 0.01 * z)),
        ("hardtanh", lambda z: np.clip(z, -1, 1)),
        ("relu6", lambda z: np.clip(z, 0, 6)),
    ]:
        for mean, var in CASES:
            got = gaussian_second_moment(name, np.array([mean]), np.array([var]))[0]
            assert got == pytest.approx(integrated(fn, mean, var), rel=1e-4), (name, mean, var)


def test_identity_and_unknown_activation() -> None:
    got = gaussian_second_moment(None, np.array([2.0, -1.0]), np.array([3.0, 0.5]))
    assert got.tolist() == [7.0, 1.5]
    with pytest.raises(ValidationError, match="prelu"):
        gaussian_second_moment("prelu", np.array([0.0]), np.array([1.0]))
    assert "prelu" not in ACTIVATIONS


def test_feeder_output_moments() -> None:
    bn = FeederBN(np.array([2.0]), np.array([0.5]), np.array([9.0]), np.array([4.0]), 1e-5)
    mean, var = bn.output_moments()
    assert mean.tolist() == [0.5]
    assert var[0] == pytest.approx(4.0 * 4.0 / (4.0 + 1e-5), rel=1e-15)


def test_linear_term_by_hand() -> None:
    rng = np.random.default_rng(0)
    w, e = rng.normal(size=(3, 5)), rng.uniform(0.1, 2.0, size=5)
    want = [(1 / 0.7 - 1) * sum(w[k, j] ** 2 * e[j] for j in range(5)) for k in range(3)]
    np.testing.assert_allclose(dropout_term(w, e, 0.3), want, rtol=1e-13)


def test_linear_term_against_monte_carlo_dropout() -> None:
    """Correlated inputs, real masks: Var_train − Var_test of W·x equals the term, to within
    the Monte-Carlo standard error (sd of a sample variance over N draws)."""
    rng = np.random.default_rng(1)
    n, rate = 400_000, 0.4
    base = rng.normal(size=(n, 1))
    x = np.maximum(base + 0.5 * rng.normal(size=(n, 4)) + 0.3, 0.0)  # correlated, non-Gaussian
    w = rng.normal(size=(2, 4))
    keep = rng.random(size=x.shape) >= rate
    y_train, y_test = (x * keep / (1 - rate)) @ w.T, x @ w.T
    diff = y_train.var(axis=0) - y_test.var(axis=0)
    term = dropout_term(w, (x**2).mean(axis=0), rate)
    se = np.sqrt(2.0 / n) * y_train.var(axis=0) * 2  # generous kurtosis factor 2 on sd(var)
    assert np.all(np.abs(diff - term) < 4 * se), (diff, term, se)


def loop_oracle(w2: np.ndarray, e: np.ndarray, geo: ConvGeometry) -> np.ndarray:
    """Hand-written: per output position, Σ over in-bounds taps of W²·E[x²]; averaged."""
    out_ch, per_group = w2.shape[:2]
    kernel, size = w2.shape[2:], e.shape[1:]
    outs = [
        (n + p[0] + p[1] - d * (k - 1) - 1) // s + 1
        for n, k, s, d, p in zip(size, kernel, geo.stride, geo.dilation, geo.padding, strict=True)
    ]
    total = np.zeros(out_ch)
    for k in range(out_ch):
        g = k // (out_ch // geo.groups)
        for pos in itertools.product(*(range(o) for o in outs)):
            for c in range(per_group):
                for tap in itertools.product(*(range(kk) for kk in kernel)):
                    src = [
                        o * s + t * d - p[0]
                        for o, s, t, d, p in zip(
                            pos, geo.stride, tap, geo.dilation, geo.padding, strict=True
                        )
                    ]
                    if all(0 <= i < n for i, n in zip(src, size, strict=True)):
                        total[k] += w2[(k, c, *tap)] * e[(g * per_group + c, *src)]
    return total / np.prod(outs)


@pytest.mark.parametrize(
    "geo",
    [
        ConvGeometry((1, 1), (1, 1), ((1, 1), (1, 1))),
        ConvGeometry((2, 1), (1, 2), ((0, 1), (2, 2)), groups=2),
        ConvGeometry((1,), (1,), ((1, 2),)),
        ConvGeometry((1, 1), (1, 1), ((0, 0), (0, 0))),
    ],
)
def test_conv_term_per_position_matches_loop(geo: ConvGeometry) -> None:
    rng = np.random.default_rng(2)
    dims = len(geo.stride)
    size = (7, 6)[:dims]
    kernel = (3, 2)[:dims] if dims == 2 else (4,)
    w = rng.normal(size=(4, 4 // geo.groups, *kernel))
    e = rng.uniform(0.1, 3.0, size=(4, *size))
    got = dropout_term(w, e, 0.25, geo)
    np.testing.assert_allclose(got, (1 / 0.75 - 1) * loop_oracle(w**2, e, geo), rtol=1e-12)
    # per-channel E[x²] with a known input size: the same as a constant map
    flat = e.mean(axis=tuple(range(1, e.ndim)))
    sized = ConvGeometry(geo.stride, geo.dilation, geo.padding, geo.groups, input_size=size)
    const = np.broadcast_to(flat.reshape(-1, *([1] * dims)), e.shape)
    np.testing.assert_allclose(
        dropout_term(w, flat, 0.25, sized),
        (1 / 0.75 - 1) * loop_oracle(w**2, np.ascontiguousarray(const), geo),
        rtol=1e-12,
    )


def test_conv_term_without_input_size_counts_every_tap() -> None:
    w = np.ones((1, 2, 3, 3))
    geo = ConvGeometry((1, 1), (1, 1), ((1, 1), (1, 1)))
    assert dropout_term(w, np.array([1.0, 2.0]), 0.5, geo).tolist() == [27.0]
    # 4×4 input, padding 1: per dim the centre tap reads 4 of 4 rows, each edge tap 3 of 4
    sized = ConvGeometry((1, 1), (1, 1), ((1, 1), (1, 1)), input_size=(4, 4))
    assert dropout_term(w, np.array([1.0, 2.0]), 0.5, sized)[0] == pytest.approx(3 * 2.5**2)


def test_structure_class_is_checked() -> None:
    with pytest.raises(ValidationError, match="class must be one of"):
        LayerStructure("bn", "sideways")


def test_flattened_inputs_in_both_layouts() -> None:
    from varshift.core.structure import flattened

    per_channel = np.array([1.0, 2.0])
    assert flattened(per_channel, 6).tolist() == [1, 1, 1, 2, 2, 2]
    assert flattened(per_channel, 6, "channels_last").tolist() == [1, 2, 1, 2, 1, 2]
    per_position = np.arange(6.0).reshape(2, 3)  # (C, P)
    assert flattened(per_position, 6).tolist() == [0, 1, 2, 3, 4, 5]
    assert flattened(per_position, 6, "channels_last").tolist() == [0, 3, 1, 4, 2, 5]
    with pytest.raises(ValidationError, match="not a whole number"):
        flattened(per_channel, 5)


def test_sensitivity_is_the_move_of_the_corrected_variance() -> None:
    # Oracle: recompute the term with every E[x²] 15% high and measure the relative change of
    # V − term directly (the sensitivity is stated as that change).
    rng = np.random.default_rng(3)
    weight, ex2 = rng.normal(size=(5, 7)), rng.uniform(0.2, 2.0, 7)
    term = dropout_term(weight, ex2, 0.5)
    stored = term * rng.uniform(1.2, 4.0, 5)
    moved = stored - dropout_term(weight, 1.15 * ex2, 0.5)
    want = np.abs(moved / (stored - term) - 1.0)
    np.testing.assert_allclose(sensitivity(term, stored - term), want, rtol=1e-12)


def _linear_case(rate: float, ex2: np.ndarray | None = None) -> tuple[object, ...]:
    """A one-layer through-linear structure whose term is known by hand: W = I (2×2), feeder
    output Normal(0, 1) through ReLU → E[x²] = 1/2, term = (1/q − 1)/2 per channel."""
    from varshift.formats import BNLayer, BNStats
    from varshift.jobs.correct import CorrectionConfig

    ones = np.ones(2)
    feeder = FeederBN(ones, np.zeros(2), np.zeros(2), ones, 0.0, "bn0")
    s = LayerStructure(
        "bn1", "through-linear", "bernoulli", rate, weight=np.eye(2), feeder=feeder,
        activation="relu", ex2=ex2,
    )  # fmt: skip
    stats = BNStats({"bn1": BNLayer("bn1", np.zeros(2), np.full(2, 1.0))}, "npz")
    return stats, CorrectionConfig(from_model=True), {"bn1": s}


@pytest.mark.parametrize(
    ("rate", "warns"),
    # term = (1/q − 1)/2: rate 0.2 → 0.125, test variance 0.875, sensitivity 0.15·0.125/0.875
    # = 2.1%; rate 0.5 → 0.5, 0.5, 15%: over the ±10% band.
    [(0.2, False), (0.5, True)],
)
def test_sensitivity_in_the_report_and_warning(rate: float, warns: bool) -> None:
    from varshift.jobs.graph_correct import correct_with_structure

    stats, config, structure = _linear_case(rate)
    result = correct_with_structure(stats, config, structure)  # type: ignore[arg-type]
    term = (1.0 / (1.0 - rate) - 1.0) / 2.0
    np.testing.assert_allclose(result.stats.layers["bn1"].var, 1.0 - term)
    expected = f"up to ±{0.15 * term / (1.0 - term):.1%}"
    assert "sensitivity: ±15% in E[x²]" in result.rows[0].assumption
    assert expected in result.rows[0].assumption
    assert bool(result.warnings) is warns
    if warns:
        assert "'bn1'" in result.warnings[0] and "--data" in result.warnings[0]
        assert "recalibrate" in result.warnings[0] and expected in result.warnings[0]


def test_measured_ex2_has_no_sensitivity_note() -> None:
    from varshift.jobs.graph_correct import correct_with_structure

    stats, config, structure = _linear_case(0.5, ex2=np.full(2, 0.5))
    result = correct_with_structure(stats, config, structure)  # type: ignore[arg-type]
    assert "sensitivity" not in result.rows[0].assumption and not result.warnings
    np.testing.assert_allclose(result.stats.layers["bn1"].var, 0.5)
