"""BatchNorm's training-mode running statistics, as every framework updates them.

Per batch ``t`` with ``n`` elements per channel: mean ``m_t``, biased variance ``v_t`` (÷ n) and
the stored batch variance ``s_t = v_t n/(n-1)`` (unbiased presets) or ``v_t`` (biased ones)::

    R_t = alpha R_{t-1} + (1 - alpha) s_t,   R_0 = 0 (mean), 1 (variance)
    torch momentum=None:  R_t = R_{t-1} + (s_t - R_{t-1}) / t   (cumulative average)
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from varshift.core.errors import ValidationError
from varshift.core.presets import Preset
from varshift.engine.config import check_array

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]


@dataclass(frozen=True)
class BNState:
    """A BatchNorm layer's running statistics.

    Attributes
    ----------
    running_mean, running_var:
        Per feature; ``running_var`` in the preset's stored convention (unbiased or biased).
    num_batches:
        Training-mode updates so far (PyTorch's ``num_batches_tracked``).
    """

    running_mean: FloatArray
    running_var: FloatArray
    num_batches: int

    @classmethod
    def initial(cls, features: int) -> BNState:
        """Every framework's start: mean 0, variance 1, no batches."""
        return cls(np.zeros(features), np.ones(features), 0)


def stored_over_biased(preset: Preset, n: int) -> float:
    """The stored batch variance over the biased one (÷ n): ``n/(n - ddof)`` of the preset's
    estimator (``n/(n-1)`` unbiased, ``n/(n-1-eps)`` keras2, 1 biased).

    Not :meth:`varshift.core.presets.Preset.stored_factor`, which is the *expected* stored
    variance over the *population* variance (1 or ``(n-1)/n``): the two differ by ``n/(n-1)``.
    """
    return preset.stored_over_biased(n) if preset.estimator.ddof else 1.0


def stored_variance(biased: FloatArray, elements: IntArray, preset: Preset) -> FloatArray:
    """Per-batch stored variances ``(K, F)`` from biased ones, batch ``k`` of ``elements[k]``
    elements per channel: :func:`stored_over_biased`, vectorised over the batches."""
    ddof = preset.estimator.ddof
    if not ddof:
        return biased
    return biased * (elements / (elements - ddof))[:, None]


def ema_weights(alpha: float, exponents: FloatArray) -> FloatArray:
    """Weights ``(1 - alpha) alpha^e`` of the batches ``e`` updates before the last one."""
    return (1.0 - alpha) * np.power(alpha, exponents)


@functools.lru_cache(maxsize=8)
def _chunk_weights(alpha: float, k: int) -> FloatArray:
    """:func:`ema_weights` of ``k`` updates applied at once (chunks repeat: cached, read-only)."""
    w = ema_weights(alpha, np.arange(k - 1, -1, -1, dtype=np.float64))
    w.flags.writeable = False
    return w


def advance(state: BNState, means: FloatArray, stored: FloatArray, preset: Preset) -> BNState:
    """Apply K updates at once: ``R_K = alpha^K R_0 + (1-alpha) sum_k alpha^(K-1-k) s_k``.

    Cumulative (torch ``momentum=None``): ``R = (t0 R + sum_k s_k) / (t0 + K)``.
    """
    k = means.shape[0]
    if k == 0:
        return state
    if preset.alpha is None:
        t0 = state.num_batches
        total = t0 + k
        rm = (t0 * state.running_mean + means.sum(axis=0)) / total
        rv = (t0 * state.running_var + stored.sum(axis=0)) / total
        return BNState(rm, rv, total)
    a = preset.alpha
    w = _chunk_weights(a, k)
    decay = a**k
    rm = decay * state.running_mean + w @ means
    rv = decay * state.running_var + w @ stored
    return BNState(rm, rv, state.num_batches + k)


#: Largest ``(elements per batch) × channels`` for which :func:`batch_moments` sums through a
#: 0/1 matrix product; beyond it (many channels) the product does too much work.
_PICK_MAX = 1 << 16


@functools.lru_cache(maxsize=16)
def _channel_picker(n: int, channels: int, positions: int) -> FloatArray:
    """``(n·C·P, C)`` 0/1 matrix: a flattened ``(n, C, P)`` batch times it sums each channel."""
    pick = np.repeat(np.tile(np.eye(channels), (n, 1)), positions, axis=0)
    pick.flags.writeable = False
    return pick


def batch_moments(z: FloatArray, lead: int) -> tuple[FloatArray, FloatArray]:
    """Two-pass batch mean and *biased* variance (÷ n) of ``z`` shaped ``(*L, n, C, *spatial)``
    (``lead`` axes ``L``), reduced over the ``n`` rows and the spatial axes per channel.

    A direct sum over the rows axis runs NumPy's inner loop over only the C channels, which is
    slow for the few channels BN layers here have. Instead every batch is one contiguous row of
    ``n·C·P`` values and a BLAS product with a 0/1 channel picker sums it (zeros add exactly), for
    the mean, its broadcast back, and the squared deviations: three small GEMMs and two
    element-wise passes, about 1.5× faster than transposing the channels to the end. Many
    channels (a large picker) fall back to that transposed copy.
    """
    shape = z.shape
    rows, channels = shape[lead], shape[lead + 1]
    positions = math.prod(shape[lead + 2 :])
    n = rows * positions
    out_shape = (*shape[:lead], channels)
    if n * channels * channels <= _PICK_MAX:
        pick = _channel_picker(rows, channels, positions)
        flat = z.reshape(*shape[:lead], n * channels)  # a view of a chunk's batches
        mean = np.matmul(flat, pick) / n
        dev = np.matmul(mean, pick.T)  # the mean of each element's channel, in place below
        np.subtract(flat, dev, out=dev)
        np.multiply(dev, dev, out=dev)
        return mean, np.matmul(dev, pick) / n
    axes = (lead, *range(lead + 2, z.ndim))
    kept = [a for a in range(z.ndim) if a not in axes]
    # NumPy sums a contiguous last axis with SIMD pairwise summation; the copy is reused in place.
    work = z.transpose(*kept, *axes).copy().reshape(*out_shape, n)
    mean = work.sum(axis=-1) / n
    work -= mean[..., None]
    return mean, np.einsum("...i,...i->...", work, work) / n


def full_batches(sizes: tuple[int, ...]) -> int:
    """How many of ``sizes`` (rows of a chunk's batches, in order) are full: all but a smaller
    last one."""
    return len(sizes) - (1 if sizes and sizes[-1] != sizes[0] else 0)


def split_stats(z: FloatArray, sizes: tuple[int, ...]) -> tuple[FloatArray, FloatArray]:
    """Per-batch means and biased variances of ``z`` (E, R, ...) → ``(E·K, F)`` in order."""
    e = z.shape[0]
    tail = z.shape[2:]
    k_full = full_batches(sizes)
    b = sizes[0]
    zf = z[:, : k_full * b].reshape(e, k_full, b, *tail)
    means, var = batch_moments(zf, 2)
    if k_full < len(sizes):
        zp = z[:, k_full * b :].reshape(e, 1, sizes[-1], *tail)
        mp, vp = batch_moments(zp, 2)
        means = np.concatenate([means, mp], axis=1)
        var = np.concatenate([var, vp], axis=1)
    f = means.shape[-1]
    return means.reshape(-1, f), var.reshape(-1, f)


def _stack_batches(batches: ArrayLike | Sequence[ArrayLike]) -> list[FloatArray]:
    """Validated batches as ``(T, n, C, *spatial)`` groups of equal shape, in order."""
    groups: list[FloatArray] = []
    if isinstance(batches, np.ndarray) and batches.ndim >= 3:
        groups.append(check_array("batches", batches))
    else:
        pending: list[FloatArray] = []
        for item in batches:  # type: ignore[union-attr]
            b = check_array("batch", item)
            if b.ndim < 2:
                raise ValidationError(f"each batch must be (n, C[, ...]); got shape {b.shape}")
            if pending and b.shape != pending[0].shape:
                groups.append(np.stack(pending))
                pending = []
            pending.append(b)
        if pending:
            groups.append(np.stack(pending))
    if not groups:
        raise ValidationError("batches must hold at least one batch")
    return groups


def bn_running_stats(
    batches: ArrayLike | Sequence[ArrayLike],
    preset: Preset,
    state: BNState | None = None,
) -> BNState:
    """Feed BatchNorm inputs through a framework's training-mode running-statistics update.

    Parameters
    ----------
    batches:
        The BN inputs of successive training steps: an array ``(T, n, C)`` or
        ``(T, n, C, *spatial)``, or a sequence of arrays ``(n_t, C)`` / ``(n_t, C, *spatial)``
        (batches may differ in size). The channel axis is 1 of each batch, as in PyTorch's
        ``BatchNorm1d/2d``; statistics reduce over the batch and spatial axes.
    preset:
        The framework convention: decay ``alpha`` (or the cumulative average) and the stored
        batch variance's estimator (biased ÷ n, unbiased ÷ (n-1), keras2 ÷ (n-1-eps)).
    state:
        Statistics to continue from; default :meth:`BNState.initial` (mean 0, variance 1).

    Returns
    -------
    BNState
        Running mean and running variance (in the preset's stored convention) after the batches.

    Raises
    ------
    ValidationError
        If a batch is not numeric and finite, not ``(n, C, ...)``, has another channel count, or
        is too small for the preset.

    Notes
    -----
    Per batch ``t``: mean ``m_t``, biased variance ``v_t``, stored ``s_t = v_t n/(n-ddof)``;
    ``R_t = alpha R_{t-1} + (1-alpha) s_t`` (``R_t = R_{t-1} + (s_t - R_{t-1})/t`` when
    cumulative). This is the update the engine of :func:`varshift.engine.simulate` uses; it is
    exposed so the conformance tests can feed the same batches to PyTorch and Keras.

    Examples
    --------
    >>> from varshift.core.presets import resolve_preset
    >>> x = np.array([[[0.0], [2.0]], [[1.0], [1.0]]])  # two batches of two rows, one feature
    >>> s = bn_running_stats(x, resolve_preset("torch", 0.5))
    >>> s.running_mean.tolist(), s.running_var.tolist(), s.num_batches
    ([0.75], [0.75], 2)
    """
    groups = _stack_batches(batches)
    channels = groups[0].shape[2]
    st = state if state is not None else BNState.initial(channels)
    for g in groups:
        if g.shape[2] != channels:
            raise ValidationError(f"every batch must have {channels} channels; got {g.shape[2]}")
        n = g.shape[1] * math.prod(g.shape[3:])
        preset.check_batch(n, "elements per channel")
        means, var = batch_moments(g, 1)  # (T, n, C, *spatial)
        st = advance(st, means, var * stored_over_biased(preset, n), preset)
    return st
