"""Streaming data passes: mode switches, per-channel float64 accumulators, one forward loop.

Every statistic is streamed: per-channel float64 sums of shifted values, added batch by batch
on the model's device, so memory does not grow with the number of samples, and batches are
weighted by their size.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import numpy as np
import torch
from torch import nn

from varshift.core.errors import ValidationError
from varshift.frameworks.torch.results import Scores

ECE_BINS = 15
_DROPOUT_TYPES = (nn.modules.dropout._DropoutNd,)

#: ``progress(label, batches done, batches per pass or None)`` after every batch of a pass.
Progress = Callable[[str, int, int | None], None]


class _StopForward(Exception):
    """Raised by a hook once every layer a pass measures has seen its input."""


# --- modes -------------------------------------------------------------------------------------


def _is_dropout(m: nn.Module) -> bool:
    return isinstance(m, _DROPOUT_TYPES)


def _is_bn(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.batchnorm._BatchNorm)


@contextmanager
def _modes(model: nn.Module, set_mode: Callable[[nn.Module], bool | None]) -> Iterator[nn.Module]:
    """Set ``module.training = set_mode(module)`` (``None``: unchanged); restore on exit."""
    saved = {m: m.training for m in model.modules()}
    try:
        for m in saved:
            mode = set_mode(m)
            if mode is not None:
                m.training = mode
        yield model
    finally:
        for m, mode in saved.items():
            m.training = mode


def dropout_off(model: nn.Module) -> Any:
    """Context manager: every dropout module in ``eval()`` (identity); other modes unchanged.

    Examples
    --------
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5)).train()
    >>> with dropout_off(net):
    ...     net[1].training
    False
    >>> net[1].training
    True
    """
    return _modes(model, lambda m: False if _is_dropout(m) else None)


def bn_train_only(model: nn.Module) -> Any:
    """Context manager: BatchNorm modules in training mode, every other module in ``eval()``.

    In this mode a forward pass normalises with batch statistics and *updates* the running
    statistics (momentum EMA) with dropout off: a PreciseBN-style pass without the noise.
    """
    return _modes(model, lambda m: _is_bn(m))


def all_eval(model: nn.Module) -> Any:
    return _modes(model, lambda m: False)


def all_train(model: nn.Module) -> Any:
    return _modes(model, lambda m: True)


def mode_audit(model: nn.Module) -> tuple[str, ...]:
    """Dropout and BatchNorm modules still in training mode after ``model.eval()``.

    A module whose ``train()``/``eval()`` is overridden (or a model whose ``eval`` is not
    ``nn.Module.eval``) can keep dropout on at test time; that is reported, not fixed.
    """
    saved = {m: m.training for m in model.modules()}
    try:
        try:
            model.eval()
        except NotImplementedError:  # exported GraphModules refuse train()/eval()
            return ()
        named = model.named_modules()
        return tuple(n for n, m in named if (_is_dropout(m) or _is_bn(m)) and m.training)
    finally:
        for m, mode in saved.items():
            m.training = mode


# --- streaming accumulators --------------------------------------------------------------------


def _reduce_dims(x: torch.Tensor) -> int | list[int]:
    if x.dim() < 2:
        raise ValidationError(
            f"a BatchNorm input must have a channel dimension; got shape {tuple(x.shape)}"
        )
    return 0 if x.dim() == 2 else [0, *range(2, x.dim())]


def _floating(x: torch.Tensor) -> torch.Tensor:
    x = x.detach()
    if not x.is_floating_point() or x.dtype in (torch.float16, torch.bfloat16):
        return x.float()
    return x


#: The scratch buffers of the running data pass (:func:`_scratch_like`); ``None`` outside one.
_SCRATCH: ContextVar[dict[tuple[torch.dtype, torch.device], torch.Tensor] | None] = ContextVar(
    "varshift_scratch", default=None
)


@contextmanager
def _scratch_pool() -> Iterator[None]:
    """Share one scratch buffer per dtype and device among the accumulators of a pass."""
    token = _SCRATCH.set({})
    try:
        yield
    finally:
        _SCRATCH.reset(token)


#: Inputs of at least this many bytes take their temporary from the pass's scratch buffer.
SCRATCH_BYTES = 1 << 24


def _scratch_like(x: torch.Tensor) -> torch.Tensor:
    """An uninitialised contiguous tensor of ``x``'s shape, dtype and device.

    Inside a data pass, a large one (:data:`SCRATCH_BYTES`, 16 MiB, and more) is a view of one
    buffer shared by every accumulator (the hooks run one after the other, and each is done
    with it before it returns), grown to the largest input. Fresh blocks that large are new
    pages on every batch (glibc maps allocations above its mmap threshold, at most 32 MiB,
    afresh): for a 32-channel 32×32 batch of 256, 27 ms against 10 ms reused, on 2 cores.
    Smaller temporaries come from the allocator, which is faster for them (they stay in cache).
    """
    pool = _SCRATCH.get()
    if pool is None or x.numel() * x.element_size() < SCRATCH_BYTES:
        return torch.empty(x.shape, dtype=x.dtype, device=x.device)
    key = (x.dtype, x.device)
    buf = pool.get(key)
    if buf is None or buf.numel() < x.numel():
        buf = pool[key] = torch.empty(x.numel(), dtype=x.dtype, device=x.device)
    return buf[: x.numel()].view(x.shape)


def _shifted_sums(x: torch.Tensor, shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``sum(y)`` and ``sum(y²)`` per channel of ``y = x - shift``, in ``x``'s dtype. For
    ``(N, C, ...)`` inputs the positions are summed first (a contiguous reduction), then the
    samples: several times faster on CPU than one reduction over ``(0, 2, 3, ...)``. Four
    kernels: the difference, its sum, its square (in place), that sum."""
    y = torch.sub(x, shift, out=_scratch_like(x))
    if y.dim() > 2:
        y = y.flatten(2)
        return y.sum(-1).sum(0), y.mul_(y).sum(-1).sum(0)
    return y.sum(0), y.mul_(y).sum(0)


class _BatchSums:
    """Per-batch moments of a stream, kept for up to :attr:`FOLD` batches and handed on in
    blocks as float64 shifted sums ``S1 = Σ(x - c)``, ``S2 = Σ(x - c)²`` per channel
    (``c``: the first batch's channel means, so the sums carry no large offset to cancel), so a
    batch costs one or a few kernels and no bookkeeping on the device; memory stays
    ``FOLD × 2 × channels`` whatever the number of batches.

    Per batch, in the input's dtype as the layer itself computes:

    * ``(N, C)`` and ``(N, C, L)`` inputs: the batch mean and (biased) variance from torch's
      own BatchNorm statistics kernel (``torch.batch_norm_update_stats``, one pass; 2-4× faster
      than the sums), converted to shifted sums in float64 when folded. In float32 its variance
      loses accuracy when a channel's mean is far from 0 in standard deviations (relative
      error 5e-7 at 1e3, 2e-5 at 1e4, measured), so it is used only when the first batch's
      channel means are within :attr:`KERNEL_OFFSET` standard deviations (float64: always).
    * otherwise, and for ``(N, C, H, W, ...)``: :func:`_shifted_sums`.
    """

    #: Batches buffered before a block is folded into the float64 totals.
    FOLD = 16
    #: Largest ``|mean| / sd`` (first batch, every channel) for the statistics kernel in float32.
    KERNEL_OFFSET = 100.0

    def __init__(self, fold: Callable[[torch.Tensor, torch.Tensor], None]) -> None:
        self._fold = fold  # fold(sums (k, 2, C) float64, sizes (k,) float64)
        self.shift: torch.Tensor | None = None
        self._dtype: torch.dtype | None = None
        self._kernel = False  # rows: (mean, var) from the kernel, else (S1, S2)
        self._rows: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._sizes: list[int] = []

    def _start(self, x: torch.Tensor, dims: int | list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Choose the method and the shift from the first batch; returns its row."""
        self._dtype = x.dtype
        if x.dim() <= 3 and x.device.type in ("cpu", "cuda"):
            row = torch.batch_norm_update_stats(x, None, None, 0.0)
            mean, var = row
            offset = mean.abs() <= self.KERNEL_OFFSET * var.sqrt()
            self._kernel = x.dtype == torch.float64 or bool(offset.all())
            if self._kernel:  # its mean is the shift (any shift is exact; this one is close)
                self.shift = mean.to(x.dtype).view(1, -1, *[1] * (x.dim() - 2))
                return row
        self.shift = x.mean(dim=dims, keepdim=True)
        return _shifted_sums(x, self.shift)

    def add(self, x: torch.Tensor) -> int:
        """Add one batch; returns its elements per channel (0: empty, nothing added)."""
        x = _floating(x)
        dims = _reduce_dims(x)
        n = x.numel() // x.shape[1]
        if n == 0:
            return 0
        if self.shift is None:
            self._rows.append(self._start(x, dims))
        else:
            if x.dtype != self._dtype:  # a stream that changes dtype: the first one's
                x = x.to(self._dtype)
            if self._kernel:
                self._rows.append(torch.batch_norm_update_stats(x, None, None, 0.0))
            else:
                self._rows.append(_shifted_sums(x, self.shift))
        self._sizes.append(n)
        if len(self._sizes) == self.FOLD:
            self.flush()
        return n

    def flush(self) -> None:
        """Fold the buffered batches (call before reading the totals)."""
        if not self._sizes or self.shift is None:
            return
        k = len(self._rows)
        sums = torch.stack([t for row in self._rows for t in row]).view(k, 2, -1).double()
        sizes = torch.tensor(self._sizes, dtype=torch.float64, device=sums.device)
        self._rows.clear()
        self._sizes.clear()
        if self._kernel:  # (mean, var) -> (n (m - c), n (var + (m - c)²))
            d = sums[:, 0] - self.shift.double().flatten()
            n = sizes[:, None]
            sums = torch.stack([n * d, n * (sums[:, 1] + d * d)], dim=1)
        self._fold(sums, sizes)


class ChannelMoments:
    """Per-channel count, mean and sum of squared deviations ``M2`` of a stream.

    ``add`` costs one statistics kernel, or two plain reductions, per batch (the batch's
    mean and variance, or ``sum(y)`` and ``sum(y²)`` of the shifted values ``y = x - c``, in
    the input's dtype; ``c``: the first batch's channel means), kept and folded in blocks into
    float64 shifted sums on the input's device (:class:`_BatchSums`); no per-batch
    synchronisation and no transfer to the host. ``mean = c + S1/n`` and ``M2 = S2 - S1²/n``.
    A ``var_mean`` per batch (Welford over a strided axis) costs up to 15× more.

    Beside the totals it keeps size-weighted sums of the per-batch means of ``y`` and ``y²``
    (a few channel-sized float64 vectors, whatever the number of batches), from which
    :meth:`var_rel_se` estimates the standard error of the variance by the spread between
    batches (batch means): it holds for any distribution and for correlated elements of a
    channel (the pixels of one image), where a formula from the element count would not.
    """

    #: Batches below which the between-batch standard error is not estimated.
    MIN_BATCHES = 8

    def __init__(self) -> None:
        self._count = 0
        self._stream = _BatchSums(self._fold)
        self._sums: torch.Tensor | None = None  # rows: S1, S2
        self._lin: torch.Tensor | None = None  # Σ w² v, v = (a, q): rows a, q
        self._quad: torch.Tensor | None = None  # Σ w² v_i v_j: (2, 2, C)
        self._w2 = 0.0
        self.batches = 0

    def add(self, x: torch.Tensor) -> None:
        """Add every element of each channel of ``x`` (shape ``(N, C, ...)``)."""
        n = self._stream.add(x)
        if n:
            self._count += n
            self.batches += 1

    def _fold(self, sums: torch.Tensor, sizes: torch.Tensor) -> None:
        """Add a block of batches: ``sums`` ``(k, 2, C)``, ``sizes`` ``(k,)``, float64."""
        w = sizes[:, None, None]
        v = sums / w  # the batch means of y and y²
        wv = sums * w  # = v w²
        block = (sums.sum(0), wv.sum(0), (wv[:, :, None] * v[:, None]).sum(0))
        if self._sums is None or self._lin is None or self._quad is None:
            self._sums, self._lin, self._quad = block
        else:
            self._sums += block[0]
            self._lin += block[1]
            self._quad += block[2]
        self._w2 += float(sizes.square().sum())

    def _totals(self) -> torch.Tensor | None:
        self._stream.flush()
        return self._sums

    @property
    def count(self) -> int:
        """Elements per channel seen."""
        return self._count

    @property
    def mean(self) -> torch.Tensor | None:
        """Per-channel mean (float64), ``None`` before any element."""
        sums, shift = self._totals(), self._stream.shift
        if sums is None or shift is None:
            return None
        return shift.double().flatten() + sums[0] / self._count

    @property
    def m2(self) -> torch.Tensor | None:
        """Per-channel sum of squared deviations from the mean (float64)."""
        sums = self._totals()
        if sums is None:
            return None
        s1, s2 = sums
        return torch.clamp(s2 - s1 * s1 / self._count, min=0.0)

    def population_var(self) -> torch.Tensor:
        """``M2 / n``: the population (biased) variance of everything seen."""
        m2 = self.m2
        assert m2 is not None
        return m2 / self.count

    def unbiased_var(self) -> torch.Tensor:
        """``M2 / (n - 1)``: what torch stores as ``running_var``."""
        m2 = self.m2
        assert m2 is not None
        if self.count < 2:
            raise ValidationError(
                f"recalibration needs at least 2 values per channel; got {self.count}"
            )
        return m2 / (self.count - 1)

    def var_rel_se(self) -> torch.Tensor | None:
        """Relative standard error of :meth:`population_var` per channel, from the spread
        between batches, or ``None`` with fewer than :attr:`MIN_BATCHES` batches.

        The variance is ``Q - A²`` with ``A``, ``Q`` the size-weighted means of the batch means
        ``a_b``, ``q_b`` of ``y`` and ``y²``; linearised, it is the weighted mean of ``g_b = q_b
        - 2 A a_b``, whose standard error (ratio estimator over ``B`` batches of sizes ``w_b``)
        is ``sqrt(B/(B-1) Σ w_b² (g_b - ḡ)²) / Σ w_b``.
        """
        if self._totals() is None or self._lin is None or self._quad is None:
            return None
        if self._sums is None or self.batches < self.MIN_BATCHES:
            return None
        n, b = float(self._count), self.batches
        a_mean, q_mean = self._sums / n
        a, q = self._lin
        aa, qa, qq = self._quad[0, 0], self._quad[1, 0], self._quad[1, 1]
        g_mean = q_mean - 2 * a_mean * a_mean
        sum_g2 = qq - 4 * a_mean * qa + 4 * a_mean * a_mean * aa
        sum_g = q - 2 * a_mean * a
        spread = torch.clamp(sum_g2 - 2 * g_mean * sum_g + g_mean * g_mean * self._w2, min=0.0)
        var: torch.Tensor = q_mean - a_mean * a_mean
        return torch.sqrt(spread * b / (b - 1)) / n / var


class BatchVarMean:
    """Mean over batches of the per-channel *unbiased* batch variance (what an EMA of torch's
    batch variances converges to), in float64, with its spread between batches.

    Batch variances come from shifted sums as in :class:`ChannelMoments` (shift: the first
    batch's channel means), one ``sum(y)`` and one ``sum(y²)`` per batch.
    """

    def __init__(self) -> None:
        self.batches = 0
        self._stream = _BatchSums(self._fold)
        self._sums: torch.Tensor | None = None  # rows: Σ v_b, Σ v_b²

    def add(self, x: torch.Tensor) -> None:
        """Add one batch's unbiased variance per channel."""
        if self._stream.add(x):
            self.batches += 1

    def _fold(self, sums: torch.Tensor, sizes: torch.Tensor) -> None:
        s1, s2 = sums[:, 0], sums[:, 1]
        n = sizes[:, None]
        var = torch.where(n > 1, (s2 - s1 * s1 / n) / (n - 1), math.nan)
        block = torch.stack([var.sum(0), (var * var).sum(0)])
        self._sums = block if self._sums is None else self._sums + block

    def _totals(self) -> torch.Tensor | None:
        self._stream.flush()
        return self._sums

    @property
    def total(self) -> torch.Tensor | None:
        """Sum of the batch variances, ``None`` before any batch."""
        sums = self._totals()
        return None if sums is None else sums[0]

    def value(self) -> torch.Tensor | None:
        """The mean, or ``None`` before any batch."""
        sums = self._totals()
        return None if sums is None else sums[0] / self.batches

    def rel_se(self) -> torch.Tensor | None:
        """Relative standard error of :meth:`value` (spread of the batch variances over
        ``sqrt(B)``), or ``None`` with fewer than ``ChannelMoments.MIN_BATCHES`` batches."""
        sums = self._totals()
        if sums is None or self.batches < ChannelMoments.MIN_BATCHES:
            return None
        b = self.batches
        mean = sums[0] / b
        var = torch.clamp(sums[1] / b - mean * mean, min=0.0) * b / (b - 1)
        return torch.sqrt(var / b) / mean


class ScoreSums:
    """Streaming accuracy, NLL and top-label ECE from logits and class indices."""

    def __init__(self) -> None:
        self.n = 0
        self.correct = 0.0
        self.nll = 0.0
        self.bins = np.zeros((3, ECE_BINS))  # count, confidence sum, correct sum

    def add(self, out: Any, y: torch.Tensor) -> None:
        logits = out[0] if isinstance(out, tuple | list) else out
        if not torch.is_tensor(logits) or logits.dim() != 2 or logits.shape[0] != y.shape[0]:
            shape = tuple(logits.shape) if torch.is_tensor(logits) else type(logits).__name__
            raise ValidationError(
                f"labels need (batch, classes) logits from the model; got {shape}"
            )
        y = y.to(logits.device)
        if int(y.max()) >= logits.shape[1]:
            raise ValidationError(
                f"labels must be < {logits.shape[1]} (the model's classes); got {int(y.max())}"
            )
        logp = torch.log_softmax(logits.double(), dim=1)
        conf, pred = logp.exp().max(dim=1)
        hit = (pred == y).double()
        self.n += int(y.shape[0])
        self.correct += float(hit.sum())
        self.nll -= float(logp.gather(1, y[:, None]).sum())
        b = torch.clamp((conf * ECE_BINS).long(), max=ECE_BINS - 1).cpu().numpy()
        for row, values in enumerate((np.ones(b.size), conf.cpu().numpy(), hit.cpu().numpy())):
            self.bins[row] += np.bincount(b, weights=values, minlength=ECE_BINS)

    def scores(self, variant: str) -> Scores:
        count, conf, hit = self.bins
        with np.errstate(invalid="ignore", divide="ignore"):
            gap = np.where(count > 0, np.abs(hit - conf) / np.maximum(count, 1), 0.0)
        ece = float(np.sum(count / self.n * gap)) if self.n else math.nan
        n = max(self.n, 1)
        return Scores(variant, self.n, self.correct / n, self.nll / n, ece)


# --- one data pass -----------------------------------------------------------------------------


def placement(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    for p in list(model.parameters()) + list(model.buffers()):
        if p.is_floating_point():
            return p.device, p.dtype
    return torch.device("cpu"), torch.float32


def forward(model: nn.Module, x: torch.Tensor, place: tuple[torch.device, torch.dtype]) -> Any:
    device, dtype = place
    x = x.to(device=device, dtype=dtype if x.is_floating_point() else None)
    try:
        return model(x)
    except _StopForward:
        raise
    except (RuntimeError, TypeError, ValueError, IndexError, AssertionError) as exc:
        # AssertionError: a torch.export guard (e.g. an archive exported for one batch size)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ValidationError(
            f"data: the model rejects a batch of shape {tuple(x.shape)} and dtype "
            f"{str(x.dtype).removeprefix('torch.')}: {first}"
        ) from None


def batches_per_pass(batches: Any) -> int | None:
    """The number of batches one pass reads, when known beforehand (``None`` otherwise)."""
    total = getattr(batches, "total", None)
    if isinstance(total, int):
        return total
    try:
        return len(batches)
    except TypeError:
        return None


def data_pass(
    model: nn.Module,
    batches: Any,
    measure: Mapping[str, nn.Module],
    make: Callable[[], Any],
    *,
    scores: ScoreSums | None = None,
    stop_early: bool = False,
    progress: Progress | None = None,
    label: str = "pass",
) -> tuple[dict[str, Any], list[str], int]:
    """Run the model over ``batches`` (in its current modes, without gradients), feeding each
    measured module's input to an accumulator from ``make()``.

    Returns ``(accumulators by name, names in first-call order, samples)``. With
    ``stop_early`` a forward stops once every measured module has seen its input (the rest
    of the network is not needed); never when ``scores`` needs the output.
    """
    acc = {name: make() for name in measure}
    order: list[str] = []
    seen: set[str] = set()

    def hook(name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def record(module: nn.Module, args: tuple[Any, ...]) -> None:
            acc[name].add(args[0])
            if name not in order:
                order.append(name)
            seen.add(name)
            if stop_early and len(seen) == len(acc):
                raise _StopForward

        return record

    total = batches_per_pass(batches)
    handles = [m.register_forward_pre_hook(hook(name)) for name, m in measure.items()]
    place = placement(model)
    samples = 0
    try:
        with torch.no_grad(), _scratch_pool():
            for i, (x, y) in enumerate(batches):
                seen.clear()
                try:
                    out = forward(model, x, place)
                except _StopForward:
                    out = None
                if scores is not None and y is not None and out is not None:
                    scores.add(out, y)
                samples += int(x.shape[0])
                if progress is not None:
                    progress(label, i + 1, total)
    finally:
        for h in handles:
            h.remove()
    if samples == 0:
        raise ValidationError("data: no samples (the data source is empty)")
    return acc, order, samples
