"""Graph-aware correction of a saved Keras model (issue 10): the structure comes from the
``.keras`` archive's ``config.json`` (nothing runs), each BatchNormalization gets its class's
formula, and the corrected archive loads in Keras with the variance the layer really sees.

The nets are trained here on scikit-learn's digits with Keras 3 (torch backend, conftest), then
their BN statistics are re-recorded with dropout on and the weights frozen (150 batches of
256 at momentum 0.95: the EMA has forgotten training's weight drift), so the test sees the
formulas, not the drift. The truth is measured with plain Keras: the eval-mode input of each
BN over all 1,797 images, its population variance per channel. Keras' BN stores the *biased*
batch variance, so without dropout it would record ``(n − 1)/n`` of that (``n`` = 256), the
target of ``--batch-size 256`` with the default ``--target framework``.
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
MOMENTUM = 0.95  # the re-recording forgets training (0.95**150 < 5e-4)


def _data() -> np.ndarray:
    x = datasets.load_digits().data.astype("float32")
    return (x - x.mean(0)) / (x.std(0) + 1e-3)


def _build(rate: float) -> Any:
    """Dense → BN → ReLU → Dropout → Dense → BN → ReLU → Dropout → BN → classifier."""
    L = keras.layers
    inp = L.Input((64,))
    x = L.Dense(48, name="fc1")(inp)
    x = L.BatchNormalization(momentum=MOMENTUM, name="bn_none")(x)
    x = L.Activation("relu", name="act1")(x)
    x = L.Dropout(rate, name="drop1")(x)
    x = L.Dense(32, name="fc2")(x)
    x = L.BatchNormalization(momentum=MOMENTUM, name="bn_linear")(x)
    x = L.Activation("relu", name="act2")(x)
    x = L.Dropout(rate, name="drop2")(x)
    x = L.BatchNormalization(momentum=MOMENTUM, name="bn_stacked")(x)
    out = L.Dense(10, activation="softmax", name="head")(x)
    return keras.Model(inp, out)


def train_and_save(path: Path, rate: float = RATE, seed: int = 0) -> Path:
    """Train the net, re-record its BN statistics (dropout on, weights frozen), save it."""
    keras.utils.set_random_seed(seed)
    data = _data()
    labels = datasets.load_digits().target
    model = _build(rate)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(data, labels, batch_size=64, epochs=2, verbose=0)
    rng = np.random.default_rng(seed + 1)
    for _ in range(150):
        model(data[rng.choice(len(data), BATCH, replace=False)], training=True)
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


# --- rate 0.5: the truth recorded (issue 10's target is missed data-free) ------------------------

# One seed in the suite (each Keras net costs ~40 s of training on 2 cores); seeds 1 and 2 were
# measured the same way by a script, and the reason below quotes all three.
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


@pytest.mark.xfail(
    strict=True,
    reason="measured: median corrected/true 1.039, 1.016, 1.029 (seeds 0-2) but only 88%, 81%, "
    "84% of channels within ±10%. Not mainly the Gaussian E[x²] (×0.96-1.01 of the measured at "
    "the median channel): with the measured E[x²] it is still 1.013, 0.989, 1.031 and 88%, 84%, "
    "88%. The stored variance is 2.2× the test variance here, so the EMA's own noise (momentum "
    "0.95; 5 re-recordings of seed 0: sd 2.5% of the stored variance, i.e. 5.6% of the test "
    "variance at the median channel, up to 12%) is amplified 2.2× by the subtraction; no formula "
    "removes that (the warning quotes ±30-32% per 15% error in E[x²])",
)
def test_rate_05_through_linear_data_free(saved_05: list[Path], tmp_path: Path) -> None:
    ratios = [_corrected_05(p, tmp_path)[0] for p in saved_05]
    medians = [float(np.median(r)) for r in ratios]
    within = [float(np.mean(np.abs(r - 1.0) <= 0.10)) for r in ratios]
    assert all(0.97 <= m <= 1.05 for m in medians) and min(within) >= 0.90, (medians, within)


def test_rate_05_miss_is_flagged(saved_05: list[Path], tmp_path: Path) -> None:
    """What the report does say: the sensitivity to E[x²] and a warning past ±10%."""
    for path in saved_05:
        _, result = _corrected_05(path, tmp_path)
        report = json.loads((tmp_path / f"fixed-{path.stem}.keras.report.json").read_text())
        (row,) = [r for r in report["rows"] if r["layer"] == "bn_linear"]
        assert "sensitivity: ±15% in E[x²]" in row["assumption"]
        (warning,) = [w for w in report["metadata"]["warnings"] if "bn_linear" in w]
        assert "recalibrate" in warning and "--data" in warning
        assert "warning:" in result.stderr and "'bn_linear'" in result.stderr  # shown too
