"""Conformance with Flax (JAX on CPU): the engine's running statistics equal those of
``flax.nnx.BatchNorm`` and Linen ``nn.BatchNorm`` for the same BN inputs, and varshift's dropout
reproduces ``nnx.Dropout``'s output for the masks Flax samples (element-wise and with
``broadcast_dims``, i.e. channel-wise).

What Flax does, from ``flax/nnx/nn/normalization.py`` (0.12.8; Linen's
``flax/linen/normalization.py`` is the same): ``ra = momentum·ra + (1 - momentum)·batch`` (the
momentum is the decay), the batch variance is ``max(0, E[x²] - E[x]²)`` (``use_fast_variance``,
biased, ÷ n), eps 1e-5 inside the square root. JAX computes in float32 (x64 is off), so the
rounding bounds of :func:`test_conformance.rounding_tol` use float32's epsilon.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from test_conformance import (
    EPS32,
    assert_close,
    assert_same_running_stats,
    cond_of,
    engine_batches,
    rounding_tol,
    stats_of,
)

from varshift.core.dropout import Dropout
from varshift.core.presets import Preset, resolve_preset
from varshift.engine import SimConfig, bn_running_stats

jax = pytest.importorskip("jax")
nnx = pytest.importorskip("flax.nnx")
linen = pytest.importorskip("flax.linen")

pytestmark = pytest.mark.flax


def f64(a: Any) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def nhwc(z: np.ndarray) -> np.ndarray:
    """The engine's (n, C, *spatial) as Flax's channels-last (n, *spatial, C)."""
    return np.moveaxis(z, 1, -1) if z.ndim > 2 else z


CASES = {
    "dense": dict(),
    "dense-momentum-0.9": dict(momentum=0.9),
    "conv-elementwise": dict(topology="conv", spatial=(2, 3)),
    "conv-channelwise": dict(topology="conv", spatial=(2, 2), channelwise=True),
}


def config_of(case: str) -> tuple[SimConfig, float]:
    kw = dict(CASES[case])
    momentum = float(kw.pop("momentum", 0.99))  # type: ignore[arg-type]
    # 16 epochs x 38 batches = 608 updates: the initial 0/1 weigh 0.99^608 = 0.2% at the end.
    config = SimConfig(
        rate=0.2,
        samples=600,
        batch_size=16,
        epochs=16,
        features=3,
        mean=1.0,
        preset=resolve_preset("flax", momentum),
        **kw,  # type: ignore[arg-type]
    )
    return config, momentum


def elements(case: str) -> int:
    return 16 * {"conv-elementwise": 6, "conv-channelwise": 4}.get(case, 1)


def run_nnx(batches: list[tuple[Any, ...]], momentum: float) -> Any:
    """``nnx.BatchNorm`` in training mode (``model.train()``) over the BN inputs."""
    bn = nnx.BatchNorm(3, momentum=momentum, epsilon=1e-5, rngs=nnx.Rngs(0))
    bn.train()
    step = nnx.jit(lambda m, z: m(z))
    for _, _, z in batches:
        step(bn, nhwc(z).astype(np.float32))
    return bn


@pytest.mark.parametrize("case", sorted(CASES))
def test_nnx_batchnorm_on_the_engines_masks(case: str) -> None:
    config, momentum = config_of(case)
    result, batches = engine_batches(config)
    bn = run_nnx(batches, momentum)
    assert bn.use_running_average is False
    assert_same_running_stats(
        result,
        batches,
        f64(bn.mean[...]),
        f64(bn.var[...]),
        eps=EPS32,
        alpha=config.preset.alpha,
        n=elements(case),
    )


@pytest.mark.parametrize("case", sorted(CASES))
def test_linen_batchnorm_on_the_engines_masks(case: str) -> None:
    config, momentum = config_of(case)
    result, batches = engine_batches(config)
    bn = linen.BatchNorm(use_running_average=False, momentum=momentum, epsilon=1e-5)
    first = nhwc(batches[0][2]).astype(np.float32)
    variables = bn.init(jax.random.key(0), first)  # init does not update the statistics
    stats, params = variables["batch_stats"], variables["params"]
    apply = jax.jit(lambda s, z: bn.apply({"params": params, "batch_stats": s}, z, mutable=True))
    for _, _, z in batches:
        _, updated = apply(stats, nhwc(z).astype(np.float32))
        stats = updated["batch_stats"]
    assert_same_running_stats(
        result,
        batches,
        f64(stats["mean"]),
        f64(stats["var"]),
        eps=EPS32,
        alpha=config.preset.alpha,
        n=elements(case),
    )


def test_nnx_check_is_sharp_enough_to_see_the_bessel_factor() -> None:
    """Negative control: with an unbiased (÷ (n-1)) preset the engine must NOT match Flax; the
    difference is exactly the Bessel factor 16/15 (608 = 38 full batches x 16 epochs)."""
    config = SimConfig(
        rate=0.2,
        samples=608,
        batch_size=16,
        epochs=16,
        features=3,
        preset=Preset("flax-unbiased", 0.99, 0.99, unbiased=True, eps=1e-5),
    )
    result, batches = engine_batches(config)
    bn = run_nnx(batches, 0.99)
    _, rv = stats_of(result)
    tol = rounding_tol(EPS32, len(batches), 0.99, 16, cond_of(batches))
    resid = 0.99 ** len(batches)
    ratio = (rv - resid) / (f64(bn.var[...]) - resid)
    assert np.all(np.abs(ratio - 16 / 15) < 10 * tol)
    assert np.all(np.abs(rv / f64(bn.var[...]) - 1) > 100 * tol)


DROPOUTS = {
    "elementwise": ((16, 4), ()),
    "channelwise-nhwc": ((16, 3, 3, 4), (1, 2)),  # one mask value per (sample, channel)
}


@pytest.mark.parametrize("case", sorted(DROPOUTS))
def test_nnx_dropout_masks_through_the_engine(case: str) -> None:
    """Flax samples the masks (``nnx.Dropout`` before ``nnx.BatchNorm``, ``model.train()``);
    varshift's dropout reproduces the BN input and the engine's BN update its statistics; then
    ``model.eval()`` turns dropout off and normalises with the running statistics."""
    shape, broadcast = DROPOUTS[case]
    rate = 0.25
    model = nnx.Sequential(
        nnx.Dropout(rate, broadcast_dims=broadcast, rngs=nnx.Rngs(dropout=0)),
        nnx.BatchNorm(shape[-1], rngs=nnx.Rngs(0)),
    )
    model.train()
    drop = Dropout("bernoulli", rate)
    rng = np.random.default_rng(0)
    bn_inputs = []
    for _ in range(300):
        x = rng.normal(2.0, 1.5, size=shape).astype(np.float32)
        y = f64(model.layers[0](x))  # what BN receives
        model.layers[1](y.astype(np.float32))
        noise = (y != 0).astype(float) / (1 - rate)
        if broadcast:
            assert np.all(noise == noise[:, :1, :1, :])  # shared over H and W
        np.testing.assert_allclose(drop.apply(f64(x), noise), y, rtol=EPS32, atol=0)
        bn_inputs.append(np.moveaxis(y, -1, 1))
    state = bn_running_stats(bn_inputs, resolve_preset("flax"))
    n = shape[0] * (9 if len(shape) == 4 else 1)
    cond = float(np.max([np.mean(b**2) / np.var(b) for b in bn_inputs]))
    tol = rounding_tol(EPS32, 300, 0.99, n, cond)
    bn = model.layers[1]
    assert_close(state.running_mean, f64(bn.mean[...]), tol, 3.0)
    assert_close(state.running_var, f64(bn.var[...]), tol, 3.0)

    model.eval()
    assert bn.use_running_average and model.layers[0].deterministic
    x = rng.normal(2.0, 1.5, size=shape).astype(np.float32)
    want = (f64(x) - f64(bn.mean[...])) / np.sqrt(f64(bn.var[...]) + 1e-5)
    np.testing.assert_allclose(f64(model(x)), want, rtol=1e-5, atol=1e-5)
