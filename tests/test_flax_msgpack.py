"""Flax msgpack checkpoints (``.msgpack``) without flax: the files are built here by hand with
the encoding of ``flax/serialization.py`` (a map; each array an ExtType 1 whose payload is
``msgpack.packb((shape, dtype name, C-order bytes))``, code 3 for a NumPy scalar), read by
varshift, rewritten with only the changed leaves' bytes different. With flax installed, a real
Linen variables dict is read and the corrected file restored by flax itself."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from varshift.cli import app
from varshift.core.errors import InputFileError
from varshift.formats import detect_format, read_stats, write_stats

msgpack = pytest.importorskip("msgpack")


def ext(values: Any, dtype: str = "float32", code: int = 1) -> Any:
    """flax.serialization._msgpack_ext_pack, written out."""
    arr = np.asarray(values, dtype=dtype)
    payload = msgpack.packb((arr.shape, arr.dtype.name, arr.tobytes("C")), use_bin_type=True)
    return msgpack.ExtType(code, payload)


def unext(code: int, data: bytes) -> Any:
    shape, dtype, buffer = msgpack.unpackb(data, raw=True)
    arr = np.frombuffer(buffer, dtype=np.dtype(dtype.decode())).reshape(shape)
    return arr[()] if code == 3 else arr


def leaves(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(leaves(v, f"{prefix}/{k}" if prefix else str(k)))
        return out
    return {prefix: tree}


def decoded(path: Path) -> dict[str, Any]:
    return leaves(msgpack.unpackb(path.read_bytes(), ext_hook=unext, strict_map_key=False))


def nnx_tree() -> dict[str, Any]:
    """``nnx.to_pure_dict(nnx.state(model))`` of Linear → Dropout → BatchNorm, plus leaves of
    every other kind a state dict may hold (NumPy scalar, int, str, list)."""
    return {
        "bn1": {
            "bias": ext([0.1, -0.2, 0.3]),
            "mean": ext([0.5, 1.0, -1.5]),
            "scale": ext([1.0, 2.0, 0.5]),
            "var": ext([4.0, 2.0, 1.0]),
        },
        "hidden": {"bias": ext([0.0, 0.0, 0.0]), "kernel": ext(np.arange(12.0).reshape(4, 3))},
        "step": ext(7, "int32", code=3),
        "note": "kept",
        "sizes": [3, 4],
        "lr": 0.01,
    }


def write(path: Path, tree: dict[str, Any]) -> Path:
    path.write_bytes(msgpack.packb(tree, use_bin_type=True))
    return path


def test_nnx_state_layers_and_keys(tmp_path: Path) -> None:
    stats = read_stats(write(tmp_path / "model.msgpack", nnx_tree()))
    assert stats.format == "flax" and stats.framework == "flax"
    assert list(stats.layers) == ["bn1"]
    bn = stats.layers["bn1"]
    assert dict(bn.keys) == {"mean": "bn1/mean", "var": "bn1/var", "scale": "bn1/scale",
                             "bias": "bn1/bias"}  # fmt: skip
    np.testing.assert_array_equal(bn.var, [4.0, 2.0, 1.0])
    np.testing.assert_array_equal(bn.mean, [0.5, 1.0, -1.5])
    np.testing.assert_array_equal(bn.scale, [1.0, 2.0, 0.5])
    assert bn.dtype == "float32" and bn.count is None


def test_a_corrected_file_differs_only_in_the_changed_leaf(tmp_path: Path) -> None:
    source = write(tmp_path / "model.msgpack", nnx_tree())
    stats = read_stats(source)
    bn = stats.layers["bn1"]
    new = type(bn)(**{**bn.__dict__, "var": np.array([1.0, 0.5, 0.25])})
    out = write_stats(stats.with_layers({"bn1": new}), tmp_path / "fixed.msgpack")
    before, after = decoded(source), decoded(out)
    assert list(before) == list(after)
    changed = [k for k in before if not np.array_equal(before[k], after[k])]
    assert changed == ["bn1/var"]
    np.testing.assert_array_equal(after["bn1/var"], np.float32([1.0, 0.5, 0.25]))
    assert after["bn1/var"].dtype == np.float32
    a, b = source.read_bytes(), out.read_bytes()
    assert len(a) == len(b)
    diff = [i for i in range(len(a)) if a[i] != b[i]]
    at = a.index(ext([4.0, 2.0, 1.0]).data)  # the variance's payload in the source
    assert diff and at <= diff[0] and diff[-1] < at + len(ext([4.0, 2.0, 1.0]).data)


def test_linen_variables_take_scale_and_bias_from_params(tmp_path: Path) -> None:
    tree = {
        "batch_stats": {"BatchNorm_0": {"mean": ext([1.0, 2.0]), "var": ext([3.0, 4.0])}},
        "params": {
            "BatchNorm_0": {"bias": ext([0.5, 0.5]), "scale": ext([2.0, 2.0])},
            "Dense_0": {"bias": ext([0.0, 0.0]), "kernel": ext(np.ones((3, 2)))},
        },
    }
    stats = read_stats(write(tmp_path / "vars.msgpack", tree))
    bn = stats.layers["batch_stats/BatchNorm_0"]
    assert bn.keys["scale"] == "params/BatchNorm_0/scale"
    np.testing.assert_array_equal(bn.scale, [2.0, 2.0])
    np.testing.assert_array_equal(bn.bias, [0.5, 0.5])


def test_older_state_dicts_with_value_leaves(tmp_path: Path) -> None:
    tree = {"bn": {"mean": {"value": ext([0.0])}, "var": {"value": ext([2.0], "float64")}}}
    source = write(tmp_path / "old.msgpack", tree)
    stats = read_stats(source)
    bn = stats.layers["bn"]
    assert (bn.keys["var"], bn.dtype) == ("bn/var/value", "float64")
    new = type(bn)(**{**bn.__dict__, "var": np.array([1.0 / 3.0])})
    out = write_stats(stats.with_layers({"bn": new}), tmp_path / "fixed.msgpack")
    assert decoded(out)["bn/var/value"][0] == 1.0 / 3.0


def test_a_file_without_batchnorm_has_no_layers(tmp_path: Path) -> None:
    stats = read_stats(write(tmp_path / "m.msgpack", {"dense": {"kernel": ext([[1.0]])}}))
    assert dict(stats.layers) == {}


def test_content_sniffing(tmp_path: Path) -> None:
    path = write(tmp_path / "state.bin", nnx_tree())
    assert detect_format(path) == "flax"


def bad(tmp_path: Path, name: str, data: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(InputFileError):
        read_stats(path)
    result = CliRunner().invoke(app, ["inspect", str(path)])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and "Traceback" not in result.stderr
    return lines[0]


def test_bad_files_are_refused_in_one_line(tmp_path: Path) -> None:
    whole = msgpack.packb(nnx_tree(), use_bin_type=True)
    assert "truncated" in bad(tmp_path, "cut.msgpack", whole[: len(whole) // 2])
    assert "no map" in bad(tmp_path, "list.msgpack", msgpack.packb([1, 2]))
    assert "after the msgpack map" in bad(tmp_path, "tail.msgpack", whole + b"\x00")
    bf16 = msgpack.ExtType(1, msgpack.packb(((2,), "bfloat16", bytes(4)), use_bin_type=True))
    tree = {"bn": {"mean": bf16, "var": bf16}}
    assert "bfloat16" in bad(tmp_path, "bf16.msgpack", msgpack.packb(tree, use_bin_type=True))
    junk = {"bn": {"mean": msgpack.ExtType(1, b"\x01"), "var": ext([1.0])}}
    assert "not a flax array" in bad(tmp_path, "junk.msgpack", msgpack.packb(junk))


# --- with flax: its own files, and its own reading of ours ------------------------------------


def test_flax_linen_variables_round_trip(tmp_path: Path) -> None:
    jax = pytest.importorskip("jax")
    linen = pytest.importorskip("flax.linen")
    serialization = pytest.importorskip("flax.serialization")

    class Net(linen.Module):  # type: ignore[misc]
        @linen.compact
        def __call__(self, x: Any) -> Any:
            x = linen.Dropout(0.5, deterministic=False)(linen.Dense(4)(x))
            return linen.BatchNorm(use_running_average=False)(x)

    x = np.random.default_rng(0).normal(size=(16, 3)).astype(np.float32)
    net = Net()
    variables = net.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, x)
    _, updated = net.apply(variables, x, rngs={"dropout": jax.random.key(2)}, mutable=True)
    variables = {"params": variables["params"], **updated}
    source = tmp_path / "linen.msgpack"
    source.write_bytes(serialization.to_bytes(variables))

    stats = read_stats(source)
    bn = stats.layers["batch_stats/BatchNorm_0"]
    var = np.asarray(variables["batch_stats"]["BatchNorm_0"]["var"])
    np.testing.assert_array_equal(bn.var, var)
    np.testing.assert_array_equal(bn.scale, np.ones(4))
    new = type(bn)(**{**bn.__dict__, "var": bn.var / 2})
    out = write_stats(stats.with_layers({bn.name: new}), tmp_path / "fixed.msgpack")
    restored = serialization.from_bytes(variables, out.read_bytes())
    np.testing.assert_array_equal(
        restored["batch_stats"]["BatchNorm_0"]["var"],
        (var / 2).astype(np.float32),
    )
    same = jax.tree_util.tree_map(np.array_equal, restored["params"], variables["params"])
    assert all(jax.tree_util.tree_leaves(same))
