"""Ground truth: real PyTorch and Keras 3 models trained with Dropout → BatchNorm, their saved
statistics corrected by `varshift correct`, compared with the variance each BN layer really
sees at test time (one pass over the training data with dropout off).

How the statistics are recorded: each model is trained briefly with SGD, then its weights are
frozen and its BN statistics are reset and re-recorded by a pure statistics pass in training
mode (dropout on), like the end of training with a small learning rate, or a recalibration
such as ``torch.optim.swa_utils.update_bn``. Batches are drawn with replacement from the
training set, so they are independent draws from the very distribution the truth is measured
on, and the running statistics' noise follows DESIGN §2. Without freezing, the BN input keeps
drifting with the weights and the stored statistics describe a mixture of past networks.

Tolerances are z-scores: the corrected variance ``q (R + m²) - m²`` moves by
``q dR + 2 (1 - q) m dm`` when the stored variance R and mean m are off by dR and dm, so its
noise sd is at most ``q sd(R) + 2 (1 - q) |m| sd(m)`` whatever their correlation; sd(R) and
sd(m) come from :func:`varshift.core.theory.running_stats` (iid elements) or, for images, from the
measured spread of the batch statistics.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from varshift.cli import app
from varshift.core.dropout import Dropout, InputMoments
from varshift.core.presets import resolve_preset
from varshift.core.theory import running_stats
from varshift.formats import read_stats

Z = 4.0  # per-channel bound; the seeds are fixed, so the tests are deterministic


def varshift(*args: str | Path) -> str:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.stderr
    return result.stdout


def band(
    clean: np.ndarray, stored_mean: np.ndarray, rate: float, preset: Any, n: int, steps: int
) -> np.ndarray:
    """Noise sd of the corrected *population* variance per channel (iid elements).

    ``clean`` is (samples, channels) of the BN input with dropout off; the exact moments of the
    training-mode input follow from it (:meth:`Dropout.train_moments`). A biased preset's
    running variance is divided by ``(n-1)/n`` by the debiasing step, and so is its noise.
    """
    q, drop = 1 - rate, Dropout("bernoulli", rate)
    sd = np.empty(clean.shape[1])
    for j in range(clean.shape[1]):
        run = running_stats(
            drop.train_moments(InputMoments.from_samples(clean[:, j])), preset, n, steps
        )
        var_sd = run.var_sd / preset.stored_factor(n)
        sd[j] = q * var_sd + 2 * (1 - q) * abs(stored_mean[j]) * run.mean_sd
    return sd


# --- PyTorch ---------------------------------------------------------------------------------


def capture_input(torch: Any, model: Any, layer: Any, x: Any) -> np.ndarray:
    """The input of ``layer`` for ``x`` with the model in eval mode (dropout off)."""
    seen: dict[str, Any] = {}
    handle = layer.register_forward_pre_hook(lambda m, inp: seen.update(x=inp[0].detach()))
    model.eval()
    with torch.no_grad():
        model(x)
    handle.remove()
    return np.asarray(seen["x"].double().numpy())


def train(torch: Any, model: Any, x: Any, y: Any, *, batch: int, updates: int, lr: float) -> None:
    """Brief SGD training (mean squared error) on batches drawn with replacement, dropout on."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    model.train()
    for _ in range(updates):
        idx = torch.randint(len(x), (batch,))
        loss = torch.nn.functional.mse_loss(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()


def record_statistics(torch: Any, model: Any, bn: Any, x: Any, *, batch: int, steps: int) -> None:
    """The statistics pass: ``bn``'s statistics reset, then re-recorded over ``steps`` batches
    drawn with replacement, with frozen weights and dropout on (the model in training mode)."""
    bn.reset_running_stats()
    with torch.no_grad():
        for _ in range(steps):
            model(x[torch.randint(len(x), (batch,))])


def torch_mlp(torch: Any, rate: float) -> Any:
    return torch.nn.Sequential(
        torch.nn.Linear(4, 16),
        torch.nn.ReLU(),
        torch.nn.Dropout(rate),
        torch.nn.BatchNorm1d(16),
        torch.nn.Linear(16, 1),
    )


@pytest.mark.torch
def test_torch_bn1d_corrected_variance_is_the_test_time_variance(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    samples, rate, n, steps = 4096, 0.5, 64, 200
    x = torch.randn(samples, 4)
    y = torch.sin(x @ torch.randn(4, 1)) + 0.1 * torch.randn(samples, 1)
    model = torch_mlp(torch, rate)
    train(torch, model, x, y, batch=n, updates=300, lr=0.05)
    bn = model[3]
    record_statistics(torch, model, bn, x, batch=n, steps=steps)
    torch.save(model.state_dict(), tmp_path / "model.pt")

    assert "| 3       | 16         | 200" in varshift("inspect", tmp_path / "model.pt")
    varshift("correct", tmp_path / "model.pt", "--rate", str(rate), "-o", tmp_path / "fixed.pt")
    fixed = torch_mlp(torch, rate)
    fixed.load_state_dict(torch.load(tmp_path / "fixed.pt", weights_only=True), strict=True)

    clean = capture_input(torch, model, bn, x)
    truth = clean.var(axis=0)  # the population the batches were drawn from
    stored = bn.running_var.double().numpy()
    corrected = fixed[3].running_var.double().numpy()
    sd = band(clean, bn.running_mean.double().numpy(), rate, resolve_preset("torch"), n, steps)
    z_after, z_before = (corrected - truth) / sd, (stored - truth) / sd
    assert np.all(np.abs(z_after) < Z), z_after
    assert np.all(z_before > Z), z_before  # the shift is real and the band can see it
    assert np.mean(stored / truth) > 2.0  # (c² + v)/q - c² over v, q = 1/2
    assert abs(np.mean(corrected / truth) - 1) < 0.1
    np.testing.assert_array_equal(fixed[3].running_mean.numpy(), bn.running_mean.numpy())
    assert fixed[3].num_batches_tracked.item() == steps


@pytest.mark.torch
def test_torch_bn2d_on_images(tmp_path: Path) -> None:
    """Conv → ReLU → Dropout (element-wise) → BatchNorm2d. n = N·H·W elements per channel
    are correlated within an image, so the band uses the measured spread of the batch
    statistics in the EMA noise formula, plus the bias those correlations give the unbiased
    batch variance: ``E[s] - Var = -n/(n-1) (Var[batch mean] - Var/n)``."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(1)
    samples, rate, images, steps, side, channels = 1024, 0.3, 16, 150, 8, 6
    smooth = torch.nn.functional.avg_pool2d(torch.randn(samples, 1, side, side), 3, 1, 1)
    x = torch.randn(samples, 1, side, side) + 2 * smooth
    y = x.mean(dim=(1, 2, 3)).unsqueeze(1) ** 2
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, channels, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Dropout(rate),
        torch.nn.BatchNorm2d(channels),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(channels, 1),
    )
    train(torch, model, x, y, batch=images, updates=200, lr=0.02)
    bn = model[3]
    batch_stats: list[tuple[np.ndarray, np.ndarray]] = []

    def record(module: Any, inputs: tuple[Any, ...]) -> None:
        b = inputs[0].detach().double()
        batch_stats.append((b.mean(dim=(0, 2, 3)).numpy(), b.var(dim=(0, 2, 3)).numpy()))

    handle = bn.register_forward_pre_hook(record)
    record_statistics(torch, model, bn, x, batch=images, steps=steps)
    handle.remove()
    torch.save(model.state_dict(), tmp_path / "cnn.pt")
    varshift("correct", tmp_path / "cnn.pt", "--rate", str(rate), "-o", tmp_path / "fixed.pt")
    corrected = read_stats(tmp_path / "fixed.pt").layers["3"].var

    clean = capture_input(torch, model, bn, x).transpose(1, 0, 2, 3).reshape(channels, -1)
    truth, c = clean.var(axis=1), clean.mean(axis=1)
    q, alpha, n = 1 - rate, 0.9, images * side * side
    train_var = (c * c + truth) / q - c * c  # case (a) over the training set
    means = np.array([m for m, _ in batch_stats])
    variances = np.array([v for _, v in batch_stats])
    ema = (1 - alpha) / (1 + alpha) * (1 - alpha ** (2 * steps))  # Var[R] / Var[s]
    stored_mean = bn.running_mean.double().numpy()
    sd = q * np.sqrt(ema * variances.var(axis=0, ddof=1)) + 2 * (1 - q) * np.abs(
        stored_mean
    ) * np.sqrt(ema * means.var(axis=0, ddof=1))
    bias = q * n / (n - 1) * (means.var(axis=0, ddof=1) - train_var / n)
    z_after = (corrected - truth) / sd
    assert np.all(np.abs(z_after) < Z + np.abs(bias) / sd), z_after
    stored = bn.running_var.double().numpy()
    assert np.all((stored - truth) / sd > Z)
    assert abs(np.mean(corrected / truth) - 1) < 0.1 < np.mean(stored / truth) - 1


# --- Keras 3 ------------------------------------------------------------------------------


@pytest.mark.keras
@pytest.mark.filterwarnings(
    # Keras 3.15's torch backend calls np.array(tensor) the NumPy-2 way torch does not support.
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
)
def test_keras_debiased_is_the_test_time_variance_and_naive_is_not(tmp_path: Path) -> None:
    """Keras stores biased batch variances (÷ n). With n = 4 the naive inversion is low by
    ``(v + (1 - q) c²)/n`` (DESIGN §2); the debiased one is not."""
    keras = pytest.importorskip("keras")
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    samples, rate, n, steps = 2048, 0.5, 4, 1000

    def build() -> Any:
        inputs = keras.Input((4,))
        h = keras.layers.Dense(16, activation="relu", name="hidden")(inputs)
        h = keras.layers.Dropout(rate)(h)
        h = keras.layers.BatchNormalization(name="bn")(h)
        return keras.Model(inputs, keras.layers.Dense(1)(h))

    x = rng.normal(size=(samples, 4)).astype("float32")
    y = np.sin(x @ rng.normal(size=(4, 1))).astype("float32")
    model = build()
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    model.fit(x, y, batch_size=32, epochs=2, verbose=0)
    bn = model.get_layer("bn")
    bn.moving_mean.assign(np.zeros(16, "float32"))
    bn.moving_variance.assign(np.ones(16, "float32"))
    for _ in range(steps):  # the statistics pass: no optimizer step, dropout on
        model(x[rng.integers(0, samples, n)], training=True)
    model.save_weights(tmp_path / "model.weights.h5")

    common = ["--rate", str(rate), "--batch-size", str(n)]
    varshift("correct", tmp_path / "model.weights.h5", *common, "--target", "population",
             "-o", tmp_path / "debiased.weights.h5")  # fmt: skip
    varshift("correct", tmp_path / "model.weights.h5", *common, "--method", "naive",
             "-o", tmp_path / "naive.weights.h5")  # fmt: skip
    corrected = {}
    for method in ("debiased", "naive"):
        fixed = build()
        fixed.load_weights(tmp_path / f"{method}.weights.h5")
        corrected[method] = np.asarray(fixed.get_layer("bn").moving_variance, dtype=np.float64)

    hidden = keras.Model(model.inputs, model.get_layer("hidden").output)
    clean = np.asarray(hidden.predict(x, verbose=0), dtype=np.float64)
    truth, c = clean.var(axis=0), clean.mean(axis=0)
    stored_mean = np.asarray(bn.moving_mean, dtype=np.float64)
    stored = np.asarray(bn.moving_variance, dtype=np.float64)
    live = truth > 1e-3 * truth.max()  # a ReLU unit that never fires has nothing to correct
    assert live.sum() >= 12
    sd = band(clean, stored_mean, rate, resolve_preset("keras"), n, steps)
    q = 1 - rate
    z_debiased = ((corrected["debiased"] - truth) / sd)[live]
    naive_offset = -(truth + (1 - q) * c * c) / n
    z_naive = ((corrected["naive"] - truth) / sd)[live]
    z_naive_vs_theory = ((corrected["naive"] - truth - naive_offset) / sd)[live]
    assert np.all(np.abs(z_debiased) < Z), z_debiased
    assert np.all(np.abs(z_naive_vs_theory) < Z), z_naive_vs_theory  # wrong by what theory says
    assert np.mean(z_naive) < -1.0 < np.mean(z_debiased)
    errors = {m: np.abs(corrected[m] - truth)[live] for m in corrected}
    assert np.mean(errors["debiased"]) < 0.5 * np.mean(errors["naive"])
    assert np.mean((stored / truth)[live]) > 1.5  # the uncorrected mismatch
