"""Diagnosis and data-free correction of saved BatchNorm statistics (DESIGN §2).

:func:`inspect_stats` gives one row per BN layer of a file: channel count, the spread of its
running mean and variance, its update count, and flags for statistics that cannot be trusted
(still at their initial 0/1, too few updates to forget them, non-finite or non-positive
variances).

:func:`correct_stats` replaces the running variance of every selected layer with what the
layer will see at test time, assuming it directly follows dropout (case (a)):
:func:`varshift.core.theory.corrected_variance`, ``v = (V + mu²)/kappa - mu²`` (bernoulli:
``q (V + mu²) - mu²``) after undoing the stored-variance bias of biased presets. A layer is
selected by the rate (every layer) or by ``PATTERN=RATE`` rules (shell globs on the layer
name; the last matching rule wins) and dropped again by ``exclude`` globs.

A corrected variance ≤ 0 means the stored variance is smaller than dropout alone would record
from a *constant* input with the stored mean. That is an error, unless the shortfall is within
``clip_z`` noise standard deviations of that value (:func:`varshift.core.theory.running_stats`, with
the batch size and update count), or within ``clip_rtol`` of it when the batch size is not
known; then the channel is clipped to the framework's eps with a warning. Never a silent NaN.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from fnmatch import fnmatchcase
from typing import ClassVar

import numpy as np
from numpy.typing import NDArray

from varshift.core.dropout import DEFAULT_KIND, KINDS, Dropout, InputMoments
from varshift.core.errors import InputFileError, ValidationError
from varshift.core.frames import TableResult
from varshift.core.presets import DEFAULT_FRAMEWORK, PRESETS, Preset
from varshift.core.theory import corrected_variance, running_stats, updates_to_forget
from varshift.core.validate import check_choice, check_range
from varshift.formats import BNLayer, BNStats, FloatArray

METHODS: tuple[str, ...] = ("debiased", "naive")
TARGETS: tuple[str, ...] = ("framework", "population")

#: A non-positive corrected variance is clipped when the stored variance is at most this many
#: noise standard deviations below what dropout alone records from a constant input.
CLIP_Z = 3.0
#: Without a batch size the noise cannot be sized: clip when the shortfall is at most this
#: fraction. It is one noise sd of the value a PyTorch running variance (momentum 0.1, n = 32)
#: records from a constant input at rate 0.1, and 3 sd at rate 0.3 (``theory.running_stats``);
#: ``--batch-size`` replaces it with the ``clip_z`` rule.
CLIP_RTOL = 0.1
#: Update count assumed for the stationary noise of an EMA when the file does not store one.
_STATIONARY = 10**9


# --- selection -------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerRule:
    """``--layer PATTERN=RATE``: layers whose name matches the glob get this dropout rate."""

    pattern: str
    rate: float


def parse_layer_rule(text: str) -> LayerRule:
    """Parse ``PATTERN=RATE`` (the last ``=`` splits, so patterns may contain ``=``).

    Examples
    --------
    >>> parse_layer_rule("features.*=0.2")
    LayerRule(pattern='features.*', rate=0.2)
    """
    pattern, sep, rate_text = text.rpartition("=")
    if not sep or not pattern.strip():
        raise ValidationError(f"--layer must be PATTERN=RATE (e.g. 'block1.*=0.5'); got {text!r}")
    try:
        rate = float(rate_text)
    except ValueError:
        raise ValidationError(
            f"--layer {text!r}: rate must be a number in [0, 1); got {rate_text!r}"
        ) from None
    return LayerRule(
        pattern.strip(), check_range(f"--layer {text!r}: rate", rate, 0.0, 1.0, closed="left")
    )


@dataclass(frozen=True)
class CorrectionConfig:
    """What :func:`correct_stats` applies.

    Attributes
    ----------
    rate:
        Dropout rate (probability of dropping) for every layer; acts as a first rule ``*``.
    rules:
        ``PATTERN=RATE`` rules; a layer gets the rate of the *last* rule matching its name.
        With neither ``rate`` nor rules nothing is selected (uout: every layer, its noise is
        set by ``beta`` alone).
    exclude:
        Globs of layers left as they are, whatever the rules say.
    dropout, beta:
        The dropout kind before the BN layers and uout's half-width.
    preset:
        The framework convention that stored the statistics.
    batch_size:
        ``n``, elements per channel in one training batch (N, or N·H·W for images): used to
        undo the biased presets' ``(n-1)/n`` and to size the noise when clipping.
    method, target:
        See :func:`varshift.core.theory.corrected_variance`.
    clip_z, clip_rtol:
        Clipping tolerances (module docstring).
    from_model:
        The rates and dropout kinds come from the model's structure (``--model``): no rate
        is needed.
    """

    rate: float | None = None
    rules: tuple[LayerRule, ...] = ()
    exclude: tuple[str, ...] = ()
    dropout: str = DEFAULT_KIND
    beta: float = 0.1
    preset: Preset = field(default_factory=lambda: PRESETS[DEFAULT_FRAMEWORK])
    batch_size: int | None = None
    method: str = "debiased"
    target: str = "framework"
    clip_z: float = CLIP_Z
    clip_rtol: float = CLIP_RTOL
    from_model: bool = False

    def __post_init__(self) -> None:
        if self.rate is not None:
            check_range("rate", self.rate, 0.0, 1.0, closed="left")
        kind = Dropout(self.dropout, self.rate or 0.0, self.beta).kind  # validates kind, beta
        object.__setattr__(self, "dropout", kind)
        check_choice("method", self.method, METHODS)
        check_choice("target", self.target, TARGETS)
        if self.batch_size is not None:
            self.preset.check_batch(self.batch_size)
            if self.batch_size < 2:  # n/(n-1) undoes the biased variance and sizes the noise
                raise ValidationError(
                    f"batch_size must be >= 2 (the correction uses n/(n-1)); got {self.batch_size}"
                )
        check_range("clip_z", self.clip_z, 0.0, None)
        check_range("clip_rtol", self.clip_rtol, 0.0, 1.0)
        if self.from_model and (self.rate is not None or self.rules):
            raise ValidationError(
                "--rate and --layer cannot be combined with --model: the dropout rates are read "
                "from the model (use --exclude to leave layers alone)"
            )
        rate_free = not KINDS[self.dropout].uses_rate  # uout: the noise ignores the rate
        if self.rate is None and not self.rules and not rate_free and not self.from_model:
            raise ValidationError(
                "give the dropout rate: --rate R for every layer, or --layer PATTERN=RATE"
            )

    def rate_rules(self) -> tuple[LayerRule, ...]:
        """Every rule in order, ``rate`` first as ``*`` (uout without rules: ``*`` at 0)."""
        first: tuple[LayerRule, ...] = ()
        if self.rate is not None:
            first = (LayerRule("*", self.rate),)
        elif not KINDS[self.dropout].uses_rate and not self.rules:
            first = (LayerRule("*", 0.0),)
        return first + self.rules


def layer_matches(name: str, pattern: str, local: Mapping[str, str] | None = None) -> bool:
    """Whether a glob matches a layer's name or, in a checkpoint holding several state dicts,
    its name inside its state dict (``bn1`` matches ``state_dict:bn1`` and
    ``state_dict_ema:bn1``; ``state_dict_ema:*`` only the second)."""
    if fnmatchcase(name, pattern):
        return True
    return local is not None and fnmatchcase(local.get(name, name), pattern)


def _unmatched(
    patterns: Sequence[str],
    names: Sequence[str],
    option: str,
    where: str,
    local: Mapping[str, str] | None,
) -> None:
    for pattern in patterns:
        if not any(layer_matches(name, pattern, local) for name in names):
            shown = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
            raise ValidationError(
                f"{where}: {option} pattern {pattern!r} matches no layer; layers: {shown}"
            )


def select_rates(
    names: Sequence[str],
    config: CorrectionConfig,
    where: str,
    local: Mapping[str, str] | None = None,
) -> dict[str, float | None]:
    """Layer name → the rate to correct it with, or ``None`` (not selected or excluded).

    ``local``: name → the layer's name inside its state dict, for a checkpoint holding
    several (:func:`layer_matches`).

    Raises
    ------
    ValidationError
        If a ``--layer`` or ``--exclude`` pattern matches no layer (a typo would otherwise
        silently leave a layer uncorrected).
    """
    _unmatched([r.pattern for r in config.rules], names, "--layer", where, local)
    _unmatched(list(config.exclude), names, "--exclude", where, local)
    rules = config.rate_rules()
    out: dict[str, float | None] = {}
    for name in names:
        rate = None
        for rule in rules:
            if layer_matches(name, rule.pattern, local):
                rate = rule.rate
        if any(layer_matches(name, pattern, local) for pattern in config.exclude):
            rate = None
        out[name] = rate
    return out


def local_names(stats: BNStats) -> dict[str, str] | None:
    """Layer name → its name inside its state dict, when ``stats`` holds several; else ``None``."""
    if not stats.containers:
        return None
    return {name: stats.local_name(name) for name in stats.layers}


# --- correction -------------------------------------------------------------------------------


#: What the report says of a layer corrected without knowing the model's structure.
UNKNOWN_ASSUMPTION = "structure unknown: assumed directly after dropout"
#: The one warning of a correction without the model's structure.
UNKNOWN_WARNING = (
    "model structure unknown: every layer assumed directly after dropout (exact only there; "
    "give --model to classify each BatchNorm)"
)
#: The formula of the direct case, by dropout kind.
DIRECT_FORMULA = {
    "bernoulli": "direct: q·(V + mu²) − mu²",
    "vanilla": "direct: q·(V + mu²) − mu²",
    "gaussian": "direct: q·(V + mu²) − mu²",
    "uout": "direct: (V + mu²)/kappa − mu²",
    "alpha": "direct: alpha dropout's affine noise inverted (mean and variance)",
}


@dataclass(frozen=True)
class LayerCorrection:
    """One layer's before/after summary.

    Attributes
    ----------
    layer, kind:
        The layer name and its class (DESIGN §5): ``direct``, ``through-linear``, ``stacked``,
        ``none``, or ``unknown`` when the file says nothing about the model's structure.
    action:
        ``corrected``, ``excluded``, ``not selected``, ``not corrected`` (a class or an input
        the data-free formulas do not cover) or ``untouched`` (no dropout upstream).
    formula:
        The formula applied (empty when left alone).
    rate:
        The dropout rate used (``None`` when left alone).
    channels:
        Number of channels.
    var_before, var_after:
        Mean over channels of the stored running variance before and after (the stored
        convention of the chosen ``target``).
    ratio:
        ``var_after / var_before``; for bernoulli with a zero mean this is ``q``.
    dropout_term:
        Through-linear: mean over channels of the dropout term subtracted, else ``None``.
    clipped:
        Channels whose corrected variance was ≤ 0 and were set to the floor.
    assumption:
        What the formula assumes here, or why the layer was left.
    """

    layer: str
    kind: str
    action: str
    formula: str
    rate: float | None
    channels: int
    var_before: float
    var_after: float
    ratio: float
    dropout_term: float | None
    clipped: int
    assumption: str


@dataclass(frozen=True, eq=False)
class CorrectionResult(TableResult):
    """What :func:`correct_stats` did: per-layer rows, the corrected statistics, warnings
    (``to_frame()``: one row per layer, the columns of :class:`LayerCorrection`)."""

    rows: tuple[LayerCorrection, ...]
    stats: BNStats
    warnings: tuple[str, ...]

    row_type: ClassVar[type] = LayerCorrection

    def table_rows(self) -> tuple[LayerCorrection, ...]:
        """One row per BatchNorm layer."""
        return self.rows

    def table_caption(self) -> str:
        """What the table shows."""
        return f"{self.corrected} of {len(self.rows)} BatchNorm layer(s) corrected"

    @property
    def corrected(self) -> int:
        """Number of layers corrected."""
        return sum(row.action == "corrected" for row in self.rows)


def _channels(mask: NDArray[np.bool_], values: FloatArray, limit: int = 3) -> str:
    """``"3 (nan), 7 (-0.2)"``: the first channels where ``mask`` holds, with their values."""
    idx = np.flatnonzero(mask)
    shown = ", ".join(f"{i} ({values[i]:.4g})" for i in idx[:limit])
    return f"{shown}{', ...' if idx.size > limit else ''}"


def check_layer_values(layer: BNLayer, where: str) -> None:
    """Reject a layer whose stored statistics cannot be corrected: NaN/inf, negative variance."""
    here = f"{where}: layer {layer.name!r}"
    for role, values in (("running mean", layer.mean), ("running variance", layer.var)):
        bad = ~np.isfinite(values)
        if bad.any():
            raise InputFileError(
                f"{here}: {role} has {int(bad.sum())} non-finite value(s) at channel(s) "
                f"{_channels(bad, values)}; cannot correct it (exclude it with --exclude)"
            )
    negative = layer.var < 0
    if negative.any():
        raise InputFileError(
            f"{here}: running variance is negative at {int(negative.sum())} channel(s) "
            f"{_channels(negative, layer.var)}; cannot correct it (exclude it with --exclude)"
        )


def _constant_input_record(
    mean: float, dropout: Dropout, config: CorrectionConfig, count: int | None
) -> tuple[float, float]:
    """Stored variance (expected, noise sd) that dropout alone makes of a constant input.

    The constant is the clean input whose training mean is the stored mean; the noise is that
    of the running average (:func:`varshift.core.theory.running_stats`), ``sd = nan`` when the batch
    size is unknown.
    """
    if dropout.multiplicative:
        c = mean / dropout.mask_moments()[0]
    else:
        c = dropout.test_from_train(mean, 0.0)[0]
    out = dropout.train_moments(InputMoments(c, c * c, c**3, c**4))
    if config.batch_size is None:
        return out.var, math.nan
    steps = count if count is not None else (1 if config.preset.cumulative else _STATIONARY)
    run = running_stats(out, config.preset, config.batch_size, steps)
    return run.batch_var_mean, run.var_sd


def correct_layer(
    layer: BNLayer, rate: float, config: CorrectionConfig, where: str
) -> tuple[BNLayer, int, str | None]:
    """Correct one layer: ``(new layer, channels clipped, warning or None)``.

    Raises
    ------
    InputFileError
        Non-finite or negative stored values, or a corrected variance ≤ 0 beyond the noise.
    """
    check_layer_values(layer, where)
    dropout = Dropout(config.dropout, rate, config.beta)
    if dropout.multiplicative and dropout.kappa == 1.0:
        return layer, 0, None  # rate 0 (or uout with beta 0): nothing to undo
    mean, var = corrected_variance(
        layer.mean,
        layer.var,
        dropout,
        config.preset,
        config.batch_size,
        method=config.method,
        target=config.target,
    )
    bad = ~(var > 0)
    if not bad.any():
        return replace(layer, mean=mean, var=var), 0, None
    floor = max(config.preset.eps, 1e-12)
    for i in np.flatnonzero(bad):
        expected, sd = _constant_input_record(float(layer.mean[i]), dropout, config, layer.count)
        shortfall = expected - float(layer.var[i])
        tolerance = config.clip_rtol * expected if math.isnan(sd) else config.clip_z * sd
        if shortfall > tolerance:
            noise = "" if math.isnan(sd) else f" ± {sd:.2g}"
            raise InputFileError(
                f"{where}: layer {layer.name!r}: corrected variance {var[i]:.4g} ≤ 0 at channel "
                f"{i}: the stored variance {layer.var[i]:.4g} is below what {dropout.kind} "
                f"dropout at rate {rate:g} records from a constant input with the stored mean "
                f"{layer.mean[i]:.4g} ({expected:.4g}{noise}); is the rate right, and does this "
                "BN directly follow the dropout? (exclude it with --exclude)"
            )
    var = np.where(bad, floor, var)
    warning = (
        f"{where}: layer {layer.name!r}: {int(bad.sum())} channel(s) with a corrected variance "
        f"≤ 0 within noise of zero clipped to {floor:g}: {_channels(bad, layer.var)}"
    )
    return replace(layer, mean=mean, var=var), int(bad.sum()), warning


def _mean_ratio(before: FloatArray, after: FloatArray) -> tuple[float, float, float]:
    b, a = float(np.mean(before)), float(np.mean(after))
    return b, a, (a / b if b != 0 else math.nan)


def left_alone(layer: BNLayer, kind: str, action: str, assumption: str = "") -> LayerCorrection:
    """The row of a layer whose statistics stay as they are."""
    before = float(np.mean(layer.var)) if layer.channels else math.nan
    return LayerCorrection(
        layer.name, kind, action, "", None, layer.channels, before, before, 1.0, None, 0, assumption
    )


def correct_stats(stats: BNStats, config: CorrectionConfig) -> CorrectionResult:
    """Apply the data-free correction to the selected layers of ``stats``.

    Parameters
    ----------
    stats:
        Statistics from :func:`varshift.formats.read_stats`.
    config:
        Rates, selection, dropout kind, framework convention and method.

    Returns
    -------
    CorrectionResult
        ``stats`` with the selected layers' running variance (and, for alpha dropout, running
        mean) replaced; everything else unchanged.

    Raises
    ------
    ValidationError
        A selection pattern matches no layer.
    InputFileError
        A selected layer has non-finite or negative statistics, or statistics inconsistent
        with the dropout rate (corrected variance ≤ 0 beyond the noise).

    Notes
    -----
    Without the model's structure every selected BN is assumed to follow the dropout
    directly (case (a)); each row says so (the job adds one warning:
    :data:`UNKNOWN_WARNING`).
    :func:`varshift.jobs.graph_correct.correct_with_structure` applies the formula each
    layer's class calls for when the structure is known.

    Examples
    --------
    >>> from varshift.formats import BNLayer, BNStats
    >>> layer = BNLayer("bn", np.zeros(2), np.array([2.0, 4.0]))
    >>> result = correct_stats(BNStats({"bn": layer}, "json"), CorrectionConfig(rate=0.5))
    >>> result.stats.layers["bn"].var.tolist()
    [1.0, 2.0]
    """
    names = list(stats.layers)
    local = local_names(stats)
    rates = select_rates(names, config, stats.where, local)
    rows: list[LayerCorrection] = []
    warnings: list[str] = []
    new_layers: dict[str, BNLayer] = {}
    for name in names:
        layer, rate = stats.layers[name], rates[name]
        if rate is None:
            excluded = any(layer_matches(name, p, local) for p in config.exclude)
            rows.append(left_alone(layer, "unknown", "excluded" if excluded else "not selected"))
            continue
        new, clipped, warning = correct_layer(layer, rate, config, stats.where)
        if warning:
            warnings.append(warning)
        new_layers[name] = new
        before, after, ratio = _mean_ratio(layer.var, new.var)
        shown_rate = rate if KINDS[config.dropout].uses_rate else None
        rows.append(
            LayerCorrection(
                name,
                "unknown",
                "corrected",
                DIRECT_FORMULA[config.dropout] + " (assumed)",
                shown_rate,
                layer.channels,
                before,
                after,
                ratio,
                None,
                clipped,
                UNKNOWN_ASSUMPTION,
            )
        )
    biased = not config.preset.estimator.ddof
    if config.batch_size is None and biased and config.method == "debiased":
        warnings.append(
            f"{config.preset.name} stores the biased batch variance (÷ n); without --batch-size "
            "the debiasing step is skipped (the result equals --method naive)"
        )
    return CorrectionResult(tuple(rows), stats.with_layers(new_layers), tuple(warnings))


# --- inspection -------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerInspection:
    """One layer's stored statistics at a glance (statistics over finite channels only).

    Attributes
    ----------
    count:
        Stored number of training-mode updates, or ``None``.
    initial:
        Running mean all 0 and variance all 1: never updated (or reset).
    few_updates:
        ``count`` is below :func:`varshift.core.theory.updates_to_forget` for the preset: the
        initial value 1 still weighs ≥ 1% in the running variance. ``None`` without a count.
    nonfinite, nonpositive:
        Channels with a non-finite mean or variance; channels with variance ≤ 0.
    flags:
        The flags above as text (empty when none).
    """

    layer: str
    channels: int
    count: int | None
    var_mean: float
    var_min: float
    var_max: float
    mean_mean: float
    mean_min: float
    mean_max: float
    initial: bool
    few_updates: bool | None
    nonfinite: int
    nonpositive: int
    flags: str


def _summary(values: FloatArray) -> tuple[float, float, float]:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return math.nan, math.nan, math.nan
    return float(finite.mean()), float(finite.min()), float(finite.max())


def inspect_stats(stats: BNStats, preset: Preset) -> tuple[LayerInspection, ...]:
    """One :class:`LayerInspection` per BN layer of ``stats``.

    Examples
    --------
    >>> from varshift.core.presets import resolve_preset
    >>> from varshift.formats import BNLayer, BNStats
    >>> fresh = BNLayer("bn", np.zeros(3), np.ones(3), count=0)
    >>> inspect_stats(BNStats({"bn": fresh}, "json"), resolve_preset("torch"))[0].flags
    'initial values (mean 0, var 1); few updates (0 < 44)'
    """
    forget = updates_to_forget(preset)
    rows = []
    for layer in stats.layers.values():
        nonfinite = int((~(np.isfinite(layer.mean) & np.isfinite(layer.var))).sum())
        nonpositive = int((layer.var <= 0).sum())
        initial = bool(np.all(layer.mean == 0) and np.all(layer.var == 1))
        few = None
        if layer.count is not None and forget is not None:
            few = layer.count < forget
        flags = []
        if initial:
            flags.append("initial values (mean 0, var 1)")
        if few:
            flags.append(f"few updates ({layer.count} < {forget})")
        if nonfinite:
            flags.append(f"non-finite ({nonfinite} ch)")
        if nonpositive:
            flags.append(f"var ≤ 0 ({nonpositive} ch)")
        var_stats, mean_stats = _summary(layer.var), _summary(layer.mean)
        rows.append(
            LayerInspection(
                layer.name,
                layer.channels,
                layer.count,
                *var_stats,
                *mean_stats,
                initial=initial,
                few_updates=few,
                nonfinite=nonfinite,
                nonpositive=nonpositive,
                flags="; ".join(flags),
            )
        )
    return tuple(rows)
