"""Framework presets: momentum → decay, biased/unbiased stored variance, eps, rate → keep."""

from __future__ import annotations

import math

import pytest

from varshift.core.errors import ValidationError
from varshift.core.presets import PRESETS, keep_from_rate, resolve_preset


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
    assert set(PRESETS) == {"torch", "keras", "tf-keras", "flax"}


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
        ("caffe", "default", r"framework must be one of torch, keras, tf-keras, flax; got 'caffe'"),
        ("torch", 1.5, r"momentum must be in \[0, 1\]; got 1.5"),
        ("keras", -0.1, r"momentum must be in \[0, 1\]; got -0.1"),
    ],
)
def test_bad_presets_name_the_parameter(framework: str, momentum: float, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        resolve_preset(framework, momentum)
