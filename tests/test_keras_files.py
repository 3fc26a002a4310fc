"""Keras model files: ``.keras`` archives and legacy ``model.save("x.h5")`` files, written by
the real frameworks, read by ``inspect``, corrected by ``correct`` with every other byte kept,
and loaded back by the framework, whose BatchNormalization then holds the corrected variance.

The expected corrected variance is computed here from the values h5py reads out of the file
(bernoulli dropout, no --batch-size: ``v = q (V + mu²) - mu²``, ``q = 1 - rate``; DESIGN §2),
not by varshift. Keras 3 runs on the torch backend (conftest); tf.keras tests skip without
``tf_keras``.
"""

from __future__ import annotations

import io
import os
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from varshift.cli import app
from varshift.formats import detect_format, read_stats
from varshift.formats.keras_legacy_h5 import framework_of
from varshift.frameworks.keras import bn_feeds, layer_graph, read_model_config

h5py = pytest.importorskip("h5py")
runner = CliRunner()
EPS32 = float(np.finfo(np.float32).eps)
RATE = 0.3


@pytest.fixture(scope="module")
def keras() -> Any:
    return pytest.importorskip("keras")


@pytest.fixture(scope="module")
def tfk() -> Any:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pytest.importorskip("tensorflow")
        return pytest.importorskip("tf_keras")


def trained(layers_mod: Any, model_cls: Any, fit: bool = True) -> Any:
    """Input(6) → Dense → Dropout → BN, and a Dense → BN(center=False) head; a few steps."""
    L = layers_mod
    inp = L.Input((6,))
    x = L.Dense(8, name="fc1")(inp)
    x = L.Dropout(RATE, name="drop1")(x)
    x = L.BatchNormalization(name="bn1")(x)
    x = L.Dense(4, name="fc2")(x)
    x = L.BatchNormalization(center=False, name="bn2")(x)
    model = model_cls(inp, x)
    model.compile(optimizer="adam", loss="mse")
    rng = np.random.default_rng(0)
    if not fit:
        return model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(rng.normal(3.0, 2.0, (96, 6)), rng.normal(size=(96, 4)), epochs=2, verbose=0)
    return model


def save(model: Any, path: Path) -> None:
    """``model.save`` with the frameworks' own warnings (legacy format, NumPy 2) silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save(path)


def correct(source: Path, output: Path) -> None:
    """``correct`` of a file holding its architecture: the rate is read from its config, bn1
    (Dropout → BN) is direct, bn2 (Dropout → BN → Dense → BN) stacked and left alone."""
    result = runner.invoke(app, ["correct", str(source), "-o", str(output)])
    assert result.exit_code == 0, result.stderr
    assert "direct" in result.stdout and "stacked" in result.stdout


def expected(mean: np.ndarray, var: np.ndarray) -> np.ndarray:
    """Bernoulli dropout of rate RATE, test-time variance from the stored one."""
    q = 1.0 - RATE
    m, v = mean.astype(np.float64), var.astype(np.float64)
    return (q * (v + m**2) - m**2).astype(np.float32)


def stats_datasets(fh: Any) -> dict[str, Any]:
    """Every dataset whose name ends in moving_mean / moving_variance (legacy layout), or the
    last two of each BN vars group (Keras 3 layout), by path."""
    found: dict[str, Any] = {}

    def visit(name: str, obj: Any) -> None:
        if isinstance(obj, h5py.Dataset) and "moving_" in name:
            found[name] = obj

    fh.visititems(visit)
    if not found and "layers" in fh:
        for group in fh["layers"].values():
            if group.name.rsplit("/", 1)[-1].startswith("bn") or "batch_norm" in group.name:
                keys = sorted(group["vars"].keys(), key=int)
                for k in keys[-2:]:
                    found[group["vars"][k].name] = group["vars"][k]
    return found


def assert_only_stats_bytes_changed(before: bytes, after: bytes, h5_bytes: bytes) -> None:
    """Same length, and every byte outside the statistics datasets' storage is identical."""
    assert len(before) == len(after)
    a, b = np.frombuffer(before, np.uint8), np.frombuffer(after, np.uint8)
    inside = np.zeros(len(a), dtype=bool)
    with h5py.File(io.BytesIO(h5_bytes), "r") as fh:
        for ds in stats_datasets(fh).values():
            start = ds.id.get_offset()
            inside[start : start + ds.id.get_storage_size()] = True
    assert inside.any()
    assert np.array_equal(a[~inside], b[~inside])
    assert not np.array_equal(a[inside], b[inside])  # the variances did change


def bn_values(fh: Any, layer: str) -> tuple[np.ndarray, np.ndarray]:
    """(moving_mean, moving_variance) of a legacy layer group, by weight name."""
    group = fh[f"model_weights/{layer}"]
    names = [n.decode() if isinstance(n, bytes) else n for n in group.attrs["weight_names"]]
    by_role = {n.rsplit("/", 1)[-1].split(":")[0]: group[n][()] for n in names}
    return by_role["moving_mean"], by_role["moving_variance"]


def layer_var(model: Any, name: str) -> np.ndarray:
    """A BN layer's moving variance: Keras 3 (torch backend) or tf.keras variable."""
    v = model.get_layer(name).moving_variance
    value = getattr(v, "value", None)
    if hasattr(value, "detach"):  # Keras 3 on torch: .numpy() warns under NumPy 2
        return np.asarray(value.detach().cpu().numpy(), dtype=np.float32)
    return np.asarray(v.numpy(), dtype=np.float32)


# --- Keras 3 ---------------------------------------------------------------------------------


@pytest.mark.keras
def test_keras_archive_is_corrected_member_by_member_and_loads(keras: Any, tmp_path: Path) -> None:
    model = trained(keras.layers, keras.Model)
    source, fixed = tmp_path / "model.keras", tmp_path / "fixed.keras"
    save(model, source)
    stats = read_stats(source)
    assert (stats.format, stats.framework) == ("keras-archive", "keras")
    assert list(stats.layers) == ["bn1", "bn2"]
    for name in ("bn1", "bn2"):
        np.testing.assert_array_equal(stats.layers[name].var, layer_var(model, name))
    correct(source, fixed)
    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(fixed) as zout:
        assert [i.filename for i in zin.infolist()] == [i.filename for i in zout.infolist()]
        for a, b in zip(zin.infolist(), zout.infolist(), strict=True):
            assert (a.date_time, a.compress_type, a.external_attr) == (
                b.date_time,
                b.compress_type,
                b.external_attr,
            )
            if a.filename != "model.weights.h5":
                assert zin.read(a) == zout.read(b), a.filename
        old, new = zin.read("model.weights.h5"), zout.read("model.weights.h5")
    assert_only_stats_bytes_changed(old, new, old)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = keras.saving.load_model(fixed)
    want = expected(stats.layers["bn1"].mean, stats.layers["bn1"].var)
    np.testing.assert_allclose(layer_var(loaded, "bn1"), want, rtol=2 * EPS32)
    assert not np.allclose(layer_var(loaded, "bn1"), layer_var(model, "bn1"))
    np.testing.assert_array_equal(layer_var(loaded, "bn2"), layer_var(model, "bn2"))


@pytest.mark.keras
def test_keras3_legacy_h5_is_corrected_in_place_and_loads(keras: Any, tmp_path: Path) -> None:
    model = trained(keras.layers, keras.Model)
    source, fixed = tmp_path / "model.h5", tmp_path / "fixed.h5"
    save(model, source)
    assert detect_format(source) == "keras-legacy"
    stats = read_stats(source)
    assert stats.framework == "keras" and list(stats.layers) == ["bn1", "bn2"]
    assert stats.layers["bn1"].count == stats.layers["bn2"].count == 6  # 2 epochs × 3 batches
    correct(source, fixed)
    assert_only_stats_bytes_changed(source.read_bytes(), fixed.read_bytes(), source.read_bytes())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # compile=False: Keras 3.15 cannot deserialise the legacy training config's 'mse'
        # ("not a KerasSaveable subclass"), for the uncorrected file just the same.
        loaded = keras.saving.load_model(fixed, compile=False)
    with h5py.File(source, "r") as fh:
        mean, var = bn_values(fh, "bn1")
        np.testing.assert_allclose(layer_var(loaded, "bn1"), expected(mean, var), rtol=2 * EPS32)
        _, var2 = bn_values(fh, "bn2")  # stacked: left alone
        np.testing.assert_array_equal(layer_var(loaded, "bn2"), var2)


# --- tf.keras --------------------------------------------------------------------------------


def test_tf_keras_legacy_h5_is_corrected_and_loads(tfk: Any, tmp_path: Path) -> None:
    model = trained(tfk.layers, tfk.Model)
    source, fixed = tmp_path / "model.h5", tmp_path / "fixed.h5"
    save(model, source)
    stats = read_stats(source)
    # tf_keras 2.21 writes keras_version 2.21.0; Dense inputs: the non-fused (biased) path.
    assert (stats.format, stats.framework) == ("keras-legacy", "keras")
    correct(source, fixed)
    assert_only_stats_bytes_changed(source.read_bytes(), fixed.read_bytes(), source.read_bytes())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = tfk.models.load_model(fixed)
    with h5py.File(source, "r") as fh:
        mean, var = bn_values(fh, "bn1")
        np.testing.assert_allclose(layer_var(loaded, "bn1"), expected(mean, var), rtol=2 * EPS32)
        _, var2 = bn_values(fh, "bn2")  # stacked: left alone
        np.testing.assert_array_equal(layer_var(loaded, "bn2"), var2)


def test_tf_keras_conv_model_is_read_as_the_fused_path(tfk: Any, tmp_path: Path) -> None:
    L = tfk.layers
    inp = L.Input((4, 4, 2))
    x = L.SpatialDropout2D(0.2)(L.Conv2D(3, 3, padding="same")(inp))
    model = tfk.Model(inp, L.BatchNormalization()(x))
    source = tmp_path / "conv.h5"
    save(model, source)
    assert model.layers[-1].fused is True  # what tf.keras ran: the fused kernel
    assert read_stats(source).framework == "tf-keras"


# --- conventions and safety --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("version", "backend", "axes", "want"),
    [
        ("3.15.1", "torch", [[-1]], "keras"),
        ("2.2.4", "tensorflow", [[1]], "keras2"),  # multi-backend Keras 2.1.4–2.3.1
        ("2.3.1", "theano", [[3]], "keras2"),
        ("2.1.3", "tensorflow", [[1]], "keras"),  # before f51a7ef090 (BN: use sample variance)
        ("2.2.4", "cntk", [[1]], "keras"),  # the CNTK backend skipped the n/(n-1-eps) factor
        ("2.2.4-tf", "tensorflow", [[3], [3]], "tf-keras"),  # tf.keras, NHWC: fused
        ("2.21.0", "tensorflow", [[1]], "keras"),  # tf.keras, 2-D: non-fused, biased
        ("2.21.0", "tensorflow", [[1], [3]], None),  # both paths in one file
        ("", "tensorflow", [[1]], None),
    ],
)
def test_the_convention_follows_the_keras_version(
    version: str, backend: str, axes: list[list[int]], want: str | None
) -> None:
    assert framework_of(version, backend, [{"axis": a} for a in axes]) == want


def test_tf_keras_non_fused_configs_are_read_as_such() -> None:
    for cfg in ({"axis": [3], "fused": False}, {"axis": [3], "renorm": True}):
        assert framework_of("2.21.0", "tensorflow", [cfg]) == "keras"


def hand_archive(path: Path, config: dict[str, Any]) -> None:
    """A .keras zip whose weights file is empty of BN layers, with any config."""
    import json

    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as fh:
        fh.create_group("layers/lambda/vars")
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("metadata.json", json.dumps({"keras_version": "3.15.1"}))
        zf.writestr("config.json", json.dumps(config))
        zf.writestr("model.weights.h5", buffer.getvalue())


def test_reading_imports_no_framework_and_runs_no_layer_code(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Lambda layer's serialised function is never deserialised: reading works with Keras,
    tf.keras and TensorFlow made unimportable, and the config comes back as plain JSON."""
    for module in ("keras", "tf_keras", "tensorflow", "torch"):
        monkeypatch.setitem(sys.modules, module, None)
    config = {
        "class_name": "Functional",
        "config": {
            "layers": [
                {"class_name": "InputLayer", "config": {"name": "in"}, "inbound_nodes": []},
                {
                    "class_name": "Lambda",
                    "config": {"name": "lambda", "function": {"class_name": "__lambda__"}},
                    "inbound_nodes": [[["in", 0, 0, {}]]],
                },
            ]
        },
    }
    path = tmp_path / "lambda.keras"
    hand_archive(path, config)
    assert read_stats(path).layers == {}
    graph = layer_graph(read_model_config(path))
    assert [(n.name, n.class_name, n.inbound) for n in graph] == [
        ("in", "InputLayer", ()),
        ("lambda", "Lambda", ("in",)),
    ]


# --- the layer graph ---------------------------------------------------------------------------


def keras2_functional() -> dict[str, Any]:
    """A Keras 2 (tf.keras) Functional config: Input → Dropout → Dense → BN, and a Dropout →
    BN branch merged by Add → Dropout(0) → BN."""

    def layer(name: str, cls: str, inbound: list[str], **cfg: Any) -> dict[str, Any]:
        return {
            "class_name": cls,
            "name": name,
            "config": {"name": name, **cfg},
            "inbound_nodes": [[[i, 0, 0, {}] for i in inbound]] if inbound else [],
        }

    return {
        "class_name": "Functional",
        "config": {
            "layers": [
                layer("in", "InputLayer", []),
                layer("d1", "Dropout", ["in"], rate=0.5),
                layer("fc", "Dense", ["d1"], activation="linear"),
                layer("bn_lin", "BatchNormalization", ["fc"]),
                layer("d2", "SpatialDropout1D", ["in"], rate=0.2),
                layer("flat", "Flatten", ["d2"]),
                layer("bn_direct", "BatchNormalization", ["flat"]),
                layer("add", "Add", ["bn_lin", "bn_direct"]),
                layer("d0", "Dropout", ["add"], rate=0.0),
                layer("bn_none", "BatchNormalization", ["d0"]),
                layer("relu", "Dense", ["d1"], activation="relu"),
                layer("bn_act", "BatchNormalization", ["relu"]),
            ]
        },
    }


def test_bn_feeds_of_a_keras2_functional_config() -> None:
    feeds = {f.bn: f for f in bn_feeds(layer_graph(keras2_functional()))}
    assert list(feeds) == ["bn_lin", "bn_direct", "bn_none", "bn_act"]
    lin = feeds["bn_lin"]
    assert (lin.path, lin.chain, lin.dropout, lin.rate, lin.kind) == (
        "through-linear",
        ("fc", "d1"),
        "d1",
        0.5,
        "bernoulli",
    )
    assert (lin.dense, lin.kernel, lin.activation) == ("fc", "fc/kernel", "linear")
    direct = feeds["bn_direct"]
    assert (direct.path, direct.chain, direct.channelwise, direct.rate) == (
        "direct",
        ("flat", "d2"),
        True,
        0.2,
    )
    none = feeds["bn_none"]
    assert (none.path, none.stop, none.dropout) == ("none", "merge", None)
    assert feeds["bn_act"].path == "stacked"  # dropout → Dense(relu) → BN: not linear
    assert feeds["bn_act"].to_dict()["dropout"] == "d1"


@pytest.mark.keras
def test_bn_feeds_of_a_real_keras3_archive(keras: Any, tmp_path: Path) -> None:
    model = trained(keras.layers, keras.Model, fit=False)
    path = tmp_path / "m.keras"
    save(model, path)
    feeds = {f.bn: f for f in bn_feeds(layer_graph(read_model_config(path)))}
    assert (feeds["bn1"].path, feeds["bn1"].dropout, feeds["bn1"].rate) == ("direct", "drop1", RATE)
    # fc2 feeds bn2, and above it bn1 and drop1: the noise went through a BN first.
    assert (feeds["bn2"].path, feeds["bn2"].dense, feeds["bn2"].chain) == (
        "stacked",
        "fc2",
        ("fc2", "bn1", "drop1"),
    )


def test_a_weights_only_file_has_no_architecture(tmp_path: Path) -> None:
    from varshift.core.errors import InputFileError

    path = tmp_path / "w.weights.h5"
    with h5py.File(path, "w") as fh:
        fh.create_group("layers")
    with pytest.raises(InputFileError, match="no model architecture"):
        read_model_config(path)
