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
* **Randomness.** ``rng`` is split (``Generator.spawn``) into independent streams for the
  dataset, the linear weights, the per-epoch permutations and the dropout noise, so the noise of
  a batch does not depend on how the work is chunked.
* **Streaming.** Work proceeds in chunks of whole epochs (or of batches inside one large
  epoch) of about ``chunk_elements`` numbers, so memory does not grow with epochs or steps.
  Inside a chunk everything is vectorised over batches and features, and the running averages
  advance by a weighted sum: ``R_K = alpha^K R_0 + (1-alpha) sum_k alpha^(K-1-k) s_k``.

Theory beside the simulation
----------------------------
Every expectation is computed from the *drawn dataset* (its rows are the population batches are
drawn from, without replacement within an epoch) with the dropout noise integrated out exactly,
so the finite dataset itself does not inflate z-scores:

* ``E[s] = f_n (sigma_y² - Var[batch mean])``, with ``f_n = n/(n-1)`` (unbiased) or 1, where
  ``Var[batch mean]`` includes the finite-population factor ``(N-b)/(N-1)``;
* ``E[R_T] = alpha^T R_0 + sum_t w_t E[s_t]`` over the actual schedule (full and last batches);
* ``Var[R_T] = sum_t w_t² Var[s_t]``, corrected for the rows being drawn *without replacement*
  within an epoch: the first-order (per-row) part of ``s_t`` is a permutation statistic, so its
  exact permutation variance replaces the independent-batch one. This matters as soon as the
  average spans a good part of an epoch (Keras' 0.99, torch's cumulative average).
* ``Var[s]`` is exact for rows drawn i.i.d. from the dataset, for every topology: a batch of
  ``b`` rows has ``s = mean_r(Q_r)/P - (mean_r D_r)²/P²`` with per-row
  ``Q_r = sum_p (y_rp - mu)²`` and ``D_r = sum_p (y_rp - mu)``, whose conditional moments
  given the row are integrated over the noise in closed form (independent elements, a shared
  channel-wise mask, or a linear unit's sum of independently masked inputs). For ``direct`` it
  is ``mu4/n - sigma⁴ (n-3)/(n(n-1))`` (:func:`varshift.core.theory.sample_variance_variance`).

The band of the running mean is exact; that of the running variance neglects the weak
(``O(1/n)`` relative) correlation of the second-order parts of ``s_t`` between batches of one
epoch.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from numpy.typing import ArrayLike, NDArray

from varshift.core.dropout import Dropout, InputMoments
from varshift.core.errors import InputFileError, ValidationError
from varshift.core.presets import PRESETS, Preset
from varshift.core.theory import (
    check_rho,
    corrected_variance,
    gamma_star,
    shift_direct,
    shift_linear,
)
from varshift.core.validate import check_choice, check_finite, check_int, check_range

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]
#: ``progress(done, total)``: called after every chunk with the number of batches done.
ProgressCallback = Callable[[int, int], None]
_Row = TypeVar("_Row", "FeatureRow", "FitRow")

TOPOLOGIES: tuple[str, ...] = ("direct", "linear", "conv")
INPUT_DISTS: tuple[str, ...] = ("normal", "uniform", "relu")

DEFAULT_SAMPLES = 10_000
DEFAULT_FEATURES = 5
DEFAULT_WIDTH = 64
DEFAULT_SPATIAL = (4, 4)

#: Keras' Adam defaults (``keras/src/optimizers/adam.py``), used by the ``fit`` demonstration.
ADAM_BETA_1 = 0.9
ADAM_BETA_2 = 0.999
ADAM_EPSILON = 1e-7


# --- configuration ------------------------------------------------------------------------------


@dataclass(frozen=True)
class SimConfig:
    """Everything one simulation run needs (validated by :func:`simulate`).

    Attributes
    ----------
    rate, dropout, beta:
        Dropout rate (probability of dropping), kind (see :mod:`varshift.core.dropout`) and uout's
        half-width.
    preset:
        The BatchNorm convention (:func:`varshift.core.presets.resolve_preset`).
    batch_size:
        Rows per mini-batch (the last batch of an epoch may be smaller, see ``drop_last``).
    samples:
        Dataset rows. ``None``: 10000 for synthetic inputs, all rows of ``data`` when given; a
        number with ``data`` draws that many rows from ``data`` with replacement.
    epochs, steps:
        Passes over the dataset, or (if ``steps`` is set, which wins) the exact number of batches.
    drop_last:
        Drop the smaller last batch of each epoch instead of training on it.
    features:
        BN features: columns (``direct``), linear units (``linear``) or channels (``conv``).
        ``None``: 5, or what ``data``/``weights`` imply.
    input_dist, mean, std:
        Synthetic inputs: ``normal`` ``N(mean, std²)``, ``uniform`` with that mean and standard
        deviation, or ``relu``: ``max(0, z)`` with ``z ~ N(mean, std²)`` (what follows
        BN → ReLU; ``mean``/``std`` are the pre-activation's).
    data:
        Recorded dropout inputs instead of synthetic ones: ``(rows, features)`` for ``direct``,
        ``(rows, width)`` for ``linear``, ``(rows, C, H, W)`` for ``conv``.
    topology:
        ``direct`` (dropout → BN), ``linear`` (dropout → linear map of ``width`` inputs → BN over
        its ``features`` outputs) or ``conv`` (``(N, C, H, W)`` inputs, BN per channel over
        ``N·H·W``).
    width, rho, cos2, weights:
        ``linear`` only: inputs per unit (default 64), their pairwise correlation, the target
        ``cos²θ = (sum w)²/(d sum w²)`` of every unit's weights (``None``: i.i.d. normal
        weights), or explicit ``(features, width)`` weights.
    spatial, channelwise:
        ``conv`` only: ``(H, W)`` of each channel map (default 4×4) and whether one mask value
        covers a whole channel map of a sample (PyTorch ``Dropout2d``, Keras ``SpatialDropout2D``).
    fit, lr, probe:
        Also train BN's ``gamma, beta`` with Adam (learning rate ``lr``) to reproduce the clean
        input, with and without dropout, and predict the output for input ``probe`` at test time.
    chunk_elements:
        About how many numbers one streamed chunk holds (memory knob, not a result knob).
    """

    rate: float = 0.2
    dropout: str = "bernoulli"
    beta: float = 0.1
    preset: Preset = PRESETS["torch"]
    batch_size: int = 32
    samples: int | None = None
    epochs: int = 10
    steps: int | None = None
    drop_last: bool = False
    features: int | None = None
    input_dist: str = "normal"
    mean: float = 0.0
    std: float = 1.0
    data: FloatArray | None = field(default=None, compare=False, repr=False)
    topology: str = "direct"
    width: int | None = None
    rho: float = 0.0
    cos2: float | None = None
    weights: FloatArray | None = field(default=None, compare=False, repr=False)
    spatial: tuple[int, int] | None = None
    channelwise: bool = False
    fit: bool = False
    lr: float = 1e-3
    probe: float = 1.0
    chunk_elements: int = 1 << 18  # cache-sized chunks: faster than 1 << 20 (bench/)


@dataclass(frozen=True, eq=False)
class _Plan:
    """A validated, fully resolved :class:`SimConfig`."""

    dropout: Dropout
    preset: Preset
    topology: str
    input_dist: str
    mean: float
    std: float
    rows: int  # N, dataset rows
    features: int  # F, BN features
    width: int  # d (linear); features otherwise
    spatial: tuple[int, int]  # (1, 1) unless conv
    channelwise: bool
    batch: int  # b, rows per full batch
    last: int  # rows in the smaller last batch (0: none / dropped)
    full_batches: int  # full batches per epoch
    steps: int  # T
    rho: float
    cos2: float | None
    data: FloatArray | None
    resample: bool
    weights: FloatArray | None
    fit: bool
    lr: float
    probe: float
    chunk_rows: int

    @property
    def positions(self) -> int:
        """P: elements per channel in one row (H·W for conv, else 1)."""
        return self.spatial[0] * self.spatial[1]

    @property
    def per_epoch(self) -> int:
        """Batches per epoch."""
        return self.full_batches + (1 if self.last else 0)

    @property
    def used_rows(self) -> int:
        """Rows trained on per epoch."""
        return self.full_batches * self.batch + self.last

    @property
    def epochs(self) -> int:
        """Epochs started (the last may be partial when ``steps`` is set)."""
        return -(-self.steps // self.per_epoch)

    @property
    def row_shape(self) -> tuple[int, ...]:
        """Shape of one dataset row (the dropout input of one sample)."""
        if self.topology == "conv":
            return (self.features, *self.spatial)
        return (self.width,)

    @property
    def mask_shape(self) -> tuple[int, ...]:
        """Shape of one row's dropout noise (channel-wise: one value per channel)."""
        if self.topology == "conv" and self.channelwise:
            return (self.features, 1, 1)
        return self.row_shape


def _check_array(name: str, value: ArrayLike) -> FloatArray:
    arr = np.asarray(value)
    if arr.dtype.kind not in "fiub":
        raise ValidationError(f"{name} must be numeric; got dtype {arr.dtype}")
    out = np.asarray(arr, dtype=np.float64)
    if out.size == 0:
        raise ValidationError(f"{name} must not be empty; got shape {out.shape}")
    bad = int(np.count_nonzero(~np.isfinite(out)))
    if bad:
        raise ValidationError(f"{name} must be finite; got {bad} NaN or infinite value(s)")
    return out


def _match(name: str, given: int | None, implied: int, source: str) -> int:
    if given is not None and given != implied:
        raise ValidationError(f"{name} must be {implied} to match {source}; got {given}")
    return implied


def _plan(config: SimConfig) -> _Plan:
    """Validate ``config`` at the boundary and resolve its defaults."""
    dropout = Dropout(config.dropout, config.rate, config.beta)
    preset = config.preset
    topology = check_choice("topology", config.topology, TOPOLOGIES)
    input_dist = check_choice("input_dist", config.input_dist, INPUT_DISTS)
    mean = check_finite("mean", config.mean)
    std = check_range("std", config.std, 0.0, None)
    batch = check_int("batch_size", config.batch_size, 1)
    epochs = check_int("epochs", config.epochs, 1)
    steps = None if config.steps is None else check_int("steps", config.steps, 1)
    chunk = check_int("chunk_elements", config.chunk_elements, 1)
    if config.channelwise and topology != "conv":
        raise ValidationError("channelwise masks need the conv topology; got " + topology)
    if topology != "linear" and (config.rho != 0.0 or config.cos2 is not None):
        raise ValidationError("rho and cos2 apply to the linear topology only")
    if topology != "linear" and (config.weights is not None or config.width is not None):
        raise ValidationError("width and weights apply to the linear topology only")
    if topology != "conv" and config.spatial is not None:
        raise ValidationError("spatial applies to the conv topology only")

    data = None if config.data is None else _check_array("data", config.data)
    spatial = (1, 1)
    features: int | None = config.features
    width = config.width
    if data is not None:
        if topology == "conv":
            if data.ndim != 4:
                raise ValidationError(
                    f"data must be 4-D (rows, channels, height, width) for the conv topology; "
                    f"got shape {data.shape}"
                )
            features = _match("features", features, data.shape[1], "the data's channels")
            sh, sw = int(data.shape[2]), int(data.shape[3])
            if config.spatial is not None and tuple(config.spatial) != (sh, sw):
                raise ValidationError(
                    f"spatial must be {sh}x{sw} to match the data; got "
                    f"{config.spatial[0]}x{config.spatial[1]}"
                )
            spatial = (sh, sw)
        else:
            if data.ndim == 1:
                data = data[:, None]
            if data.ndim != 2:
                cols = "features" if topology == "direct" else "width"
                raise ValidationError(
                    f"data must be 2-D (rows, {cols}) for the {topology} topology; "
                    f"got shape {data.shape}"
                )
            if topology == "direct":
                features = _match("features", features, data.shape[1], "the data's columns")
            else:
                width = _match("width", width, data.shape[1], "the data's columns")
        rows = data.shape[0] if config.samples is None else config.samples
    else:
        rows = DEFAULT_SAMPLES if config.samples is None else config.samples
        if topology == "conv":
            sp = DEFAULT_SPATIAL if config.spatial is None else config.spatial
            spatial = (check_int("height", sp[0], 1), check_int("width_px", sp[1], 1))
    rows = check_int("samples", rows, 1)

    weights = None
    cos2 = None
    rho = 0.0
    if topology == "linear":
        if config.weights is not None:
            weights = _check_array("weights", config.weights)
            if weights.ndim == 1:
                weights = weights[None, :]
            if weights.ndim != 2:
                raise ValidationError(
                    f"weights must be 2-D (features, width) or 1-D (width,); got shape "
                    f"{weights.shape}"
                )
            features = _match("features", features, weights.shape[0], "the weights' rows")
            width = _match("width", width, weights.shape[1], "the weights' columns")
            if config.cos2 is not None:
                raise ValidationError("give either weights or cos2, not both")
        width = check_int("width", DEFAULT_WIDTH if width is None else width, 1)
        if config.cos2 is not None:
            cos2 = check_range("cos2", config.cos2, 0.0, 1.0)
            if width == 1 and cos2 != 1.0:
                raise ValidationError(f"cos2 must be 1 for width 1 (one weight); got {cos2:g}")
        if data is not None and config.rho != 0.0:
            raise ValidationError("rho applies to synthetic inputs; data bring their own")
        rho = check_rho(config.rho, width)
    features = check_int("features", DEFAULT_FEATURES if features is None else features, 1)
    if topology != "linear":
        width = features
    assert width is not None

    if batch > rows:
        raise ValidationError(f"batch_size must be <= samples ({rows}); got {batch}")
    positions = spatial[0] * spatial[1]
    preset.check_batch(batch * positions, "batch_size")
    full, rest = divmod(rows, batch)
    last = 0 if config.drop_last else rest
    if last and preset.unbiased and last * positions < 2:
        raise ValidationError(
            f"the last batch of each epoch would hold {last} row ({rows} samples, batch_size "
            f"{batch}); {preset.name} stores the unbiased variance, which needs >= 2 elements: "
            "use drop_last (--drop-last) or another batch size"
        )
    per_epoch = full + (1 if last else 0)
    total = epochs * per_epoch if steps is None else steps

    if config.fit and topology != "direct":
        raise ValidationError(f"fit needs the direct topology; got {topology}")
    lr = check_range("lr", config.lr, 0.0, None, closed="neither")
    probe = check_finite("probe", config.probe)

    row_elems = math.prod((features, *spatial)) if topology == "conv" else width + features
    chunk_rows = max(batch, (chunk // max(row_elems, 1)) // batch * batch)
    return _Plan(
        dropout=dropout,
        preset=preset,
        topology=topology,
        input_dist=input_dist,
        mean=mean,
        std=std,
        rows=rows,
        features=features,
        width=width,
        spatial=spatial,
        channelwise=bool(config.channelwise),
        batch=batch,
        last=last,
        full_batches=full,
        steps=total,
        rho=rho,
        cos2=cos2,
        data=data,
        resample=data is not None and config.samples is not None,
        weights=weights,
        fit=bool(config.fit),
        lr=lr,
        probe=probe,
        chunk_rows=chunk_rows,
    )


# --- inputs -------------------------------------------------------------------------------------


def load_activations(path: str | Path) -> FloatArray:
    """Read recorded activations from a ``.npy`` or ``.csv`` file (never unpickles).

    A ``.csv`` file is comma-separated numbers, one row per sample, with an optional header
    line. The result is float64 and finite.

    Raises
    ------
    InputFileError
        If the file is missing, empty, not numeric, holds NaN/infinite values, or is not a
        ``.npy``/``.csv`` file.
    """
    p = Path(path)
    if not p.exists():
        raise InputFileError(f"{p}: no such file")
    if not p.is_file():
        raise InputFileError(f"{p}: not a regular file")
    suffix = p.suffix.lower()
    if suffix == ".npy":
        try:
            with p.open("rb") as fh:
                magic = fh.read(6)
            if magic != b"\x93NUMPY":
                raise InputFileError(f"{p}: is not a valid .npy file")
            arr = np.load(p, allow_pickle=False)
        except ValueError as exc:
            why = "holds pickled objects" if "pickle" in str(exc) else "is not a valid .npy file"
            raise InputFileError(f"{p}: {why}") from None
        except OSError as exc:
            raise InputFileError(f"{p}: cannot read ({exc.strerror or exc})") from None
        if not isinstance(arr, np.ndarray) or arr.dtype.kind not in "fiub":
            kind = getattr(arr, "dtype", type(arr))
            raise InputFileError(f"{p}: must hold numbers; got dtype {kind}")
    elif suffix in (".csv", ".txt"):
        arr = _read_csv(p)
    else:
        raise InputFileError(f"{p}: must be a .npy or .csv file; got {suffix or 'no suffix'}")
    out = np.asarray(arr, dtype=np.float64)
    if out.size == 0:
        raise InputFileError(f"{p}: holds no values (shape {out.shape})")
    bad = int(np.count_nonzero(~np.isfinite(out)))
    if bad:
        raise InputFileError(f"{p}: holds {bad} NaN or infinite value(s); values must be finite")
    return out


def _read_csv(path: Path) -> FloatArray:
    """Comma-separated numbers with an optional header line."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputFileError(f"{path}: cannot read as text ({exc})") from None
    rows = [(i + 1, line) for i, line in enumerate(lines) if line.strip()]
    if not rows:
        raise InputFileError(f"{path}: is empty")

    def parse(line: str) -> list[float] | None:
        try:
            return [float(tok) for tok in line.split(",")]
        except ValueError:
            return None

    if parse(rows[0][1]) is None:  # a header line
        rows = rows[1:]
        if not rows:
            raise InputFileError(f"{path}: has a header but no data rows")
    values: list[list[float]] = []
    for lineno, line in rows:
        parsed = parse(line)
        if parsed is None:
            raise InputFileError(f"{path}: line {lineno} is not comma-separated numbers")
        if values and len(parsed) != len(values[0]):
            raise InputFileError(
                f"{path}: line {lineno} has {len(parsed)} values; expected {len(values[0])}"
            )
        values.append(parsed)
    return np.asarray(values, dtype=np.float64)


def _marginal(plan: _Plan) -> InputMoments:
    """Moments of one synthetic input element."""
    if plan.input_dist == "normal":
        return InputMoments.normal(plan.mean, plan.std**2)
    if plan.input_dist == "uniform":
        return InputMoments.uniform(plan.mean, plan.std**2)
    return InputMoments.relu_normal(plan.mean, plan.std**2)


def _draw_elements(plan: _Plan, shape: tuple[int, ...], rng: np.random.Generator) -> FloatArray:
    """I.i.d. draws of the synthetic input distribution."""
    if plan.input_dist == "uniform":
        return plan.mean + plan.std * math.sqrt(3.0) * (2.0 * rng.random(shape) - 1.0)
    z = plan.mean + plan.std * rng.standard_normal(shape)
    return np.maximum(z, 0.0) if plan.input_dist == "relu" else z


def _draw_dataset(plan: _Plan, rng: np.random.Generator) -> FloatArray:
    """The dataset rows; ``linear`` inputs are equicorrelated with ``rho``.

    Equicorrelation uses the symmetric square root of ``S = v((1-rho) I + rho 11')``:
    ``x = c + sqrt(v) (sqrt(1-rho) (u - mean(u)) + sqrt(1+(d-1) rho) mean(u))`` for standardised
    i.i.d. draws ``u``. Means and covariance are exact; the marginals are exactly the chosen
    distribution for ``normal`` (any rho) and for ``rho = 0``.
    """
    shape = (plan.rows, *plan.row_shape)
    if plan.topology != "linear" or plan.rho == 0.0:
        return _draw_elements(plan, shape, rng)
    mom = _marginal(plan)
    c, v = mom.mean, max(mom.var, 0.0)
    x = _draw_elements(plan, shape, rng)
    u = (x - c) / math.sqrt(v) if v > 0 else np.zeros(shape)
    ubar = u.mean(axis=1, keepdims=True)
    d = plan.width
    s_perp = math.sqrt(max(1.0 - plan.rho, 0.0))
    s_par = math.sqrt(max(1.0 + (d - 1) * plan.rho, 0.0))
    return np.asarray(c + math.sqrt(v) * (s_perp * (u - ubar) + s_par * ubar))


def _draw_weights(plan: _Plan, rng: np.random.Generator) -> FloatArray:
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


# --- BatchNorm running statistics ---------------------------------------------------------------


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


def _advance(state: BNState, means: FloatArray, stored: FloatArray, preset: Preset) -> BNState:
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
    w = (1.0 - a) * np.power(a, np.arange(k - 1, -1, -1, dtype=np.float64))
    decay = a**k
    rm = decay * state.running_mean + w @ means
    rv = decay * state.running_var + w @ stored
    return BNState(rm, rv, state.num_batches + k)


#: Largest ``(elements per batch) × channels`` for which :func:`_batch_moments` sums through a
#: 0/1 matrix product; beyond it (many channels) the product does too much work.
_PICK_MAX = 1 << 16


@functools.lru_cache(maxsize=16)
def _channel_picker(n: int, channels: int, positions: int) -> FloatArray:
    """``(n·C·P, C)`` 0/1 matrix: a flattened ``(n, C, P)`` batch times it sums each channel."""
    pick = np.repeat(np.tile(np.eye(channels), (n, 1)), positions, axis=0)
    pick.flags.writeable = False
    return pick


def _batch_moments(z: FloatArray, lead: int) -> tuple[FloatArray, FloatArray]:
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


def _stored_factor(preset: Preset, n: int) -> float:
    """Stored batch variance over the biased one: ``n/(n-1)`` (unbiased) or 1."""
    return n / (n - 1) if preset.unbiased else 1.0


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
        The framework convention: decay ``alpha`` (or the cumulative average) and whether the
        stored batch variance is unbiased (÷ (n-1)) or biased (÷ n).
    state:
        Statistics to continue from; default :meth:`BNState.initial` (mean 0, variance 1).

    Returns
    -------
    BNState
        Running mean and running variance (in the preset's stored convention) after the batches.

    Notes
    -----
    Per batch ``t``: mean ``m_t``, biased variance ``v_t``, stored ``s_t = v_t n/(n-1)`` or ``v_t``;
    ``R_t = alpha R_{t-1} + (1-alpha) s_t`` (``R_t = R_{t-1} + (s_t - R_{t-1})/t`` when
    cumulative). This is the update the engine of :func:`simulate` uses; it is exposed so the
    conformance tests can feed the same batches to PyTorch and Keras.

    Examples
    --------
    >>> from varshift.core.presets import resolve_preset
    >>> x = np.array([[[0.0], [2.0]], [[1.0], [1.0]]])  # two batches of two rows, one feature
    >>> s = bn_running_stats(x, resolve_preset("torch", 0.5))
    >>> s.running_mean.tolist(), s.running_var.tolist(), s.num_batches
    ([0.75], [0.75], 2)
    """
    groups: list[FloatArray] = []
    if isinstance(batches, np.ndarray) and batches.ndim >= 3:
        groups.append(_check_array("batches", batches))
    else:
        pending: list[FloatArray] = []
        for item in batches:  # type: ignore[union-attr]
            b = _check_array("batch", item)
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
    channels = groups[0].shape[2]
    st = state if state is not None else BNState.initial(channels)
    for g in groups:
        if g.shape[2] != channels:
            raise ValidationError(f"every batch must have {channels} channels; got {g.shape[2]}")
        n = g.shape[1] * math.prod(g.shape[3:])
        preset.check_batch(n, "elements per channel")
        means, var = _batch_moments(g, 1)  # (T, n, C, *spatial)
        st = _advance(st, means, var * _stored_factor(preset, n), preset)
    return st


# --- results ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FeatureRow:
    """One BN feature's simulation beside theory (see :func:`simulate`).

    Variances are population variances unless named ``running``/``batch`` (the preset's stored
    convention). ``None`` marks a quantity undefined for the topology.

    Attributes
    ----------
    feature:
        ``"0"``, ``"1"``, … or ``"mean"`` for the average over features.
    input_mean, input_var:
        ``c`` and ``v`` of the dropout input, measured on the dataset (``linear``: averaged over
        the unit's ``width`` inputs).
    D:
        ``linear``: ``(sum w)² / sum w² = d cos²θ`` of the unit's weights.
    train_mean_theory, train_var_theory, test_var_theory, shift_ratio_theory:
        Closed forms for what BN sees in training and at test time, and ``Delta = test/train``.
    batch_var_expected, batch_var_sd:
        Mean and sd of one stored batch variance of a full batch.
    running_mean_expected, running_mean_sd, running_mean, z_mean:
        Theory's expected running mean with its noise sd, the simulated one and its z-score.
    running_var_expected, running_var_sd, running_var, z_var:
        The same for the stored running variance.
    test_mean, test_var:
        What BN sees at test time (dropout off), measured on the dataset: the "real" variance.
    shift_ratio_measured:
        ``test_var / running_var``: the real variance over the recorded one.
    corrected_var_debiased, corrected_var_naive:
        Data-free corrections of the simulated running statistics (population target; direct
        and conv only), and ``error_*`` their relative error against ``test_var``.
    """

    feature: str
    input_mean: float
    input_var: float
    D: float | None
    train_mean_theory: float
    train_var_theory: float
    test_var_theory: float
    shift_ratio_theory: float
    batch_var_expected: float
    batch_var_sd: float
    running_mean_expected: float
    running_mean_sd: float
    running_mean: float
    z_mean: float
    running_var_expected: float
    running_var_sd: float
    running_var: float
    z_var: float
    test_mean: float
    test_var: float
    shift_ratio_measured: float
    corrected_var_debiased: float | None
    corrected_var_naive: float | None
    error_debiased: float | None
    error_naive: float | None


@dataclass(frozen=True)
class FitRow:
    """One feature of the ``fit`` demonstration (identity target, Adam on ``gamma, beta``).

    Attributes
    ----------
    gamma_star, beta_star:
        The least-squares optimum under dropout (:func:`varshift.core.theory.gamma_star`, with eps).
    gamma_star_clean:
        The optimum without dropout, ``v / sqrt(v + eps)``.
    gamma_clean, beta_clean, running_mean_clean, running_var_clean:
        The model trained without dropout.
    gamma_dropout, beta_dropout:
        The model trained with dropout (its running statistics are the feature's ``running_*``).
    corrected_running_mean, corrected_running_var:
        Its running statistics after the data-free correction (debiased, stored convention).
    pred_clean, pred_dropout, pred_corrected:
        Test-time outputs for ``probe``: ``gamma (x - mean)/sqrt(var + eps) + beta``.
    pred_dropout_theory, pred_corrected_theory:
        The same with ``gamma*, beta*`` and theory's expected running statistics.
    """

    feature: str
    probe: float
    gamma_star: float
    beta_star: float
    gamma_star_clean: float
    gamma_clean: float
    beta_clean: float
    gamma_dropout: float
    beta_dropout: float
    running_mean_clean: float
    running_var_clean: float
    corrected_running_mean: float
    corrected_running_var: float
    pred_clean: float
    pred_dropout: float
    pred_corrected: float
    pred_dropout_theory: float
    pred_corrected_theory: float


@dataclass(frozen=True)
class FitResult:
    """The ``fit`` demonstration: per-feature rows, their mean, and the optimiser used."""

    rows: tuple[FitRow, ...]
    mean: FitRow
    lr: float
    optimizer: str = "adam (keras defaults: beta_1 0.9, beta_2 0.999, epsilon 1e-7)"


@dataclass(frozen=True)
class SimSummary:
    """Run facts and the simulation summarised over features.

    Attributes
    ----------
    rows, features, batch_size, elements_per_batch, last_batch_elements:
        Dataset rows N, BN features, rows per batch b, elements per channel n of a full batch,
        and of the smaller last batch (0 if none).
    batches_per_epoch, epochs, steps:
        The schedule actually run (``epochs`` counts a final partial epoch).
    residual_weight:
        ``alpha^T``: the weight the initial values 0/1 still carry.
    rms_z_mean, max_abs_z_mean, rms_z_var, max_abs_z_var:
        Root-mean-square and largest absolute z-scores over features.
    mean:
        The per-feature columns averaged over features (``feature == "mean"``).
    """

    topology: str
    rows: int
    features: int
    batch_size: int
    elements_per_batch: int
    last_batch_elements: int
    batches_per_epoch: int
    epochs: int
    steps: int
    residual_weight: float
    rms_z_mean: float
    max_abs_z_mean: float
    rms_z_var: float
    max_abs_z_var: float
    mean: FeatureRow


@dataclass(frozen=True)
class SimResult:
    """What :func:`simulate` returns.

    ``features`` has one row per BN feature; ``fit`` is set when ``config.fit``; ``weights`` is
    the linear map used by the ``linear`` topology (``None`` otherwise); ``trace`` is the
    running variance along the run when ``simulate(trace=...)`` asked for it.
    """

    config: SimConfig
    features: tuple[FeatureRow, ...]
    summary: SimSummary
    fit: FitResult | None
    weights: FloatArray | None = field(default=None, compare=False, repr=False)
    trace: RunningTrace | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, eq=False)
class RunningTrace:
    """The stored running variance along a run, at up to ``trace`` evenly spaced steps.

    Attributes
    ----------
    steps:
        ``(P,)`` updates done, increasing from 0 (the initial value 1) to ``T`` (the end of the
        run, where ``running_var`` equals the result's).
    running_var:
        ``(P, F)`` the simulated running variance after ``steps`` updates (stored convention).
    running_var_expected, running_var_sd:
        ``(P, F)`` theory for independent batches of the full size: EMA
        ``E[R_t] = alpha^t 1 + (1 - alpha^t) E[s]``,
        ``Var[R_t] = (1-alpha)/(1+alpha) (1 - alpha^(2t)) Var[s]``; cumulative average
        ``E[R_t] = E[s]``, ``Var[R_t] = Var[s]/t`` (t >= 1). ``E[s]`` and ``Var[s]`` are the
        rows' ``batch_var_expected`` and ``batch_var_sd²``. At ``t = T`` the rows'
        ``running_var_expected``/``running_var_sd`` are the exact ones (smaller last batches,
        rows drawn without replacement within an epoch); this band neglects both.
    """

    steps: IntArray
    running_var: FloatArray
    running_var_expected: FloatArray
    running_var_sd: FloatArray


@dataclass(frozen=True)
class Chunk:
    """One streamed chunk, as passed to ``simulate(observer=...)`` (for tests and debugging).

    ``E`` epochs share the row range ``[row_start, row_start + R)`` of their permutations.

    Attributes
    ----------
    first_step:
        Index (0-based) of the chunk's first batch in the whole run.
    epochs:
        ``(E,)`` epoch indices.
    rows:
        ``(E, R)`` dataset row indices, in training order.
    x, noise, bn_input:
        ``(E, R, ...)``: dropout inputs, dropout noise (:meth:`Dropout.sample_noise`) and what
        BN sees.
    batch_rows:
        Rows of each batch of one epoch's range, in order.
    """

    first_step: int
    epochs: IntArray
    rows: IntArray
    x: FloatArray
    noise: FloatArray
    bn_input: FloatArray
    batch_rows: tuple[int, ...]

    def batches(self) -> Iterator[tuple[FloatArray, FloatArray, FloatArray]]:
        """``(x, noise, bn_input)`` of every batch, in training order (a Python loop: tests)."""
        for e in range(self.x.shape[0]):
            start = 0
            for size in self.batch_rows:
                sl = slice(start, start + size)
                yield self.x[e, sl], self.noise[e, sl], self.bn_input[e, sl]
                start += size


# --- the engine ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _ChunkSpec:
    epoch: int  # first epoch
    n_epochs: int
    r0: int  # row range in each epoch's permutation
    r1: int


def _chunks(plan: _Plan) -> Iterator[_ChunkSpec]:
    """Split the schedule into chunks of whole epochs, or of batches inside one epoch."""
    used, per_epoch, b = plan.used_rows, plan.per_epoch, plan.batch
    done, epoch = 0, 0
    while done < plan.steps:
        left = plan.steps - done
        if used <= plan.chunk_rows:
            whole = left // per_epoch
            if whole >= 1:
                e = min(whole, max(1, plan.chunk_rows // used))
                yield _ChunkSpec(epoch, e, 0, used)
                epoch, done = epoch + e, done + e * per_epoch
            else:  # a final partial epoch: its first `left` batches are all full ones
                yield _ChunkSpec(epoch, 1, 0, left * b)
                epoch, done = epoch + 1, done + left
            continue
        r0 = 0
        while r0 < used and done < plan.steps:
            r1 = min(used, r0 + plan.chunk_rows)
            n_steps = _steps_in(plan, r0, r1)
            if done + n_steps > plan.steps:
                r1 = r0 + (plan.steps - done) * b
                n_steps = plan.steps - done
            yield _ChunkSpec(epoch, 1, r0, r1)
            r0, done = r1, done + n_steps
        epoch += 1


def _batch_sizes(plan: _Plan, r0: int, r1: int) -> tuple[int, ...]:
    """Rows of each batch in rows ``[r0, r1)`` of an epoch (``r0`` is a batch boundary)."""
    full_end = plan.full_batches * plan.batch
    k = (min(r1, full_end) - r0) // plan.batch
    tail = (plan.last,) if r1 > full_end else ()
    return (plan.batch,) * k + tail


def _steps_in(plan: _Plan, r0: int, r1: int) -> int:
    return len(_batch_sizes(plan, r0, r1))


def _split_stats(z: FloatArray, sizes: tuple[int, ...]) -> tuple[FloatArray, FloatArray]:
    """Per-batch means and biased variances of ``z`` (E, R, ...) → ``(E·K, F)`` in order."""
    e = z.shape[0]
    tail = z.shape[2:]
    k_full = len(sizes) - (1 if sizes and sizes[-1] != sizes[0] else 0)
    b = sizes[0]
    zf = z[:, : k_full * b].reshape(e, k_full, b, *tail)
    means, var = _batch_moments(zf, 2)
    if k_full < len(sizes):
        zp = z[:, k_full * b :].reshape(e, 1, sizes[-1], *tail)
        mp, vp = _batch_moments(zp, 2)
        means = np.concatenate([means, mp], axis=1)
        var = np.concatenate([var, vp], axis=1)
    f = means.shape[-1]
    return means.reshape(-1, f), var.reshape(-1, f)


class _Fit:
    """Adam on ``(gamma, beta)`` of two models (clean, dropout) with an identity target.

    Per batch, BN normalises with the batch statistics, ``zhat = (y - m)/sqrt(v + eps)``; the
    loss is Keras' ``mse`` (mean over rows and features), so with ``mean(zhat) = 0`` and
    ``mean(zhat²) = v/(v + eps)``: ``dL/dgamma = (2/F)(gamma v/(v+eps) - cov(x, y)/sqrt(v+eps))``
    and ``dL/dbeta = (2/F)(beta - mean(x))``. Adam as in ``keras/src/optimizers/adam.py``.
    """

    def __init__(self, features: int, lr: float) -> None:
        # theta[param, model, feature]: param 0 = gamma, 1 = beta; model 0 = clean, 1 = dropout.
        self.theta = np.zeros((2, 2, features))
        self.theta[0] = 1.0
        self.m = np.zeros_like(self.theta)
        self.v = np.zeros_like(self.theta)
        self.lr = lr
        self.t = 0

    def run(self, q: FloatArray, r: FloatArray) -> None:
        """K Adam steps with gradients ``g_k = q_k * theta - r_k`` (arrays ``(K, 2, 2, F)``)."""
        k = q.shape[0]
        steps = np.arange(self.t + 1, self.t + k + 1, dtype=np.float64)
        rates = self.lr * np.sqrt(1.0 - ADAM_BETA_2**steps) / (1.0 - ADAM_BETA_1**steps)
        theta, m, v = self.theta, self.m, self.v
        g = np.empty_like(theta)
        tmp = np.empty_like(theta)
        c1, c2 = 1.0 - ADAM_BETA_1, 1.0 - ADAM_BETA_2
        for i in range(k):  # Adam is a nonlinear recurrence: one step at a time
            np.multiply(theta, q[i], out=g)
            g -= r[i]
            np.subtract(g, m, out=tmp)
            tmp *= c1
            m += tmp
            np.multiply(g, g, out=tmp)
            tmp -= v
            tmp *= c2
            v += tmp
            np.sqrt(v, out=tmp)
            tmp += ADAM_EPSILON
            np.divide(m, tmp, out=tmp)
            tmp *= rates[i]
            theta -= tmp
        self.t += k


def _fit_coefficients(
    x: FloatArray, y: FloatArray, sizes: tuple[int, ...], eps: float
) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray]:
    """Gradient coefficients ``(q, r)`` per batch, and the clean model's batch mean/variance."""
    mx, vx = _split_stats(x, sizes)
    _, vy = _split_stats(y, sizes)
    cov = _split_stats_cov(x, y, sizes)
    k, f = mx.shape
    scale = 2.0 / f
    q = np.empty((k, 2, 2, f))
    r = np.empty((k, 2, 2, f))
    q[:, 0, 0] = scale * vx / (vx + eps)
    q[:, 0, 1] = scale * vy / (vy + eps)
    q[:, 1] = scale
    r[:, 0, 0] = scale * vx / np.sqrt(vx + eps)
    r[:, 0, 1] = scale * cov / np.sqrt(vy + eps)
    r[:, 1, 0] = scale * mx
    r[:, 1, 1] = scale * mx
    return q, r, mx, vx


def _split_stats_cov(x: FloatArray, y: FloatArray, sizes: tuple[int, ...]) -> FloatArray:
    """Per-batch biased covariance of ``x`` and ``y`` (E, R, F) → ``(E·K, F)``."""
    e, f = x.shape[0], x.shape[-1]
    k_full = len(sizes) - (1 if sizes and sizes[-1] != sizes[0] else 0)
    b = sizes[0]
    out = []
    for lo, cnt, size in ((0, k_full, b), (k_full * b, len(sizes) - k_full, sizes[-1])):
        if cnt == 0:
            continue
        xs = x[:, lo : lo + cnt * size].reshape(e, cnt, size, f)
        ys = y[:, lo : lo + cnt * size].reshape(e, cnt, size, f)
        dx = xs - xs.mean(axis=2, keepdims=True)
        dy = ys - ys.mean(axis=2, keepdims=True)
        out.append((dx * dy).mean(axis=2))
    return np.concatenate(out, axis=1).reshape(-1, f)


@dataclass(frozen=True)
class _Schedule:
    """Weight sums of the running average over the run's schedule (data-free)."""

    residual: float  # weight of R_0
    w1: tuple[float, float]  # sum of weights of full / last batches
    w2: tuple[float, float]  # sum of squared weights
    perm: dict[str, float]  # permutation corrections, see _schedule


#: Coefficient pairs whose permutation corrections :func:`_band` needs.
_PAIRS = (("m", "m"), ("v", "v"), ("d", "d"), ("v", "d"))


def _schedule(plan: _Plan, block: int = 1 << 15) -> _Schedule:
    """Sum the running-average weights ``w_t`` over the schedule, in bounded memory.

    EMA: ``w_t = (1-alpha) alpha^(T-t)``; cumulative: ``1/T``. For per-row coefficients
    ``m_t = w_t/n_t`` (running mean), ``v_t = w_t f_t/n_t`` and ``d_t = w_t f_t/n_t²`` (running
    variance, see :func:`_band`) the correction of pair ``(a, b)`` is
    ``sum_t b_t a_t b_t - sum_epochs (sum_{t in epoch} b_t a_t)(sum_{t in epoch} b_t b_t)``
    (``b_t`` rows in batch t). ``block`` steps at a time: its dozen arrays stay near 4 MB
    whatever the number of steps (``bench/``: peak memory at 1000 epochs as at 10).
    """
    total, per_epoch, preset = plan.steps, plan.per_epoch, plan.preset
    p = plan.positions
    n_full, n_last = plan.batch * p, max(plan.last, 1) * p
    f_full, f_last = _stored_factor(preset, n_full), _stored_factor(preset, max(n_last, 2))
    w1 = [0.0, 0.0]
    w2 = [0.0, 0.0]
    direct = dict.fromkeys(_PAIRS, 0.0)
    epochs = dict.fromkeys(_PAIRS, 0.0)
    carry_epoch = -1
    carry = {"m": 0.0, "v": 0.0, "d": 0.0}

    def close(sums: dict[str, FloatArray]) -> None:
        for a, b in _PAIRS:
            epochs[(a, b)] += float((sums[a] * sums[b]).sum())

    for start in range(0, total, block):
        g = np.arange(start, min(total, start + block))
        if preset.alpha is None:
            w = np.full(g.shape, 1.0 / total)
        else:
            w = (1.0 - preset.alpha) * np.power(preset.alpha, (total - 1 - g).astype(np.float64))
        epoch = g // per_epoch
        is_last = (g % per_epoch) == plan.full_batches
        rows = np.where(is_last, plan.last, plan.batch)
        n = rows * p
        coef = {"m": w / n, "v": w * np.where(is_last, f_last, f_full) / n}
        coef["d"] = coef["v"] / n
        for cls, mask in enumerate((~is_last, is_last)):
            w1[cls] += float(w[mask].sum())
            w2[cls] += float((w[mask] ** 2).sum())
        for a, b in _PAIRS:
            direct[(a, b)] += float((rows * coef[a] * coef[b]).sum())
        per = {
            k: np.bincount(epoch - epoch[0], weights=rows * c).astype(np.float64)
            for k, c in coef.items()
        }
        if epoch[0] == carry_epoch:
            for k in per:
                per[k][0] += carry[k]
        elif carry_epoch >= 0:
            close({k: np.array([v], dtype=np.float64) for k, v in carry.items()})
        close({k: v[:-1] for k, v in per.items()})
        carry = {k: float(v[-1]) for k, v in per.items()}
        carry_epoch = int(epoch[-1])
    close({k: np.array([v], dtype=np.float64) for k, v in carry.items()})
    residual = 0.0 if preset.alpha is None else float(preset.alpha**total)
    perm = {f"{a}{b}": direct[(a, b)] - epochs[(a, b)] for a, b in _PAIRS}
    return _Schedule(residual=residual, w1=(w1[0], w1[1]), w2=(w2[0], w2[1]), perm=perm)


def _noise_cumulants(dropout: Dropout) -> tuple[float, float, float, float]:
    """Mean and cumulants ``k2, k3, k4`` of the scalar noise ``xi`` in ``y = a(x) + b(x) xi``.

    Multiplicative kinds: ``xi = m`` (``a = 0``, ``b = x``); alpha dropout: ``xi ~ Bernoulli(q)``,
    ``a = d`` (the dropped value), ``b = A x + B - d``. Written without cancellation.
    """
    q, r, kind = dropout.keep, dropout.rate, dropout.kind
    if kind in ("bernoulli", "vanilla", "alpha"):
        s = 1.0 / q if kind == "bernoulli" else 1.0
        mean = 1.0 if kind == "bernoulli" else q
        qr = q * r
        return mean, s**2 * qr, s**3 * qr * (1.0 - 2.0 * q), s**4 * qr * (1.0 - 6.0 * qr)
    if kind == "gaussian":
        return 1.0, r / q, 0.0, 0.0
    b2 = dropout.beta**2
    return 1.0, b2 / 3.0, 0.0, -2.0 * b2 * b2 / 15.0


@dataclass(frozen=True)
class _RowMoments:
    """Per dataset row and BN feature, conditional on the row's inputs ``x`` (noise integrated
    out): ``G = E[Y|x]`` with ``Y`` the row's sum of the feature's P BN-input elements, and for
    ``D = Y - P mu`` and ``Q = sum_p (y_p - mu)²``: ``E[Q]``, ``E[Q²]``, ``E[D²]``, ``E[D⁴]``,
    ``E[Q D²]``. ``mu`` is the population mean of one element."""

    g: FloatArray
    mu: FloatArray
    eq: FloatArray
    eq2: FloatArray
    ed2: FloatArray
    ed4: FloatArray
    eqd2: FloatArray


def _moments_from_cumulants(
    k1: FloatArray, k2: FloatArray, k3: FloatArray, k4: FloatArray
) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray]:
    """Raw moments ``E[Z^j]``, j = 1..4, from cumulants."""
    k1s = k1 * k1
    return (
        k1,
        k2 + k1s,
        k3 + 3.0 * k2 * k1 + k1s * k1,
        k4 + 4.0 * k3 * k1 + 3.0 * k2 * k2 + 6.0 * k2 * k1s + k1s * k1s,
    )


def _element_affine(dropout: Dropout, x: FloatArray) -> tuple[FloatArray, FloatArray]:
    """``(E[y|x], b(x))`` of one dropout output element ``y = a(x) + b(x) xi``."""
    xbar = _noise_cumulants(dropout)[0]
    if dropout.multiplicative:
        return xbar * x, x
    a, b, d = dropout._alpha_affine()
    beta = a * x + b - d
    return d + xbar * beta, beta


def _element_mean(plan: _Plan, data: FloatArray, weights: FloatArray | None) -> FloatArray:
    """``mu``: population mean of one BN-input element per feature (``E[y|x]`` is affine)."""
    axes = (0, 2, 3) if plan.topology == "conv" else (0,)
    g_mean = _element_affine(plan.dropout, data.mean(axis=axes))[0]
    if plan.topology == "linear":
        assert weights is not None
        return np.asarray(g_mean @ weights.T)
    return g_mean


def _row_moments(
    plan: _Plan, data: FloatArray, weights: FloatArray | None, mu: FloatArray
) -> _RowMoments:
    """Exact conditional moments of each row's contribution to a batch's statistics.

    Elements of a row are ``y_p = a_p + b_p xi_p`` (:func:`_noise_cumulants`); they are
    independent given ``x`` except under channel-wise masks, where one ``xi`` is shared. For
    ``linear`` the single element per row is ``u = sum_i w_i y_i``, whose cumulants are
    ``sum_i w_i^j b_i^j k_j`` (independent masks). ``mu`` is :func:`_element_mean`.
    """
    _, k2, k3, k4 = _noise_cumulants(plan.dropout)
    g_el, beta = _element_affine(plan.dropout, data)
    n_rows, f, p = data.shape[0], plan.features, plan.positions
    if plan.topology == "linear":
        assert weights is not None
        g_unit = g_el @ weights.T
        b2, w2 = beta * beta, weights * weights
        cum = [
            g_unit - mu,
            b2 @ w2.T * k2,
            (b2 * beta) @ (w2 * weights).T * k3,
            (b2 * b2) @ (w2 * w2).T * k4,
        ]
        return _independent_rows(g_unit, mu, *(c[:, :, None] for c in cum))
    g_el = g_el.reshape(n_rows, f, p)
    beta = beta.reshape(n_rows, f, p)
    g = g_el.sum(axis=2)
    dev = g_el - mu[:, None]
    if not plan.channelwise:
        b2 = beta * beta
        return _independent_rows(g, mu, dev, b2 * k2, b2 * beta * k3, b2 * b2 * k4)
    # One xi per (row, channel): D = A0 + A1 eta, Q = B0 + B1 eta + B2 eta², eta = xi - E[xi].
    c4 = k4 + 3.0 * k2 * k2  # E[eta⁴]
    a0, a1 = dev.sum(axis=2), beta.sum(axis=2)
    b0, b1, b2 = (dev * dev).sum(axis=2), 2.0 * (dev * beta).sum(axis=2), (beta * beta).sum(axis=2)
    a0s, a1s = a0 * a0, a1 * a1
    return _RowMoments(
        g=g,
        mu=mu,
        eq=b0 + b2 * k2,
        eq2=b0 * b0 + (b1 * b1 + 2.0 * b0 * b2) * k2 + 2.0 * b1 * b2 * k3 + b2 * b2 * c4,
        ed2=a0s + a1s * k2,
        ed4=a0s * a0s + 6.0 * a0s * a1s * k2 + 4.0 * a0 * a1s * a1 * k3 + a1s * a1s * c4,
        eqd2=b0 * a0s
        + (b0 * a1s + 2.0 * b1 * a0 * a1 + b2 * a0s) * k2
        + (b1 * a1s + 2.0 * b2 * a0 * a1) * k3
        + b2 * a1s * c4,
    )


def _independent_rows(
    g: FloatArray, mu: FloatArray, k1: FloatArray, k2: FloatArray, k3: FloatArray, k4: FloatArray
) -> _RowMoments:
    """:class:`_RowMoments` for elements independent given ``x``; ``k_j`` are ``(N, F, P)``
    cumulants of ``Z_p = y_p - mu``."""
    if k1.shape[2] == 1:  # one element per row: Q = D², so every moment is E[Z²] or E[Z⁴]
        _, z2, _, z4 = _moments_from_cumulants(k1[:, :, 0], k2[:, :, 0], k3[:, :, 0], k4[:, :, 0])
        return _RowMoments(g=g, mu=mu, eq=z2, eq2=z4, ed2=z2, ed4=z4, eqd2=z4)
    e1, e2, e3, e4 = _moments_from_cumulants(k1, k2, k3, k4)
    s1, s2, s3, s4 = (e.sum(axis=2) for e in (e1, e2, e3, e4))
    s11, s22 = (e1 * e1).sum(axis=2), (e2 * e2).sum(axis=2)
    s31, s21, s211 = (e3 * e1).sum(axis=2), (e2 * e1).sum(axis=2), (e2 * e1 * e1).sum(axis=2)
    kk1, kk2, kk3, kk4 = (k.sum(axis=2) for k in (k1, k2, k3, k4))  # cumulants of D add up
    pairs2 = s2 * s2 - s22  # sum_{p != q} e2_p e2_q
    return _RowMoments(
        g=g,
        mu=mu,
        eq=s2,
        eq2=s4 + pairs2,
        ed2=s2 + s1 * s1 - s11,
        ed4=_moments_from_cumulants(kk1, kk2, kk3, kk4)[3],
        eqd2=s4
        + pairs2
        + 2.0 * (s3 * s1 - s31)
        + s2 * (s1 * s1 - s11)
        - 2.0 * s1 * s21
        + 2.0 * s211,
    )


def _trace_steps(total: int, points: int) -> IntArray:
    """Up to ``points`` evenly spaced update counts from 0 to ``total`` (both included)."""
    if points > total:
        return np.arange(total + 1, dtype=np.int64)
    return np.unique(np.rint(np.linspace(0.0, total, points)).astype(np.int64))


class _Tracer:
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
                state = _advance(state, means[pos:j], stored[pos:j], preset)
                pos = j
            self.values[self.next] = state.running_var
            self.next += 1


def _trace_result(plan: _Plan, tracer: _Tracer, band: dict[str, FloatArray]) -> RunningTrace:
    """The recorded trace beside the independent-batch band of :class:`RunningTrace`."""
    t = tracer.steps.astype(np.float64)
    if plan.preset.alpha is None:
        resid = np.where(t == 0, 1.0, 0.0)
        sq = np.where(t == 0, 0.0, 1.0 / np.maximum(t, 1.0))
    else:
        a = plan.preset.alpha
        resid = np.power(a, t)
        # Squared EMA weights sum to (1-a)²(1-a^2t)/(1-a²) (theory.running_stats).
        sq = (1.0 - a) / (1.0 + a) * (1.0 - np.power(a, 2.0 * t))
    es = band["batch_var_expected"][None, :]
    vs = band["batch_var_sd"][None, :] ** 2
    return RunningTrace(
        steps=tracer.steps,
        running_var=tracer.values,
        running_var_expected=resid[:, None] + (1.0 - resid[:, None]) * es,
        running_var_sd=np.sqrt(sq[:, None] * vs),
    )


def simulate(
    config: SimConfig,
    rng: np.random.Generator | int | None = None,
    *,
    progress: ProgressCallback | None = None,
    observer: Callable[[Chunk], None] | None = None,
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
    See the module docstring for the schedule, the streaming and how the noise band is derived.

    Examples
    --------
    >>> res = simulate(SimConfig(rate=0.5, samples=2000, features=2, epochs=2), rng=0)
    >>> round(res.features[0].shift_ratio_theory, 2), res.summary.steps
    (0.5, 126)
    """
    plan = _plan(config)
    points = check_int("trace", trace, 0)
    if points == 1:
        raise ValidationError("trace must be 0 (off) or >= 2 points; got 1")
    gen = np.random.default_rng(rng)
    rng_data, rng_weights, rng_perm, rng_noise = gen.spawn(4)
    if plan.data is None:
        data = _draw_dataset(plan, rng_data)
    elif plan.resample:
        data = plan.data[rng_data.integers(0, plan.data.shape[0], size=plan.rows)]
    else:
        data = plan.data
    weights = None
    if plan.topology == "linear":
        weights = plan.weights if plan.weights is not None else _draw_weights(plan, rng_weights)

    dropout, preset, f = plan.dropout, plan.preset, plan.features
    state = BNState.initial(f)
    clean = BNState.initial(f)
    fit = _Fit(f, plan.lr) if plan.fit else None
    tracer = _Tracer(_trace_steps(plan.steps, points), state) if points else None
    perm = np.empty((1, plan.rows), dtype=np.int64)
    scratch = _Scratch()
    scale = dropout.indicator_scale
    done = 0
    for spec in _chunks(plan):
        if spec.r0 == 0:
            perm = np.stack([rng_perm.permutation(plan.rows) for _ in range(spec.n_epochs)])
        rows = perm[:, spec.r0 : spec.r1]
        # Indices are valid, so mode="clip" checks nothing; "raise" would buffer the output.
        x = scratch.get("x", (*rows.shape, *plan.row_shape))
        np.take(data, rows, axis=0, out=x, mode="clip")
        noise = scratch.get("noise", (*rows.shape, *plan.mask_shape))
        y = scratch.get("y", x.shape)
        if scale is not None:
            # Inverted dropout is x·a·s with a the keep indicator: BN sees its statistics from
            # x·a, times s (mean) and s² (variance) per batch, which saves a pass over the chunk.
            np.multiply(x, dropout.sample_keep(rng_noise, noise), out=y)
        else:
            y = np.asarray(
                dropout.apply(x, dropout.sample_noise(noise.shape, rng_noise, out=noise))
            )
        z = y @ weights.T if weights is not None else y
        sizes = _batch_sizes(plan, spec.r0, spec.r1)
        means, var = _split_stats(z, sizes)
        n_of = np.tile(np.asarray(sizes), spec.n_epochs) * plan.positions
        if scale is not None and scale != 1.0:
            means *= scale
            var *= scale * scale
            if fit is not None or observer is not None:  # they see the layers' true outputs
                noise *= scale
                y *= scale
                z = y @ weights.T if weights is not None else y
        if preset.unbiased:
            stored = var * (n_of / (n_of - 1))[:, None]
        else:
            stored = var
        before, state = state, _advance(state, means, stored, preset)
        if tracer is not None:
            tracer.record(before, means, stored, preset, state)
        if fit is not None:
            q, r, mx, vx = _fit_coefficients(x, y, sizes, preset.eps)
            fit.run(q, r)
            sx = vx * (n_of / (n_of - 1))[:, None] if preset.unbiased else vx
            clean = _advance(clean, mx, sx, preset)
        if observer is not None:
            observer(
                Chunk(
                    first_step=done,
                    epochs=np.arange(spec.epoch, spec.epoch + spec.n_epochs),
                    rows=rows,
                    x=x.copy(),  # the buffers are reused by the next chunk
                    noise=noise.copy(),
                    bn_input=z.copy(),
                    batch_rows=sizes,
                )
            )
        done += means.shape[0]
        if progress is not None:
            progress(done, plan.steps)
    return _assemble(plan, config, data, weights, state, clean, fit, tracer)


class _Scratch:
    """Named flat buffers reused across chunks, handed out as views of the wanted shape.

    A chunk's arrays are the same size every time; allocating them afresh costs page faults
    and zeroing of new memory once they exceed malloc's mmap threshold (``bench/``).
    """

    def __init__(self) -> None:
        self._buffers: dict[str, FloatArray] = {}

    def get(self, name: str, shape: tuple[int, ...]) -> FloatArray:
        size = math.prod(shape)
        buf = self._buffers.get(name)
        if buf is None or buf.size < size:
            buf = self._buffers[name] = np.empty(size)
        return buf[:size].reshape(shape)


class _RowSums:
    """Streaming means over dataset rows of :class:`_RowMoments`, with population variances of
    ``g``, ``eq``, ``ed2`` and the covariance of ``eq`` and ``ed2`` (Chan et al.'s update)."""

    MEANS = ("g", "eq", "ed2", "ed4", "eq2", "eqd2")
    SPREAD = ("g", "eq", "ed2")

    def __init__(self, features: int) -> None:
        self.count = 0
        self.mean = {k: np.zeros(features) for k in self.MEANS}
        self.m2 = {k: np.zeros(features) for k in self.SPREAD}
        self.c = np.zeros(features)

    def add(self, rm: _RowMoments) -> None:
        k = rm.g.shape[0]
        total = self.count + k
        w = self.count * k / total
        cols = {name: getattr(rm, name) for name in self.MEANS}
        # With one element per row several moments are one array (Q = D²): reduce each once.
        means: dict[int, FloatArray] = {}
        devs: dict[int, FloatArray] = {}
        squares: dict[int, FloatArray] = {}
        for col in cols.values():
            if id(col) not in means:
                means[id(col)] = col.mean(axis=0)
        for name in self.SPREAD:
            col = cols[name]
            if id(col) not in devs:
                devs[id(col)] = col - means[id(col)]
                squares[id(col)] = (devs[id(col)] ** 2).sum(axis=0)
        delta = {}
        for name, col in cols.items():
            delta[name] = means[id(col)] - self.mean[name]
            if name in self.SPREAD:
                self.m2[name] = self.m2[name] + squares[id(col)] + delta[name] ** 2 * w
            self.mean[name] = self.mean[name] + delta[name] * (k / total)
        dq, dd = devs[id(cols["eq"])], devs[id(cols["ed2"])]
        cross = squares[id(cols["eq"])] if dq is dd else (dq * dd).sum(axis=0)
        self.c = self.c + cross + delta["eq"] * delta["ed2"] * w
        self.count = total

    @property
    def var(self) -> dict[str, FloatArray]:
        return {k: v / self.count for k, v in self.m2.items()}

    @property
    def cov(self) -> FloatArray:
        return self.c / self.count


def _band(
    plan: _Plan, data: FloatArray, weights: FloatArray | None, sched: _Schedule
) -> dict[str, FloatArray]:
    """Theory's expectations and noise sds of the running statistics, per feature.

    With per-row ``Q_r``, ``D_r`` (:class:`_RowMoments`), a batch of ``b`` rows has biased
    variance ``s = mean_r(Q_r)/P - (mean_r D_r)²/P²``. For rows drawn i.i.d. from the dataset:
    ``Var[s] = Var Q/(P² b) + (E D⁴ + (2b-3)(E D²)²)/(P⁴ b³) - 2 Cov(Q, D²)/(P³ b²)`` (for
    ``P = 1`` this is the classic ``(b-1)²/b³ mu4 - (b-1)(b-3)/b³ sigma⁴``), times ``f²`` if
    stored unbiased. The expectation uses the exact without-replacement variance of the batch
    mean; the band swaps the i.i.d. variance of the per-row part of ``s``,
    ``(f/n)(Q_r - D_r²/n)`` projected on the row, for its permutation variance.
    """
    big_n, p, preset = plan.rows, plan.positions, plan.preset
    mu = _element_mean(plan, data, weights)
    acc = _RowSums(plan.features)
    for start in range(0, big_n, plan.chunk_rows):  # bounded memory, like the simulation
        acc.add(_row_moments(plan, data[start : start + plan.chunk_rows], weights, mu))
    var_g, var_h, var_k, cov_hk = acc.var["g"], acc.var["eq"], acc.var["ed2"], acc.cov
    m_eq, m_ed2, m_ed4 = acc.mean["eq"], acc.mean["ed2"], acc.mean["ed4"]
    var_q = acc.mean["eq2"] - m_eq * m_eq
    cov_qd2 = acc.mean["eqd2"] - m_eq * m_ed2
    sigma2 = m_eq / p
    mean_nc = m_ed2 - var_g  # E[Var(Y|x)]
    fpc_scale = 1.0 / (big_n - 1) if big_n > 1 else 0.0

    classes = ((plan.batch, 0), (plan.last, 1)) if plan.last else ((plan.batch, 0),)
    expected_s: dict[int, FloatArray] = {}
    var_s: dict[int, FloatArray] = {}
    for b, cls in classes:
        n = b * p
        f2 = _stored_factor(preset, max(n, 2)) ** 2
        var_mean = (var_g * (big_n - b) * fpc_scale + mean_nc) / (b * p * p)
        expected_s[cls] = (sigma2 - var_mean) * math.sqrt(f2)
        var_s[cls] = f2 * (
            var_q / (p * p * b)
            + (m_ed4 + (2 * b - 3) * m_ed2 * m_ed2) / (p**4 * b**3)
            - 2.0 * cov_qd2 / (p**3 * b * b)
        )
    exp_var = sched.residual + sum(sched.w1[c] * expected_s[c] for _, c in classes)
    perm_var = var_h * sched.perm["vv"] + var_k * sched.perm["dd"] - 2.0 * cov_hk * sched.perm["vd"]
    var_var = sum(sched.w2[c] * var_s[c] for _, c in classes) + fpc_scale * perm_var
    var_mean_t = (
        sum(sched.w2[c] * m_ed2 / (b * p * p) for b, c in classes)
        + var_g * fpc_scale * sched.perm["mm"]
    )
    return {
        "mu": mu,
        "sigma2": sigma2,
        "batch_var_expected": expected_s[0],
        "batch_var_sd": np.sqrt(np.maximum(var_s[0], 0.0)),
        "running_mean_expected": (1.0 - sched.residual) * mu,
        "running_mean_sd": np.sqrt(np.maximum(var_mean_t, 0.0)),
        "running_var_expected": np.asarray(exp_var, dtype=np.float64),
        "running_var_sd": np.sqrt(np.maximum(var_var, 0.0)),
    }


def _z(sim: FloatArray, expected: FloatArray, sd: FloatArray) -> FloatArray:
    """``(sim - expected)/sd``; 0 when both the difference and sd vanish, NaN if only sd does."""
    diff = sim - expected
    with np.errstate(divide="ignore", invalid="ignore"):
        z = diff / sd
    tiny = np.abs(diff) <= 1e-12 * np.maximum(np.abs(expected), 1.0)
    return np.where(sd > 0, z, np.where(tiny, 0.0, np.nan))


def _ratio(num: FloatArray, den: FloatArray) -> FloatArray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den != 0, num / np.where(den != 0, den, 1.0), np.nan)


def _assemble(
    plan: _Plan,
    config: SimConfig,
    data: FloatArray,
    weights: FloatArray | None,
    state: BNState,
    clean: BNState,
    fit: _Fit | None,
    tracer: _Tracer | None = None,
) -> SimResult:
    """Theory, measurements and the result dataclasses."""
    dropout, preset, f = plan.dropout, plan.preset, plan.features
    sched = _schedule(plan)
    band = _band(plan, data, weights, sched)
    ts = dropout.test_scale
    if plan.topology == "conv":
        axes: tuple[int, ...] = (0, 2, 3)
        in_mean, in_var = data.mean(axis=axes), data.var(axis=axes)
        test = ts * data
        test_mean, test_var = test.mean(axis=axes), test.var(axis=axes)
    elif plan.topology == "direct":
        in_mean, in_var = data.mean(axis=0), data.var(axis=0)
        test_mean, test_var = ts * in_mean, (ts * data).var(axis=0)
    else:
        assert weights is not None
        c_vec, cov = (
            data.mean(axis=0),
            np.cov(data, rowvar=False, bias=True).reshape(plan.width, plan.width),
        )
        in_mean = np.full(f, c_vec.mean())
        in_var = np.full(f, np.diag(cov).mean())
        test = (ts * data) @ weights.T
        test_mean, test_var = test.mean(axis=0), test.var(axis=0)
    if plan.topology == "linear":
        assert weights is not None
        train_var_th, test_var_th = shift_linear(c_vec, cov, weights, dropout)
        d_eff = weights.sum(axis=1) ** 2 / (weights * weights).sum(axis=1)
    else:
        shifts = [
            shift_direct(float(c), float(v), dropout) for c, v in zip(in_mean, in_var, strict=True)
        ]
        train_var_th = np.array([s.train_var for s in shifts])
        test_var_th = np.array([s.test_var for s in shifts])
        d_eff = None
    ratio_th = _ratio(test_var_th, train_var_th)
    n_full = plan.batch * plan.positions
    rm, rv = state.running_mean, state.running_var
    z_mean = _z(rm, band["running_mean_expected"], band["running_mean_sd"])
    z_var = _z(rv, band["running_var_expected"], band["running_var_sd"])
    ratio_meas = _ratio(test_var, rv)
    deb = naive = err_deb = err_naive = None
    if plan.topology != "linear":
        _, deb = corrected_variance(rm, rv, dropout, preset, n_full, target="population")
        _, naive = corrected_variance(rm, rv, dropout, preset, n_full, method="naive")
        err_deb = _ratio(deb - test_var, test_var)
        err_naive = _ratio(naive - test_var, test_var)

    def opt(arr: FloatArray | None, j: int) -> float | None:
        return None if arr is None else float(arr[j])

    rows = tuple(
        FeatureRow(
            feature=str(j),
            input_mean=float(in_mean[j]),
            input_var=float(in_var[j]),
            D=opt(d_eff, j),
            train_mean_theory=float(band["mu"][j]),
            train_var_theory=float(train_var_th[j]),
            test_var_theory=float(test_var_th[j]),
            shift_ratio_theory=float(ratio_th[j]),
            batch_var_expected=float(band["batch_var_expected"][j]),
            batch_var_sd=float(band["batch_var_sd"][j]),
            running_mean_expected=float(band["running_mean_expected"][j]),
            running_mean_sd=float(band["running_mean_sd"][j]),
            running_mean=float(rm[j]),
            z_mean=float(z_mean[j]),
            running_var_expected=float(band["running_var_expected"][j]),
            running_var_sd=float(band["running_var_sd"][j]),
            running_var=float(rv[j]),
            z_var=float(z_var[j]),
            test_mean=float(test_mean[j]),
            test_var=float(test_var[j]),
            shift_ratio_measured=float(ratio_meas[j]),
            corrected_var_debiased=opt(deb, j),
            corrected_var_naive=opt(naive, j),
            error_debiased=opt(err_deb, j),
            error_naive=opt(err_naive, j),
        )
        for j in range(f)
    )
    summary = SimSummary(
        topology=plan.topology,
        rows=plan.rows,
        features=f,
        batch_size=plan.batch,
        elements_per_batch=n_full,
        last_batch_elements=plan.last * plan.positions,
        batches_per_epoch=plan.per_epoch,
        epochs=plan.epochs,
        steps=plan.steps,
        residual_weight=sched.residual,
        rms_z_mean=_rms(z_mean),
        max_abs_z_mean=_max_abs(z_mean),
        rms_z_var=_rms(z_var),
        max_abs_z_var=_max_abs(z_var),
        mean=_mean_row(rows, FeatureRow),
    )
    fit_result = None
    if fit is not None:
        fit_result = _fit_result(plan, in_mean, in_var, band, state, clean, fit)
    trace = _trace_result(plan, tracer, band) if tracer is not None else None
    return SimResult(config, rows, summary, fit_result, weights, trace)


def _rms(z: FloatArray) -> float:
    ok = z[np.isfinite(z)]
    return float(np.sqrt(np.mean(ok * ok))) if ok.size else math.nan


def _max_abs(z: FloatArray) -> float:
    ok = z[np.isfinite(z)]
    return float(np.max(np.abs(ok))) if ok.size else math.nan


def _mean_row(rows: Sequence[_Row], cls: type[_Row]) -> _Row:
    """The row of per-column means over features (``feature == "mean"``)."""
    values: dict[str, Any] = {}
    for fld in fields(cls):
        col = [getattr(r, fld.name) for r in rows]
        if fld.name == "feature":
            values[fld.name] = "mean"
        elif all(isinstance(v, float) for v in col):
            values[fld.name] = float(np.mean(col))
        elif all(v == col[0] for v in col):
            values[fld.name] = col[0]
        else:
            values[fld.name] = None
    return replace(rows[0], **values)


def _predict(
    gamma: FloatArray, beta: FloatArray, x: float, mean: FloatArray, var: FloatArray, eps: float
) -> FloatArray:
    """BN at test time: ``gamma (x - mean)/sqrt(var + eps) + beta``."""
    return np.asarray(gamma * (x - mean) / np.sqrt(var + eps) + beta)


def _fit_result(
    plan: _Plan,
    c: FloatArray,
    v: FloatArray,
    band: dict[str, FloatArray],
    state: BNState,
    clean: BNState,
    fit: _Fit,
) -> FitResult:
    """Predictions at test time for ``probe`` from the clean, dropout and corrected models."""
    dropout, preset, eps = plan.dropout, plan.preset, plan.preset.eps
    n = plan.batch * plan.positions
    gs = np.array(
        [gamma_star(float(ci), float(vi), dropout, eps)[0] for ci, vi in zip(c, v, strict=True)]
    )
    gs_clean = np.array(
        [
            gamma_star(float(ci), float(vi), Dropout("bernoulli", 0.0), eps)[0]
            for ci, vi in zip(c, v, strict=True)
        ]
    )
    (g_clean, g_drop), (b_clean, b_drop) = fit.theta
    probe = plan.probe
    seen = dropout.test_scale * probe  # what BN sees at test time after the dropout layer
    cm, cv = corrected_variance(state.running_mean, state.running_var, dropout, preset, n)
    pred_clean = _predict(g_clean, b_clean, probe, clean.running_mean, clean.running_var, eps)
    pred_drop = _predict(g_drop, b_drop, seen, state.running_mean, state.running_var, eps)
    pred_corr = _predict(g_drop, b_drop, seen, cm, cv, eps)
    em, ev = band["running_mean_expected"], band["running_var_expected"]
    tm, tv = corrected_variance(em, ev, dropout, preset, n)
    th_drop = _predict(gs, c, seen, em, ev, eps)
    th_corr = _predict(gs, c, seen, tm, tv, eps)
    rows = tuple(
        FitRow(
            feature=str(j),
            probe=probe,
            gamma_star=float(gs[j]),
            beta_star=float(c[j]),
            gamma_star_clean=float(gs_clean[j]),
            gamma_clean=float(g_clean[j]),
            beta_clean=float(b_clean[j]),
            gamma_dropout=float(g_drop[j]),
            beta_dropout=float(b_drop[j]),
            running_mean_clean=float(clean.running_mean[j]),
            running_var_clean=float(clean.running_var[j]),
            corrected_running_mean=float(cm[j]),
            corrected_running_var=float(cv[j]),
            pred_clean=float(pred_clean[j]),
            pred_dropout=float(pred_drop[j]),
            pred_corrected=float(pred_corr[j]),
            pred_dropout_theory=float(th_drop[j]),
            pred_corrected_theory=float(th_corr[j]),
        )
        for j in range(plan.features)
    )
    return FitResult(rows=rows, mean=_mean_row(rows, FitRow), lr=plan.lr)
