"""Orbax checkpoint folders of a Flax NNX state: a Linear → Dropout → BatchNorm model with known
statistics saved by Orbax itself (``StandardCheckpointer().save(path, nnx.state(model))``, the
Flax checkpointing guide's way, RNG key included), ``varshift inspect`` shows them, ``varshift
correct -o`` writes a new folder that Orbax restores into the model (``nnx.update``), with the
BN variance of the closed form (DESIGN §2, written out here) and every other leaf unchanged;
the input folder is hashed before and after. Bad folders and outputs are refused in one line."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from varshift.cli import app
from varshift.formats import read_stats

jax = pytest.importorskip("jax")
nnx = pytest.importorskip("flax.nnx")
ocp = pytest.importorskip("orbax.checkpoint")

pytestmark = pytest.mark.flax

RATE, BATCH = 0.2, 32
MEAN = np.float32([0.5, -1.0, 1.0, 0.0])
VAR = np.float32([4.0, 2.5, 1.0, 9.0])

runner = CliRunner()


class Net(nnx.Module):  # type: ignore[misc]
    """Linear → Dropout → BatchNorm (the BN directly follows the dropout)."""

    def __init__(self, rngs: Any) -> None:
        self.hidden = nnx.Linear(3, 4, rngs=rngs)
        self.drop = nnx.Dropout(RATE, rngs=rngs)
        self.bn = nnx.BatchNorm(4, rngs=rngs)

    def __call__(self, x: Any) -> Any:
        return self.bn(self.drop(self.hidden(x)))


def model_with_statistics() -> Any:
    model = Net(nnx.Rngs(0))
    model.bn.mean[...] = MEAN
    model.bn.var[...] = VAR
    model.bn.scale[...] = np.float32([1.0, 0.5, 2.0, 1.5])
    model.bn.bias[...] = np.float32([0.1, -0.2, 0.3, 0.0])
    return model


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``ckpt`` (StandardCheckpointer) and ``managed/3/default`` (CheckpointManager step 3)."""
    root = tmp_path_factory.mktemp("orbax")
    state = nnx.state(model_with_statistics())
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(root / "ckpt", state)
    with ocp.CheckpointManager(root / "managed") as manager:
        manager.save(3, args=ocp.args.StandardSave(state))
        manager.wait_until_finished()
    return {"ckpt": root / "ckpt", "step": root / "managed" / "3"}


def hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def restored_into_model(folder: Path) -> Any:
    """The Flax guide's restore: an abstract model's state as the target, then ``nnx.update``."""
    abstract = nnx.eval_shape(lambda: Net(nnx.Rngs(0)))
    _, target = nnx.split(abstract)
    with ocp.StandardCheckpointer() as checkpointer:
        state = checkpointer.restore(folder.absolute(), target)
    model = Net(nnx.Rngs(5))
    nnx.update(model, state)
    return model


def leaves(folder: Path) -> dict[str, np.ndarray]:
    """Every leaf of a folder restored by Orbax without a target (typed keys as their data)."""
    with ocp.StandardCheckpointer() as checkpointer:
        tree = checkpointer.restore(folder.absolute())
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        out[jax.tree_util.keystr(path)] = np.asarray(leaf)
    return out


def refused(*args: object) -> str:
    """Exit 2 with one line on stderr, no traceback; the line."""
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 2, (result.exit_code, result.stderr, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("varshift: error: "), result.stderr
    return lines[0]


@pytest.mark.filterwarnings("ignore::UserWarning")  # Orbax's own restores warn about sharding
def test_inspect_lists_the_batchnorm_statistics(folders: dict[str, Path]) -> None:
    stats = read_stats(folders["ckpt"])
    assert (stats.format, stats.framework, list(stats.layers)) == ("orbax", "flax", ["bn"])
    bn = stats.layers["bn"]
    assert dict(bn.keys) == {role: f"bn/{role}/value" for role in ("mean", "var", "scale", "bias")}
    np.testing.assert_array_equal(bn.var, VAR)
    np.testing.assert_array_equal(bn.mean, MEAN)
    np.testing.assert_array_equal(bn.scale, [1.0, 0.5, 2.0, 1.5])
    result = runner.invoke(app, ["inspect", str(folders["ckpt"]), "-f", "csv"])
    assert result.exit_code == 0, result.stderr
    header, row = result.stdout.strip().splitlines()
    fields = dict(zip(header.split(","), row.split(","), strict=False))
    assert fields["layer"] == "bn" and fields["channels"] == "4"
    assert float(fields["var_mean"]) == pytest.approx(float(VAR.mean()), rel=1e-9)
    assert float(fields["var_max"]) == 9.0 and float(fields["mean_min"]) == -1.0
    # a CheckpointManager's item folder is the same layout
    managed = read_stats(folders["step"] / "default")
    np.testing.assert_array_equal(managed.layers["bn"].var, VAR)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_correct_writes_a_folder_orbax_and_flax_load(
    folders: dict[str, Path], tmp_path: Path
) -> None:
    source, out = folders["ckpt"], tmp_path / "fixed"
    before = hashes(source)
    args = ["correct", source, "--rate", RATE, "--batch-size", BATCH, "-o", out, "-q"]
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.stderr
    assert hashes(source) == before  # the input folder is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fixed", "fixed.report.json"]
    # DESIGN §2, flax stores the biased variance: undo (n-1)/n, invert the dropout, re-apply it
    q, n = 1 - RATE, BATCH
    mu, stored = MEAN.astype(np.float64), VAR.astype(np.float64)
    test_variance = q * (stored * n / (n - 1) + mu**2) - mu**2
    expected = test_variance * (n - 1) / n
    model = restored_into_model(out)
    np.testing.assert_allclose(np.asarray(model.bn.var[...]), expected, rtol=1e-6)
    assert model.bn.var[...].dtype == np.float32
    np.testing.assert_array_equal(np.asarray(model.bn.mean[...]), MEAN)
    model.eval()
    assert np.isfinite(np.asarray(model(np.ones((2, 3), np.float32)))).all()
    old, new = leaves(source), leaves(out)
    assert old.keys() == new.keys()
    changed = [k for k in old if not np.array_equal(old[k], new[k])]
    assert changed == ["['bn']['var']['value']"]
    for key in old:
        assert old[key].dtype == new[key].dtype and old[key].shape == new[key].shape, key


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_force_replaces_only_a_checkpoint_folder(folders: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "fixed"
    stale = tmp_path / ".fixed.varshift-tmp-999999999"  # a killed run's temporary folder
    (stale / "d").mkdir(parents=True)
    base = ["correct", str(folders["ckpt"]), "--no-report", "-q", "-o", str(out)]
    first = runner.invoke(app, [*base, "--rate", "0.1"])
    assert first.exit_code == 0, first.stderr
    assert not stale.exists()
    assert "already exists" in refused(*base, "--rate", "0.2")
    second = runner.invoke(app, [*base, "--rate", "0.2", "--force"])
    assert second.exit_code == 0, second.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fixed"]  # no temporary folder left
    mu, stored = MEAN.astype(np.float64), VAR.astype(np.float64)
    np.testing.assert_allclose(
        read_stats(out).layers["bn"].var, 0.8 * (stored + mu**2) - mu**2, rtol=1e-6
    )
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    assert "not an Orbax checkpoint folder" in refused(
        "correct", folders["ckpt"], "--rate", "0.2", "-o", foreign, "--force", "--no-report"
    )
    assert (foreign / "keep.txt").read_text() == "mine"


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_numpy_and_float64_leaves_keep_their_type_without_ocdbt(tmp_path: Path) -> None:
    """A PyTreeCheckpointer(use_ocdbt=False) folder of NumPy leaves (float64 statistics, a
    float64 kernel, an int32 step) and jax leaves saved with 64-bit mode on."""
    source, out = tmp_path / "zarr", tmp_path / "fixed"
    with jax.enable_x64(True):
        tree = {
            "bn": {"mean": np.float64([0.5, -1.0]), "var": np.float64([4.0, 2.5])},
            "kernel": np.arange(6.0).reshape(2, 3),
            "step": np.int32(7),
            "jax64": jax.numpy.asarray([1.0, 2.0], dtype=jax.numpy.float64),
        }
        with ocp.PyTreeCheckpointer(use_ocdbt=False) as checkpointer:
            checkpointer.save(source.absolute(), tree)
    assert not (source / "manifest.ocdbt").exists()
    args = ["correct", source, "--rate", RATE, "-o", out, "--no-report", "-q"]
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.stderr
    assert not (out / "manifest.ocdbt").exists()  # the source's storage options kept
    with jax.enable_x64(True), ocp.PyTreeCheckpointer() as checkpointer:
        old, new = checkpointer.restore(source.absolute()), checkpointer.restore(out.absolute())
    flat_old = dict(jax.tree_util.tree_flatten_with_path(old)[0])
    flat_new = dict(jax.tree_util.tree_flatten_with_path(new)[0])
    for key, before in flat_old.items():
        after = flat_new[key]
        same_dtype = np.asarray(after).dtype == np.asarray(before).dtype
        assert type(after) is type(before) and same_dtype, key
    mu, stored = np.float64([0.5, -1.0]), np.float64([4.0, 2.5])
    np.testing.assert_allclose(new["bn"]["var"], (1 - RATE) * (stored + mu**2) - mu**2, rtol=1e-15)
    for key in (("kernel",), ("step",), ("jax64",), ("bn", "mean")):
        a, b = old, new
        for part in key:
            a, b = a[part], b[part]
        np.testing.assert_array_equal(np.asarray(b), np.asarray(a))


def test_bad_folders_and_outputs_are_refused_in_one_line(
    folders: dict[str, Path], tmp_path: Path
) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "weights.bin").write_bytes(b"x")
    assert "is a folder; expected a file" in refused("inspect", plain)
    cut = tmp_path / "cut"
    shutil.copytree(folders["ckpt"], cut)
    for data in (cut / "d").iterdir():  # the data file the manifest points to
        data.unlink()
    assert "not a readable Orbax checkpoint" in refused("inspect", cut)
    chunked = tmp_path / "chunked"  # a large array's chunk lives in a data file of its own
    tree = {"bn": {"mean": np.zeros(4, np.float32), "var": np.ones(4, np.float32)}}
    tree["kernel"] = np.arange(200_000, dtype=np.float32).reshape(400, 500)
    with ocp.PyTreeCheckpointer() as checkpointer:
        checkpointer.save(chunked.absolute(), tree)
    largest = max((p for p in chunked.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    assert largest.stat().st_size > tree["kernel"].nbytes // 2
    largest.unlink()  # read as an error, not as zeros
    assert "truncated or corrupt" in refused("correct", chunked, "--rate", "0.2", "--dry-run")
    step = folders["step"]
    assert f"give its item folder ({step / 'default'})" in refused("inspect", step)
    source = folders["ckpt"]
    before = hashes(source)
    inside = refused("correct", source, "--rate", "0.2", "-o", source / "fixed")
    assert "inside the input folder" in inside
    holder = tmp_path / "holder"
    shutil.copytree(source, holder / "ckpt")
    contains = refused("correct", holder / "ckpt", "--rate", "0.2", "-o", holder, "--force")
    assert "contains the input" in contains
    assert "is the input" in refused("correct", source, "--rate", "0.2", "-o", source, "--force")
    assert hashes(source) == before and hashes(holder / "ckpt") == before


def test_other_commands_do_not_import_orbax_or_jax() -> None:
    code = (
        "import sys, varshift.cli, varshift.formats, varshift.formats.flax_orbax; "
        "print(sorted(m for m in ('jax', 'orbax', 'tensorstore', 'flax') if m in sys.modules))"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr
