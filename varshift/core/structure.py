"""What the data-free correction needs to know about the path into one BatchNorm (DESIGN §5).

A framework reader (the PyTorch graph, a Keras config) fills one :class:`LayerStructure` per
BatchNorm with plain NumPy arrays; the formulas here never import a framework.

Through-linear (element-wise dropout → Linear/Conv → BN, no noise further up): the mask noise
``(m_j/q − 1)·x_j`` has mean 0, is independent across elements and uncorrelated with the
signal, so the training variance of output ``k`` is its test variance plus

    ``(1/q − 1) · Σ_j W_kj² · E[x_j²]``

whatever the correlation of the inputs. For a convolution the sum runs over input channels and
kernel taps; a tap reading the zero padding carries no noise, so at output position ``o`` only
the taps inside the input count, and the BN (which pools all positions) sees the average of
the per-position terms (:func:`dropout_term`).

``E[x²]`` of the dropout input comes from the BN feeding it, through the activation between
them (:func:`gaussian_second_moment`): in training that BN's output has mean ``β`` and variance
``γ²·σ²/(σ² + eps)`` per channel; it is taken as Gaussian (the assumption), then ReLU has a
closed form and other activations are integrated numerically.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from varshift.core.errors import ValidationError

FloatArray = NDArray[np.float64]

#: The BN classes of DESIGN §5, and ``unknown`` for a model without structure.
CLASSES: tuple[str, ...] = ("direct", "through-linear", "stacked", "none", "unknown")

#: Activations without a closed form are integrated against the normal density on this many
#: equally spaced points over ±12 sd (the trapezoid rule: spectrally accurate for smooth
#: functions, O(h²) ≈ 1e-5 at the kinks of hardtanh or ReLU6, where Gauss–Hermite with 96–300
#: nodes erred by 1e-3 to 2e-2).
QUADRATURE_POINTS = 12_001


@dataclass(frozen=True, eq=False)
class FeederBN:
    """The BatchNorm feeding a dropout (``name``): per-channel ``γ``, ``β``, running mean/var, eps.

    ``var`` is the feeder's running variance as it will be after the correction (the
    training-time batch variance it normalised by, in expectation).
    """

    gamma: FloatArray
    beta: FloatArray
    mean: FloatArray
    var: FloatArray
    eps: float
    name: str = ""

    def output_moments(self) -> tuple[FloatArray, FloatArray]:
        """Per-channel mean ``β`` and variance ``γ²·σ²/(σ² + eps)`` of its training output."""
        var = np.maximum(np.asarray(self.var, dtype=np.float64), 0.0)
        scale = np.asarray(self.gamma, dtype=np.float64) ** 2 * var / (var + self.eps)
        return np.asarray(self.beta, dtype=np.float64), scale


@dataclass(frozen=True)
class ConvGeometry:
    """A convolution's stride, dilation, groups and zero padding per spatial dim.

    Attributes
    ----------
    padding:
        ``(before, after)`` zeros per spatial dim.
    padding_mode:
        ``zeros``; anything else (reflect, replicate, circular) reads real, noisy inputs
        twice and is not covered by the closed form.
    input_size:
        Spatial size of the conv input, or ``None`` when unknown (then every tap is counted:
        the padding is ignored, which overstates the term at the borders).
    """

    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    padding: tuple[tuple[int, int], ...]
    groups: int = 1
    padding_mode: str = "zeros"
    input_size: tuple[int, ...] | None = None


@dataclass(frozen=True, eq=False)
class LayerStructure:
    """The path into one BatchNorm, as a framework reader found it.

    Attributes
    ----------
    layer, kind:
        The BN's name (as the statistics file names it) and its class (:data:`CLASSES`).
    dropout_kind, rate, channelwise:
        The nearest dropout upstream: varshift kind (``bernoulli``, ``alpha``), rate and
        whether one draw is shared by all positions of a channel; ``None`` rate: no dropout.
    weight:
        Through-linear: the Linear ``(out, in)`` or Conv ``(out, in/groups, *kernel)`` weight.
    conv:
        Through-linear through a convolution: its geometry.
    feeder, activation:
        The BN feeding the dropout and the activation between (``None``: identity).
    further_noise:
        Dropouts further up the path (stacked).
    ex2:
        ``E[x²]`` of the dropout input measured on data: ``(in,)`` or ``(in, *spatial)``;
        ``None``: derive it from ``feeder`` (Gaussian).
    noise_sum:
        Channel-wise dropout with data: the measured ``Σ_c E[(W_kc ⋆ x_c)²]`` per output
        channel, position-averaged (the term without ``1/q − 1``; cross terms included).
    layout:
        How a Linear after a flatten orders an image's values: ``channels_first`` (torch's
        NCHW) or ``channels_last`` (Keras' NHWC default).
    path:
        Readable path, e.g. ``bn1 → relu → drop → fc2 → bn2``.
    """

    layer: str
    kind: str
    dropout_kind: str | None = None
    rate: float | None = None
    channelwise: bool = False
    weight: FloatArray | None = None
    conv: ConvGeometry | None = None
    feeder: FeederBN | None = None
    activation: str | None = None
    further_noise: tuple[str, ...] = ()
    ex2: FloatArray | None = None
    noise_sum: FloatArray | None = None
    layout: str = "channels_first"
    path: str = ""

    def __post_init__(self) -> None:
        if self.kind not in CLASSES:
            raise ValidationError(f"class must be one of {', '.join(CLASSES)}; got {self.kind!r}")


# --- E[x²] of the dropout input ------------------------------------------------------------------


def _sigmoid(z: FloatArray) -> FloatArray:
    return np.asarray(0.5 * (1.0 + np.tanh(0.5 * z)))


def _softplus(z: FloatArray) -> FloatArray:
    return np.asarray(np.logaddexp(0.0, z))


def _gelu(z: FloatArray) -> FloatArray:
    erf = np.vectorize(math.erf, otypes=[np.float64])
    return np.asarray(0.5 * z * (1.0 + erf(z / math.sqrt(2.0))))


def _elu(z: FloatArray, alpha: float = 1.0) -> FloatArray:
    return np.asarray(np.where(z > 0, z, alpha * np.expm1(np.minimum(z, 0.0))))


_SELU_ALPHA, _SELU_SCALE = 1.6732632423543772, 1.0507009873554805

#: Activation name (lower case, as the graph reader names it) → element-wise function, with the
#: frameworks' default constants (leaky ReLU slope 0.01).
ACTIVATIONS: dict[str, Callable[[FloatArray], FloatArray]] = {
    "identity": lambda z: z,
    "relu": lambda z: np.maximum(z, 0.0),
    "relu6": lambda z: np.clip(z, 0.0, 6.0),
    "leaky_relu": lambda z: np.where(z > 0, z, 0.01 * z),
    "leakyrelu": lambda z: np.where(z > 0, z, 0.01 * z),
    "elu": _elu,
    "celu": _elu,
    "selu": lambda z: _SELU_SCALE * _elu(z, _SELU_ALPHA),
    "gelu": _gelu,
    "silu": lambda z: z * _sigmoid(z),
    "swish": lambda z: z * _sigmoid(z),
    "sigmoid": _sigmoid,
    "tanh": np.tanh,
    "softplus": _softplus,
    "mish": lambda z: z * np.tanh(_softplus(z)),
    "hardtanh": lambda z: np.clip(z, -1.0, 1.0),
    "hardsigmoid": lambda z: np.clip(z / 6.0 + 0.5, 0.0, 1.0),
    "hardswish": lambda z: z * np.clip(z / 6.0 + 0.5, 0.0, 1.0),
}


def _relu_second_moment(mean: FloatArray, var: FloatArray) -> FloatArray:
    """``E[max(0, z)²] = (m² + s²)·Φ(m/s) + m·s·φ(m/s)`` for ``z ~ Normal(m, s²)``."""
    sd = np.sqrt(var)
    out = np.where(mean > 0, mean**2, 0.0)
    live = sd > 0
    a = np.where(live, mean / np.where(live, sd, 1.0), 0.0)
    erfc = np.vectorize(math.erfc, otypes=[np.float64])
    cdf = 0.5 * erfc(-a / math.sqrt(2.0))
    pdf = np.exp(-0.5 * a * a) / math.sqrt(2.0 * math.pi)
    return np.asarray(np.where(live, (mean**2 + var) * cdf + mean * sd * pdf, out))


def gaussian_second_moment(activation: str | None, mean: FloatArray, var: FloatArray) -> FloatArray:
    """``E[f(z)²]`` per channel for ``z ~ Normal(mean, var)``.

    ``f`` is :data:`ACTIVATIONS` ``[activation]`` (``None``: identity). Identity and ReLU are
    closed forms; the others are integrated numerically (:data:`QUADRATURE_POINTS`).

    Raises
    ------
    ValidationError
        An activation without a known element-wise form (e.g. PReLU's learned slope).

    Examples
    --------
    >>> float(gaussian_second_moment("relu", np.array([0.0]), np.array([1.0]))[0])
    0.5
    """
    m = np.asarray(mean, dtype=np.float64)
    v = np.maximum(np.asarray(var, dtype=np.float64), 0.0)
    name = (activation or "identity").lower()
    if name == "identity":
        return np.asarray(m**2 + v)
    if name == "relu":
        return _relu_second_moment(m, v)
    if name not in ACTIVATIONS:
        raise ValidationError(f"activation {activation!r} has no known element-wise form")
    u = np.linspace(-12.0, 12.0, QUADRATURE_POINTS)
    weights = np.exp(-0.5 * u * u) * (u[1] - u[0]) / math.sqrt(2.0 * math.pi)
    weights[[0, -1]] *= 0.5
    out = np.empty(np.broadcast(m, v).shape)
    for i in np.ndindex(out.shape):  # one channel at a time: memory stays O(points)
        z = m[i] + math.sqrt(v[i]) * u
        out[i] = float(ACTIVATIONS[name](z) ** 2 @ weights)
    return out


# --- the dropout term ----------------------------------------------------------------------------


def _output_size(size: int, kernel: int, stride: int, dilation: int, pad: tuple[int, int]) -> int:
    return (size + pad[0] + pad[1] - dilation * (kernel - 1) - 1) // stride + 1


def _tap_means(ex2: FloatArray, kernel: tuple[int, ...], conv: ConvGeometry) -> FloatArray:
    """``(C, *kernel)``: for each input channel and tap, the mean over output positions of
    ``E[x²]`` at the input element that tap reads (0 where it reads the zero padding)."""
    spatial = ex2.shape[1:]
    pads = [(0, 0), *conv.padding]
    padded = np.pad(ex2, pads)
    outs = [
        _output_size(n, k, s, d, p)
        for n, k, s, d, p in zip(
            spatial, kernel, conv.stride, conv.dilation, conv.padding, strict=True
        )
    ]
    if min(outs) < 1:
        raise ValidationError(f"convolution output is empty for input size {spatial}")
    means = np.empty((ex2.shape[0], *kernel))
    for tap in itertools.product(*(range(k) for k in kernel)):
        index = tuple(
            slice(t * d, t * d + s * (o - 1) + 1, s)
            for t, d, s, o in zip(tap, conv.dilation, conv.stride, outs, strict=True)
        )
        window = padded[(slice(None), *index)]
        key: tuple[Any, ...] = (slice(None), *tap)
        means[key] = window.reshape(ex2.shape[0], -1).mean(axis=1)
    return means


def flattened(ex2: FloatArray, features: int, layout: str = "channels_first") -> FloatArray:
    """``E[x²]`` as the ``features`` inputs of a Linear after a flatten.

    Per position ``(C, *spatial)``: flattened in the given layout. Per channel ``(C,)`` with
    ``features = C·P``: each channel's value for its ``P`` positions, channel-major
    (``channels_first``, torch's ``flatten`` of NCHW) or position-major (``channels_last``).

    Raises
    ------
    ValidationError
        ``features`` is not a whole number of channels.
    """
    e = np.asarray(ex2, dtype=np.float64)
    if e.ndim > 1:
        e = e.reshape(-1) if layout == "channels_first" else np.moveaxis(e, 0, -1).reshape(-1)
    if e.size == features:
        return e
    if e.size == 0 or features % e.size:
        raise ValidationError(
            f"{features} linear inputs are not a whole number of {e.size} channels"
        )
    repeat = features // e.size
    return np.repeat(e, repeat) if layout == "channels_first" else np.tile(e, repeat)


def dropout_term(
    weight: FloatArray,
    ex2: FloatArray,
    rate: float,
    conv: ConvGeometry | None = None,
    layout: str = "channels_first",
) -> FloatArray:
    """``(1/q − 1)·Σ W² E[x²]`` per output channel (position-averaged for a convolution).

    Parameters
    ----------
    weight:
        Linear ``(out, in)`` or Conv ``(out, in/groups, *kernel)``.
    ex2:
        ``E[x²]`` of the dropout input: ``(in,)`` per channel, or ``(in, *spatial)`` per
        position (measured) for a convolution.
    rate:
        The element-wise dropout's rate; ``q = 1 − rate``.
    conv:
        The geometry of a convolution; with an unknown ``input_size`` and per-channel ``ex2``
        every tap is counted (padding ignored).
    layout:
        How a Linear sees a flattened image (:func:`flattened`).

    Examples
    --------
    >>> dropout_term(np.array([[1.0, 2.0]]), np.array([1.0, 0.5]), 0.5).tolist()
    [3.0]
    """
    w2 = np.asarray(weight, dtype=np.float64) ** 2
    e = np.asarray(ex2, dtype=np.float64)
    factor = 1.0 / (1.0 - rate) - 1.0
    if conv is None:
        return np.asarray(factor * (w2 @ flattened(e, w2.shape[1], layout)))
    kernel = tuple(w2.shape[2:])
    if e.ndim == 1 and conv.input_size is not None:
        e = np.broadcast_to(e.reshape(-1, *([1] * len(kernel))), (e.size, *conv.input_size))
    taps = (
        np.broadcast_to(e[:, None], (e.size, int(np.prod(kernel)))).reshape(e.size, *kernel)
        if e.ndim == 1
        else _tap_means(e, kernel, conv)
    )
    out_ch, per_group = w2.shape[0], w2.shape[1]
    group = np.arange(out_ch) // (out_ch // conv.groups)  # the group of each output channel
    term = np.empty(out_ch)
    for k in range(out_ch):
        inputs = taps[group[k] * per_group : (group[k] + 1) * per_group]
        term[k] = float(np.sum(w2[k] * inputs))
    return np.asarray(factor * term)


# --- how much the data-free E[x²] matters --------------------------------------------------------

#: The relative error in a data-free ``E[x²]`` the report quotes the sensitivity for. Measured on
#: the nets of tests/test_graph_correct.py: the Gaussian ``E[relu(z)²]`` was 12–14% short at the
#: median channel of the MLPs (their BN outputs are skewed) and off by ×0.7–1.9 per channel of
#: the 8×8 conv net (a channel's values pooled over the image are far from one Gaussian). It is a
#: typical size, not a bound.
EX2_ERROR = 0.15


def sensitivity(term: FloatArray, corrected: FloatArray, error: float = EX2_ERROR) -> FloatArray:
    """Per channel: the relative change of a through-linear corrected variance when every
    ``E[x²]`` behind its dropout term is off by the relative ``error``.

    The term is linear in ``E[x²]``, so the test variance ``V − t`` moves by ``error·t`` and its
    relative change is ``error·t / (V − t)``: small where the term is a small share of the
    stored variance, large where it is most of it (high rates).

    Parameters
    ----------
    term:
        The dropout term per channel.
    corrected:
        The corrected (test-time) variance per channel, in the same convention as ``term``.
    error:
        The relative error in ``E[x²]`` (:data:`EX2_ERROR`).

    Examples
    --------
    >>> sensitivity(np.array([1.0]), np.array([3.0])).round(3).tolist()
    [0.05]
    """
    t = np.asarray(term, dtype=np.float64)
    v = np.asarray(corrected, dtype=np.float64)
    return np.asarray(error * t / v)
