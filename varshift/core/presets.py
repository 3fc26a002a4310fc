"""Framework BatchNorm conventions as data; the one place where a dropout rate becomes a keep
probability.

Every framework's momentum is normalised to a decay ``alpha`` (the weight of the old value)::

    R_t = alpha * R_{t-1} + (1 - alpha) * s_t,   R_0 = 0 (running mean), 1 (running variance)

PyTorch's ``momentum`` is the weight of the *new* batch (``alpha = 1 - momentum``) and
``momentum=None`` means a cumulative average (``R_t = R_{t-1} + (s_t - R_{t-1}) / t``); Keras
and Flax's ``momentum`` is already the decay. Sources: ``torch/nn/modules/batchnorm.py``,
``keras/src/layers/normalization/batch_normalization.py``, ``flax/nnx/nn/normalization.py``,
``tensorflow/core/kernels/fused_batch_norm_op.cc`` (see ``shared/reference/frameworks.md``).

Each framework is one :class:`Preset` record in :data:`PRESETS`; everything that differs
between frameworks (momentum meaning, ``momentum=None``, the stored-variance
:class:`Estimator`, eps and its minimum) is a field, so a new preset is one more entry and
nothing else branches on a framework's name. The weights of the running average live in
:mod:`varshift.core.ema`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from varshift.core.errors import ValidationError
from varshift.core.validate import check_choice, check_range


def keep_from_rate(rate: float) -> float:
    """Return the keep probability ``q = 1 - rate`` of a dropout layer.

    ``rate`` is the probability of *dropping* a unit: PyTorch's ``p``, Keras' and Flax's
    ``rate``. The paper (Li et al. 2019) writes the keep probability as ``p``; varshift never
    exposes a bare ``p``.

    Raises
    ------
    ValidationError
        If ``rate`` is not in ``[0, 1)`` (a rate of 1 drops everything: no variance is left).

    Examples
    --------
    >>> keep_from_rate(0.2)
    0.8
    """
    r = check_range("rate", rate, 0.0, 1.0, closed="left")
    return 1.0 - r


def bessel(n: int) -> float:
    """Bessel's factor ``n/(n-1)``: the unbiased sample variance over the biased one.

    Examples
    --------
    >>> bessel(4)
    1.3333333333333333
    """
    return n / (n - 1)


@dataclass(frozen=True)
class Estimator:
    """How a framework turns one batch of ``n`` values into the variance it stores.

    ``stored = sum_i (x_i - mean)² / (n - ddof)``: ``ddof = 0`` is the biased variance (÷ n),
    ``ddof = 1`` Bessel's unbiased one (÷ (n-1)). A framework that scales the biased variance
    by ``n/(n-d)`` is one more record with ``ddof = d``. Training batches are always normalised
    with the biased variance; only what is *stored* differs.

    Attributes
    ----------
    name:
        Short name shown in tables and metadata (``unbiased``, ``biased``).
    ddof:
        Delta degrees of freedom of the stored variance, as above.
    divisor:
        The divisor as written in messages and docs (``n``, ``n-1``).
    """

    name: str
    ddof: float
    divisor: str

    @property
    def min_batch(self) -> int:
        """Fewest elements per channel the estimator is defined for (``n > ddof``)."""
        return math.floor(self.ddof) + 1

    def over_biased(self, n: int) -> float:
        """Stored batch variance over the biased one: ``n/(n - ddof)`` (1 or ``n/(n-1)``)."""
        return n / (n - self.ddof)

    def over_population(self, n: int) -> float:
        """Expected stored batch variance over the population variance, for ``n`` iid values:
        ``(n-1)/(n - ddof)`` (``(n-1)/n`` biased, 1 unbiased)."""
        return (n - 1) / (n - self.ddof)


#: The stored-variance estimators of the presets.
BIASED = Estimator("biased", 0.0, "n")
UNBIASED = Estimator("unbiased", 1.0, "n-1")


def keras2_estimator(eps: float) -> Estimator:
    """Multi-backend Keras 2.1.4–2.3.1: the biased variance times ``n/(n - 1 - eps)``.

    ``BatchNormalization.call`` in keras-team/keras ``keras/layers/normalization.py`` writes
    ``variance *= sample_size / (sample_size - (1.0 + self.epsilon))`` before the moving
    average, with the layer's own epsilon: ``ddof = 1 + eps``.

    Examples
    --------
    >>> keras2_estimator(1e-3).ddof, keras2_estimator(1e-3).min_batch
    (1.001, 2)
    """
    return Estimator("unbiased-eps", 1.0 + eps, "n-1-eps")


@dataclass(frozen=True, init=False)
class Preset:
    """How one framework's BatchNorm records its running statistics; every difference is a field.

    Attributes
    ----------
    name:
        The ``--framework`` name (``torch``, ``keras``, ``tf-keras`` = the fused path for 4-D/5-D
        inputs, ``keras2`` = multi-backend Keras 2.x, ``flax``).
    momentum:
        The momentum in the framework's own meaning, or ``None`` (cumulative average).
    alpha:
        Decay: the weight of the old running value, ``R_t = alpha R_{t-1} + (1 - alpha) s_t``.
        ``None`` when ``cumulative``.
    eps:
        The epsilon added inside the square root, ``1/sqrt(var + eps)``.
    estimator:
        The stored batch variance (:class:`Estimator`): biased (÷ n), unbiased (÷ (n-1)) or
        Keras 2's ÷ (n-1-eps).
    momentum_is_decay:
        True if ``momentum`` is the weight of the old value (Keras, Flax); False if it is the
        weight of the new batch (PyTorch: ``alpha = 1 - momentum``).
    none_is_cumulative:
        True if ``momentum=None`` selects the cumulative average (PyTorch); otherwise ``None``
        is refused.
    min_eps:
        The framework raises a smaller eps to this value (TF's fused kernel: 1.001e-5).
    eps_in_ddof:
        True if the stored estimator's ``ddof`` is ``1 + eps`` (Keras 2.x,
        :func:`keras2_estimator`), so that an eps override moves it too.
    label:
        The framework as people name it (``PyTorch``), for prose and messages.
    source:
        Where the convention is written in the framework's source.
    spatial_only_note:
        Non-empty if the convention holds only for 4-D/5-D inputs (tf.keras' fused path): the
        note ``simulate`` prints when a run's topology is not spatial.

    Notes
    -----
    ``Preset(name, momentum, alpha, unbiased=..., eps=...)`` still builds a preset with the
    other fields at their defaults (decay momentum, no cumulative average, no eps minimum).
    """

    name: str
    momentum: float | None
    alpha: float | None
    eps: float
    estimator: Estimator
    momentum_is_decay: bool
    none_is_cumulative: bool
    min_eps: float
    eps_in_ddof: bool
    label: str
    source: str
    spatial_only_note: str

    def __init__(
        self,
        name: str,
        momentum: float | None,
        alpha: float | None,
        unbiased: bool | None = None,
        eps: float = 1e-5,
        *,
        estimator: Estimator | None = None,
        momentum_is_decay: bool = True,
        none_is_cumulative: bool = False,
        min_eps: float = 0.0,
        eps_in_ddof: bool = False,
        label: str = "",
        source: str = "",
        spatial_only_note: str = "",
    ) -> None:
        # Hand-written so that ``unbiased=True/False`` (the first generation's field) still works
        # as a shorthand for ``estimator=UNBIASED/BIASED``; replace() passes every field by name.
        if estimator is None:
            estimator = UNBIASED if unbiased else BIASED
        elif unbiased is not None and unbiased != (estimator == UNBIASED):
            raise ValueError("pass either unbiased or an estimator that agrees with it")
        values = {
            "name": name,
            "momentum": momentum,
            "alpha": alpha,
            "eps": eps,
            "estimator": estimator,
            "momentum_is_decay": momentum_is_decay,
            "none_is_cumulative": none_is_cumulative,
            "min_eps": min_eps,
            "eps_in_ddof": eps_in_ddof,
            "label": label or name,
            "source": source,
            "spatial_only_note": spatial_only_note,
        }
        for key, value in values.items():
            object.__setattr__(self, key, value)

    @property
    def unbiased(self) -> bool:
        """True if the stored batch variance is Bessel-corrected (÷ (n-1)); False otherwise."""
        return self.estimator == UNBIASED

    @property
    def cumulative(self) -> bool:
        """True for torch's ``momentum=None``: an equal-weight average of all batch statistics."""
        return self.alpha is None

    def alpha_from(self, momentum: float) -> float:
        """The decay ``alpha`` that ``momentum``, in this framework's meaning, stands for."""
        return momentum if self.momentum_is_decay else 1.0 - momentum

    def stored_factor(self, n: int) -> float:
        """Expected stored batch variance over the population variance: 1, ``(n-1)/n`` or
        ``(n-1)/(n-1-eps)`` (:meth:`Estimator.over_population`)."""
        return self.estimator.over_population(n)

    def stored_over_biased(self, n: int) -> float:
        """Stored batch variance over the biased one: ``n/(n - ddof)`` (1 when biased)."""
        return self.estimator.over_biased(n)

    def check_batch(self, n: int, name: str = "batch_size") -> int:
        """Validate the number of elements reduced per channel for this preset."""
        need = self.estimator.min_batch
        if n < need:
            est = self.estimator
            why = f" (the stored variance is {est.name}, ÷ ({est.divisor}))" if est.ddof else ""
            raise ValidationError(f"{name} must be >= {need} for {self.name}{why}; got {n}")
        return n


PRESETS: dict[str, Preset] = {
    "torch": Preset(
        "torch",
        0.1,
        0.9,
        eps=1e-5,
        estimator=UNBIASED,
        momentum_is_decay=False,
        none_is_cumulative=True,
        label="PyTorch",
        source="torch/nn/modules/batchnorm.py (running_var is unbiased; momentum weighs the new "
        "batch; None is the cumulative average)",
    ),
    "keras": Preset(
        "keras",
        0.99,
        0.99,
        eps=1e-3,
        estimator=BIASED,
        label="Keras 3",
        source="keras/src/layers/normalization/batch_normalization.py (biased moving_variance)",
    ),
    # tf.keras fused path (4-D/5-D inputs): TF's fused kernel Bessel-corrects; eps >= 1.001e-5.
    # Its non-fused path (2-D inputs, e.g. after Dense) stores the biased variance, like the
    # keras preset; multi-backend Keras 2.1.4–2.3.1 is the keras2 preset.
    "tf-keras": Preset(
        "tf-keras",
        0.99,
        0.99,
        eps=1e-3,
        estimator=UNBIASED,
        min_eps=1.001e-5,
        label="tf.keras (fused)",
        source="tensorflow/core/kernels/fused_batch_norm_op.cc (unbiased; eps >= 1.001e-5)",
        spatial_only_note="note: tf-keras stores the unbiased variance only on its fused (4-D) "
        "path; after a Dense layer tf.keras (TensorFlow 2, tf_keras) stores the biased one, like "
        "--framework keras, and multi-backend Keras 2.1.4–2.3.1 stores it times "
        "n/(n-1-eps): --framework keras2",
    ),
    # Multi-backend Keras 2.x (docs/keras2.md): exact for 2.3.0–2.3.1 on the TensorFlow backend
    # (2-D inputs; 4-D too under TF 2, where the fused branch is off) and for 2.1.4–2.3.1 on
    # Theano. 2.1.4–2.2.5 on TensorFlow also zero-debias the moving average
    # (R_t = sum_k (1-a) a^(t-k) s_k / (1 - a^t)): the same values once a^t is negligible
    # (a^t < 1e-4 after 917 updates at 0.99), not over the first updates; and their fused
    # 4-D path under TF 1.x Bessel-corrects twice. Neither is modelled.
    "keras2": Preset(
        "keras2",
        0.99,
        0.99,
        eps=1e-3,
        estimator=keras2_estimator(1e-3),
        eps_in_ddof=True,
        label="Keras 2.x (multi-backend)",
        source="keras/layers/normalization.py BatchNormalization.call, keras-team/keras "
        "2.1.4–2.3.1 (variance *= n / (n - (1 + epsilon))); keras/backend/tensorflow_backend.py "
        "moving_average_update 2.3.x (plain EMA; 2.1.3–2.2.5 zero-debias, not modelled)",
    ),
    "flax": Preset(
        "flax",
        0.99,
        0.99,
        eps=1e-5,
        estimator=BIASED,
        label="Flax",
        source="flax/nnx/nn/normalization.py and flax/linen/normalization.py (biased)",
    ),
}

#: The preset names, in registry order (the ``--framework`` choices).
FRAMEWORKS: tuple[str, ...] = tuple(PRESETS)
#: The default ``--framework``.
DEFAULT_FRAMEWORK: str = "torch"


def resolve_preset(
    framework: str = "torch",
    momentum: float | str | None = "default",
    eps: float | None = None,
) -> Preset:
    """Return the preset for ``framework`` with an optional momentum and eps override.

    Parameters
    ----------
    framework:
        A key of :data:`PRESETS`: ``torch``, ``keras``, ``tf-keras``, ``keras2``, ``flax``.
    momentum:
        ``"default"`` keeps the framework's default; a float is read in the framework's own
        meaning (torch: weight of the new batch; others: decay); ``None`` selects torch's
        cumulative average and is rejected for the other frameworks.
    eps:
        Overrides the framework's epsilon; raised to the preset's ``min_eps`` (tf-keras:
        1.001e-5) like the framework does; for ``keras2`` it also sets the stored variance's
        divisor ``n - 1 - eps``.

    Examples
    --------
    >>> resolve_preset("torch", 0.2).alpha
    0.8
    >>> resolve_preset("keras").alpha
    0.99
    """
    name = check_choice("framework", framework, tuple(PRESETS))
    preset = PRESETS[name]
    if momentum == "default":
        pass
    elif momentum is None:
        if not preset.none_is_cumulative:
            labels = (p.label for p in PRESETS.values() if p.none_is_cumulative)
            owners = " or ".join(dict.fromkeys(labels))
            raise ValidationError(
                f"momentum must be a number for {name}; got None (the cumulative average "
                f"is {owners}'s momentum=None only)"
            )
        preset = replace(preset, momentum=None, alpha=None)
    else:
        m = check_range("momentum", float(momentum), 0.0, 1.0)
        preset = replace(preset, momentum=m, alpha=preset.alpha_from(m))
    if eps is not None:
        e = check_range("eps", eps, 0.0, None)
        preset = replace(preset, eps=max(e, preset.min_eps) if preset.min_eps else e)
        if preset.eps_in_ddof:
            preset = replace(preset, estimator=keras2_estimator(preset.eps))
    return preset
