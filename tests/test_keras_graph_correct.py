"""Graph-aware correction of a saved Keras model (issue 10): the structure comes from the
``.keras`` archive's ``config.json`` (nothing runs), each BatchNormalization gets its class's
formula, and the corrected archive loads in Keras with the variance the layer really sees.

The nets are trained here on scikit-learn's digits with Keras 3 (torch backend, conftest), then
their BN statistics are *settled*, as ``tests/_graph_nets.py`` does for torch: weights frozen,
dropout on, the statistics re-recorded as the cumulative average of 280 batch statistics (batch
256), so the test sees the formulas, not training's weight drift nor an EMA's noise (an EMA at
momentum 0.95 averages only ~39 batches, and the through-linear subtraction amplifies that noise
by the stored/test variance ratio, 2.2 at rate 0.5). The truth is measured with plain Keras: the
eval-mode input of each BN over all 1,797 images, its population variance per channel. Keras'
BN stores the *biased* batch variance, so without dropout it would record ``(n − 1)/n`` of that
(``n`` = 256), the target of ``--batch-size 256`` with the default ``--target framework``.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from varshift.cli import app
from varshift.frameworks.keras.structure import layer_structures

keras = pytest.importorskip("keras")
datasets = pytest.importorskip("sklearn.datasets")
runner = CliRunner()
# Keras 3.15 on NumPy 2 warns inside its own variable conversions.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
BATCH = 256  # of the re-recording, hence --batch-size
RATE = 0.2
SETTLE = 280  # batches averaged by the re-recording (as the torch tests' 280)


def _data() -> np.ndarray:
    x = datasets.load_digits().data.astype("float32")
    return (x - x.mean(0)) / (x.std(0) + 1e-3)


def _build(rate: float) -> Any:
    """Dense → BN → ReLU → Dropout → Dense → BN → ReLU → Dropout → BN → classifier."""
    L = keras.layers
    inp = L.Input((64,))
    x = L.Dense(48, name="fc1")(inp)
    x = L.BatchNormalization(name="bn_none")(x)
    x = L.Activation("relu", name="act1")(x)
    x = L.Dropout(rate, name="drop1")(x)
    x = L.Dense(32, name="fc2")(x)
    x = L.BatchNormalization(name="bn_linear")(x)
    x = L.Activation("relu", name="act2")(x)
    x = L.Dropout(rate, name="drop2")(x)
    x = L.BatchNormalization(name="bn_stacked")(x)
    out = L.Dense(10, activation="softmax", name="head")(x)
    return keras.Model(inp, out)


def _bns(model: Any) -> list[Any]:
    return [la for la in model.layers if isinstance(la, keras.layers.BatchNormalization)]


def settle(model: Any, seed: int, batches: int = SETTLE) -> dict[str, np.ndarray]:
    """Re-record every BN's statistics as the cumulative average of ``batches`` batch statistics.

    Weights frozen (nothing is trained), dropout on (``training=True``). Keras 3's
    ``BatchNormalization.call`` reads ``self.momentum`` when it runs (eagerly here: the torch
    backend, no compiled function), so ``momentum = 1 − 1/t`` before batch ``t`` makes the
    moving statistics the mean of the ``t`` batch statistics (``t`` = 1 drops what was stored).
    The layers' momentum is put back afterwards, so a saved model's config is a normal one.
    Returns, per BN, the mean and biased variance of each batch it was fed, computed with NumPy
    (float64, ``batches × channels`` each), for :func:`test_settle_is_the_batch_average`.
    """
    bns = _bns(model)
    # One call runs every layer once: the BN inputs come back with the dropout masks used.
    probe = keras.Model(model.inputs, [bn.input for bn in bns] + list(model.outputs))
    kept = [bn.momentum for bn in bns]
    data = _data()
    rng = np.random.default_rng(seed + 1)
    seen: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in bns]
    for t in range(1, batches + 1):
        for bn in bns:
            bn.momentum = 1.0 - 1.0 / t
        outs = probe([data[rng.choice(len(data), BATCH, replace=False)]], training=True)
        for got, out in zip(seen, outs[: len(bns)], strict=True):
            x = keras.ops.convert_to_numpy(out).astype(np.float64)
            got.append((x.mean(axis=0), x.var(axis=0)))
    for bn, momentum in zip(bns, kept, strict=True):
        bn.momentum = momentum
    return {bn.name: np.asarray(got).transpose(1, 0, 2) for bn, got in zip(bns, seen, strict=True)}


def train_and_save(path: Path, rate: float = RATE, seed: int = 0) -> Path:
    """Train the net, settle its BN statistics (:func:`settle`), save it."""
    if keras.backend.backend() == "torch":
        # One thread, as tests/_graph_nets.py sets: the nets (and the numbers quoted below) do
        # not depend on which test ran first, and two threads thrash on the shared 2 cores.
        import torch

        torch.set_num_threads(1)
    keras.utils.set_random_seed(seed)
    labels = datasets.load_digits().target
    model = _build(rate)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(_data(), labels, batch_size=64, epochs=2, verbose=0)
    settle(model, seed)
    with warnings.catch_warnings():  # Keras' own NumPy-2 deprecation warnings
        warnings.simplefilter("ignore")
        model.save(path)
    return path


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_and_save(tmp_path_factory.mktemp("keras") / "net.keras")


def _load(path: Path) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return keras.saving.load_model(path)


def _bn_input_variance(model: Any, bn: str) -> np.ndarray:
    """Population variance per channel of what ``bn`` receives in inference mode."""
    layer = model.get_layer(bn)
    probe = keras.Model(model.inputs, layer.input)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        x = keras.ops.convert_to_numpy(probe(_data(), training=False)).astype(np.float64)
    return np.asarray(x.var(axis=0))


def _moving_variance(model: Any, bn: str) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(model.get_layer(bn).moving_variance), float)


def test_settle_is_the_batch_average(saved: Path) -> None:
    """The re-recording stores the plain mean of the batch statistics, recomputed here with
    NumPy from what each batch fed the BN (its dropout masks included), and leaves the
    layers' momentum as it was (the Keras default in the saved config)."""
    model = _load(saved)
    assert [bn.momentum for bn in _bns(model)] == [0.99] * 3
    batch = settle(model, seed=7)
    assert [bn.momentum for bn in _bns(model)] == [0.99] * 3
    # float32 running average: ≤ 2⁻²³ relative per update, ≤ 280·2⁻²³ ≈ 3.3e-5 in all.
    rtol = 1e-4
    for bn in _bns(model):
        means, variances = batch[bn.name]
        mean = np.asarray(keras.ops.convert_to_numpy(bn.moving_mean), float)
        np.testing.assert_allclose(_moving_variance(model, bn.name), variances.mean(0), rtol=rtol)
        sd = np.sqrt(variances.mean(0))  # the mean's scale (a mean can be near 0)
        assert np.max(np.abs(mean - means.mean(0)) / sd) <= rtol
        # The check tells averages apart: an EMA at 0.99 of the same batches is far off.
        ema = variances[0]
        for v in variances[1:]:
            ema = 0.99 * ema + 0.01 * v
        assert np.max(np.abs(ema / variances.mean(0) - 1)) > 100 * rtol


def test_classes_read_from_config(saved: Path) -> None:
    s = layer_structures(saved)
    assert {k: v.kind for k, v in s.items()} == {
        "bn_none": "none",
        "bn_linear": "through-linear",
        "bn_stacked": "stacked",
    }
    lin = s["bn_linear"]
    assert lin.rate == pytest.approx(RATE) and lin.activation == "relu"
    assert lin.weight is not None and lin.weight.shape == (32, 48)  # Dense kernel transposed
    assert lin.feeder is not None and lin.feeder.name == "bn_none"


def test_corrected_archive_measures_one(saved: Path, tmp_path: Path) -> None:
    fixed = tmp_path / "fixed.keras"
    result = runner.invoke(
        app, ["correct", str(saved), "--batch-size", str(BATCH), "-o", str(fixed)]
    )
    assert result.exit_code == 0, result.stderr
    before = _load(saved)
    after = _load(fixed)
    target = _bn_input_variance(before, "bn_linear") * (BATCH - 1) / BATCH
    ratio_before = _moving_variance(before, "bn_linear") / target
    ratio = _moving_variance(after, "bn_linear") / target
    assert np.median(ratio_before) > 1.05  # the shift is there to be corrected
    assert 0.97 <= np.median(ratio) <= 1.05, ratio
    assert np.mean(np.abs(ratio - 1.0) <= 0.10) >= 0.90, ratio
    for untouched in ("bn_none", "bn_stacked"):  # never changed silently
        assert np.array_equal(
            _moving_variance(after, untouched), _moving_variance(before, untouched)
        )
    assert "stacked" in result.stdout and "recalibrate" in result.stdout


def test_rate_is_refused_with_architecture(saved: Path) -> None:
    result = runner.invoke(app, ["correct", str(saved), "--rate", "0.2", "--dry-run"])
    assert result.exit_code == 2
    assert "read from the model" in result.stderr


# --- rate 0.5: the stored variance is 2.2× the test variance, the subtraction amplifies noise -----

# One seed in the suite (each Keras net costs ~40 s of training on 2 cores); seeds 1 and 2 were
# measured the same way by a script: median corrected/true 1.013, 1.003, 1.002 (seeds 0-2), every
# channel within ±10% (extremes 0.914 and 1.085). With the EMA re-recording this file used before
# (momentum 0.95, ~39 batch variances averaged) it was 1.039, 1.016, 1.029 and only 81-88% within:
# the EMA's noise, amplified 2.2× by the subtraction, not the formula. With E[x²] measured in
# eval mode (by hand) the medians are 0.971, 0.977, 0.987 (97% within): in training mode the
# upstream BN normalises by batch statistics, which lowers E[x²] by 1.3% and the signal variance
# by 1.0% at the median channel (seed 0); the Gaussian E[x²] happens to sit on the other side.
SEEDS = (0,)


@pytest.fixture(scope="module")
def saved_05(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("keras05")
    return [train_and_save(folder / f"net-{s}.keras", rate=0.5, seed=s) for s in SEEDS]


def _corrected_05(path: Path, tmp_path: Path) -> tuple[np.ndarray, Any]:
    """Corrected moving variance / what bn_linear sees (the CLI result too)."""
    fixed = tmp_path / f"fixed-{path.stem}.keras"
    result = runner.invoke(
        app, ["correct", str(path), "--batch-size", str(BATCH), "-o", str(fixed)]
    )
    assert result.exit_code == 0, result.stderr
    target = _bn_input_variance(_load(path), "bn_linear") * (BATCH - 1) / BATCH
    return _moving_variance(_load(fixed), "bn_linear") / target, result


def test_rate_05_through_linear_data_free(saved_05: list[Path], tmp_path: Path) -> None:
    ratios = [_corrected_05(p, tmp_path)[0] for p in saved_05]
    medians = [float(np.median(r)) for r in ratios]
    within = [float(np.mean(np.abs(r - 1.0) <= 0.10)) for r in ratios]
    assert all(0.97 <= m <= 1.05 for m in medians) and min(within) >= 0.90, (medians, within)


def test_rate_05_sensitivity_is_flagged(saved_05: list[Path], tmp_path: Path) -> None:
    """The data-free row quotes its sensitivity to E[x²] and warns past ±10% (here ±30-32% per
    15% error in E[x²]), whether or not this net's Gaussian E[x²] happens to be close."""
    for path in saved_05:
        _, result = _corrected_05(path, tmp_path)
        report = json.loads((tmp_path / f"fixed-{path.stem}.keras.report.json").read_text())
        (row,) = [r for r in report["rows"] if r["layer"] == "bn_linear"]
        assert "sensitivity: ±15% in E[x²]" in row["assumption"]
        (warning,) = [w for w in report["metadata"]["warnings"] if "bn_linear" in w]
        assert "recalibrate" in warning and "--data" in warning
        assert "warning:" in result.stderr and "'bn_linear'" in result.stderr  # shown too
