"""The running variance recorded along a run (``simulate(trace=...)``) beside its band."""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from varshift.core.presets import Preset
from varshift.engine.band import Band
from varshift.engine.bn import BNState, advance
from varshift.engine.results import RunningTrace

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]


def trace_steps(total: int, points: int) -> IntArray:
    """Up to ``points`` evenly spaced update counts from 0 to ``total`` (both included)."""
    if points > total:
        return np.arange(total + 1, dtype=np.int64)
    return np.unique(np.rint(np.linspace(0.0, total, points)).astype(np.int64))


class Tracer:
    """Records the running variance at chosen steps, chunk by chunk (memory: points × F)."""

    def __init__(self, steps: IntArray, initial: BNState) -> None:
        self.steps = steps
        self.values = np.empty((steps.size, initial.running_var.size))
        self.next = 0
        if steps.size and steps[0] == 0:
            self.values[0] = initial.running_var
            self.next = 1

    def record(
        self,
        before: BNState,
        means: FloatArray,
        stored: FloatArray,
        preset: Preset,
        after: BNState,
    ) -> None:
        """Replay the chunk's updates up to each wanted step inside it; the chunk's end is
        taken from ``after`` so the last point is exactly the engine's state."""
        done, k = before.num_batches, means.shape[0]
        state, pos = before, 0
        while self.next < self.steps.size and self.steps[self.next] <= done + k:
            j = int(self.steps[self.next]) - done
            if j == k:
                state = after
            else:
                state = advance(state, means[pos:j], stored[pos:j], preset)
                pos = j
            self.values[self.next] = state.running_var
            self.next += 1

    def result(self, preset: Preset, band: Band) -> RunningTrace:
        """The recorded trace beside the independent-batch band of :class:`RunningTrace`.

        The weight sums are :func:`varshift.core.theory.running_stats`' (residual ``alpha^t``,
        squared weights ``(1-alpha)²(1-alpha^2t)/(1-alpha²)``), vectorised over the steps.
        """
        t = self.steps.astype(np.float64)
        if preset.alpha is None:
            resid = np.where(t == 0, 1.0, 0.0)
            sq = np.where(t == 0, 0.0, 1.0 / np.maximum(t, 1.0))
        else:
            a = preset.alpha
            resid = np.power(a, t)
            sq = (1.0 - a) / (1.0 + a) * (1.0 - np.power(a, 2.0 * t))
        es = band.batch_var_expected[None, :]
        vs = band.batch_var_sd[None, :] ** 2
        return RunningTrace(
            steps=self.steps,
            running_var=self.values,
            running_var_expected=resid[:, None] + (1.0 - resid[:, None]) * es,
            running_var_sd=np.sqrt(sq[:, None] * vs),
        )
