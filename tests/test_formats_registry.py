"""The format registry, driven by its records so that a new format is tested without new code:
every format round-trips through its own writer and reader, recognises its own content and no
other's, owns its extensions, and explains a missing extra."""

from __future__ import annotations

import json
import shutil
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from varshift.core.errors import MissingDependencyError
from varshift.formats import (
    FOLDER_FORMATS,
    FORMATS,
    REGISTRY,
    BNLayer,
    BNStats,
    detect_format,
    format_from_extension,
    read_stats,
    write_stats,
)


def require_extra(name: str) -> None:
    """Skip unless the optional package the format needs is installed."""
    extra = REGISTRY[name].extra
    if extra is not None:
        pytest.importorskip(extra.module)


def f32(values: list[float]) -> np.ndarray:
    return np.asarray(values, dtype=np.float32).astype(np.float64)


def two_layers() -> BNStats:
    """Two layers with float32-exact values, one with affine parameters and a count."""
    a = BNLayer(
        "block.bn",
        mean=f32([0.5, -1.25, 3.0]),
        var=f32([2.0, 0.75, 1.5]),
        scale=f32([1.0, 0.5, 2.0]),
        bias=f32([0.0, -0.5, 0.25]),
        count=12,
        dtype="float32",
    )
    b = BNLayer("head.bn", mean=f32([1.0, 2.0]), var=f32([4.0, 8.0]), dtype="float32")
    return BNStats({a.name: a, b.name: b}, "json")


def keras_sample(path: Path) -> None:
    """A Keras 3 ``.weights.h5`` layout: a Keras output rewrites a Keras input, so the
    registry's writer cannot start from in-memory statistics."""
    h5py = pytest.importorskip("h5py")
    block = [[1.0, 0.5, 2.0], [0.0, -0.5, 0.25], [0.5, -1.25, 3.0], [2.0, 0.75, 1.5]]
    head = [[1.0, 2.0], [4.0, 8.0]]  # moving_mean, moving_variance: no gamma, no beta
    with h5py.File(path, "w") as fh:
        for i, (layer, variables) in enumerate((("block.bn", block), ("head.bn", head))):
            g = fh.create_group(f"layers/batch_normalization{f'_{i}' if i else ''}/vars")
            g.attrs["name"] = layer
            for k, values in enumerate(variables):
                g[str(k)] = np.asarray(values, dtype=np.float32)
        fh["optimizer/vars/0"] = np.int64(12)


def keras_archive_sample(path: Path) -> None:
    """A ``.keras`` zip: config.json, metadata.json and the Keras 3 weights file above."""
    weights = path.with_name("inner.weights.h5")
    keras_sample(weights)
    config = {"class_name": "Functional", "config": {"name": "m", "layers": []}}
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("metadata.json", json.dumps({"keras_version": "3.15.1"}))
        zf.writestr("config.json", json.dumps(config))
        zf.writestr("model.weights.h5", weights.read_bytes())
    weights.unlink()


def keras_legacy_sample(path: Path) -> None:
    """A legacy ``model.save('x.h5')`` layout: ``model_weights`` with ``layer_names`` and, per
    layer, ``weight_names`` naming TF variables (``block.bn/gamma:0``)."""
    h5py = pytest.importorskip("h5py")
    roles = ("gamma", "beta", "moving_mean", "moving_variance")
    values = [[1.0, 0.5, 2.0], [0.0, -0.5, 0.25], [0.5, -1.25, 3.0], [2.0, 0.75, 1.5]]
    block = dict(zip(roles, values, strict=True))
    head = {"moving_mean": [1.0, 2.0], "moving_variance": [4.0, 8.0]}
    with h5py.File(path, "w") as fh:
        fh.attrs["keras_version"] = "3.15.1"
        fh.attrs["backend"] = "torch"
        root = fh.create_group("model_weights")
        root.attrs["layer_names"] = [b"input", b"block.bn", b"head.bn"]
        root.create_group("input").attrs["weight_names"] = np.array([], dtype="S1")
        for layer, variables in (("block.bn", block), ("head.bn", head)):
            group = root.create_group(layer)
            names = [f"{layer}/{role}:0" for role in variables]
            group.attrs["weight_names"] = [n.encode() for n in names]
            for weight, values in zip(names, variables.values(), strict=True):
                group[weight] = np.asarray(values, dtype=np.float32)
        opt = fh.create_group("optimizer_weights")
        opt.attrs["weight_names"] = [b"iteration:0"]
        opt["iteration:0"] = np.int64(12)


def orbax_sample(path: Path) -> None:
    """An Orbax checkpoint folder of an NNX-like state: ``P/{mean,var,scale,bias}/value``."""
    pytest.importorskip("jax")
    ocp = pytest.importorskip("orbax.checkpoint")
    block = {"scale": [1.0, 0.5, 2.0], "bias": [0.0, -0.5, 0.25]}
    block |= {"mean": [0.5, -1.25, 3.0], "var": [2.0, 0.75, 1.5]}
    tree = {
        "block.bn": {k: {"value": np.asarray(v, np.float32)} for k, v in block.items()},
        "head.bn": {"mean": {"value": np.float32([1, 2])}, "var": {"value": np.float32([4, 8])}},
    }
    with ocp.PyTreeCheckpointer() as checkpointer:
        checkpointer.save(path.absolute(), tree)


#: Formats whose writer cannot create a file from :func:`two_layers`: how to make a sample.
SAMPLES: dict[str, Callable[[Path], None]] = {
    "keras": keras_sample,
    "keras-archive": keras_archive_sample,
    "keras-legacy": keras_legacy_sample,
    "orbax": orbax_sample,
}

#: Formats whose checkpoints are files (the byte-level and sniffing tests apply to them).
FILE_FORMATS = tuple(name for name in FORMATS if name not in FOLDER_FORMATS)


def extension(name: str) -> str:
    """A file extension of the format: its own, else one it claims by content (none for a
    folder format)."""
    record = REGISTRY[name]
    return (record.extensions or record.claims or ("",))[0]


def sample(tmp_path: Path, name: str) -> Path:
    require_extra(name)
    path = tmp_path / f"source{extension(name)}"
    if name in SAMPLES:
        SAMPLES[name](path)
    else:
        write_stats(two_layers(), path, name)
    return path


def assert_same_layers(a: BNStats, b: BNStats) -> None:
    assert list(a.layers) == list(b.layers)
    for name, layer in a.layers.items():
        other = b.layers[name]
        assert (layer.count, layer.dtype, dict(layer.keys)) == (
            other.count,
            other.dtype,
            dict(other.keys),
        )
        for role in ("mean", "var", "scale", "bias"):
            x, y = getattr(layer, role), getattr(other, role)
            assert (x is None) == (y is None), (name, role)
            if x is not None:
                np.testing.assert_array_equal(x, y, err_msg=f"{name}.{role}")


def test_the_registry_lists_every_format_once() -> None:
    assert FORMATS == tuple(REGISTRY) == tuple(f.name for f in REGISTRY.values())
    assert len(set(FORMATS)) == len(FORMATS)
    extensions = [ext for f in REGISTRY.values() for ext in f.extensions]
    assert len(set(extensions)) == len(extensions)


@pytest.mark.parametrize("name", FORMATS)
def test_every_extension_names_its_format(name: str) -> None:
    for ext in REGISTRY[name].extensions:
        assert ext == ext.lower() and ext.startswith(".")
        assert format_from_extension(f"dir/model{ext}") == name
        assert format_from_extension(f"MODEL{ext.upper()}") == name


@pytest.mark.parametrize("name", FORMATS)
def test_every_format_round_trips(tmp_path: Path, name: str) -> None:
    source = sample(tmp_path, name)
    first = read_stats(source)
    assert first.format == name == detect_format(source)
    assert list(first.layers) == ["block.bn", "head.bn"]
    np.testing.assert_array_equal(first.layers["block.bn"].var, f32([2.0, 0.75, 1.5]))
    np.testing.assert_array_equal(first.layers["head.bn"].mean, f32([1.0, 2.0]))
    again = tmp_path / f"again{extension(name)}"
    write_stats(first, again)
    second = read_stats(again)
    assert second.format == name and second.framework == first.framework
    assert_same_layers(first, second)
    if name not in FOLDER_FORMATS:  # a folder is rewritten by its framework, not byte by byte
        assert again.read_bytes() == source.read_bytes()  # nothing changed, nothing rewritten


@pytest.mark.parametrize("name", FILE_FORMATS)
def test_content_sniffing_recognises_each_format_and_no_other(tmp_path: Path, name: str) -> None:
    source = sample(tmp_path, name)
    head = source.read_bytes()[:16]
    claimed = [f.name for f in REGISTRY.values() if f.sniff is not None and f.sniff(head, source)]
    assert claimed == ([name] if REGISTRY[name].sniff is not None else [])
    if claimed:
        unknown = tmp_path / "renamed.bin"
        shutil.copyfile(source, unknown)
        assert detect_format(unknown) == name


@pytest.mark.parametrize("name", [f.name for f in REGISTRY.values() if f.extra is not None])
def test_a_missing_extra_is_explained(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    extra = REGISTRY[name].extra
    assert extra is not None
    for module in [m for m in sys.modules if m.split(".")[0] == extra.module] or [extra.module]:
        monkeypatch.setitem(sys.modules, module, None)
    path = tmp_path / f"model{extension(name)}"
    if name in FOLDER_FORMATS:  # a folder its record recognises, holding nothing readable
        path.mkdir()
        for marker in ("_METADATA", "_CHECKPOINT_METADATA"):
            (path / marker).write_bytes(b"not read: the extra is missing")
        assert REGISTRY[name].folder is not None and REGISTRY[name].folder(path)
    else:
        path.write_bytes(b"not read: the extra is missing")
    with pytest.raises(MissingDependencyError, match=rf"pip install 'varshift\[{extra.name}\]'"):
        read_stats(path)
