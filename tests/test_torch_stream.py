"""ChannelMoments and BatchVarMean against numpy on the whole stream at once (float64 oracle),
and their between-batch standard errors against the closed forms for i.i.d. data."""

from __future__ import annotations

import math

import numpy as np
import pytest

pytestmark = pytest.mark.torch
torch = pytest.importorskip("torch")

from varshift.frameworks.torch.stream import BatchVarMean, ChannelMoments  # noqa: E402


def test_streamed_moments_equal_numpy_over_uneven_batches() -> None:
    rng = np.random.default_rng(4)
    sizes = [7, 1, 30, 2, 11, 5, 9, 3, 16, 4]  # uneven, the second a single sample
    chunks = [rng.normal(3.0, 2.0, size=(n, 5, 2, 3)) for n in sizes]
    moments = ChannelMoments()
    for chunk in chunks:
        moments.add(torch.from_numpy(chunk))
    # channel-last, flattened: every element of each channel, all batches together
    z = np.concatenate([c.transpose(0, 2, 3, 1).reshape(-1, 5) for c in chunks])
    assert moments.count == z.shape[0]
    assert moments.mean is not None
    np.testing.assert_allclose(moments.mean.numpy(), z.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(moments.population_var().numpy(), z.var(axis=0), rtol=1e-12)
    np.testing.assert_allclose(moments.unbiased_var().numpy(), z.var(axis=0, ddof=1), rtol=1e-12)


def test_float32_stream_with_a_large_offset_keeps_float32_accuracy() -> None:
    # mean/std = 1e4: unshifted float32 sums of x² would lose every digit of the variance
    rng = np.random.default_rng(5)
    chunks = [rng.normal(1e4, 1.0, size=(256, 3)) for _ in range(20)]
    moments = ChannelMoments()
    for chunk in chunks:
        moments.add(torch.from_numpy(chunk).float())
    z = np.concatenate([c.astype(np.float32).astype(np.float64) for c in chunks])
    # float32 rounding of (x - c) with |x - c| of a few units: ~1e-7 relative per element
    np.testing.assert_allclose(moments.population_var().numpy(), z.var(axis=0), rtol=1e-5)
    np.testing.assert_allclose(moments.mean.numpy(), z.mean(axis=0), rtol=1e-9)


@pytest.mark.parametrize(
    ("draw", "kurtosis"),
    [
        (lambda rng, size: rng.normal(2.0, 3.0, size), 3.0),
        (lambda rng, size: rng.exponential(2.0, size), 9.0),
    ],
)
def test_between_batch_standard_error_matches_the_fourth_moment_formula(
    draw: object, kurtosis: float
) -> None:
    # i.i.d. elements: se(var)/var = sqrt((m4/var² - 1)/N), m4/var² = 3 (normal), 9 (exponential)
    batches, size, channels = 400, 64, 4
    rng = np.random.default_rng(6)
    moments = ChannelMoments()
    for _ in range(batches):
        moments.add(torch.from_numpy(draw(rng, (size, channels))))  # type: ignore[operator]
    got = moments.var_rel_se()
    assert got is not None
    want = math.sqrt((kurtosis - 1.0) / (batches * size))
    # the batch-means estimate has its own relative error ~ sqrt((kurt_g - 1)/(2(B-1)))-ish;
    # 1/sqrt(2(B-1)) = 3.5 % for Gaussian g; allow 4 of those, doubled for the heavy tail
    tol = 4 / math.sqrt(2 * (batches - 1)) * (1.0 if kurtosis == 3.0 else 2.0)
    np.testing.assert_allclose(got.numpy(), want, rtol=tol)


def test_too_few_batches_give_no_standard_error() -> None:
    moments, on = ChannelMoments(), BatchVarMean()
    for _ in range(ChannelMoments.MIN_BATCHES - 1):
        x = torch.randn(16, 3, dtype=torch.float64)
        moments.add(x)
        on.add(x)
    assert moments.var_rel_se() is None and on.rel_se() is None


def test_batch_var_mean_equals_numpy_and_its_spread() -> None:
    rng = np.random.default_rng(7)
    chunks = [rng.normal(-1.0, 0.5, size=(32, 6, 4)) for _ in range(10)]
    acc = BatchVarMean()
    for chunk in chunks:
        acc.add(torch.from_numpy(chunk))
    per_batch = np.array([c.transpose(0, 2, 1).reshape(-1, 6).var(axis=0, ddof=1) for c in chunks])
    assert acc.value() is not None
    np.testing.assert_allclose(acc.value().numpy(), per_batch.mean(axis=0), rtol=1e-12)
    want = per_batch.std(axis=0, ddof=1) / math.sqrt(10) / per_batch.mean(axis=0)
    rel = acc.rel_se()
    assert rel is not None
    np.testing.assert_allclose(rel.numpy(), want, rtol=1e-9)


def test_many_uneven_batches_fold_exactly() -> None:
    # more batches than the buffer holds (two folds and a partial one), uneven sizes: totals,
    # the between-batch standard error and the batch-variance mean against numpy per batch
    rng = np.random.default_rng(8)
    sizes = rng.integers(2, 40, size=150)
    chunks = [rng.normal(1.5, 0.7, size=(int(n), 3, 2)) for n in sizes]
    moments, on = ChannelMoments(), BatchVarMean()
    for chunk in chunks:
        moments.add(torch.from_numpy(chunk))
        on.add(torch.from_numpy(chunk))
    flat = [c.transpose(0, 2, 1).reshape(-1, 3) for c in chunks]
    z = np.concatenate(flat)
    np.testing.assert_allclose(moments.population_var().numpy(), z.var(axis=0), rtol=1e-12)
    np.testing.assert_allclose(moments.mean.numpy(), z.mean(axis=0), rtol=1e-12)
    # ratio estimator of the variance's standard error, written out batch by batch
    w = np.array([len(f) for f in flat], dtype=float)
    a_mean, var = z.mean(axis=0), z.var(axis=0)
    g = np.array([np.mean(f**2, axis=0) - 2 * a_mean * np.mean(f, axis=0) for f in flat])
    g_bar = (w[:, None] * g).sum(axis=0) / w.sum()
    b = len(flat)
    spread = (w[:, None] ** 2 * (g - g_bar) ** 2).sum(axis=0) * b / (b - 1)
    want = np.sqrt(spread) / w.sum() / var
    got = moments.var_rel_se()
    assert got is not None
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-9)
    per_batch = np.array([f.var(axis=0, ddof=1) for f in flat])
    value = on.value()
    assert value is not None and on.batches == b
    np.testing.assert_allclose(value.numpy(), per_batch.mean(axis=0), rtol=1e-12)


@pytest.mark.parametrize("shape", [(256, 6), (128, 6, 5)])
def test_float32_batches_near_zero_mean_keep_float32_accuracy(shape: tuple[int, ...]) -> None:
    # (N, C) and (N, C, L) inputs with |mean| of a few sd take torch's BatchNorm statistics
    # kernel per batch: a float32 mean and variance, each within a few ulps (pairwise sums over
    # <= 640 values: ~log2(640) eps = 6e-7 relative), folded in float64
    rng = np.random.default_rng(9)
    chunks = [rng.normal(3.0, 1.5, size=shape).astype(np.float32) for _ in range(40)]
    moments = ChannelMoments()
    for chunk in chunks:
        moments.add(torch.from_numpy(chunk))
    z = np.concatenate([np.moveaxis(c, 1, -1).reshape(-1, 6).astype(np.float64) for c in chunks])
    np.testing.assert_allclose(moments.population_var().numpy(), z.var(axis=0), rtol=2e-6)
    np.testing.assert_allclose(moments.mean.numpy(), z.mean(axis=0), rtol=2e-6)


def test_a_stream_that_changes_dtype_is_summed_in_the_first_dtype() -> None:
    rng = np.random.default_rng(10)
    chunks = [rng.normal(0.5, 1.0, size=(64, 4)) for _ in range(6)]
    moments = ChannelMoments()
    for i, chunk in enumerate(chunks):
        t = torch.from_numpy(chunk)
        moments.add(t if i % 2 == 0 else t.float())
    z = np.concatenate(
        [c if i % 2 == 0 else c.astype(np.float32).astype(np.float64) for i, c in enumerate(chunks)]
    )
    np.testing.assert_allclose(moments.population_var().numpy(), z.var(axis=0), rtol=1e-12)
