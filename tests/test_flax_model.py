"""The seed-style Flax NNX model: an MLP with ``nnx.Dropout`` → ``nnx.BatchNorm`` trained with
optax on scikit-learn's digits, its state saved the way the Flax NNX docs show
(``nnx.to_pure_dict(nnx.state(model, ...))`` through ``flax.serialization.to_bytes``), then
``varshift inspect`` and ``varshift correct`` on the ``.msgpack`` file, the corrected file loaded
back into the model (``from_bytes``, ``nnx.replace_by_pure_dict``, ``nnx.update``), and the
corrected running variance compared with the variance the BN layer really sees in
``model.eval()`` over the data.

As in ``test_correct_ground_truth.py``: after training, the weights are frozen and the BN
statistics are reset and re-recorded in ``model.train()`` over batches drawn with replacement,
so that they are an EMA over independent draws of one distribution and their noise is the one
of DESIGN §2 (:func:`test_correct_ground_truth.band`, from the EMA's effective sample size).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_correct_ground_truth import Z, band, varshift

from varshift.core.presets import resolve_preset
from varshift.formats import read_stats

jax = pytest.importorskip("jax")
nnx = pytest.importorskip("flax.nnx")
optax = pytest.importorskip("optax")
serialization = pytest.importorskip("flax.serialization")
datasets = pytest.importorskip("sklearn.datasets")

pytestmark = pytest.mark.flax

RATE, WIDTH, N, STEPS = 0.5, 32, 8, 1000


class MLP(nnx.Module):  # type: ignore[misc]
    """Linear → ReLU → Dropout → BatchNorm → Linear (the BN directly follows the dropout)."""

    def __init__(self, rngs: Any) -> None:
        self.hidden = nnx.Linear(64, WIDTH, rngs=rngs)
        self.drop = nnx.Dropout(RATE, rngs=rngs)
        self.bn = nnx.BatchNorm(WIDTH, rngs=rngs)
        self.head = nnx.Linear(WIDTH, 10, rngs=rngs)

    def features(self, x: Any) -> Any:
        return nnx.relu(self.hidden(x))

    def __call__(self, x: Any) -> Any:
        return self.head(self.bn(self.drop(self.features(x))))


def checkpointed(model: Any) -> Any:
    """What is saved: parameters and batch statistics (the Dropout's RNG key is not an array
    msgpack can hold)."""
    return nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))


def train(model: Any, x: np.ndarray, y: np.ndarray) -> None:
    """Adam on the cross-entropy, 6 epochs of batches of 64, dropout on."""
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit  # type: ignore[untyped-decorator]
    def step(model: Any, optimizer: Any, xb: Any, yb: Any) -> None:
        def loss(m: Any) -> Any:
            return optax.softmax_cross_entropy_with_integer_labels(m(xb), yb).mean()

        optimizer.update(model, nnx.grad(loss)(model))

    model.train()
    rng = np.random.default_rng(1)
    for _ in range(6):
        order = rng.permutation(len(x))
        for start in range(0, len(x), 64):
            idx = order[start : start + 64]
            step(model, optimizer, x[idx], y[idx])


def record_statistics(model: Any, x: np.ndarray) -> None:
    """Frozen weights; BN statistics reset to 0/1 and re-recorded in ``model.train()``."""
    model.bn.mean[...] = np.zeros(WIDTH, np.float32)
    model.bn.var[...] = np.ones(WIDTH, np.float32)
    model.train()
    forward = nnx.jit(lambda m, xb: m(xb))
    rng = np.random.default_rng(2)
    for _ in range(STEPS):
        forward(model, x[rng.integers(0, len(x), N)])


def load(path: Path) -> Any:
    """A fresh model (other initial weights) with the state of a ``.msgpack`` file."""
    model = MLP(nnx.Rngs(7))
    state = checkpointed(model)
    restored = serialization.from_bytes(nnx.to_pure_dict(state), path.read_bytes())
    nnx.replace_by_pure_dict(state, restored)
    nnx.update(model, state)
    model.eval()
    return model


def f64(a: Any) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def test_nnx_model_checkpoint_is_inspected_corrected_and_loads_back(tmp_path: Path) -> None:
    xs, ys = datasets.load_digits(return_X_y=True)
    x, y = (xs / 16.0).astype(np.float32), ys.astype(np.int32)
    model = MLP(nnx.Rngs(0))
    train(model, x, y)
    record_statistics(model, x)
    source = tmp_path / "model.msgpack"
    source.write_bytes(serialization.to_bytes(nnx.to_pure_dict(checkpointed(model))))

    stats = read_stats(source)
    assert list(stats.layers) == ["bn"] and stats.framework == "flax"
    assert dict(stats.layers["bn"].keys) == {
        "mean": "bn/mean",
        "var": "bn/var",
        "scale": "bn/scale",
        "bias": "bn/bias",
    }
    shown = varshift("inspect", source)
    assert "bn" in shown and "flax" in shown.lower()

    common = ["--rate", str(RATE), "--batch-size", str(N)]
    varshift("correct", source, *common, "--target", "population", "-o", tmp_path / "pop.msgpack")
    varshift("correct", source, *common, "-o", tmp_path / "framework.msgpack")
    fixed = {name: load(tmp_path / f"{name}.msgpack") for name in ("pop", "framework")}

    # Everything but the running variance is what was saved; the file differs nowhere else.
    before = serialization.msgpack_restore(source.read_bytes())
    after = serialization.msgpack_restore((tmp_path / "pop.msgpack").read_bytes())
    flat_before = dict(jax.tree_util.tree_leaves_with_path(before))
    flat_after = dict(jax.tree_util.tree_leaves_with_path(after))
    assert flat_before.keys() == flat_after.keys()
    changed = [k for k in flat_before if not np.array_equal(flat_before[k], flat_after[k])]
    assert [jax.tree_util.keystr(k) for k in changed] == ["['bn']['var']"]
    saved = dict(nnx.to_flat_state(checkpointed(model)))
    loaded = dict(nnx.to_flat_state(checkpointed(fixed["pop"])))
    assert loaded.keys() == saved.keys()
    for name, value in loaded.items():
        if name != ("bn", "var"):
            np.testing.assert_array_equal(value[...], saved[name][...], err_msg=str(name))

    # The truth: the BN input in model.eval() (dropout off) over all the data.
    model.eval()
    clean = f64(model.drop(model.features(x)))
    truth = clean.var(axis=0)
    stored_mean, stored = f64(model.bn.mean[...]), f64(model.bn.var[...])
    live = truth > 1e-3 * truth.max()  # a ReLU unit that never fires has nothing to correct
    assert live.sum() >= WIDTH // 2
    sd = band(clean, stored_mean, RATE, resolve_preset("flax"), N, STEPS)[live]
    corrected = f64(fixed["pop"].bn.var[...])
    truth_live, corrected_live = truth[live], corrected[live]
    z = (corrected_live - truth_live) / sd
    assert np.all(np.abs(z) < Z), z
    ratio = corrected_live / truth_live  # 1.00 within the EMA's noise (sd / truth)
    assert np.all(np.abs(ratio - 1) < Z * sd / truth_live), ratio
    assert abs(np.mean(ratio) - 1) < 0.1
    assert np.mean(stored[live] / truth_live) > 1.5  # the uncorrected mismatch is real
    # The default target is what Flax would store without dropout: the biased (n-1)/n of it.
    framework = f64(fixed["framework"].bn.var[...])
    np.testing.assert_allclose(framework, corrected * (N - 1) / N, rtol=1e-6)

    # The corrected model normalises with the corrected statistics in model.eval().
    out = f64(fixed["pop"].bn(clean.astype(np.float32)))
    scale, bias = f64(fixed["pop"].bn.scale[...]), f64(fixed["pop"].bn.bias[...])
    want = (clean - stored_mean) / np.sqrt(corrected + 1e-5) * scale + bias
    np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-4)
