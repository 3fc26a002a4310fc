"""Tests of :mod:`varshift.engine` (and the small noise.py fix it needed).

Expected values come from independent few-line oracles written here (a per-batch NumPy loop
over the very inputs and masks the engine used, closed forms written as arithmetic), never
from the code under test. Statistical checks use tolerances derived from standard errors.
"""

from __future__ import annotations

import math
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest

from varshift.core.dropout import Dropout, InputMoments
from varshift.core.errors import InputFileError, ValidationError
from varshift.core.presets import Preset, resolve_preset
from varshift.core.theory import running_stats
from varshift.engine import (
    BNState,
    Chunk,
    SimConfig,
    SimResult,
    bn_running_stats,
    load_activations,
    simulate,
)

EPS64 = float(np.finfo(np.float64).eps)
ALPHA_PRIME = -1.7580993408473766  # SELU scale * alpha, negated (PyTorch/Keras AlphaDropout)


# --- noise.py fix ---------------------------------------------------------------------------


@pytest.mark.parametrize(("mu", "var"), [(0.0, 1.0), (1.5, 4.0), (-3.0, 0.25), (-6.0, 1.0)])
def test_relu_normal_moments_without_scipy_stats(mu: float, var: float) -> None:
    # noise.py computes the normal pdf/tail with math.erfc instead of importing scipy.stats
    # (0.8 s of start-up); the moments still agree with scipy's truncated normal.
    stats = pytest.importorskip("scipy.stats")
    m = InputMoments.relu_normal(mu, var)
    sd = math.sqrt(var)
    mass = stats.norm.sf(-mu / sd)
    for k, got in enumerate([m.m1, m.m2, m.m3, m.m4], start=1):
        ref = stats.truncnorm.moment(k, -mu / sd, math.inf, loc=mu, scale=sd) * mass
        assert got == pytest.approx(ref, rel=1e-6)


def test_importing_the_numerics_does_not_import_scipy_stats() -> None:
    code = (
        "import sys, varshift.core.dropout, varshift.core.theory, varshift.engine\n"
        "assert 'scipy.stats' not in sys.modules, 'scipy.stats imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --- an independent per-batch oracle ----------------------------------------------------------


def oracle_dropout(kind: str, rate: float, x: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """Training-mode dropout written from the frameworks' formulas (not from varshift)."""
    if kind != "alpha":
        return x * noise
    q = 1.0 - rate
    a = 1.0 / math.sqrt(q * (1.0 + rate * ALPHA_PRIME**2))
    b = -a * ALPHA_PRIME * rate
    return np.where(noise > 0, a * x + b, a * ALPHA_PRIME + b)


def oracle_running_stats(
    bn_inputs: list[np.ndarray], unbiased: bool, alpha: float | None
) -> tuple[np.ndarray, np.ndarray]:
    """PyTorch's/Keras' update, one batch at a time (channel axis 1)."""
    channels = bn_inputs[0].shape[1]
    rm, rv = np.zeros(channels), np.ones(channels)
    for t, z in enumerate(bn_inputs, start=1):
        axes = (0,) if z.ndim == 2 else (0, 2, 3)
        n = z.size // channels
        m = z.mean(axis=axes)
        dev = z - m.reshape((1, -1) + (1,) * (z.ndim - 2))
        v = (dev**2).sum(axis=axes) / (n - 1 if unbiased else n)
        f = 1.0 / t if alpha is None else 1.0 - alpha
        rm = (1.0 - f) * rm + f * m
        rv = (1.0 - f) * rv + f * v
    return rm, rv


def run_with_batches(config: SimConfig, seed: int = 0) -> tuple[SimResult, list[Chunk]]:
    chunks: list[Chunk] = []
    result = simulate(config, rng=seed, observer=chunks.append)
    return result, chunks


def running(result: SimResult) -> tuple[np.ndarray, np.ndarray]:
    return (
        np.array([f.running_mean for f in result.features]),
        np.array([f.running_var for f in result.features]),
    )


CASES = {
    "torch-direct": dict(samples=203, batch_size=16, epochs=3, features=3),
    "torch-momentum-0.3": dict(
        samples=200, batch_size=20, epochs=2, preset=resolve_preset("torch", 0.3)
    ),
    "torch-cumulative": dict(
        samples=150, batch_size=16, epochs=3, preset=resolve_preset("torch", None)
    ),
    "keras-direct": dict(samples=181, batch_size=8, epochs=2, preset=resolve_preset("keras")),
    "tf-keras-drop-last": dict(
        samples=181, batch_size=8, epochs=2, drop_last=True, preset=resolve_preset("tf-keras")
    ),
    "flax-steps": dict(samples=100, batch_size=8, steps=29, preset=resolve_preset("flax")),
    "alpha": dict(samples=120, batch_size=12, epochs=2, dropout="alpha", rate=0.3),
    "gaussian-uniform": dict(
        samples=120, batch_size=12, epochs=2, dropout="gaussian", input_dist="uniform"
    ),
    "uout-relu": dict(samples=120, batch_size=12, epochs=2, dropout="uout", input_dist="relu"),
    "vanilla": dict(samples=120, batch_size=12, epochs=2, dropout="vanilla", mean=1.0),
    "linear": dict(samples=150, batch_size=10, epochs=2, topology="linear", width=7, rho=0.4),
    "linear-cos2": dict(samples=150, batch_size=10, epochs=2, topology="linear", width=7, cos2=0.3),
    "conv": dict(samples=60, batch_size=7, epochs=2, topology="conv", features=3, spatial=(2, 3)),
    "conv-channelwise-keras": dict(
        samples=60,
        batch_size=7,
        epochs=2,
        topology="conv",
        features=3,
        spatial=(3, 2),
        channelwise=True,
        preset=resolve_preset("keras"),
    ),
    "small-chunks": dict(samples=203, batch_size=16, epochs=3, chunk_elements=40),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_engine_equals_a_per_batch_oracle_on_the_same_masks(case: str) -> None:
    config = SimConfig(**{"mean": 0.5, **CASES[case]})  # type: ignore[arg-type]
    result, chunks = run_with_batches(config)
    preset = config.preset
    kind = config.dropout
    bn_inputs = []
    for chunk in chunks:
        for x, noise, bn_input in chunk.batches():
            y = oracle_dropout(kind, config.rate, x, noise)
            z = y @ result.weights.T if result.weights is not None else y
            np.testing.assert_array_equal(z, bn_input)  # what the engine says BN saw
            bn_inputs.append(z)
    assert len(bn_inputs) == result.summary.steps
    rm, rv = oracle_running_stats(bn_inputs, preset.unbiased, preset.alpha)
    got_m, got_v = running(result)
    # The engine sums K updates at once (alpha^K R + sum_k w_k s_k) instead of K sequential
    # updates, and computes the unbiased variance as mean·n/(n-1): the two differ only by
    # rounding, bounded by (steps + n) float64 ulps relative to the magnitudes involved.
    n = max(b.size // b.shape[1] for b in bn_inputs)
    scale = max(float(np.max(np.abs(np.concatenate(bn_inputs)))) ** 2, 1.0)
    tol = 4 * (len(bn_inputs) + n) * EPS64 * scale
    np.testing.assert_allclose(got_m, rm, rtol=0, atol=tol)
    np.testing.assert_allclose(got_v, rv, rtol=0, atol=tol)


def test_batches_follow_a_training_loop() -> None:
    # 203 rows, batch 16: 12 full batches and one of 11 per epoch, a fresh permutation each.
    data = np.random.default_rng(5).normal(size=(203, 2))
    config = SimConfig(data=data, batch_size=16, epochs=3, rate=0.25, chunk_elements=100)
    result, chunks = run_with_batches(config)
    rows_per_epoch: dict[int, list[np.ndarray]] = {}
    sizes = []
    for chunk in chunks:
        np.testing.assert_array_equal(chunk.x, data[chunk.rows])
        for e, rows in zip(chunk.epochs, chunk.rows, strict=True):
            rows_per_epoch.setdefault(int(e), []).append(rows)
        sizes += [len(x) for x, _, _ in chunk.batches()]
    assert sizes == ([16] * 12 + [11]) * 3
    perms = [np.concatenate(rows_per_epoch[e]) for e in range(3)]
    for perm in perms:
        np.testing.assert_array_equal(np.sort(perm), np.arange(203))
    assert not np.array_equal(perms[0], perms[1])  # reshuffled
    noise = np.concatenate([c.noise.ravel() for c in chunks])
    assert set(np.unique(noise)) == {0.0, 1 / 0.75}
    # The drop fraction is Binomial(size, 0.25); allow 4 standard errors.
    assert abs(np.mean(noise == 0) - 0.25) < 4 * math.sqrt(0.25 * 0.75 / noise.size)
    assert result.summary.steps == 39 and result.summary.batches_per_epoch == 13


def test_steps_stop_mid_epoch_and_drop_last_drops_the_small_batch() -> None:
    base = SimConfig(samples=100, batch_size=30, steps=6)
    res, chunks = run_with_batches(base)
    assert [len(x) for c in chunks for x, _, _ in c.batches()] == [30, 30, 30, 10, 30, 30]
    assert res.summary.epochs == 2
    res, chunks = run_with_batches(replace(base, drop_last=True))
    assert [len(x) for c in chunks for x, _, _ in c.batches()] == [30] * 6


def test_channelwise_masks_are_shared_over_a_channel_map() -> None:
    config = SimConfig(samples=40, batch_size=8, epochs=1, topology="conv", channelwise=True)
    _, chunks = run_with_batches(config)
    for chunk in chunks:
        assert chunk.noise.shape[-2:] == (1, 1)
        np.testing.assert_array_equal(chunk.bn_input, chunk.x * chunk.noise)  # broadcast over H, W


def test_chunking_does_not_change_the_result() -> None:
    a = simulate(SimConfig(samples=500, batch_size=16, epochs=4), rng=3)
    b = simulate(SimConfig(samples=500, batch_size=16, epochs=4, chunk_elements=50), rng=3)
    for x, y in zip(a.features, b.features, strict=True):
        assert x.running_var == pytest.approx(y.running_var, rel=1e-12)
        assert x.running_mean == pytest.approx(y.running_mean, rel=1e-12, abs=1e-14)
        assert x.running_var_expected == pytest.approx(y.running_var_expected, rel=1e-12)
        assert x.running_var_sd == pytest.approx(y.running_var_sd, rel=1e-9)


def test_same_seed_same_result_and_another_seed_differs() -> None:
    config = SimConfig(samples=300, features=2, epochs=2, fit=True)
    a, b, c = (simulate(config, rng=s) for s in (7, 7, 8))
    assert repr(asdict(a.summary)) == repr(asdict(b.summary))
    assert repr(a.fit) == repr(b.fit)
    assert a.features[0].running_var != c.features[0].running_var


# --- bn_running_stats -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "preset",
    [resolve_preset("torch"), resolve_preset("torch", None), resolve_preset("keras")],
    ids=["torch", "torch-cumulative", "keras"],
)
def test_bn_running_stats_handles_unequal_batches(preset: Preset) -> None:
    rng = np.random.default_rng(0)
    batches = [rng.normal(2.0, 3.0, size=(n, 4)) for n in (8, 8, 5, 8, 3, 3)]
    state = bn_running_stats(batches, preset)
    rm, rv = oracle_running_stats(batches, preset.unbiased, preset.alpha)
    np.testing.assert_allclose(state.running_mean, rm, rtol=1e-13)
    np.testing.assert_allclose(state.running_var, rv, rtol=1e-13)
    assert state.num_batches == 6
    # Continuing from a state equals one long run.
    half = bn_running_stats(batches[:3], preset)
    rest = bn_running_stats(batches[3:], preset, state=half)
    np.testing.assert_allclose(rest.running_var, rv, rtol=1e-13)


def test_bn_running_stats_rejects_bad_batches() -> None:
    with pytest.raises(ValidationError, match="elements per channel must be >= 2 for torch"):
        bn_running_stats([np.ones((1, 3))], resolve_preset("torch"))
    with pytest.raises(ValidationError, match="finite"):
        bn_running_stats([np.full((4, 2), np.nan)], resolve_preset("keras"))
    with pytest.raises(ValidationError, match="at least one batch"):
        bn_running_stats([], resolve_preset("keras"))
    assert BNState.initial(2).running_var.tolist() == [1.0, 1.0]


# --- theory beside the simulation -------------------------------------------------------------


def test_expectations_match_closed_forms_written_here() -> None:
    # A given dataset whose rows divide into full batches; bernoulli dropout, torch preset.
    rng = np.random.default_rng(11)
    data = rng.normal(3.0, 2.0, size=(640, 3))
    rate, b, steps = 0.3, 32, 15
    q = 1 - rate
    res = simulate(SimConfig(data=data, rate=rate, batch_size=b, steps=steps), rng=0)
    alpha = 0.9
    big_n = data.shape[0]
    for j, row in enumerate(res.features):
        c, v = data[:, j].mean(), data[:, j].var()
        train = (c * c + v) / q - c * c  # Li et al. eq. (4)-(6)
        assert row.train_var_theory == pytest.approx(train, rel=1e-12)
        assert row.test_var == pytest.approx(v, rel=1e-12)
        assert row.shift_ratio_theory == pytest.approx(v / train, rel=1e-12)
        # Unbiased sample variance of a batch drawn without replacement from N rows, with
        # fresh masks: Var_train + Var(x)/(N-1) (the rows are negatively correlated).
        e_s = train + v / (big_n - 1)
        assert row.batch_var_expected == pytest.approx(e_s, rel=1e-12)
        resid = alpha**steps
        assert row.running_var_expected == pytest.approx(resid + (1 - resid) * e_s, rel=1e-12)
        assert row.running_mean_expected == pytest.approx((1 - resid) * c, rel=1e-12)
        # Var[s] for rows i.i.d. from the dataset: theory's mu4/n - sigma^4 (n-3)/(n(n-1))
        # with the dropout output's moments (raw moments of m: 1, 1/q, 1/q², 1/q³).
        xm = [np.mean(data[:, j] ** k) for k in range(1, 5)]
        ym = [xm[0], xm[1] / q, xm[2] / q**2, xm[3] / q**3]
        mu4 = ym[3] - 4 * ym[0] * ym[2] + 6 * ym[0] ** 2 * ym[1] - 3 * ym[0] ** 4
        var_s = mu4 / b - train**2 * (b - 3) / (b * (b - 1))
        assert row.batch_var_sd == pytest.approx(math.sqrt(var_s), rel=1e-9)
        # The same numbers through varshift.core.theory.running_stats (i.i.d. batches): only the
        # finite-population term v/(N-1) separates the two expectations.
        out = Dropout("bernoulli", rate).train_moments(InputMoments.from_samples(data[:, j]))
        iid = running_stats(out, resolve_preset("torch"), b, steps)
        assert row.batch_var_sd == pytest.approx(iid.batch_var_sd, rel=1e-9)
        assert row.running_var_expected == pytest.approx(
            iid.expected_var + (1 - resid) * v / (big_n - 1), rel=1e-12
        )


def test_running_mean_band_of_one_batch_is_the_exact_batch_mean_sd() -> None:
    # torch momentum 1: the running mean is the last batch mean. With 64 rows and batches of
    # 16 drawn without replacement: Var = (Var(x) (N-b)/(N-1) + E[x²] r/q) / b.
    rng = np.random.default_rng(2)
    data = rng.normal(1.0, 1.5, size=(64, 2))
    rate, b = 0.5, 16
    res = simulate(
        SimConfig(data=data, rate=rate, batch_size=b, steps=1, preset=resolve_preset("torch", 1.0)),
        rng=0,
    )
    for j, row in enumerate(res.features):
        x = data[:, j]
        var = (x.var() * (64 - b) / 63 + np.mean(x * x) * rate / (1 - rate)) / b
        assert row.running_mean_sd == pytest.approx(math.sqrt(var), rel=1e-12)
        assert row.running_mean_expected == pytest.approx(x.mean(), rel=1e-12)


@pytest.mark.parametrize(
    "extra",
    [
        dict(topology="conv", spatial=(2, 2), features=2),
        dict(topology="conv", spatial=(2, 3), features=2, channelwise=True),
        dict(topology="conv", spatial=(2, 2), features=2, channelwise=True, dropout="alpha"),
        dict(topology="linear", width=5, features=2, rho=0.5, cos2=0.6),
        dict(topology="linear", width=5, features=2, dropout="uout", beta=0.8),
        dict(features=2, dropout="gaussian", input_dist="relu"),
    ],
    ids=["conv", "conv-channelwise", "conv-channelwise-alpha", "linear", "linear-uout", "direct"],
)
def test_stored_batch_variance_sd_matches_monte_carlo(extra: dict[str, object]) -> None:
    # One long epoch of small batches from a large dataset: the batches are (nearly)
    # independent draws, so the spread of their stored variances estimates batch_var_sd.
    config = SimConfig(samples=48_000, batch_size=6, steps=8000, rate=0.3, mean=1.0, **extra)  # type: ignore[arg-type]
    result, chunks = run_with_batches(config)
    stored = []
    for chunk in chunks:
        for _, _, z in chunk.batches():
            axes = (0,) if z.ndim == 2 else (0, 2, 3)
            stored.append(z.var(axis=axes, ddof=1))
    s = np.array(stored)
    k = s.shape[0]
    emp_var = s.var(axis=0, ddof=1)
    # Standard error of a sample variance: sqrt((m4 - var²)/k) with the sample's own m4.
    m4 = ((s - s.mean(axis=0)) ** 4).mean(axis=0)
    se = np.sqrt((m4 - emp_var**2) / k)
    pred = np.array([f.batch_var_sd for f in result.features]) ** 2
    assert np.all(np.abs(emp_var - pred) < 4 * se), (emp_var, pred, se)
    exp = np.array([f.batch_var_expected for f in result.features])
    assert np.all(np.abs(s.mean(axis=0) - exp) < 4 * np.sqrt(emp_var / k))


# Statistical calibration over independent seeds: each run gives one z per feature (features
# and seeds are independent; a linear unit's inputs are shared, so linear runs use one unit).
CALIBRATION = {
    "torch": dict(samples=2000, features=6, epochs=3),
    "keras-small-dataset": dict(
        samples=500, features=6, batch_size=20, epochs=40, preset=resolve_preset("keras")
    ),
    "torch-cumulative": dict(
        samples=1000, features=6, epochs=5, preset=resolve_preset("torch", None)
    ),
    "conv-channelwise": dict(
        samples=600,
        features=6,
        epochs=3,
        topology="conv",
        spatial=(3, 3),
        channelwise=True,
        mean=1.0,
    ),
    "linear-alpha": dict(
        samples=1000, features=1, epochs=5, topology="linear", width=8, rho=0.5, dropout="alpha"
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CALIBRATION))
def test_running_statistics_fall_in_the_band_at_the_nominal_rate(case: str) -> None:
    kw = CALIBRATION[case]
    seeds = 600 if kw.get("features") == 1 else 120
    z_var, z_mean = [], []
    for seed in range(seeds):
        res = simulate(SimConfig(rate=0.3, **kw), rng=1000 + seed)  # type: ignore[arg-type]
        z_var += [f.z_var for f in res.features]
        z_mean += [f.z_mean for f in res.features]
    for z in (np.array(z_var), np.array(z_mean)):
        m = z.size
        p = math.erf(2 / math.sqrt(2))  # P(|Z| < 2) = 0.9545
        inside = np.mean(np.abs(z) < 2)
        # Binomial(m, p) fraction: 4 standard errors (false alarm ~ 6e-5 per check).
        assert abs(inside - p) < 4 * math.sqrt(p * (1 - p) / m), (case, inside)
        assert abs(z.mean()) < 4 / math.sqrt(m), (case, z.mean())


def test_fit_adam_equals_a_per_step_oracle() -> None:
    # Keras' Adam on gamma, beta of BN with an identity target (mse over rows and features),
    # one step at a time, on the engine's own batches.
    config = SimConfig(
        samples=640, features=3, batch_size=32, epochs=3, mean=2.0, fit=True, lr=0.01
    )
    result, chunks = run_with_batches(config)
    eps = config.preset.eps
    lr, b1, b2, e = 0.01, 0.9, 0.999, 1e-7
    theta = {"clean": np.array([[1.0] * 3, [0.0] * 3]), "dropout": np.array([[1.0] * 3, [0.0] * 3])}
    m = {k: np.zeros((2, 3)) for k in theta}
    v = {k: np.zeros((2, 3)) for k in theta}
    t = 0
    for chunk in chunks:
        for x, noise, _ in chunk.batches():
            t += 1
            for key, inp in (("clean", x), ("dropout", x * noise)):
                zhat = (inp - inp.mean(axis=0)) / np.sqrt(inp.var(axis=0) + eps)
                gamma, beta = theta[key]
                err = gamma * zhat + beta - x
                grad = np.stack([(2 * err * zhat).mean(axis=0), (2 * err).mean(axis=0)]) / 3
                m[key] += (grad - m[key]) * (1 - b1)
                v[key] += (grad * grad - v[key]) * (1 - b2)
                rate = lr * math.sqrt(1 - b2**t) / (1 - b1**t)
                theta[key] = theta[key] - m[key] * rate / (np.sqrt(v[key]) + e)
    assert result.fit is not None
    rows = result.fit.rows
    # A nonlinear recurrence over 60 steps: allow rounding growth well below 1e-9.
    np.testing.assert_allclose([r.gamma_clean for r in rows], theta["clean"][0], rtol=1e-9)
    np.testing.assert_allclose([r.beta_clean for r in rows], theta["clean"][1], rtol=1e-9)
    np.testing.assert_allclose([r.gamma_dropout for r in rows], theta["dropout"][0], rtol=1e-9)
    np.testing.assert_allclose([r.beta_dropout for r in rows], theta["dropout"][1], rtol=1e-9)


def test_fit_predictions_use_the_models_statistics() -> None:
    res = simulate(
        SimConfig(samples=2000, features=2, epochs=5, mean=5.0, std=2.0, fit=True, probe=1.5), rng=1
    )
    assert res.fit is not None
    eps = 1e-5
    for row, feat in zip(res.fit.rows, res.features, strict=True):
        pred = row.gamma_dropout * (1.5 - feat.running_mean) / math.sqrt(feat.running_var + eps)
        assert row.pred_dropout == pytest.approx(pred + row.beta_dropout, rel=1e-12)
        pred_c = (
            row.gamma_clean
            * (1.5 - row.running_mean_clean)
            / math.sqrt(row.running_var_clean + eps)
        )
        assert row.pred_clean == pytest.approx(pred_c + row.beta_clean, rel=1e-12)
        # Corrected statistics (bernoulli, torch, unbiased): v = q (V + mu²) - mu².
        q, mu, big_v = 0.8, feat.running_mean, feat.running_var
        assert row.corrected_running_var == pytest.approx(q * (big_v + mu * mu) - mu * mu, rel=1e-9)
        c, v = feat.input_mean, feat.input_var
        train = (c * c + v) / q - c * c
        assert row.gamma_star == pytest.approx(v / math.sqrt(train + eps), rel=1e-12)


# --- inputs and validation --------------------------------------------------------------------


def test_linear_weights_reach_the_target_cos2() -> None:
    res = simulate(
        SimConfig(topology="linear", width=20, cos2=0.3, samples=100, features=4, epochs=1), rng=0
    )
    assert res.weights is not None
    w = res.weights
    cos2 = w.sum(axis=1) ** 2 / (20 * (w * w).sum(axis=1))
    np.testing.assert_allclose(cos2, 0.3, rtol=1e-12)
    np.testing.assert_allclose([f.D for f in res.features], 20 * 0.3, rtol=1e-12)


def test_equicorrelated_inputs_have_the_requested_correlation() -> None:
    _, chunks = run_with_batches(
        SimConfig(topology="linear", width=6, rho=-0.15, samples=20000, epochs=1, mean=2.0, std=3.0)
    )
    x = np.concatenate([c.x.reshape(-1, 6) for c in chunks])
    corr = np.corrcoef(x, rowvar=False)[np.triu_indices(6, 1)]
    # Sample correlations of 20000 rows: se ≈ (1 - rho²)/sqrt(N).
    assert np.all(np.abs(corr + 0.15) < 4 * (1 - 0.15**2) / math.sqrt(20000))
    assert abs(x.mean() - 2.0) < 4 * 3.0 / math.sqrt(x.size)


BAD_CONFIGS = [
    (dict(batch_size=500, samples=100), r"batch_size must be <= samples \(100\); got 500"),
    (dict(epochs=0), "epochs must be an integer >= 1; got 0"),
    (dict(steps=0), "steps must be an integer >= 1; got 0"),
    (dict(rate=1.0), r"rate must be in \[0, 1\); got 1"),
    (dict(topology="linear", width=4, rho=-0.5), "covariance must be positive semi-definite"),
    (dict(topology="linear", width=1, cos2=0.5), "cos2 must be 1 for width 1"),
    (dict(channelwise=True), "channelwise masks need the conv topology"),
    (dict(topology="conv", fit=True), "fit needs the direct topology"),
    (dict(samples=97, batch_size=32), "the last batch of each epoch would hold 1 row"),
    (dict(std=-1.0), "std must be >= 0; got -1"),
    (dict(topology="spiral"), "topology must be one of direct, linear, conv"),
    (dict(lr=0.0, fit=True), r"lr must be > 0; got 0"),
    (dict(data=np.ones((10, 2, 2))), r"data must be 2-D \(rows, features\)"),
    (dict(data=np.ones((10, 2)), topology="conv"), "data must be 4-D"),
    (dict(data=np.array([[1.0, np.nan]] * 4)), "data must be finite; got 4 NaN"),
    (dict(data=np.ones((10, 2)), features=3), "features must be 2 to match the data's columns"),
    (
        dict(topology="linear", width=3, weights=np.ones((2, 4))),
        "width must be 4 to match the weights' columns",
    ),
]


@pytest.mark.parametrize(("kwargs", "message"), BAD_CONFIGS)
def test_bad_configs_raise_one_clear_error(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        simulate(SimConfig(**kwargs), rng=0)  # type: ignore[arg-type]


def test_load_activations_reads_npy_and_csv(tmp_path: Path) -> None:
    arr = np.arange(12.0).reshape(4, 3)
    np.save(tmp_path / "a.npy", arr)
    np.testing.assert_array_equal(load_activations(tmp_path / "a.npy"), arr)
    (tmp_path / "a.csv").write_text("x,y,z\n" + "\n".join(",".join(map(str, r)) for r in arr))
    np.testing.assert_array_equal(load_activations(tmp_path / "a.csv"), arr)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("missing.npy", None, "no such file"),
        ("empty.csv", "", "is empty"),
        ("header.csv", "a,b\n", "has a header but no data rows"),
        ("words.csv", "1,2\n3,x\n", "line 2 is not comma-separated numbers"),
        ("ragged.csv", "1,2\n3\n", "line 2 has 1 values; expected 2"),
        ("nan.csv", "1,2\nnan,4\n", "holds 1 NaN or infinite value"),
        ("data.txt.gz", "1", "must be a .npy or .csv file"),
        ("broken.npy", "not numpy", "is not a valid .npy file"),
    ],
)
def test_load_activations_rejects_bad_files(
    tmp_path: Path, name: str, content: str | None, message: str
) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(InputFileError, match=message):
        load_activations(path)


def test_load_activations_never_unpickles(tmp_path: Path) -> None:
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(InputFileError, match="holds pickled objects"):
        load_activations(tmp_path / "obj.npy")
    np.save(tmp_path / "empty.npy", np.zeros((0, 3)))
    with pytest.raises(InputFileError, match="holds no values"):
        load_activations(tmp_path / "empty.npy")


def test_recorded_inputs_are_resampled_when_samples_is_given() -> None:
    data = np.random.default_rng(0).normal(size=(50, 2))
    _, chunks = run_with_batches(SimConfig(data=data, samples=200, batch_size=10, epochs=1))
    x = np.concatenate([c.x.reshape(-1, 2) for c in chunks])
    assert x.shape == (200, 2)
    # Every drawn row is one of the recorded rows.
    assert all(any(np.array_equal(r, d) for d in data) for r in x[:20])


def test_memory_does_not_grow_with_epochs() -> None:
    # Streaming: the largest array of a run is one chunk, whatever the number of epochs.
    sizes: dict[int, int] = {}
    for epochs in (2, 200):
        biggest = 0

        def watch(chunk: Chunk) -> None:
            nonlocal biggest
            biggest = max(biggest, chunk.x.nbytes, chunk.noise.nbytes, chunk.bn_input.nbytes)

        simulate(
            SimConfig(samples=500, features=4, epochs=epochs, chunk_elements=4000),
            rng=0,
            observer=watch,
        )
        sizes[epochs] = biggest
    assert sizes[200] == sizes[2] <= 8 * 4000


def test_simconfig_refuses_a_preset_name_with_a_validation_error() -> None:
    from varshift.core.errors import ValidationError
    from varshift.core.presets import PRESETS
    from varshift.engine import SimConfig

    with pytest.raises(ValidationError, match=r"preset must be a Preset .*PRESETS\['keras'\]"):
        SimConfig(preset="keras")  # type: ignore[arg-type]
    assert SimConfig(preset=PRESETS["keras"]).preset.name == "keras"
