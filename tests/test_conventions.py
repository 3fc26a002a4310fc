"""Framework presets: momentum → decay, biased/unbiased stored variance, eps, rate → keep."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from varshift.core.ema import (
    ema_batch_weights,
    ema_residual,
    ema_weight_sums,
    ema_weight_sums_at,
)
from varshift.core.errors import ValidationError
from varshift.core.presets import (
    BIASED,
    FRAMEWORKS,
    PRESETS,
    UNBIASED,
    Estimator,
    Preset,
    bessel,
    keep_from_rate,
    resolve_preset,
)


def test_keep_is_one_minus_rate() -> None:
    assert keep_from_rate(0.0) == 1.0
    assert keep_from_rate(0.2) == 1.0 - 0.2
    assert keep_from_rate(0.75) == 0.25


@pytest.mark.parametrize("rate", [-0.1, 1.0, 1.2, math.nan, math.inf])
def test_rate_outside_unit_interval_is_rejected(rate: float) -> None:
    with pytest.raises(ValidationError, match=r"^rate must be"):
        keep_from_rate(rate)


def test_default_presets_match_the_framework_sources() -> None:
    # torch: momentum 0.1 is the weight of the new batch; unbiased running_var; eps 1e-5.
    torch = resolve_preset("torch")
    assert (torch.momentum, torch.alpha, torch.unbiased, torch.eps) == (0.1, 0.9, True, 1e-5)
    # Keras 3: momentum 0.99 is the decay; biased moving_variance; eps 1e-3.
    keras = resolve_preset("keras")
    assert (keras.momentum, keras.alpha, keras.unbiased, keras.eps) == (0.99, 0.99, False, 1e-3)
    # tf.keras fused path: TF's kernel Bessel-corrects the stored variance.
    tfk = resolve_preset("tf-keras")
    assert (tfk.alpha, tfk.unbiased, tfk.eps) == (0.99, True, 1e-3)
    flax = resolve_preset("flax")
    assert (flax.alpha, flax.unbiased, flax.eps) == (0.99, False, 1e-5)
    # Multi-backend Keras 2.1.4–2.3.1: variance *= n / (n - (1 + epsilon)) before the average.
    k2 = resolve_preset("keras2")
    assert (k2.momentum, k2.alpha, k2.unbiased, k2.eps) == (0.99, 0.99, False, 1e-3)
    assert k2.estimator.ddof == 1.0 + 1e-3 and k2.stored_over_biased(32) == 32 / 30.999
    assert set(PRESETS) == {"torch", "keras", "tf-keras", "keras2", "flax"}


def test_momentum_is_read_in_each_frameworks_own_meaning() -> None:
    assert resolve_preset("torch", 0.3).alpha == pytest.approx(0.7)
    assert resolve_preset("keras", 0.9).alpha == 0.9
    assert resolve_preset("flax", 0.5).alpha == 0.5


def test_torch_momentum_none_is_a_cumulative_average() -> None:
    p = resolve_preset("torch", None)
    assert p.cumulative and p.alpha is None and p.momentum is None
    with pytest.raises(ValidationError, match="momentum must be a number for keras"):
        resolve_preset("keras", None)


def test_stored_factor_and_batch_checks() -> None:
    assert resolve_preset("torch").stored_factor(32) == 1.0
    assert resolve_preset("keras").stored_factor(32) == 31 / 32
    with pytest.raises(ValidationError, match=r"batch_size must be >= 2 for torch"):
        resolve_preset("torch").check_batch(1)
    assert resolve_preset("keras").check_batch(1) == 1


def test_tf_keras_eps_is_raised_to_the_fused_minimum() -> None:
    assert resolve_preset("tf-keras", eps=1e-8).eps == 1.001e-5
    assert resolve_preset("torch", eps=1e-8).eps == 1e-8


@pytest.mark.parametrize(
    ("framework", "momentum", "message"),
    [
        (
            "caffe",
            "default",
            r"framework must be one of torch, keras, tf-keras, keras2, flax; got 'caffe'",
        ),
        ("torch", 1.5, r"momentum must be in \[0, 1\]; got 1.5"),
        ("keras", -0.1, r"momentum must be in \[0, 1\]; got -0.1"),
    ],
)
def test_bad_presets_name_the_parameter(framework: str, momentum: float, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        resolve_preset(framework, momentum)


# --- the preset registry ------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_has_every_field(name: str) -> None:
    p = PRESETS[name]
    assert p.name == name
    assert p.label and p.source
    assert p.momentum is not None and p.alpha is not None
    assert p.alpha == p.alpha_from(p.momentum)
    assert p.eps > 0 and p.eps >= p.min_eps >= 0
    if p.eps_in_ddof:  # Keras 2.x: the stored variance is ÷ (n - 1 - eps)
        assert p.estimator.ddof == 1.0 + p.eps
    else:
        assert p.estimator in (BIASED, UNBIASED)
    assert isinstance(p.momentum_is_decay, bool) and isinstance(p.none_is_cumulative, bool)


def test_framework_choices_are_the_registry_keys() -> None:
    from varshift.cli._common import Framework

    assert [f.value for f in Framework] == list(PRESETS) == list(FRAMEWORKS)


def test_estimators_divide_by_n_minus_ddof() -> None:
    assert bessel(5) == 5 / 4
    assert UNBIASED.over_biased(5) == 5 / 4 and BIASED.over_biased(5) == 1.0
    assert UNBIASED.over_population(5) == 1.0 and BIASED.over_population(5) == 4 / 5
    assert (BIASED.min_batch, UNBIASED.min_batch) == (1, 2)
    # A third estimator is one more record: the biased variance scaled by n/(n-1-e).
    scaled = Estimator("scaled", 1.0 + 1e-3, "n-1-eps")
    assert scaled.over_biased(8) == 8 / (8 - 1.001)
    assert scaled.over_population(8) == 7 / (8 - 1.001)
    p = Preset("x", 0.99, 0.99, eps=1e-3, estimator=scaled)
    assert not p.unbiased and p.stored_factor(8) == 7 / (8 - 1.001)
    with pytest.raises(ValidationError, match=r"^batch_size must be >= 2 for x \(the stored "):
        p.check_batch(1)


def test_the_first_generation_constructor_still_works() -> None:
    p = Preset("keras-unbiased", 0.99, 0.99, unbiased=True, eps=1e-3)
    assert p.unbiased and p.estimator == UNBIASED and p.momentum_is_decay
    assert replace(p, alpha=0.5).estimator == UNBIASED
    assert Preset("b", 0.9, 0.9, unbiased=False).estimator == BIASED
    with pytest.raises(
        ValidationError,
        match=r"^batch_size must be >= 2 for torch \(the stored "
        r"variance is unbiased, ÷ \(n-1\)\); got 1$",
    ):
        PRESETS["torch"].check_batch(1)


def test_resolve_preset_reads_fields_not_names(monkeypatch: pytest.MonkeyPatch) -> None:
    # Presets built from torch's and tf-keras' fields under other names behave like them.
    monkeypatch.setitem(PRESETS, "clone", replace(PRESETS["torch"], name="clone"))
    monkeypatch.setitem(PRESETS, "fused", replace(PRESETS["tf-keras"], name="fused"))
    assert resolve_preset("clone", 0.3).alpha == 1.0 - 0.3
    assert resolve_preset("clone", None).cumulative
    assert resolve_preset("fused", eps=1e-8).eps == 1.001e-5
    assert resolve_preset("fused", 0.9).alpha == 0.9
    with pytest.raises(
        ValidationError,
        match=r"for fused; got None \(the cumulative average is "
        r"PyTorch's momentum=None only\)$",
    ):
        resolve_preset("fused", None)


# --- EMA weights --------------------------------------------------------------------------------


def _loop_weights(alpha: float | None, steps: int) -> tuple[float, list[float]]:
    """Run the update on unit impulses: the weight of R_0 and of every batch."""
    r0, ws = 1.0, [0.0] * steps
    for t in range(steps):
        if alpha is None:
            k = 1.0 / (t + 1)
            r0, ws = r0 * (1 - k), [w * (1 - k) for w in ws]
            ws[t] += k
        else:
            r0, ws = r0 * alpha, [w * alpha for w in ws]
            ws[t] += 1 - alpha
    return r0, ws


@pytest.mark.parametrize(("alpha", "steps"), [(0.9, 7), (0.5, 1), (0.99, 30), (None, 6), (1.0, 4)])
def test_ema_weight_sums_match_the_update_run_on_impulses(alpha: float | None, steps: int) -> None:
    r0, ws = _loop_weights(alpha, steps)
    resid, sq = ema_weight_sums(alpha, steps)
    assert resid == pytest.approx(r0, abs=1e-15)
    assert sq == pytest.approx(sum(w * w for w in ws), rel=1e-12, abs=1e-15)
    assert ema_residual(alpha, steps) == pytest.approx(r0, abs=1e-15)
    got = ema_batch_weights(alpha, steps, np.arange(steps))
    assert got.tolist() == pytest.approx(ws, rel=1e-12, abs=1e-15)
    resids, sqs = ema_weight_sums_at(alpha, np.array([0.0, float(steps)]))
    assert resids.tolist() == pytest.approx([1.0, r0], abs=1e-15)
    assert sqs.tolist() == pytest.approx([0.0, sum(w * w for w in ws)], rel=1e-12, abs=1e-15)


def test_ema_before_any_update() -> None:
    assert ema_weight_sums(0.9, 0) == (1.0, 0.0)
    assert ema_residual(None, 0) == 1.0
