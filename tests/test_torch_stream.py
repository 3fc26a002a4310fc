"""ChannelMoments against numpy on the whole stream at once (float64 oracle)."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.torch
torch = pytest.importorskip("torch")

from varshift.frameworks.torch.stream import ChannelMoments  # noqa: E402


@pytest.mark.parametrize("flush", [1, 3, 64])
def test_streamed_moments_equal_numpy_over_uneven_batches_and_flushes(flush: int) -> None:
    rng = np.random.default_rng(4)
    sizes = [7, 1, 30, 2, 11, 5, 9, 3, 16, 4]  # uneven, and more batches than a small flush
    chunks = [rng.normal(3.0, 2.0, size=(n, 5, 2, 3)) for n in sizes]
    moments = ChannelMoments()
    moments.FLUSH = flush
    for chunk in chunks:
        moments.add(torch.from_numpy(chunk))
    # channel-last, flattened: every element of each channel, all batches together
    z = np.concatenate([c.transpose(0, 2, 3, 1).reshape(-1, 5) for c in chunks])
    assert moments.count == z.shape[0]
    assert moments.mean is not None
    np.testing.assert_allclose(moments.mean.numpy(), z.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(moments.population_var().numpy(), z.var(axis=0), rtol=1e-12)
    np.testing.assert_allclose(moments.unbiased_var().numpy(), z.var(axis=0, ddof=1), rtol=1e-12)
