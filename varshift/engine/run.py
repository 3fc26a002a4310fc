"""Monte Carlo of a Dropout → BatchNorm pipeline, run the way a framework's training loop runs it.

A dataset of ``samples`` rows is drawn once (or given), then trained over ``epochs`` (or for
``steps`` batches) with a fresh permutation of the rows per epoch and mini-batches of
``batch_size`` rows. Every batch passes dropout in training mode and, for the ``linear``
topology, a fixed linear map; the BatchNorm layer then records, per feature (channel)::

    m_t = batch mean,  s_t = stored batch variance (÷ (n-1) or ÷ n, per preset)
    R_t = alpha R_{t-1} + (1 - alpha) s_t,   R_0 = 0 (mean), 1 (variance)
    torch momentum=None:  R_t = R_{t-1} + (s_t - R_{t-1}) / t   (cumulative average)

``n`` is the number of elements reduced per channel: the batch's rows, times ``H·W`` for the
``conv`` topology.

Conventions
-----------
* **Last batch of an epoch.** When ``batch_size`` does not divide the rows, the last batch of
  every epoch is smaller, as with PyTorch's ``DataLoader(drop_last=False)`` and Keras ``fit``;
  ``drop_last=True`` drops it (``DataLoader(drop_last=True)``). A last batch too small for the
  preset (one element with an unbiased stored variance — PyTorch raises then) is an error.
* **Steps.** ``steps`` stops after exactly that many batches (the last epoch may be partial);
  otherwise ``epochs`` full epochs are run.
* **Randomness.** ``rng`` is split into independent streams for the dataset, the linear weights,
  the per-epoch permutations and the dropout noise (:mod:`varshift.engine.sampling`), so the
  noise of a batch does not depend on how the work is chunked.
* **Streaming.** Work proceeds in chunks of whole epochs (or of batches inside one large
  epoch) of about ``chunk_elements`` numbers, so memory does not grow with epochs or steps.
  Inside a chunk everything is vectorised over batches and features, and the running averages
  advance by a weighted sum: ``R_K = alpha^K R_0 + (1-alpha) sum_k alpha^(K-1-k) s_k``.

Theory beside the simulation (expectations and the exact noise band of every simulated number)
is :mod:`varshift.engine.band`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from numpy.typing import NDArray

from varshift.core.errors import ValidationError
from varshift.core.validate import check_int
from varshift.engine import bn
from varshift.engine.assemble import assemble
from varshift.engine.config import Plan, SimConfig, make_plan
from varshift.engine.fit import AdamFit, fit_coefficients
from varshift.engine.results import Chunk, SimResult
from varshift.engine.sampling import (
    ChunkSpec,
    Scratch,
    Streams,
    batch_sizes,
    chunks,
    dataset,
    linear_weights,
    split_streams,
)
from varshift.engine.trace import Tracer, trace_steps

FloatArray = NDArray[np.float64]
#: ``progress(done, total)``: called after every chunk with the number of batches done.
ProgressCallback = Callable[[int, int], None]
ChunkObserver = Callable[[Chunk], None]


class _Run:
    """The state of one run between chunks: BN statistics, optimiser, trace and buffers."""

    def __init__(
        self,
        plan: Plan,
        data: FloatArray,
        weights: FloatArray | None,
        streams: Streams,
        points: int,
        observer: ChunkObserver | None,
    ) -> None:
        self.plan, self.data, self.weights, self.streams = plan, data, weights, streams
        self.observer = observer
        self.state = bn.BNState.initial(plan.features)
        self.clean = bn.BNState.initial(plan.features)
        self.fit = AdamFit(plan.features, plan.lr) if plan.fit else None
        self.tracer = Tracer(trace_steps(plan.steps, points), self.state) if points else None
        self.order = np.arange(plan.rows, dtype=np.int64)
        self.perm = np.empty((0, plan.rows), dtype=np.int64)
        self.scratch = Scratch()
        self.done = 0

    def _permute(self, epochs: int) -> None:
        """Fresh row orders of the next ``epochs`` epochs in ``self.perm[:epochs]``: exactly what
        ``Generator.permutation(rows)`` returns (it shuffles an ``arange``), in a reused buffer."""
        if self.perm.shape[0] < epochs:
            self.perm = np.empty((epochs, self.plan.rows), dtype=np.int64)
        for order in self.perm[:epochs]:
            order[...] = self.order
            self.streams.perm.shuffle(order)

    def _forward(self, rows: NDArray[np.int64]) -> tuple[FloatArray, FloatArray, FloatArray]:
        """Gather the rows and pass dropout: ``(x, noise, y)``, for inverted dropout with
        ``noise`` the keep indicator and ``y = x·noise`` not yet scaled by ``1/q`` (then,
        without fit or observer, ``y`` overwrites ``noise``: the two are one buffer)."""
        plan, dropout, scratch = self.plan, self.plan.dropout, self.scratch
        # Indices are valid, so mode="clip" checks nothing; "raise" would buffer the output.
        x = scratch.get("x", (*rows.shape, *plan.row_shape))
        np.take(self.data, rows, axis=0, out=x, mode="clip")
        noise = scratch.get("noise", (*rows.shape, *plan.mask_shape))
        if dropout.indicator_scale is not None:
            # Inverted dropout is x·a·s with a the keep indicator: BN sees its statistics from
            # x·a, times s (mean) and s² (variance) per batch, which saves a pass over the chunk.
            keep = dropout.sample_keep(self.streams.noise, noise)  # fills `noise`
            if noise.shape == x.shape and self.fit is None and self.observer is None:
                # No one reads the mask again: x·a overwrites it (one buffer less in cache).
                return x, noise, np.multiply(x, noise, out=noise)
            y = np.multiply(x, keep, out=scratch.get("y", x.shape))
        else:
            dropout.sample_noise(noise.shape, self.streams.noise, out=noise)  # fills `noise`
            y = np.asarray(dropout.apply(x, noise))
        return x, noise, y

    def chunk(self, spec: ChunkSpec) -> None:
        """Train on one chunk of batches: dropout, BN statistics, the running averages."""
        plan, preset, weights = self.plan, self.plan.preset, self.weights
        if spec.r0 == 0:
            self._permute(spec.n_epochs)
        rows = self.perm[: spec.n_epochs, spec.r0 : spec.r1]
        x, noise, y = self._forward(rows)
        z = y @ weights.T if weights is not None else y
        sizes = batch_sizes(plan, spec.r0, spec.r1)
        means, var = bn.split_stats(z, sizes)
        n_of = np.tile(np.asarray(sizes), spec.n_epochs) * plan.positions
        scale = plan.dropout.indicator_scale
        if scale is not None and scale != 1.0:
            means *= scale
            var *= scale * scale
            if self.fit is not None or self.observer is not None:  # they see the true outputs
                noise *= scale
                y *= scale
                z = y @ weights.T if weights is not None else y
        stored = bn.stored_variance(var, n_of, preset)
        before, self.state = self.state, bn.advance(self.state, means, stored, preset)
        if self.tracer is not None:
            self.tracer.record(before, means, stored, preset, self.state)
        if self.fit is not None:
            q, r, mx, vx = fit_coefficients(x, y, sizes, preset.eps)
            self.fit.run(q, r)
            self.clean = bn.advance(self.clean, mx, bn.stored_variance(vx, n_of, preset), preset)
        if self.observer is not None:
            self.observer(
                Chunk(
                    first_step=self.done,
                    epochs=np.arange(spec.epoch, spec.epoch + spec.n_epochs),
                    rows=rows.copy(),
                    x=x.copy(),  # the buffers (rows too) are reused by the next chunk
                    noise=noise.copy(),
                    bn_input=z.copy(),
                    batch_rows=sizes,
                )
            )
        self.done += means.shape[0]


def simulate(
    config: SimConfig,
    rng: np.random.Generator | int | None = None,
    *,
    progress: ProgressCallback | None = None,
    observer: ChunkObserver | None = None,
    trace: int = 0,
) -> SimResult:
    """Run a Dropout → BatchNorm pipeline like a training loop and set it beside theory.

    Parameters
    ----------
    config:
        The run (see :class:`SimConfig`).
    rng:
        A ``numpy.random.Generator``, a seed, or ``None`` (fresh entropy).
    progress:
        Optional ``progress(done_batches, total_batches)``, called after every chunk.
    observer:
        Optional callback receiving every :class:`Chunk` (inputs, noise, BN inputs); for tests.
    trace:
        Also record the running variance at up to this many evenly spaced steps, with its
        predicted band (:class:`RunningTrace`, in ``result.trace``); 0 (default) records
        nothing. Memory grows with ``trace × features``, never with the steps.

    Returns
    -------
    SimResult
        Per BN feature: the dropout input's moments, theory's train/test variance and shift
        ratio, the expected running statistics with their noise band, the simulated ones with
        z-scores, the test-time ("real") variance measured with dropout off, the measured shift
        ratio, and the data-free corrections with their errors; a summary; and the ``fit``
        demonstration when requested.

    Raises
    ------
    ValidationError
        If a parameter is out of range or inconsistent (the message names it).

    Notes
    -----
    See the module docstring for the schedule and the streaming, and
    :mod:`varshift.engine.band` for how the noise band is derived.

    Examples
    --------
    >>> res = simulate(SimConfig(rate=0.5, samples=2000, features=2, epochs=2), rng=0)
    >>> round(res.features[0].shift_ratio_theory, 2), res.summary.steps
    (0.5, 126)
    """
    plan = make_plan(config)
    points = check_int("trace", trace, 0)
    if points == 1:
        raise ValidationError("trace must be 0 (off) or >= 2 points; got 1")
    streams = split_streams(rng)
    data = dataset(plan, streams.data)
    weights = linear_weights(plan, streams.weights)
    run = _Run(plan, data, weights, streams, points, observer)
    for spec in chunks(plan):
        run.chunk(spec)
        if progress is not None:
            progress(run.done, plan.steps)
    return assemble(plan, config, data, weights, run.state, run.clean, run.fit, run.tracer)
