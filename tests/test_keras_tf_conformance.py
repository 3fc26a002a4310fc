"""Conformance with tf.keras (the ``tf_keras`` package on TensorFlow 2): the same inputs and
dropout masks go through ``tf_keras.layers.BatchNormalization`` on its fused (4-D) and
non-fused (2-D) paths, and the engine's running statistics must equal the layer's.

The fused path is TensorFlow's ``FusedBatchNormV3`` kernel, which stores the Bessel-corrected
batch variance (the ``tf-keras`` preset); the non-fused path stores ``tf.nn.moments``' biased
variance (the ``keras`` preset). Tolerances are the rounding bounds of
``tests/test_conformance.py``: float64 on the non-fused path (the layer is built in float64),
float32 on the fused one (the kernel accepts float16/bfloat16/float32 only).

Skipped unless ``tensorflow-cpu`` and ``tf-keras`` are installed (about 2 GB; see the README).
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import numpy as np
import pytest
from test_conformance import EPS32, EPS64, assert_same_running_stats, engine_batches, rounding_tol

from varshift.core.dropout import Dropout
from varshift.core.presets import Preset, resolve_preset
from varshift.engine import SimConfig, bn_running_stats

pytestmark = pytest.mark.tfkeras


@pytest.fixture(scope="module")
def tfk() -> Any:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TensorFlow's own import-time deprecation warnings
        pytest.importorskip("tensorflow")
        return pytest.importorskip("tf_keras")


def run_tf_bn(tfk: Any, inputs: list[np.ndarray], momentum: float, dtype: str) -> Any:
    """A fresh tf.keras BatchNormalization (channels last) updated once per input, eagerly."""
    bn = tfk.layers.BatchNormalization(momentum=momentum, epsilon=1e-3, dtype=dtype)
    for y in inputs:
        bn(y.astype(dtype), training=True)
    return bn


def channels_last(y: np.ndarray) -> np.ndarray:
    """The engine's (N, C, H, W) as tf.keras' default (N, H, W, C)."""
    return np.moveaxis(y, 1, -1) if y.ndim == 4 else y


def tf_momentum(momentum: float, dtype: str) -> float:
    """The decay the non-fused path really applies to float64 variables: tf_keras'
    ``_assign_moving_average`` builds ``tf.convert_to_tensor(1.0 - momentum)`` (float32 for a
    Python float) and casts it to the variable's dtype, so ``1 - momentum`` is float32-rounded
    (``tf_keras/src/layers/normalization/batch_normalization.py``, tf-keras 2.21). In float32
    the rounding is inside the float32 bound anyway."""
    return 1.0 - float(np.float32(1.0 - momentum)) if dtype == "float64" else momentum


def cond(inputs: list[np.ndarray], axis: int = -1) -> float:
    """The cancellation factor ``E[y²]/Var[y]`` per channel (``axis``), the largest one."""
    z = np.concatenate([np.moveaxis(y, axis, -1).reshape(-1, y.shape[axis]) for y in inputs])
    return float(np.max((z**2).mean(0) / z.var(0)))


def engine_inputs(config: SimConfig) -> tuple[Any, list[Any], list[np.ndarray]]:
    result, batches = engine_batches(config)
    drop = Dropout(config.dropout, config.rate)
    return result, batches, [channels_last(drop.apply(x, noise)) for x, noise, _ in batches]


TF_CASES = {
    # name: (preset, SimConfig keywords, layer dtype, fused expected)
    "dense-nonfused-0.99": ("keras", 0.99, {}, "float64", False),
    "dense-nonfused-0.9": ("keras", 0.9, {}, "float64", False),
    "conv-fused-elementwise": ("tf-keras", 0.99, {"spatial": (3, 2)}, "float32", True),
    "conv-fused-channelwise": (
        "tf-keras",
        0.9,
        {"spatial": (2, 2), "channelwise": True},
        "float32",
        True,
    ),
}


@pytest.mark.parametrize("case", sorted(TF_CASES))
def test_tf_keras_batchnormalization_on_the_engines_masks(tfk: Any, case: str) -> None:
    name, momentum, kw, dtype, fused = TF_CASES[case]
    preset = resolve_preset(name, tf_momentum(momentum, dtype))
    topology = "conv" if kw else "direct"
    config = SimConfig(
        rate=0.3,
        samples=300,
        batch_size=16,
        epochs=4,
        features=3,
        mean=1.0,
        preset=preset,
        topology=topology,
        **kw,
    )  # type: ignore[arg-type]
    result, batches, inputs = engine_inputs(config)
    bn = run_tf_bn(tfk, inputs, momentum, dtype)
    assert bn.fused is fused  # the path this case is about was the one that ran
    positions = int(np.prod(kw.get("spatial", (1,))))
    assert_same_running_stats(
        result,
        batches,
        bn.moving_mean.numpy().astype(np.float64),
        bn.moving_variance.numpy().astype(np.float64),
        eps=EPS32 if dtype == "float32" else EPS64,
        alpha=preset.alpha,
        n=16 * positions,
    )


@pytest.mark.parametrize("path", ["fused", "nonfused"])
def test_the_other_preset_is_visibly_wrong(tfk: Any, path: str) -> None:
    """Negative control: the check sees the Bessel factor n/(n-1) on both paths (n = 16)."""
    rng = np.random.default_rng(7)
    shape = (16, 2, 2, 3) if path == "fused" else (16, 3)
    inputs = [rng.normal(1.0, 2.0, size=shape) for _ in range(300)]
    bn = run_tf_bn(tfk, inputs, 0.99, "float32" if path == "fused" else "float64")
    engine_in = [np.moveaxis(y, -1, 1) for y in inputs]
    right = "tf-keras" if path == "fused" else "keras"
    wrong = "keras" if path == "fused" else "tf-keras"
    got = bn.moving_variance.numpy().astype(np.float64)
    dtype = "float32" if path == "fused" else "float64"
    good = bn_running_stats(engine_in, resolve_preset(right, tf_momentum(0.99, dtype))).running_var
    bad = bn_running_stats(engine_in, resolve_preset(wrong, tf_momentum(0.99, dtype))).running_var
    n = 16 * (4 if path == "fused" else 1)
    eps = EPS32 if path == "fused" else EPS64
    np.testing.assert_allclose(got, good, rtol=rounding_tol(eps, 300, 0.99, n, cond(inputs)))
    # The wrong convention is off by about 1/(n-1) of the converged part (0.99^300 = 0.05 left).
    assert np.all(np.abs(got / bad - 1.0) > 0.5 / (n - 1))


SAMPLED = {
    "Dropout+BN (non-fused)": ("Dropout", (32, 4), "float64", "keras"),
    "SpatialDropout2D+BN (fused)": ("SpatialDropout2D", (16, 3, 3, 4), "float32", "tf-keras"),
}


@pytest.mark.parametrize("case", sorted(SAMPLED))
def test_tf_keras_sampled_masks_through_the_engine(tfk: Any, case: str) -> None:
    """tf.keras samples the masks; the engine's BN update of what BN received reproduces the
    layer's running statistics, and the kept values are ``x / keep`` (inverted dropout)."""
    layer, shape, dtype, name = SAMPLED[case]
    rate = 0.25
    tfk.utils.set_random_seed(0)
    drop = getattr(tfk.layers, layer)(rate, dtype=dtype)
    bn = tfk.layers.BatchNormalization(dtype=dtype)
    rng = np.random.default_rng(0)
    received = []
    for _ in range(200):
        x = rng.normal(2.0, 1.5, size=shape).astype(dtype)
        y = drop(x, training=True).numpy()
        bn(y, training=True)
        kept = y != 0
        np.testing.assert_allclose(y[kept], x[kept] / (1 - rate), rtol=4 * EPS32)
        received.append(np.moveaxis(y.astype(np.float64), -1, 1))
    preset: Preset = resolve_preset(name, tf_momentum(0.99, dtype))
    st = bn_running_stats(received, preset)
    n = int(np.prod(shape[:-1]))
    eps = EPS32 if dtype == "float32" else EPS64
    tol = rounding_tol(eps, len(received), preset.alpha, n, cond(received, axis=1))
    scale = float(np.sqrt(st.running_var.max() + st.running_mean.max() ** 2))
    np.testing.assert_allclose(bn.moving_mean.numpy(), st.running_mean, rtol=tol, atol=tol * scale)
    np.testing.assert_allclose(bn.moving_variance.numpy(), st.running_var, rtol=tol)
    assert bn.fused is (len(shape) == 4)
