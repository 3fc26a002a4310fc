"""Readers and writers of BN statistics: every format round-trips and keeps what it did not
change; damaged, unsafe or malformed files give one clear InputFileError."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import zipfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from varshift.core.errors import InputFileError, MissingDependencyError, OutputFileError
from varshift.formats import (
    REGISTRY,
    BNLayer,
    BNStats,
    detect_format,
    format_from_extension,
    read_stats,
    write_stats,
)

# Keras 3.15's torch backend calls np.array(tensor) the NumPy-2 way torch does not support yet.
pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
)

PLAIN_FORMATS = ["csv", "tsv", "json", "npz", "safetensors"]
EXT = {
    "csv": ".csv",
    "tsv": ".tsv",
    "json": ".json",
    "npz": ".npz",
    "safetensors": ".safetensors",
    "torch": ".pt",
}


def require_extra(fmt: str) -> None:
    """Skip unless the optional package the format needs is installed."""
    extra = REGISTRY[fmt].extra
    if extra is not None:
        pytest.importorskip(extra.module)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def changed(stats: BNStats) -> BNStats:
    """Every layer's variance halved plus 1/4 and mean plus 1/8 (exact in float16 and up)."""
    return stats.with_layers(
        {
            name: replace(layer, mean=layer.mean + 0.125, var=layer.var * 0.5 + 0.25)
            for name, layer in stats.layers.items()
        }
    )


def stored(values: np.ndarray, dtype: str) -> np.ndarray:
    return values.astype(np.dtype(dtype)).astype(np.float64)


def two_layers() -> BNStats:
    """Two hand-made layers with float32-exact values, one without affine parameters."""
    rng = np.random.default_rng(1)
    a = BNLayer(
        "block.bn",
        mean=stored(rng.normal(size=4), "float32"),
        var=stored(rng.uniform(0.5, 2.0, size=4), "float32"),
        scale=stored(rng.uniform(0.5, 1.5, size=4), "float32"),
        bias=stored(rng.normal(size=4), "float32"),
        count=37,
        dtype="float32",
    )
    b = BNLayer(
        "head.bn", mean=np.array([0.5, -1.0]), var=np.array([2.0, 3.0]), count=37, dtype="float32"
    )
    return BNStats({a.name: a, b.name: b}, "json")


def assert_same_layers(a: BNStats, b: BNStats, dtype: str = "float64") -> None:
    """Same layers, counts and values (compared in ``dtype``: text exports of float32 values
    print the shortest float32 repr, which reads back as a nearby float64)."""
    assert list(a.layers) == list(b.layers)
    for name, layer in a.layers.items():
        other = b.layers[name]
        assert layer.count == other.count
        for role in ("mean", "var", "scale", "bias"):
            x, y = getattr(layer, role), getattr(other, role)
            assert (x is None) == (y is None)
            if x is not None:
                np.testing.assert_array_equal(stored(x, dtype), stored(y, dtype))


# --- plain formats ----------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", PLAIN_FORMATS)
def test_plain_formats_round_trip_and_keep_unchanged_values(tmp_path: Path, fmt: str) -> None:
    require_extra(fmt)
    source = tmp_path / f"stats{EXT[fmt]}"
    write_stats(two_layers(), source)
    first = read_stats(source)
    assert first.format == fmt and detect_format(source) == fmt
    assert_same_layers(first, two_layers(), "float32")
    fixed = changed(first)
    out = tmp_path / f"fixed{EXT[fmt]}"
    before = digest(source)
    write_stats(fixed, out)
    assert digest(source) == before  # the input is never modified
    back = read_stats(out)
    expected = {
        n: replace(layer, mean=stored(layer.mean, "float32"), var=stored(layer.var, "float32"))
        for n, layer in fixed.layers.items()
    }
    if fmt in ("csv", "tsv", "json"):
        expected = dict(fixed.layers)  # text keeps float64 exactly
    assert_same_layers(back, BNStats(expected, fmt))


def test_csv_keeps_every_other_cell_byte_for_byte(tmp_path: Path) -> None:
    source = tmp_path / "stats.csv"
    source.write_text(
        "layer,channel,mean,var,count,note\r\n"
        "bn1,1,0.25,4.0,100,second\r\n"
        "bn1,0,0.00,2.000,100,first\r\n"
        "bn2,0,1e-1,nan,100,\r\n"
    )
    stats = read_stats(source)
    assert stats.layers["bn1"].var.tolist() == [2.0, 4.0]  # ordered by channel
    assert np.isnan(stats.layers["bn2"].var[0])
    bn1 = stats.layers["bn1"]
    write_stats(stats.with_layers({"bn1": replace(bn1, var=bn1.var / 2)}), tmp_path / "out.csv")
    assert (tmp_path / "out.csv").read_bytes() == (
        b"layer,channel,mean,var,count,note\r\n"
        b"bn1,1,0.25,2.0,100,second\r\n"
        b"bn1,0,0.00,1.0,100,first\r\n"
        b"bn2,0,1e-1,nan,100,\r\n"
    )


def test_json_keeps_other_keys_and_both_layouts_read(tmp_path: Path) -> None:
    nested = {
        "model": "resnet",
        "layers": {"bn": {"running_mean": [0.0, 1.0], "running_var": [2.0, 3.0], "count": 7}},
    }
    path = tmp_path / "s.json"
    path.write_text(json.dumps(nested))
    stats = read_stats(path)
    assert stats.layers["bn"].count == 7
    bn = stats.layers["bn"]
    write_stats(stats.with_layers({"bn": replace(bn, var=bn.var + 1)}), tmp_path / "o.json")
    doc = json.loads((tmp_path / "o.json").read_text())
    assert doc["model"] == "resnet"
    assert doc["layers"]["bn"] == {
        "running_mean": [0.0, 1.0],
        "running_var": [3.0, 4.0],
        "count": 7,
    }

    records = [
        {"layer": "bn", "channel": 1, "mean": 1.0, "var": 3.0, "tag": "x"},
        {"layer": "bn", "channel": 0, "mean": 0.0, "var": 2.0, "tag": "y"},
    ]
    path.write_text(json.dumps(records))
    stats = read_stats(path)
    assert stats.layers["bn"].var.tolist() == [2.0, 3.0]
    bn = stats.layers["bn"]
    write_stats(stats.with_layers({"bn": replace(bn, var=bn.var * 2)}), tmp_path / "r.json")
    doc = json.loads((tmp_path / "r.json").read_text())
    assert [r["var"] for r in doc] == [6.0, 4.0] and [r["tag"] for r in doc] == ["x", "y"]


def test_npz_keeps_other_arrays_dtypes_and_compression(tmp_path: Path) -> None:
    arrays = {
        "fc.weight": np.arange(6, dtype=np.float32).reshape(2, 3),
        "bn.running_mean": np.array([0.5, 1.5], dtype=np.float16),
        "bn.running_var": np.array([2.0, 4.0], dtype=np.float16),
        "bn.num_batches_tracked": np.array(12, dtype=np.int64),
        "stats/Norm_0/mean": np.zeros(3),
        "stats/Norm_0/var": np.ones(3),
    }
    path = tmp_path / "w.npz"
    np.savez_compressed(path, **arrays)  # type: ignore[arg-type]
    stats = read_stats(path)
    assert list(stats.layers) == ["bn", "stats/Norm_0"]
    assert stats.framework is None  # running_* and mean/var names disagree
    assert stats.layers["bn"].dtype == "float16" and stats.layers["bn"].count == 12
    write_stats(changed(stats), tmp_path / "o.npz")
    with np.load(tmp_path / "o.npz") as out:
        assert set(out.files) == set(arrays)
        np.testing.assert_array_equal(out["fc.weight"], arrays["fc.weight"])
        assert out["bn.running_var"].dtype == np.float16
        np.testing.assert_array_equal(out["bn.running_var"], np.array([1.25, 2.25], np.float16))
        assert (
            out["bn.num_batches_tracked"].dtype == np.int64 and out["bn.num_batches_tracked"] == 12
        )
    with zipfile.ZipFile(tmp_path / "o.npz") as zf:
        assert all(i.compress_type == zipfile.ZIP_DEFLATED for i in zf.infolist())


def test_safetensors_keeps_metadata_and_other_tensors(tmp_path: Path) -> None:
    st = pytest.importorskip("safetensors.numpy")
    arrays = {
        "enc.w": np.ones((2, 2), dtype=np.float32),
        "enc.bn.moving_mean": np.array([1.0, 2.0], dtype=np.float32),
        "enc.bn.moving_variance": np.array([4.0, 8.0], dtype=np.float32),
    }
    path = tmp_path / "w.safetensors"
    st.save_file(arrays, path, metadata={"format": "np", "epoch": "9"})
    stats = read_stats(path)
    assert stats.framework == "keras" and list(stats.layers) == ["enc.bn"]
    write_stats(changed(stats), tmp_path / "o.safetensors")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "o.safetensors"), framework="np") as fh:
        assert fh.metadata() == {"format": "np", "epoch": "9"}
        np.testing.assert_array_equal(fh.get_tensor("enc.w"), arrays["enc.w"])
        np.testing.assert_array_equal(fh.get_tensor("enc.bn.moving_variance"), [2.25, 4.25])


# --- PyTorch --------------------------------------------------------------------------------


def torch_model() -> Any:
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(2, 4, 3),
        torch.nn.Dropout(0.3),
        torch.nn.BatchNorm2d(4),
        torch.nn.Flatten(),
        torch.nn.Linear(16, 3),
        torch.nn.BatchNorm1d(3, affine=False),
    )
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 2, 4, 4) + 1.0)
    return model


@pytest.mark.torch
@pytest.mark.parametrize("wrapper", ["plain", "lightning", "model"])
def test_torch_checkpoint_round_trip_keeps_everything_else(tmp_path: Path, wrapper: str) -> None:
    torch = pytest.importorskip("torch")
    model = torch_model()
    sd = model.state_dict()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    obj: Any = {
        "plain": sd,
        "lightning": {"epoch": 4, "state_dict": sd, "optimizer_states": [opt.state_dict()]},
        "model": {"model": sd, "optimizer": opt.state_dict(), "step": torch.tensor(7)},
    }[wrapper]
    path = tmp_path / "ckpt.ckpt"  # an unknown extension: recognised by content
    torch.save(obj, path)
    stats = read_stats(path)
    assert stats.format == "torch" and stats.framework == "torch"
    assert stats.container == {"plain": "", "lightning": "state_dict", "model": "model"}[wrapper]
    assert list(stats.layers) == ["2", "5"]
    bn2 = stats.layers["2"]
    assert bn2.count == 3 and bn2.scale is not None and stats.layers["5"].scale is None
    assert dict(bn2.keys) == {
        "mean": "2.running_mean",
        "var": "2.running_var",
        "scale": "2.weight",
        "bias": "2.bias",
        "count": "2.num_batches_tracked",
    }
    before = digest(path)
    write_stats(changed(stats), tmp_path / "fixed.pt")
    assert digest(path) == before
    out = torch.load(tmp_path / "fixed.pt", weights_only=True)
    original = torch.load(path, weights_only=True)
    state, old = (
        (out, original) if wrapper == "plain" else (out[stats.container], original[stats.container])
    )
    assert list(state) == list(old)
    assert state._metadata == old._metadata  # the version info load_state_dict reads
    for key, tensor in old.items():
        assert state[key].dtype == tensor.dtype and state[key].shape == tensor.shape
        if key.endswith(("running_mean", "running_var")):
            continue
        assert torch.equal(state[key], tensor), key
    assert torch.equal(state["2.running_var"], old["2.running_var"] * 0.5 + 0.25)
    assert torch.equal(state["5.running_mean"], old["5.running_mean"] + 0.125)
    if wrapper != "plain":
        rest = {k: v for k, v in out.items() if k != stats.container}
        assert repr(rest) == repr({k: v for k, v in original.items() if k != stats.container})
    fresh = torch_model()
    fresh.load_state_dict(state, strict=True)


@pytest.mark.torch
def test_torch_half_and_bfloat16_buffers_keep_their_dtype(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    for dtype in (torch.float16, torch.bfloat16):
        bn = torch.nn.BatchNorm1d(3).to(dtype)
        path = tmp_path / f"{dtype}.pt"
        torch.save(bn.state_dict(), path)
        stats = read_stats(path)
        assert stats.layers["bn"].dtype == str(dtype).removeprefix("torch.")
        write_stats(changed(stats), tmp_path / f"o{dtype}.pt")
        out = torch.load(tmp_path / f"o{dtype}.pt", weights_only=True)
        assert out["running_var"].dtype == dtype
        assert out["running_var"].tolist() == [0.75] * 3
        assert out["running_mean"].tolist() == [0.125] * 3


@pytest.mark.torch
@pytest.mark.parametrize("fmt", ["csv", "json", "npz", "safetensors"])
def test_torch_exports_to_other_formats(tmp_path: Path, fmt: str) -> None:
    torch = pytest.importorskip("torch")
    require_extra(fmt)
    path = tmp_path / "m.pt"
    torch.save(torch_model().state_dict(), path)
    stats = read_stats(path)
    out = tmp_path / f"m{EXT[fmt]}"
    write_stats(stats, out)
    back = read_stats(out)
    assert_same_layers(back, stats, "float32")
    if fmt in ("npz", "safetensors"):  # every tensor of the state dict, not only BN
        assert back.framework == "torch"
        assert "0.weight" in back.origin.data  # type: ignore[union-attr]


@pytest.mark.torch
def test_a_pickle_that_would_run_code_is_refused(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self) -> tuple[Callable[..., Any], tuple[str, str]]:
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.pt"
    torch.save({"bn.running_var": torch.ones(2), "payload": Evil()}, path)
    with pytest.raises(InputFileError, match=r"evil\.pt: refusing to load: .*weights_only"):
        read_stats(path)
    assert not marker.exists()


@pytest.mark.torch
def test_a_whole_pickled_module_is_refused(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    path = tmp_path / "module.pt"
    torch.save(torch.nn.BatchNorm1d(2), path)
    with pytest.raises(InputFileError, match="refusing to load"):
        read_stats(path)


@pytest.mark.torch
def test_missing_extra_is_explained(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "m.pt"
    path.write_bytes(b"PK\x03\x04not really")
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(MissingDependencyError, match=r"PyTorch: pip install 'varshift\[torch\]'"):
        read_stats(path)


def test_the_core_imports_without_the_optional_extras() -> None:
    code = (
        "import sys\n"
        "import varshift.formats, varshift.jobs.correct\n"
        "bad = [m for m in ('torch', 'h5py', 'safetensors', 'keras') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --- Keras 3 ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keras_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    keras = pytest.importorskip("keras")
    keras.utils.set_random_seed(0)
    inputs = keras.Input((3,))
    x = keras.layers.Dense(4)(inputs)
    x = keras.layers.Dropout(0.5)(x)
    x = keras.layers.BatchNormalization(name="bn_full")(x)
    x = keras.layers.BatchNormalization(scale=False, name="bn_noscale")(x)
    outputs = keras.layers.Dense(1)(x)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer="sgd", loss="mse")
    rng = np.random.default_rng(0)
    model.fit(rng.normal(size=(64, 3)), rng.normal(size=(64, 1)), batch_size=16, verbose=0)
    path = tmp_path_factory.mktemp("keras") / "model.weights.h5"
    model.save_weights(path)
    return path


@pytest.mark.keras
def test_keras_weights_round_trip_keeping_the_rest(keras_file: Path, tmp_path: Path) -> None:
    h5py = pytest.importorskip("h5py")
    stats = read_stats(keras_file)
    assert stats.format == "keras" and stats.framework == "keras"
    assert list(stats.layers) == ["bn_full", "bn_noscale"]
    full, noscale = stats.layers["bn_full"], stats.layers["bn_noscale"]
    assert full.scale is not None and noscale.scale is None  # 3 variables: gamma or beta?
    assert full.count == 4 == noscale.count  # optimizer iterations: 64 / 16
    assert full.keys["var"] == "/layers/batch_normalization/vars/3"
    assert noscale.keys["var"] == "/layers/batch_normalization_1/vars/2"
    before = digest(keras_file)
    out = tmp_path / "fixed.weights.h5"
    write_stats(changed(stats), out)
    assert digest(keras_file) == before
    rewritten = {layer.keys[role] for layer in (full, noscale) for role in ("mean", "var")}
    with h5py.File(keras_file) as old, h5py.File(out) as new:
        paths: list[str] = []
        old.visit(paths.append)
        assert paths
        for name in paths:
            assert name in new and dict(old[name].attrs) == dict(new[name].attrs)
            if isinstance(old[name], h5py.Dataset):
                a, b = old[name][()], new[name][()]
                assert a.dtype == b.dtype and np.shape(a) == np.shape(b)
                if "/" + name not in rewritten:
                    np.testing.assert_array_equal(a, b, err_msg=name)
    back = read_stats(out)
    np.testing.assert_array_equal(
        back.layers["bn_full"].var, stored(full.var * 0.5 + 0.25, "float32")
    )
    np.testing.assert_array_equal(
        back.layers["bn_noscale"].mean, stored(noscale.mean + 0.125, "float32")
    )


@pytest.mark.keras
def test_keras_output_needs_a_keras_input(tmp_path: Path) -> None:
    with pytest.raises(OutputFileError, match=r"needs a Keras \.weights\.h5 input"):
        write_stats(two_layers(), tmp_path / "x.weights.h5")


# --- damaged and malformed files -----------------------------------------------------------------


def test_detection_by_extension_and_content(tmp_path: Path) -> None:
    assert format_from_extension("a/model.weights.h5") == "keras"
    assert format_from_extension("model.PTH") == "torch"
    assert format_from_extension("model.ckpt") is None
    unknown = tmp_path / "model.xyz"
    unknown.write_text("hello")
    with pytest.raises(InputFileError, match=r"model\.xyz: cannot tell the format .*'\.xyz'"):
        read_stats(unknown)


@pytest.mark.parametrize(
    "name", ["m.pt", "m.weights.h5", "m.npz", "m.safetensors", "m.csv", "m.json"]
)
def test_empty_and_missing_files(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    with pytest.raises(InputFileError, match="no such file"):
        read_stats(path)
    path.touch()
    with pytest.raises(InputFileError, match=f"{name}: the file is empty"):
        read_stats(path)


def make_full(tmp_path: Path, fmt: str) -> Path:
    """A complete file of ``fmt`` with two layers."""
    require_extra(fmt)
    if fmt == "torch":
        torch = pytest.importorskip("torch")
        path = tmp_path / "full.pt"
        torch.save(torch_model().state_dict(), path)
        return path
    path = tmp_path / f"full{EXT.get(fmt, '.weights.h5')}"
    if fmt == "keras":
        h5py = pytest.importorskip("h5py")
        with h5py.File(path, "w") as fh:
            g = fh.create_group("layers/batch_normalization/vars")
            g.attrs["name"] = "bn"
            for i, values in enumerate(([1.0, 1.0], [0.0, 0.0], [0.5, 0.5], [2.0, 2.0])):
                g[str(i)] = np.asarray(values, dtype=np.float32)
        return path
    write_stats(two_layers(), path)
    return path


@pytest.mark.parametrize("fmt", ["torch", "keras", "npz", "safetensors", "csv", "json"])
def test_truncated_files_are_reported(tmp_path: Path, fmt: str) -> None:
    full = make_full(tmp_path, fmt)
    data = full.read_bytes()
    cut = tmp_path / ("cut" + full.name.removeprefix("full"))
    cut.write_bytes(data[: int(len(data) * 0.6)])
    with pytest.raises(InputFileError, match=rf"{cut.name}: .*(truncated|expected)"):
        read_stats(cut)


def test_npz_with_pickled_objects_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "obj.npz"
    np.savez(path, stuff=np.array([{"a": 1}], dtype=object))
    with pytest.raises(InputFileError, match=r"refusing to load: .*allow_pickle=False"):
        read_stats(path)


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"bn.running_mean": np.zeros(3)}, r"layer 'bn': has running_mean but no running_var"),
        ({"bn.moving_variance": np.ones(3)}, r"layer 'bn': has moving_variance but no moving_mean"),
        (
            {"bn.running_mean": np.zeros(3), "bn.running_var": np.ones(4)},
            r"layer 'bn': running_mean has shape \(3,\) but running_var has shape \(4,\)",
        ),
    ],
)
def test_missing_keys_and_mismatched_shapes(
    tmp_path: Path, arrays: dict[str, np.ndarray], message: str
) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)  # type: ignore[arg-type]
    with pytest.raises(InputFileError, match=rf"bad\.npz: {message}"):
        read_stats(path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("layer,channel,mean\nbn,0,1\n", "missing column.s. var"),
        ("layer,channel,mean,var\nbn,0,1,x\n", r"line 2: var 'x' is not a number"),
        ("layer,channel,mean,var\nbn,0,1,1\nbn,2,1,1\n", r"layer 'bn': channels must be 0..1"),
        ("layer,channel,mean,var,count\nbn,0,1,1,3\nbn,1,1,1,4\n", "count differs"),
        ("layer,channel,mean,var\nbn,0.5,1,1\n", "channel '0.5' is not an integer"),
    ],
)
def test_malformed_csv(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(InputFileError, match=rf"bad\.csv: .*{message}"):
        read_stats(path)


def test_writer_refuses_to_overwrite_or_to_touch_the_input(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    write_stats(two_layers(), path)
    stats = read_stats(path)
    for force in (False, True):
        with pytest.raises(OutputFileError, match=r"s\.json: is the input file"):
            write_stats(stats, path, force=force)
    link = tmp_path / "link.json"
    link.symlink_to(path)
    with pytest.raises(OutputFileError, match="is the input file"):
        write_stats(stats, link, force=True)
    other = tmp_path / "o.json"
    other.write_text("{}")
    with pytest.raises(OutputFileError, match=r"o\.json: already exists; pass force=True"):
        write_stats(stats, other)
    with pytest.raises(OutputFileError, match="is a folder"):
        write_stats(stats, tmp_path, force=True)
    write_stats(changed(stats), other, force=True)
    assert read_stats(other).layers["head.bn"].var.tolist() == [1.25, 1.75]
    assert not list(tmp_path.glob(".*varshift-tmp*"))  # no temporary file left behind


def test_a_file_without_bn_statistics_has_no_layers(tmp_path: Path) -> None:
    path = tmp_path / "w.npz"
    np.savez(path, w=np.ones(2), mean=np.zeros(2))  # a lone "mean" is not a BN layer
    assert dict(read_stats(path).layers) == {}


@pytest.mark.torch
def test_a_refused_legacy_pickle_prints_one_line(tmp_path: Path) -> None:
    """torch warns about the pickle protocol of a legacy (non-zip) file before refusing it;
    on the error path the warning is absorbed: stderr is varshift's one line."""
    torch = pytest.importorskip("torch")
    import collections

    path = tmp_path / "legacy.pt"
    state = {"bn.running_var": torch.ones(2), "extra": collections.Counter(a=1)}
    torch.save(state, path, _use_new_zipfile_serialization=False, pickle_protocol=4)
    r = subprocess.run(
        [sys.executable, "-m", "varshift", "inspect", str(path)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2
    assert r.stderr.splitlines() == [
        f"varshift: error: {path}: refusing to load: the file contains pickled objects other "
        "than tensors; varshift only loads weights_only checkpoints (save the state dict: "
        "torch.save(model.state_dict(), path))"
    ]


@pytest.mark.torch
def test_a_written_checkpoint_is_on_the_cpu_as_the_readme_says(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    assert 'map_location="cpu"' in (Path(__file__).parents[1] / "README.md").read_text()
    src, out = tmp_path / "m.pt", tmp_path / "fixed.pt"
    torch.save({"bn.running_mean": torch.zeros(2), "bn.running_var": torch.ones(2)}, src)
    write_stats(read_stats(src), out)
    back = torch.load(out, weights_only=True)
    assert {t.device.type for t in back.values()} == {"cpu"}
