"""Conformance with the real frameworks: the same inputs and the same dropout masks go through
PyTorch and Keras 3 (torch backend), and the engine's running statistics must equal theirs.

Tolerances are rounding bounds, not fitted numbers (see :func:`rounding_tol`): PyTorch runs in
float64 here; Keras 3.15 computes BatchNormalization in float32 even for float64 layers
(``backend.result_type("float64", "float32")`` is float32), so its bound uses float32's epsilon.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from varshift.core.dropout import Dropout
from varshift.core.presets import Preset, resolve_preset
from varshift.engine import Chunk, SimConfig, SimResult, bn_running_stats, simulate

EPS64 = float(np.finfo(np.float64).eps)
EPS32 = float(np.finfo(np.float32).eps)


def rounding_tol(eps: float, steps: int, alpha: float | None, n: int, cond: float) -> float:
    """A worst-case bound on the relative rounding difference of two running statistics.

    Each update ``R = alpha R + (1-alpha) s`` rounds at most 3 times (≤ 3 eps relative); the
    error of past updates decays with alpha, so it sums to ≤ 3 eps / (1 - alpha) — or grows
    with the number of steps for the cumulative average. A batch moment of n values loses at
    most (log2 n + 2) eps times the cancellation factor ``cond = E[y²] / Var[y]`` (Keras'
    torch backend computes ``E[y²] - E[y]²``). The float64 engine's own reassociation of the
    update (a weighted sum over a chunk) adds at most ``steps`` float64 ulps.
    """
    memory = steps if alpha is None else min(steps, 1.0 / (1.0 - alpha))
    return eps * (3.0 * memory + (math.log2(n) + 2.0) * cond) + EPS64 * steps


def engine_batches(config: SimConfig, seed: int = 0) -> tuple[SimResult, list[tuple[Any, ...]]]:
    """Run the engine and collect every batch's (x, noise, bn_input) in training order."""
    chunks: list[Chunk] = []
    result = simulate(config, rng=seed, observer=chunks.append)
    return result, [b for c in chunks for b in c.batches()]


def stats_of(result: SimResult) -> tuple[np.ndarray, np.ndarray]:
    return (
        np.array([f.running_mean for f in result.features]),
        np.array([f.running_var for f in result.features]),
    )


def cond_of(batches: list[tuple[Any, ...]]) -> float:
    z = np.concatenate([b[2].reshape(len(b[2]), b[2].shape[1], -1) for b in batches])
    axes = (0, 2)
    return float(np.max((z**2).mean(axis=axes) / z.var(axis=axes)))


def assert_close(got: np.ndarray, want: np.ndarray, tol: float, scale: float) -> None:
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * scale)


def assert_same_running_stats(
    result: SimResult,
    batches: list[tuple[Any, ...]],
    mean: np.ndarray,
    var: np.ndarray,
    *,
    eps: float,
    alpha: float | None,
    n: int,
) -> None:
    """The engine's running mean and variance equal a framework's (``mean``, ``var``) within
    :func:`rounding_tol` for its precision ``eps``, momentum ``alpha`` and ``n`` elements a batch.
    """
    rm, rv = stats_of(result)
    tol = rounding_tol(eps, len(batches), alpha, n, cond_of(batches))
    scale = float(np.sqrt(rv.max() + rm.max() ** 2))
    assert_close(rm, mean, tol, scale)
    assert_close(rv, var, tol, scale)


# --- PyTorch --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def torch() -> Any:
    return pytest.importorskip("torch")


TORCH_CASES = {
    "bn1d-momentum-0.1": dict(momentum=0.1),
    "bn1d-momentum-0.3-alpha-dropout": dict(momentum=0.3, dropout="alpha"),
    "bn1d-cumulative": dict(momentum=None),
    "bn1d-linear": dict(momentum=0.1, topology="linear", width=6, rho=0.3, cos2=0.5),
    "bn2d-elementwise": dict(momentum=0.1, topology="conv", spatial=(3, 2)),
    "bn2d-channelwise-cumulative": dict(
        momentum=None, topology="conv", spatial=(2, 2), channelwise=True
    ),
}


@pytest.mark.torch
@pytest.mark.parametrize("case", sorted(TORCH_CASES))
def test_torch_batchnorm_on_the_engines_masks(torch: Any, case: str) -> None:
    kw = dict(TORCH_CASES[case])
    momentum = kw.pop("momentum")
    preset = resolve_preset("torch", momentum)
    config = SimConfig(
        rate=0.3, samples=300, batch_size=16, epochs=4, features=3, mean=1.0, preset=preset, **kw
    )  # type: ignore[arg-type]
    result, batches = engine_batches(config)
    conv = config.topology == "conv"
    bn_cls = torch.nn.BatchNorm2d if conv else torch.nn.BatchNorm1d
    bn = bn_cls(3, momentum=momentum, dtype=torch.float64)
    bn.train()
    linear = None
    if result.weights is not None:
        linear = torch.nn.Linear(config.width, 3, bias=False, dtype=torch.float64)
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(result.weights))
    drop = Dropout(config.dropout, config.rate)
    with torch.no_grad():
        for x, noise, _ in batches:
            # The dropout output for these masks (x * mask for inverted dropout; the affine
            # map of PyTorch's AlphaDropout, checked against torch itself in the next test).
            y = torch.from_numpy(drop.apply(x, noise))
            bn(linear(y) if linear is not None else y)
    n = 16 * (6 if case == "bn2d-elementwise" else 4 if conv else 1)
    assert_same_running_stats(
        result,
        batches,
        bn.running_mean.numpy(),
        bn.running_var.numpy(),
        eps=EPS64,
        alpha=preset.alpha,
        n=n,
    )
    assert int(bn.num_batches_tracked) == len(batches) == result.summary.steps


TORCH_DROPOUTS = {
    "Dropout+BatchNorm1d": ("Dropout", "bernoulli", (16, 4)),
    "AlphaDropout+BatchNorm1d": ("AlphaDropout", "alpha", (16, 4)),
    "Dropout2d+BatchNorm2d": ("Dropout2d", "bernoulli", (16, 4, 3, 3)),
}


@pytest.mark.torch
@pytest.mark.parametrize("case", sorted(TORCH_DROPOUTS))
def test_torch_sampled_masks_through_the_engine(torch: Any, case: str) -> None:
    """PyTorch samples the masks; varshift's dropout kind and BN update reproduce its output."""
    module, kind, shape = TORCH_DROPOUTS[case]
    rate = 0.25
    drop_t = getattr(torch.nn, module)(rate)
    bn_cls = torch.nn.BatchNorm2d if len(shape) == 4 else torch.nn.BatchNorm1d
    bn = bn_cls(shape[1], dtype=torch.float64)
    net = torch.nn.Sequential(drop_t, bn).train()
    drop = Dropout(kind, rate)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    bn_inputs = []
    with torch.no_grad():
        for _ in range(200):
            x = rng.normal(2.0, 1.5, size=shape)
            y = drop_t(torch.from_numpy(x)).numpy()  # what BN receives
            bn(torch.from_numpy(y))
            if kind == "alpha":
                dropped_value = drop.apply(np.zeros(1), np.zeros(1))[0]
                noise = (~np.isclose(y, dropped_value, rtol=0, atol=1e-12)).astype(float)
            else:
                noise = (y != 0).astype(float) / (1 - rate)
                if len(shape) == 4:  # one draw per (sample, channel)
                    noise = noise[:, :, :1, :1]
                    assert np.all((y != 0) == (noise[:, :, :, :] > 0))
            mine = drop.apply(x, noise)
            # Inverted dropout: exactly x * (mask / q); alpha: the same affine map to ~1 ulp.
            np.testing.assert_allclose(mine, y, rtol=4 * EPS64, atol=4 * EPS64 * np.abs(y).max())
            bn_inputs.append(y)
    del net
    state = bn_running_stats(bn_inputs, resolve_preset("torch"))
    n = shape[0] * (9 if len(shape) == 4 else 1)
    cond = float(np.max([np.mean(b**2) / np.var(b) for b in bn_inputs]))
    tol = rounding_tol(EPS64, 200, 0.9, n, cond)
    assert_close(state.running_mean, bn.running_mean.numpy(), tol, 3.0)
    assert_close(state.running_var, bn.running_var.numpy(), tol, 3.0)


# --- Keras 3 (torch backend) ------------------------------------------------------------------


@pytest.fixture(scope="module")
def keras() -> Any:
    pytest.importorskip("torch")
    return pytest.importorskip("keras")


def keras_values(variable: Any) -> np.ndarray:
    # variable.numpy() goes through np.array(copy=False) and warns under NumPy 2.
    return np.asarray(variable.value.detach().cpu().numpy(), dtype=np.float64)


KERAS_CASES = {
    "dense": dict(),
    "dense-momentum-0.9-uout": dict(momentum=0.9, dropout="uout", beta=0.5),
    "conv-channels-first": dict(topology="conv", spatial=(2, 3)),
    "conv-channelwise": dict(topology="conv", spatial=(2, 2), channelwise=True),
}


def run_keras_bn(keras: Any, batches: list[tuple[Any, ...]], momentum: float, conv: bool) -> Any:
    bn = keras.layers.BatchNormalization(axis=1 if conv else -1, momentum=momentum, epsilon=1e-3)
    for _, _, z in batches:
        bn(z.astype(np.float32), training=True)
    return bn


@pytest.mark.keras
@pytest.mark.parametrize("case", sorted(KERAS_CASES))
def test_keras_batchnormalization_on_the_engines_masks(keras: Any, case: str) -> None:
    kw = dict(KERAS_CASES[case])
    momentum = float(kw.pop("momentum", 0.99))  # type: ignore[arg-type]
    preset = resolve_preset("keras", momentum)
    # 16 epochs x 38 batches = 608 updates: the initial 0/1 weigh 0.99^608 = 0.2% at the end.
    config = SimConfig(
        rate=0.2, samples=600, batch_size=16, epochs=16, features=3, mean=1.0, preset=preset, **kw
    )  # type: ignore[arg-type]
    result, batches = engine_batches(config)
    conv = config.topology == "conv"
    bn = run_keras_bn(keras, batches, momentum, conv)
    n = 16 * (6 if case == "conv-channels-first" else 4 if conv else 1)
    # Keras sees float32 inputs: their rounding (≤ eps32/2 relative each) is inside the bound.
    assert_same_running_stats(
        result,
        batches,
        keras_values(bn.moving_mean),
        keras_values(bn.moving_variance),
        eps=EPS32,
        alpha=preset.alpha,
        n=n,
    )


@pytest.mark.keras
def test_keras_check_is_sharp_enough_to_see_the_bessel_factor(keras: Any) -> None:
    """Negative control: with torch's unbiased convention the engine must NOT match Keras.

    608 rows in batches of 16 (no smaller last batch), 16 epochs: T = 608 updates. Both start
    from 1, so ``R - alpha^T`` is a weighted sum of stored batch variances, which differ by
    exactly the Bessel factor 16/15.
    """
    config = SimConfig(
        rate=0.2,
        samples=608,
        batch_size=16,
        epochs=16,
        features=3,
        preset=Preset("keras-unbiased", 0.99, 0.99, unbiased=True, eps=1e-3),
    )
    result, batches = engine_batches(config)
    bn = run_keras_bn(keras, batches, 0.99, conv=False)
    _, rv = stats_of(result)
    tol = rounding_tol(EPS32, len(batches), 0.99, 16, cond_of(batches))
    resid = 0.99 ** len(batches)
    ratio = (rv - resid) / (keras_values(bn.moving_variance) - resid)
    assert np.all(np.abs(ratio - 16 / 15) < 10 * tol)
    assert np.all(np.abs(rv / keras_values(bn.moving_variance) - 1) > 100 * tol)


@pytest.mark.keras
def test_keras_fit_of_gamma_beta_matches_the_engine(keras: Any) -> None:
    """The --fit demonstration: Keras trains BN(gamma, beta) with Adam on the identity target
    (model.train_on_batch(dropout output, clean input)); the engine's numbers must agree."""
    lr = 0.01
    config = SimConfig(
        rate=0.2,
        samples=320,
        batch_size=32,
        epochs=10,
        features=2,
        mean=5.0,
        std=2.0,
        preset=resolve_preset("keras"),
        fit=True,
        lr=lr,
    )
    result, batches = engine_batches(config)
    inputs = keras.Input((2,))
    model = keras.Model(
        inputs, keras.layers.BatchNormalization(momentum=0.99, epsilon=1e-3)(inputs)
    )
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=lr), loss="mse")
    for x, _noise, y in batches:
        model.train_on_batch(y.astype(np.float32), x.astype(np.float32))
    bn = model.layers[-1]
    assert result.fit is not None
    gamma = np.array([r.gamma_dropout for r in result.fit.rows])
    beta = np.array([r.beta_dropout for r in result.fit.rows])
    steps = len(batches)
    # Keras keeps gamma, beta in float32: every update rounds them (≤ eps32 |theta| each step).
    # Adam moves a parameter by ≈ lr·m/sqrt(v) per step; float32 gradients perturb m/sqrt(v)
    # by ~eps32·cond relative (64: rounding of the batch means and the normalisation), so
    # the two trajectories drift apart by at most steps·eps32·(|theta| + 64 lr cond).
    cond = cond_of(batches)
    theta_max = float(max(np.abs(gamma).max(), np.abs(beta).max()))
    bound = steps * EPS32 * (theta_max + 64 * lr * cond)
    np.testing.assert_allclose(gamma, keras_values(bn.gamma), rtol=0, atol=bound)
    np.testing.assert_allclose(beta, keras_values(bn.beta), rtol=0, atol=bound)
    rm, rv = stats_of(result)
    tol = rounding_tol(EPS32, steps, 0.99, 32, cond)
    assert_close(rv, keras_values(bn.moving_variance), tol, float(np.sqrt(rv.max())))
    assert_close(rm, keras_values(bn.moving_mean), tol, float(np.sqrt(rv.max())))
