"""Framework BatchNorm conventions; the one place where a dropout rate becomes a keep probability.

Every framework's momentum is normalised to a decay ``alpha`` (the weight of the old value)::

    R_t = alpha * R_{t-1} + (1 - alpha) * s_t,   R_0 = 0 (running mean), 1 (running variance)

PyTorch's ``momentum`` is the weight of the *new* batch (``alpha = 1 - momentum``) and
``momentum=None`` means a cumulative average (``R_t = R_{t-1} + (s_t - R_{t-1}) / t``); Keras
and Flax's ``momentum`` is already the decay. Sources: ``torch/nn/modules/batchnorm.py``,
``keras/src/layers/normalization/batch_normalization.py``, ``flax/nnx/nn/normalization.py``,
``tensorflow/core/kernels/fused_batch_norm_op.cc`` (see ``shared/reference/frameworks.md``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from varshift.core.errors import ValidationError
from varshift.core.validate import check_choice, check_range

FRAMEWORKS: tuple[str, ...] = ("torch", "keras", "tf-keras", "flax")


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


@dataclass(frozen=True)
class Preset:
    """How one framework's BatchNorm records its running statistics.

    Attributes
    ----------
    name:
        ``torch``, ``keras``, ``tf-keras`` (the fused path: 4-D/5-D inputs) or ``flax``.
    momentum:
        The momentum in the framework's own meaning, or ``None`` (torch only: cumulative average).
    alpha:
        Decay: the weight of the old running value, ``R_t = alpha R_{t-1} + (1 - alpha) s_t``.
        ``None`` when ``cumulative``.
    unbiased:
        True if the stored batch variance is Bessel-corrected (÷ (n-1)); False if biased (÷ n).
        Training batches are always normalised with the biased batch variance.
    eps:
        The epsilon added inside the square root, ``1/sqrt(var + eps)``.
    """

    name: str
    momentum: float | None
    alpha: float | None
    unbiased: bool
    eps: float

    @property
    def cumulative(self) -> bool:
        """True for torch's ``momentum=None``: an equal-weight average of all batch statistics."""
        return self.alpha is None

    def stored_factor(self, n: int) -> float:
        """Expected stored batch variance over the population variance: 1 or ``(n-1)/n``."""
        return 1.0 if self.unbiased else (n - 1) / n

    def check_batch(self, n: int, name: str = "batch_size") -> int:
        """Validate the number of elements reduced per channel for this preset."""
        if n < 1 or (self.unbiased and n < 2):
            need = 2 if self.unbiased else 1
            why = " (the stored variance is unbiased, ÷ (n-1))" if self.unbiased else ""
            raise ValidationError(f"{name} must be >= {need} for {self.name}{why}; got {n}")
        return n


PRESETS: dict[str, Preset] = {
    "torch": Preset("torch", 0.1, 0.9, unbiased=True, eps=1e-5),
    "keras": Preset("keras", 0.99, 0.99, unbiased=False, eps=1e-3),
    # tf.keras fused path (4-D/5-D inputs): TF's fused kernel Bessel-corrects; eps >= 1.001e-5.
    # Its non-fused path (2-D inputs) behaves like the keras preset.
    "tf-keras": Preset("tf-keras", 0.99, 0.99, unbiased=True, eps=1e-3),
    "flax": Preset("flax", 0.99, 0.99, unbiased=False, eps=1e-5),
}

_TF_FUSED_MIN_EPS = 1.001e-5


def resolve_preset(
    framework: str = "torch",
    momentum: float | str | None = "default",
    eps: float | None = None,
) -> Preset:
    """Return the preset for ``framework`` with an optional momentum and eps override.

    Parameters
    ----------
    framework:
        One of ``torch``, ``keras``, ``tf-keras``, ``flax``.
    momentum:
        ``"default"`` keeps the framework's default; a float is read in the framework's own
        meaning (torch: weight of the new batch; others: decay); ``None`` selects torch's
        cumulative average and is rejected for the other frameworks.
    eps:
        Overrides the framework's epsilon; tf-keras raises it to at least 1.001e-5 like TF does.

    Examples
    --------
    >>> resolve_preset("torch", 0.2).alpha
    0.8
    >>> resolve_preset("keras").alpha
    0.99
    """
    name = check_choice("framework", framework, FRAMEWORKS)
    preset = PRESETS[name]
    if momentum == "default":
        pass
    elif momentum is None:
        if name != "torch":
            raise ValidationError(
                f"momentum must be a number for {name}; got None (the cumulative average "
                "is PyTorch's momentum=None only)"
            )
        preset = replace(preset, momentum=None, alpha=None)
    else:
        m = check_range("momentum", float(momentum), 0.0, 1.0)
        alpha = 1.0 - m if name == "torch" else m
        preset = replace(preset, momentum=m, alpha=alpha)
    if eps is not None:
        e = check_range("eps", eps, 0.0, None)
        if name == "tf-keras":
            e = max(e, _TF_FUSED_MIN_EPS)
        preset = replace(preset, eps=e)
    return preset
