"""Correction and inspection of stored BN statistics: selection rules, the per-layer formula
written out as arithmetic, clipping within noise, and the flags of `inspect`."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from varshift.core.dropout import Dropout, InputMoments
from varshift.core.errors import InputFileError, ValidationError
from varshift.core.presets import resolve_preset
from varshift.core.theory import running_stats, shift_direct
from varshift.formats import BNLayer, BNStats
from varshift.jobs.correct import (
    CorrectionConfig,
    LayerRule,
    correct_stats,
    inspect_stats,
    parse_layer_rule,
    select_rates,
)

TORCH = resolve_preset("torch")
KERAS = resolve_preset("keras")


def stats_of(**layers: tuple[list[float], list[float]]) -> BNStats:
    """``name=(mean, var)`` → a BNStats with those layers (``__`` in a name becomes ``.``)."""
    out = {}
    for key, (mean, var) in layers.items():
        name = key.replace("__", ".")
        out[name] = BNLayer(name, np.asarray(mean, float), np.asarray(var, float), count=1000)
    return BNStats(out, "json")


# --- selection ------------------------------------------------------------------------------


def test_layer_rules_parse_and_validate() -> None:
    assert parse_layer_rule("features.*=0.2") == LayerRule("features.*", 0.2)
    assert parse_layer_rule("a=b=0.5") == LayerRule("a=b", 0.5)
    with pytest.raises(ValidationError, match="must be PATTERN=RATE"):
        parse_layer_rule("features.*")
    with pytest.raises(ValidationError, match=r"rate must be a number in \[0, 1\); got 'x'"):
        parse_layer_rule("bn=x")
    with pytest.raises(ValidationError, match=r"--layer 'bn=1.5': rate must be in \[0, 1\)"):
        parse_layer_rule("bn=1.5")


def test_rate_is_a_first_star_rule_and_the_last_match_wins() -> None:
    names = ["stem.bn", "block1.bn", "block2.bn", "head.bn"]
    config = CorrectionConfig(
        rate=0.1,
        rules=(LayerRule("block*", 0.3), LayerRule("block2.*", 0.5)),
        exclude=("stem.*",),
    )
    assert select_rates(names, config, "f") == {
        "stem.bn": None,
        "block1.bn": 0.3,
        "block2.bn": 0.5,
        "head.bn": 0.1,
    }
    only_rules = CorrectionConfig(rules=(LayerRule("head.*", 0.2),))
    assert select_rates(names, only_rules, "f") == {
        "stem.bn": None,
        "block1.bn": None,
        "block2.bn": None,
        "head.bn": 0.2,
    }


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (CorrectionConfig(rules=(LayerRule("blok*", 0.2),)), "--layer pattern 'blok\\*'"),
        (CorrectionConfig(rate=0.2, exclude=("hed",)), "--exclude pattern 'hed'"),
    ],
)
def test_a_pattern_matching_no_layer_is_an_error(config: CorrectionConfig, message: str) -> None:
    with pytest.raises(ValidationError, match=rf"^m\.pt: {message} matches no layer; layers: a, b"):
        select_rates(["a", "b"], config, "m.pt")


def test_config_needs_a_rate_and_valid_choices() -> None:
    with pytest.raises(ValidationError, match="give the dropout rate"):
        CorrectionConfig()
    with pytest.raises(ValidationError, match="method must be one of debiased, naive"):
        CorrectionConfig(rate=0.1, method="exact")
    with pytest.raises(ValidationError, match="target must be one of framework, population"):
        CorrectionConfig(rate=0.1, target="test")
    with pytest.raises(ValidationError, match="batch_size must be >= 2 for torch"):
        CorrectionConfig(rate=0.1, batch_size=1)
    assert CorrectionConfig(dropout="uout", beta=0.5).rate_rules() == (LayerRule("*", 0.0),)


# --- the correction ----------------------------------------------------------------------------


def test_bernoulli_correction_written_out_per_channel() -> None:
    mean, var = [0.0, 2.0, -1.0], [2.0, 10.0, 3.0]
    result = correct_stats(stats_of(bn=(mean, var)), CorrectionConfig(rate=0.2))
    q = 0.8
    new = result.stats.layers["bn"]
    np.testing.assert_allclose(
        new.var, [q * (v + m * m) - m * m for m, v in zip(mean, var, strict=True)], rtol=1e-15
    )
    np.testing.assert_array_equal(new.mean, mean)
    (row,) = result.rows
    assert (row.action, row.rate, row.channels, row.clipped) == ("corrected", 0.2, 3, 0)
    assert row.var_before == pytest.approx(5.0)
    assert row.var_after == pytest.approx(float(np.mean(new.var)))
    assert row.ratio == pytest.approx(row.var_after / 5.0)
    assert result.warnings == () and result.corrected == 1


def test_unselected_and_excluded_layers_are_untouched() -> None:
    stats = stats_of(a__bn=([1.0], [4.0]), b__bn=([1.0], [4.0]), c__bn=([1.0], [4.0]))
    config = CorrectionConfig(
        rules=(LayerRule("a.*", 0.5), LayerRule("b.*", 0.5)), exclude=("b.bn",)
    )
    result = correct_stats(stats, config)
    assert [r.action for r in result.rows] == ["corrected", "excluded", "not selected"]
    assert result.stats.layers["b.bn"] is stats.layers["b.bn"]
    assert result.stats.layers["c.bn"] is stats.layers["c.bn"]
    assert result.rows[1].var_after == 4.0 and result.rows[1].ratio == 1.0


def test_rate_zero_leaves_the_values_bit_for_bit() -> None:
    stats = stats_of(bn=([0.1, 3.0], [0.7, 1.3]))
    result = correct_stats(stats, CorrectionConfig(rate=0.0))
    assert result.stats.layers["bn"] is stats.layers["bn"]


def test_debiased_and_naive_differ_only_for_biased_presets_with_a_batch_size() -> None:
    n, q, c, v = 8, 0.5, 3.0, 2.0
    # What Keras stores in expectation: the biased batch variance of the dropout output.
    stored_var = (n - 1) / n * shift_direct(c, v, Dropout("bernoulli", 1 - q)).train_var
    stats = stats_of(bn=([c], [stored_var]))

    def corrected(**kw: object) -> float:
        config = CorrectionConfig(rate=1 - q, preset=KERAS, **kw)  # type: ignore[arg-type]
        return float(correct_stats(stats, config).stats.layers["bn"].var[0])

    assert corrected(batch_size=n) == pytest.approx((n - 1) / n * v, rel=1e-12)
    assert corrected(batch_size=n, target="population") == pytest.approx(v, rel=1e-12)
    naive = corrected(batch_size=n, method="naive")
    assert naive == pytest.approx(q * (stored_var + c * c) - c * c, rel=1e-12)
    assert naive == pytest.approx((n - 1) / n * v - (1 - q) * c * c / n, rel=1e-12)
    torch_stats = stats_of(bn=([c], [stored_var]))
    a = correct_stats(torch_stats, CorrectionConfig(rate=1 - q, batch_size=n))
    b = correct_stats(torch_stats, CorrectionConfig(rate=1 - q, batch_size=n, method="naive"))
    assert a.stats.layers["bn"].var[0] == b.stats.layers["bn"].var[0]  # torch is unbiased


def test_a_biased_preset_without_batch_size_warns_that_debiasing_is_skipped() -> None:
    result = correct_stats(stats_of(bn=([0.0], [2.0])), CorrectionConfig(rate=0.5, preset=KERAS))
    assert any("without --batch-size the debiasing step is skipped" in w for w in result.warnings)


def test_alpha_dropout_changes_the_mean_too() -> None:
    drop = Dropout("alpha", 0.2)
    c, v = 0.3, 1.5
    train_mean, train_var = drop.train_mean_var(c, v)
    result = correct_stats(
        stats_of(bn=([train_mean], [train_var])), CorrectionConfig(rate=0.2, dropout="alpha")
    )
    layer = result.stats.layers["bn"]
    assert layer.mean[0] == pytest.approx(c, rel=1e-12)
    assert layer.var[0] == pytest.approx(v, rel=1e-12)


@given(
    c=st.floats(-5, 5),
    v=st.floats(1e-2, 50),
    rate=st.floats(0.0, 0.9),
    kind=st.sampled_from(["bernoulli", "gaussian", "vanilla", "alpha"]),
)
@settings(max_examples=60, deadline=None)
def test_correction_recovers_the_test_time_variance(
    c: float, v: float, rate: float, kind: str
) -> None:
    drop = Dropout(kind, rate)
    train_mean, train_var = drop.train_mean_var(c, v)
    test = shift_direct(c, v, drop)
    result = correct_stats(
        stats_of(bn=([train_mean], [train_var])), CorrectionConfig(rate=rate, dropout=kind)
    )
    layer = result.stats.layers["bn"]
    assert layer.var[0] == pytest.approx(test.test_var, rel=1e-7, abs=1e-9 * (c * c + v))
    assert layer.mean[0] == pytest.approx(test.test_mean, rel=1e-9, abs=1e-9)


# --- bad values and clipping --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mean", "var", "message"),
    [
        (
            [0.0, 0.0],
            [1.0, math.nan],
            r"running variance has 1 non-finite value\(s\) at channel\(s\) 1 \(nan\)",
        ),
        (
            [0.0, 0.0],
            [math.inf, 1.0],
            r"running variance has 1 non-finite value\(s\) at channel\(s\) 0 \(inf\)",
        ),
        ([math.nan, 0.0], [1.0, 1.0], r"running mean has 1 non-finite"),
        ([0.0, 0.0], [1.0, -0.5], r"running variance is negative at 1 channel\(s\) 1 \(-0.5\)"),
    ],
)
def test_unusable_values_name_the_file_layer_and_channel(
    mean: list[float], var: list[float], message: str
) -> None:
    stats = BNStats({"bn": BNLayer("bn", np.array(mean), np.array(var))}, "torch", None)
    with pytest.raises(InputFileError, match=rf"^<statistics>: layer 'bn': {message}"):
        correct_stats(stats, CorrectionConfig(rate=0.5))


def test_unusable_values_in_an_excluded_layer_do_not_matter() -> None:
    stats = stats_of(bad=([0.0], [math.nan]), ok=([0.0], [2.0]))
    result = correct_stats(stats, CorrectionConfig(rate=0.5, exclude=("bad",)))
    assert result.stats.layers["ok"].var[0] == 1.0


def constant_input_record(c: float, rate: float, n: int) -> tuple[float, float]:
    """Stored variance (mean, stationary sd) of dropout applied to the constant c (torch)."""
    out = Dropout("bernoulli", rate).train_moments(InputMoments(c, c * c, c**3, c**4))
    run = running_stats(out, TORCH, n, 10**9)
    return run.batch_var_mean, run.var_sd


def test_a_variance_just_below_what_dropout_alone_records_is_clipped_with_a_warning() -> None:
    c, rate, n = 2.0, 0.5, 32
    expected, sd = constant_input_record(c, rate, n)
    assert expected == pytest.approx((1 / 0.5) * c * c - c * c)  # case (a) with v = 0
    stats = stats_of(bn=([c, 0.0, c], [expected - 2 * sd, 0.0, 10.0]))
    result = correct_stats(stats, CorrectionConfig(rate=rate, batch_size=n))
    layer = result.stats.layers["bn"]
    assert layer.var.tolist()[:2] == [TORCH.eps, TORCH.eps]
    assert layer.var[2] == pytest.approx(0.5 * (10 + 4) - 4)
    assert result.rows[0].clipped == 2
    (warning,) = result.warnings
    assert "layer 'bn': 2 channel(s) with a corrected variance ≤ 0" in warning
    assert np.all(np.isfinite(layer.var)) and np.all(layer.var > 0)


def test_a_variance_far_below_what_dropout_alone_records_is_an_error() -> None:
    c, rate, n = 2.0, 0.5, 32
    expected, sd = constant_input_record(c, rate, n)
    stats = stats_of(bn=([c], [expected - 4 * sd]))
    with pytest.raises(InputFileError, match=r"layer 'bn': corrected variance .* ≤ 0 at channel 0"):
        correct_stats(stats, CorrectionConfig(rate=rate, batch_size=n))


def test_without_a_batch_size_the_relative_tolerance_decides() -> None:
    stats_ok = stats_of(bn=([2.0], [4.0 * 0.95]))  # 5% below (1/q - 1) c² = 4
    result = correct_stats(stats_ok, CorrectionConfig(rate=0.5))
    assert result.rows[0].clipped == 1
    with pytest.raises(InputFileError, match=r"records from a constant input .*\(4\)"):
        correct_stats(stats_of(bn=([2.0], [4.0 * 0.85])), CorrectionConfig(rate=0.5))


# --- inspection ------------------------------------------------------------------------------


def test_inspect_flags() -> None:
    layers = {
        "fresh": BNLayer("fresh", np.zeros(3), np.ones(3), count=0),
        "young": BNLayer("young", np.array([0.5, 1.0]), np.array([2.0, 3.0]), count=20),
        "broken": BNLayer("broken", np.array([0.0, math.nan]), np.array([-1.0, math.inf])),
        "fine": BNLayer("fine", np.array([1.0, 3.0]), np.array([2.0, 4.0]), count=500),
    }
    rows = {r.layer: r for r in inspect_stats(BNStats(layers, "torch"), TORCH)}
    assert rows["fresh"].initial and rows["fresh"].few_updates
    assert rows["fresh"].flags == "initial values (mean 0, var 1); few updates (0 < 44)"
    assert rows["young"].few_updates and not rows["young"].initial
    assert (rows["young"].var_mean, rows["young"].var_min, rows["young"].var_max) == (2.5, 2.0, 3.0)
    broken = rows["broken"]
    assert broken.few_updates is None and broken.count is None
    assert (broken.nonfinite, broken.nonpositive) == (1, 1)
    assert broken.var_mean == -1.0 and broken.mean_mean == 0.0  # over finite channels only
    assert broken.flags == "non-finite (1 ch); var ≤ 0 (1 ch)"
    assert rows["fine"].flags == "" and rows["fine"].mean_mean == 2.0
    keras_rows = inspect_stats(BNStats({"young": layers["young"]}, "keras"), KERAS)
    assert keras_rows[0].flags == "few updates (20 < 459)"
