"""Random draws of a run (dataset, linear weights) and the streamed schedule of chunks.

``rng`` is split (``Generator.spawn``) into independent streams for the dataset, the linear
weights, the per-epoch permutations and the dropout noise (:func:`split_streams`), so the noise of
a batch does not depend on how the work is chunked. Work proceeds in chunks of whole epochs (or
of batches inside one large epoch) of about ``chunk_elements`` numbers (:func:`chunks`), so
memory does not grow with epochs or steps.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
from numpy.typing import NDArray

from varshift.engine.config import Plan
from varshift.engine.inputs import INPUT_DIST_REGISTRY

FloatArray = NDArray[np.float64]


class Streams(NamedTuple):
    """The independent random streams of one run, in the order they are spawned."""

    data: np.random.Generator
    weights: np.random.Generator
    perm: np.random.Generator
    noise: np.random.Generator


def split_streams(rng: np.random.Generator | int | None) -> Streams:
    """Normalise ``rng`` and spawn the run's four streams (their order fixes every output)."""
    return Streams(*np.random.default_rng(rng).spawn(4))


def dataset(plan: Plan, rng: np.random.Generator) -> FloatArray:
    """The dataset rows: synthetic, the recorded data, or rows drawn from it with replacement."""
    if plan.data is None:
        return draw_synthetic(plan, rng)
    if plan.resample:
        return plan.data[rng.integers(0, plan.data.shape[0], size=plan.rows)]
    return plan.data


def draw_synthetic(plan: Plan, rng: np.random.Generator) -> FloatArray:
    """Synthetic dataset rows; ``linear`` inputs are equicorrelated with ``rho``.

    Equicorrelation uses the symmetric square root of ``S = v((1-rho) I + rho 11')``:
    ``x = c + sqrt(v) (sqrt(1-rho) (u - mean(u)) + sqrt(1+(d-1) rho) mean(u))`` for standardised
    i.i.d. draws ``u``. Means and covariance are exact; the marginals are exactly the chosen
    distribution for ``normal`` (any rho) and for ``rho = 0``.
    """
    dist = INPUT_DIST_REGISTRY[plan.input_dist]
    shape = (plan.rows, *plan.row_shape)
    x = dist.draw(plan.mean, plan.std, shape, rng)
    if not plan.topo.mixes or plan.rho == 0.0:
        return x
    mom = dist.moments(plan.mean, plan.std**2)
    c, v = mom.mean, max(mom.var, 0.0)
    u = (x - c) / math.sqrt(v) if v > 0 else np.zeros(shape)
    ubar = u.mean(axis=1, keepdims=True)
    d = plan.width
    s_perp = math.sqrt(max(1.0 - plan.rho, 0.0))
    s_par = math.sqrt(max(1.0 + (d - 1) * plan.rho, 0.0))
    return np.asarray(c + math.sqrt(v) * (s_perp * (u - ubar) + s_par * ubar))


def linear_weights(plan: Plan, rng: np.random.Generator) -> FloatArray | None:
    """The ``linear`` topology's ``(features, width)`` map (given or drawn); ``None`` otherwise."""
    if not plan.topo.mixes:
        return None
    return plan.weights if plan.weights is not None else draw_weights(plan, rng)


def draw_weights(plan: Plan, rng: np.random.Generator) -> FloatArray:
    """``(features, width)`` weights: i.i.d. ``N(0, 1/d)``, or unit rows with ``cos²θ = cos2``.

    With ``cos2``: ``w = cos θ 1/sqrt(d) + sin θ z⊥/|z⊥|`` where ``z⊥`` is a normal vector with
    its mean removed, so ``(sum w)² / (d sum w²) = cos2`` exactly and ``sum w >= 0``.
    """
    d, f = plan.width, plan.features
    z = rng.standard_normal((f, d))
    if plan.cos2 is None:
        return np.asarray(z / math.sqrt(d))
    common = math.sqrt(plan.cos2 / d)
    if d == 1:
        return np.full((f, 1), common)
    perp = z - z.mean(axis=1, keepdims=True)
    perp /= np.linalg.norm(perp, axis=1, keepdims=True)
    return np.asarray(common + math.sqrt(1.0 - plan.cos2) * perp)


# --- the streamed schedule ----------------------------------------------------------------------


class ChunkSpec(NamedTuple):
    """Epochs ``[epoch, epoch + n_epochs)`` share rows ``[r0, r1)`` of their permutations."""

    epoch: int  # first epoch
    n_epochs: int
    r0: int  # row range in each epoch's permutation
    r1: int


def chunks(plan: Plan) -> Iterator[ChunkSpec]:
    """Split the schedule into chunks of whole epochs, or of batches inside one epoch."""
    used, per_epoch, b = plan.used_rows, plan.per_epoch, plan.batch
    done, epoch = 0, 0
    while done < plan.steps:
        left = plan.steps - done
        if used <= plan.chunk_rows:
            whole = left // per_epoch
            if whole >= 1:
                e = min(whole, max(1, plan.chunk_rows // used))
                yield ChunkSpec(epoch, e, 0, used)
                epoch, done = epoch + e, done + e * per_epoch
            else:  # a final partial epoch: its first `left` batches are all full ones
                yield ChunkSpec(epoch, 1, 0, left * b)
                epoch, done = epoch + 1, done + left
            continue
        r0 = 0
        while r0 < used and done < plan.steps:
            r1 = min(used, r0 + plan.chunk_rows)
            n_steps = len(batch_sizes(plan, r0, r1))
            if done + n_steps > plan.steps:
                r1 = r0 + (plan.steps - done) * b
                n_steps = plan.steps - done
            yield ChunkSpec(epoch, 1, r0, r1)
            r0, done = r1, done + n_steps
        epoch += 1


def batch_sizes(plan: Plan, r0: int, r1: int) -> tuple[int, ...]:
    """Rows of each batch in rows ``[r0, r1)`` of an epoch (``r0`` is a batch boundary)."""
    full_end = plan.full_batches * plan.batch
    k = (min(r1, full_end) - r0) // plan.batch
    tail = (plan.last,) if r1 > full_end else ()
    return (plan.batch,) * k + tail


class Scratch:
    """Named flat buffers reused across chunks, handed out as views of the wanted shape.

    A chunk's arrays are the same size every time; allocating them afresh costs page faults
    and zeroing of new memory once they exceed malloc's mmap threshold (``bench/``).
    """

    def __init__(self) -> None:
        self._buffers: dict[str, FloatArray] = {}

    def get(self, name: str, shape: tuple[int, ...]) -> FloatArray:
        """A buffer of ``shape`` (its contents are whatever the last user left)."""
        size = math.prod(shape)
        buf = self._buffers.get(name)
        if buf is None or buf.size < size:
            buf = self._buffers[name] = np.empty(size)
        return buf[:size].reshape(shape)
