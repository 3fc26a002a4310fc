"""A pure-NumPy reference of multi-backend Keras 2.x BatchNormalization's running statistics.

The ``keras2`` preset (``varshift/core/presets.py``) reproduces the update rule pinned here,
read from the Keras 2.x sources (see ``docs/keras2.md``). This module checks the reference
against closed forms, against varshift's engine update (the preset, and where the conventions
coincide), and against TensorFlow's own ``assign_moving_average`` when TensorFlow is installed
(Keras 2.x itself needs TensorFlow 1.x, not installable on Python 3.11).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pytest

from varshift.core.dropout import InputMoments
from varshift.core.errors import ValidationError
from varshift.core.presets import PRESETS, Preset, resolve_preset
from varshift.core.theory import running_stats
from varshift.engine import bn_running_stats

EPS64 = float(np.finfo(np.float64).eps)


@dataclass(frozen=True)
class Keras2Stats:
    """Running statistics of one Keras 2.x ``BatchNormalization`` layer after training steps.

    ``moving_variance`` holds the variance in Keras 2's stored convention: the biased batch
    variance times ``n / (n - 1 - epsilon)`` (and times ``n / (n - 1)`` first on the fused
    4-D path of TensorFlow 1.x), averaged as described by :func:`keras2_running_stats`.
    """

    moving_mean: np.ndarray
    moving_variance: np.ndarray
    steps: int


def moving_average_stream(
    values: Iterable[np.ndarray], initial: np.ndarray, momentum: float, *, zero_debias: bool
) -> np.ndarray:
    """Apply Keras 2.x's ``K.moving_average_update(x, value, momentum)`` once per value.

    Without zero-debias (TF backend of Keras 2.0.0–2.1.2 and 2.3.0–2.3.1, Theano backend)::

        x_t = x_{t-1} - (x_{t-1} - s_t) * (1 - momentum)        (x_0 = initial)

    With zero-debias (TF backend of Keras 2.1.3–2.2.5: ``assign_moving_average(...,
    zero_debias=True)``), TensorFlow keeps a hidden ``biased`` variable that starts at 0 and a
    step counter; the layer's variable is *overwritten* each step::

        b_t = b_{t-1} - (b_{t-1} - s_t) * (1 - momentum),  b_0 = 0
        x_t = b_t / (1 - momentum ** t)

    so ``initial`` is forgotten at the first step (``x_1 = s_1``) and ``x_t`` is the normalised
    weighted average ``sum_k (1-m) m^(t-k) s_k / (1 - m^t)``.

    Sources: keras-team/keras ``keras/backend/tensorflow_backend.py`` ``moving_average_update``
    (``zero_debias=True`` from commit 3ce40705a7, first in tag 2.1.3, to tag 2.2.5; replaced by
    the plain ``assign_sub`` in c4d29cdf21, first in tag 2.3.0); tensorflow/tensorflow
    ``tensorflow/python/training/moving_averages.py`` ``assign_moving_average`` and
    ``_zero_debias`` (TF 1.x: ``unbiased_ema_delta = unbiased_var - biased / (1 - decay**t)``,
    applied with ``assign_sub``; later TF: ``assign(v, biased / (1 - decay**t))``).
    """
    x = np.array(initial, dtype=np.float64)
    biased = np.zeros_like(x)
    one_minus = 1.0 - momentum
    for t, s in enumerate(values, start=1):
        if zero_debias:
            biased -= (biased - s) * one_minus
            x = biased / (1.0 - momentum**t)
        else:
            x -= (x - s) * one_minus
    return x


def keras2_running_stats(
    batches: Iterable[np.ndarray],
    *,
    momentum: float = 0.99,
    epsilon: float = 1e-3,
    zero_debias: bool = True,
    fused_bessel: bool = False,
) -> Keras2Stats:
    """Simulate Keras 2.x ``BatchNormalization`` (channels last) over a stream of batches.

    Per batch of ``n`` elements per channel (``n`` = product of all axes but the last), with
    ``tf.nn.moments``' biased variance ``v`` (``_regular_normalize_batch_in_training``) or the
    Bessel-corrected ``v n/(n-1)`` of ``tf.nn.fused_batch_norm`` (``fused_bessel=True``: 4-D
    inputs under TensorFlow 1.x, ``_fused_normalize_batch_in_training``), the layer stores::

        s_t = v * n / (n - (1.0 + epsilon))

    (keras-team/keras ``keras/layers/normalization.py`` ``BatchNormalization.call``:
    ``variance *= sample_size / (sample_size - (1.0 + self.epsilon))``, from commit f51a7ef090,
    tags 2.1.4–2.3.1; the CNTK backend skips it) and averages ``s_t`` and the batch mean with
    :func:`moving_average_stream` from ``moving_mean = 0`` and ``moving_variance = 1``.
    Defaults are Keras 2's: ``momentum=0.99``, ``epsilon=1e-3``.
    """
    means: list[np.ndarray] = []
    stored: list[np.ndarray] = []
    channels = None
    for batch in batches:
        b = np.asarray(batch, dtype=np.float64)
        axes = tuple(range(b.ndim - 1))
        n = math.prod(b.shape[:-1])
        channels = b.shape[-1]
        v = b.var(axis=axes)
        if fused_bessel:
            v = v * (n / max(n - 1, 1))
        means.append(b.mean(axis=axes))
        stored.append(v * (n / (n - (1.0 + epsilon))))
    if channels is None:
        raise ValueError("batches must hold at least one batch")
    zeros, ones = np.zeros(channels), np.ones(channels)
    return Keras2Stats(
        moving_mean=moving_average_stream(means, zeros, momentum, zero_debias=zero_debias),
        moving_variance=moving_average_stream(stored, ones, momentum, zero_debias=zero_debias),
        steps=len(means),
    )


def stream(seed: int = 0, steps: int = 300, n: int = 16, channels: int = 3) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(1.0, 2.0, size=(n, channels)) for _ in range(steps)]


def ema_tol(steps: int, momentum: float, cond: float, n: int) -> float:
    """Rounding bound (relative) of two float64 EMAs of the same batch moments: ≤ 3 eps per
    update, remembered over ``1/(1-momentum)`` updates, plus the moments' own rounding
    (``(log2 n + 2) eps`` times the cancellation factor ``cond = E[x²]/Var[x]``)."""
    memory = min(steps, 1.0 / (1.0 - momentum))
    return EPS64 * (3.0 * memory + (math.log2(n) + 2.0) * cond + steps)


def test_one_batch_by_hand() -> None:
    # One channel, values 0 and 2: mean 1, biased variance 1, n = 2.
    batch = np.array([[0.0], [2.0]])
    plain = keras2_running_stats([batch], zero_debias=False)
    assert plain.moving_mean[0] == pytest.approx(0.99 * 0.0 + 0.01 * 1.0, rel=4 * EPS64)
    stored = 1.0 * 2.0 / (2.0 - 1.001)  # n / (n - 1 - eps), eps = 1e-3
    assert plain.moving_variance[0] == pytest.approx(0.99 * 1.0 + 0.01 * stored, rel=4 * EPS64)
    debiased = keras2_running_stats([batch], zero_debias=True)
    # Zero-debias forgets the initial 0 / 1 at the first step: x_1 = s_1.
    assert debiased.moving_mean[0] == pytest.approx(1.0, rel=4 * EPS64)
    assert debiased.moving_variance[0] == pytest.approx(stored, rel=4 * EPS64)


def test_without_debias_and_epsilon_zero_it_is_the_unbiased_ema_of_the_engine() -> None:
    batches = stream()
    ref = keras2_running_stats(batches, epsilon=0.0, zero_debias=False)
    engine = bn_running_stats(batches, Preset("unbiased-0.99", 0.99, 0.99, True, 1e-3))
    cond = max(float(np.max((b**2).mean(0) / b.var(0))) for b in batches)
    tol = ema_tol(len(batches), 0.99, cond, 16)
    np.testing.assert_allclose(ref.moving_mean, engine.running_mean, rtol=tol, atol=tol)
    np.testing.assert_allclose(ref.moving_variance, engine.running_var, rtol=tol, atol=tol)


def test_epsilon_in_the_factor_is_visible() -> None:
    """Keras 2 divides by n - 1 - eps, not n - 1: with eps = 1e-3 and n = 16 the stored
    variance is (n-1)/(n-1-eps) = 15/14.999 above the unbiased one, every batch."""
    batches = stream(steps=400)
    with_eps = keras2_running_stats(batches, zero_debias=True)
    no_eps = keras2_running_stats(batches, epsilon=0.0, zero_debias=True)
    ratio = with_eps.moving_variance / no_eps.moving_variance
    np.testing.assert_allclose(ratio, 15.0 / 14.999, rtol=ema_tol(400, 0.99, 10.0, 16))
    assert np.all(ratio - 1.0 > 6e-5)  # 1/14999 = 6.67e-5: far above rounding


def test_zero_debias_is_the_normalised_weighted_average() -> None:
    batches = stream(steps=50)
    ref = keras2_running_stats(batches, zero_debias=True)
    m, t = 0.99, len(batches)
    n = 16
    s = np.array([b.var(0) * n / (n - 1.001) for b in batches])
    w = np.array([(1 - m) * m ** (t - k) for k in range(1, t + 1)])
    want = (w[:, None] * s).sum(0) / (1 - m**t)
    np.testing.assert_allclose(ref.moving_variance, want, rtol=1e-13)
    # Without debias the initial 1 keeps the weight m^t (here 0.99^50 = 0.605).
    plain = keras2_running_stats(batches, zero_debias=False)
    np.testing.assert_allclose(plain.moving_variance, m**t + (w[:, None] * s).sum(0), rtol=1e-13)


def test_constant_stream_is_exact_from_the_first_step_only_with_zero_debias() -> None:
    c = np.array([[3.0, -1.0], [5.0, 1.0]])  # mean (4, 0), biased var (1, 1), n = 2
    for t in (1, 2, 10, 100):
        deb = keras2_running_stats([c] * t, zero_debias=True)
        np.testing.assert_allclose(deb.moving_mean, [4.0, 0.0], rtol=1e-13, atol=1e-13)
        plain = keras2_running_stats([c] * t, zero_debias=False)
        np.testing.assert_allclose(plain.moving_mean, [4.0 * (1 - 0.99**t), 0.0], rtol=1e-13)


def test_fused_path_applies_bessel_twice() -> None:
    rng = np.random.default_rng(1)
    batches = [rng.normal(size=(4, 2, 2, 3)) for _ in range(30)]  # n = 16 per channel
    fused = keras2_running_stats(batches, fused_bessel=True)
    plain = keras2_running_stats(batches, fused_bessel=False)
    np.testing.assert_allclose(fused.moving_variance / plain.moving_variance, 16 / 15, rtol=1e-13)


# --- the keras2 preset against the reference ------------------------------------------------


def test_keras2_preset_is_the_reference_without_zero_debias() -> None:
    """The engine under ``keras2`` is Keras 2.3.x's update (no zero-debias) to rounding."""
    batches = stream(seed=3, steps=400)
    ref = keras2_running_stats(batches, zero_debias=False)
    engine = bn_running_stats(batches, PRESETS["keras2"])
    cond = max(float(np.max((b**2).mean(0) / b.var(0))) for b in batches)
    tol = ema_tol(len(batches), 0.99, cond, 16)
    np.testing.assert_allclose(engine.running_mean, ref.moving_mean, rtol=tol, atol=tol)
    np.testing.assert_allclose(engine.running_var, ref.moving_variance, rtol=tol, atol=tol)


def test_keras2_preset_and_zero_debias_differ_by_the_initial_values_weight() -> None:
    """Keras 2.1.3–2.2.5 (zero-debias) and the preset: ``R_plain = a^T + (1 - a^T) R_debias``
    exactly, so they differ by ``a^T |1 - R_debias|``: large at first, gone after ~1000 steps."""
    m = 0.99
    for steps in (1, 10, 100, 1500):
        batches = stream(seed=4, steps=steps)
        debiased = keras2_running_stats(batches, zero_debias=True)
        engine = bn_running_stats(batches, PRESETS["keras2"])
        want = m**steps + (1 - m**steps) * debiased.moving_variance
        tol = ema_tol(steps, m, 10.0, 16) * 4
        np.testing.assert_allclose(engine.running_var, want, rtol=tol)
    assert m**1500 < 3e-7  # after the classic run's 31300 steps: 0.99^31300 ≈ 2e-137


def test_keras2_eps_override_moves_the_divisor() -> None:
    preset = resolve_preset("keras2", eps=0.25)
    assert preset.eps == 0.25 and preset.estimator.ddof == 1.25
    batches = stream(seed=5, steps=60, n=4)
    ref = keras2_running_stats(batches, epsilon=0.25, zero_debias=False)
    engine = bn_running_stats(batches, preset)
    np.testing.assert_allclose(engine.running_var, ref.moving_variance, rtol=1e-12)
    # ... and the default preset's divisor is n - 1.001, which differs visibly at n = 4.
    default = bn_running_stats(batches, PRESETS["keras2"])
    assert np.all(np.abs(default.running_var / engine.running_var - 1.0) > 1e-3)


def test_keras2_expected_stored_variance_by_hand() -> None:
    """E[s] = Var (n-1)/(n-1-eps) for iid inputs: v n/(n-1-eps) with E[v] = Var (n-1)/n."""
    out = InputMoments.normal(5.0, 4.0)
    rs = running_stats(out, PRESETS["keras2"], batch_size=32, steps=31300)
    assert rs.batch_var_mean == pytest.approx(4.0 * 31 / 30.999, rel=1e-14)
    assert rs.expected_var == pytest.approx(4.0 * 31 / 30.999, rel=1e-12)


def test_keras2_needs_two_elements() -> None:
    with pytest.raises(ValidationError, match=r"batch_size must be >= 2 for keras2"):
        PRESETS["keras2"].check_batch(1)
    assert PRESETS["keras2"].check_batch(2) == 2


def test_zero_debias_is_tensorflows_assign_moving_average() -> None:
    """The reference's zero-debias stream against TensorFlow's own ``assign_moving_average(...,
    zero_debias=True)`` (the call of Keras 2.1.3–2.2.5's ``moving_average_update``), run in a
    TF1 graph; and the plain stream against ``zero_debias=False``."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tf = pytest.importorskip("tensorflow")
        from tensorflow.python.training import moving_averages
    values = np.random.default_rng(2).normal(2.0, 1.0, size=(40, 3))
    for debias in (True, False):
        graph = tf.Graph()
        with graph.as_default(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            var = tf.compat.v1.get_variable("x", initializer=np.ones(3), dtype=tf.float64)
            value = tf.compat.v1.placeholder(tf.float64, shape=(3,))
            update = moving_averages.assign_moving_average(var, value, 0.99, zero_debias=debias)
            with tf.compat.v1.Session(graph=graph) as session:
                session.run(tf.compat.v1.global_variables_initializer())
                for v in values:
                    session.run(update, {value: v})
                got = session.run(var)
        # assign_moving_average converts 1 - decay to a float32 tensor before casting it to
        # the variable's dtype (as tf_keras does): the float64 run uses float32(0.01).
        m = 1.0 - float(np.float32(1.0 - 0.99))
        want = moving_average_stream(values, np.ones(3), m, zero_debias=debias)
        np.testing.assert_allclose(got, want, rtol=ema_tol(40, 0.99, 10.0, 1))
