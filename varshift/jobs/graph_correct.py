"""Graph-aware data-free correction: the formula each BatchNorm's class calls for (DESIGN §5).

Per layer, from its :class:`~varshift.core.structure.LayerStructure`:

==============  ================================================================================
direct          the debiased case-(a) inverse (:func:`varshift.jobs.correct.correct_layer`): exact
through-linear  ``V/f − (1/q − 1)·Σ W² E[x²]`` (re-biased by ``f`` for target ``framework``), the
                mean unchanged (:func:`varshift.core.structure.dropout_term`); element-wise
                bernoulli dropout (a channel-wise mask only with a measured noise term);
                ``E[x²]`` measured, or from the feeding BN through the activation (Gaussian:
                then the row quotes how far ±15% in ``E[x²]`` moves the corrected variance,
                and a warning line says when that exceeds ±10%)
stacked         not corrected: the noise upstream changes what reaches this dropout at test time
                and the covariance needed is not in the file; ``varshift recalibrate`` is the fix
none            untouched
unknown         not corrected (the model could not be traced)
==============  ================================================================================

``f`` is the preset's stored-variance factor for ``--batch-size`` (1 without it), as in the
direct formula. A through-linear variance that comes out ≤ 0 is an error, never a silent clip.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

import numpy as np

from varshift.core.errors import InputFileError, ValidationError
from varshift.core.structure import (
    EX2_ERROR,
    LayerStructure,
    dropout_term,
    gaussian_second_moment,
    sensitivity,
)
from varshift.formats import BNLayer, BNStats, FloatArray
from varshift.jobs.correct import (
    DIRECT_FORMULA,
    CorrectionConfig,
    CorrectionResult,
    LayerCorrection,
    check_layer_values,
    correct_layer,
    layer_matches,
    left_alone,
    local_names,
)

RECALIBRATE = "run `varshift recalibrate` with data"
LINEAR_FORMULA = "through-linear: V − (1/q − 1)·Σ_j W_kj²·E[x_j²]"
CONV_FORMULA = "through-linear (conv): V − (1/q − 1)·Σ_c,taps W²·E[x²] (padding: no noise)"
#: A data-free through-linear layer whose worst channel moves by more than this for a
#: :data:`~varshift.core.structure.EX2_ERROR` error in ``E[x²]`` gets a warning line.
SENSITIVITY_WARNING = 0.10


@dataclass(frozen=True)
class _Term:
    """A through-linear layer's dropout term per channel and what it assumed."""

    values: FloatArray
    assumption: str
    data_free: bool = False


class _Refusal(Exception):
    """A layer the data-free formulas do not cover: the reason goes into the report."""


def _measured_or_gaussian(s: LayerStructure) -> tuple[FloatArray, str]:
    """``E[x²]`` of the dropout input and where it came from."""
    if s.ex2 is not None:
        return s.ex2, "E[x²] of the dropout input measured on --data (eval mode, per position)"
    if s.feeder is None:
        raise _Refusal(
            "E[x²] of the dropout input unknown: no BatchNorm feeds the dropout; give --data "
            f"or {RECALIBRATE}"
        )
    mean, var = s.feeder.output_moments()
    act = s.activation or "identity"
    try:
        ex2 = gaussian_second_moment(act, mean, var)
    except ValidationError as exc:
        raise _Refusal(f"{exc}; give --data or {RECALIBRATE}") from None
    how = "closed form" if act in ("relu", "identity") else "numerical quadrature"
    return ex2, (
        f"E[x²] from the feeding BN's γ, β through {act} ({how}), its output taken as Gaussian"
    )


def through_linear_term(s: LayerStructure) -> _Term:
    """The dropout term of a through-linear layer, or :class:`_Refusal` with the reason."""
    if s.dropout_kind != "bernoulli" or s.rate is None:
        raise _Refusal(
            f"{s.dropout_kind} dropout through a linear layer: no closed form here; {RECALIBRATE}"
        )
    if s.weight is None:
        raise _Refusal(f"the linear layer's weight is not available; {RECALIBRATE}")
    factor = 1.0 / (1.0 - s.rate) - 1.0
    if s.channelwise:
        if s.noise_sum is None:
            raise _Refusal(
                "channel-wise dropout shares one mask over a channel's positions: the cross "
                "terms between kernel taps need the inputs' spatial correlation, which the file "
                f"does not hold; give --data or {RECALIBRATE}"
            )
        return _Term(
            factor * s.noise_sum,
            "channel-wise mask: noise term measured on --data (cross terms within a channel "
            "included)",
        )
    if s.conv is not None and s.conv.padding_mode != "zeros":
        raise _Refusal(
            f"padding mode {s.conv.padding_mode!r} reads noisy inputs twice; {RECALIBRATE}"
        )
    ex2, assumption = _measured_or_gaussian(s)
    if s.conv is not None and s.conv.input_size is None and s.ex2 is None:
        assumption += (
            "; input size unknown: every kernel tap counted, padding ignored (overstates the "
            "term at the borders; give --input-shape)"
        )
    if s.conv is None and np.ndim(ex2) == 1 and np.size(ex2) != s.weight.shape[1]:
        assumption += "; flattened image: the channel's E[x²] taken at each of its positions"
    try:
        values = dropout_term(s.weight, ex2, s.rate, s.conv, s.layout)
    except (ValueError, ValidationError) as exc:
        raise _Refusal(f"dropout term not computable: {exc}; {RECALIBRATE}") from None
    if values.shape != (s.weight.shape[0],):
        raise _Refusal(f"dropout term has shape {values.shape}; {RECALIBRATE}")
    return _Term(values, assumption, data_free=s.ex2 is None)


def _refusal_text(s: LayerStructure) -> str:
    if s.kind == "stacked":
        further = ", ".join(s.further_noise) or "a path no closed form covers"
        return (
            f"stacked: noise further up ({further}) changes what reaches this BN at test time "
            f"and the covariance needed is not in the file; {RECALIBRATE}"
        )
    return f"structure unknown (the model could not be traced); {RECALIBRATE}"


def _sensitivity_note(
    layer: BNLayer, term: _Term, test_var: FloatArray, where: str
) -> tuple[str, str | None]:
    """The sensitivity of a data-free correction to its ``E[x²]``: the assumption's suffix and a
    warning when the worst channel can leave the ±10% band (:func:`sensitivity`)."""
    if not term.data_free:
        return "", None
    sens = sensitivity(term.values, test_var)
    k = int(np.argmax(sens))
    share = f"±{EX2_ERROR:.0%} in E[x²] moves the corrected variance by up to ±{sens[k]:.1%}"
    note = f"; sensitivity: {share} (channel {k}, dropout term {term.values[k] / test_var[k]:.0%}"
    note += " of the test variance)"
    if sens[k] <= SENSITIVITY_WARNING:
        return note, None
    return note, (
        f"{where}: layer {layer.name!r}: the data-free E[x²] is an assumption and {share} "
        f"(channel {k}; more than ±{SENSITIVITY_WARNING:.0%}): give --data or {RECALIBRATE}"
    )


def _through_linear(
    layer: BNLayer, s: LayerStructure, config: CorrectionConfig, where: str
) -> tuple[BNLayer, LayerCorrection, str | None]:
    check_layer_values(layer, where)
    term = through_linear_term(s)
    if term.values.shape != layer.var.shape:
        raise _Refusal(
            f"the linear layer has {term.values.size} outputs but the BN {layer.channels} "
            f"channels; {RECALIBRATE}"
        )
    factor = 1.0
    if config.batch_size is not None and config.method == "debiased":
        factor = config.preset.stored_factor(config.preset.check_batch(config.batch_size))
    rebias = factor if config.target == "framework" else 1.0
    test_var = layer.var / factor - term.values
    var = test_var * rebias
    bad = ~(var > 0)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise InputFileError(
            f"{where}: layer {layer.name!r}: corrected variance {var[i]:.4g} ≤ 0 at channel {i}: "
            f"the dropout term {term.values[i]:.4g} exceeds the stored variance "
            f"{layer.var[i]:.4g}; is this the model the statistics were trained with? "
            "(exclude it with --exclude)"
        )
    new = replace(layer, var=var)
    formula = CONV_FORMULA if s.conv is not None else LINEAR_FORMULA
    note, warning = _sensitivity_note(layer, term, test_var, where)
    row = _row(layer, new, s, "corrected", formula, 0, term.assumption + note)
    return new, replace(row, dropout_term=float(np.mean(term.values))), warning


def _row(
    layer: BNLayer,
    new: BNLayer,
    s: LayerStructure,
    action: str,
    formula: str,
    clipped: int,
    assumption: str,
) -> LayerCorrection:
    before, after = float(np.mean(layer.var)), float(np.mean(new.var))
    ratio = after / before if before != 0 else float("nan")
    return LayerCorrection(
        layer.name,
        s.kind,
        action,
        formula,
        s.rate,
        layer.channels,
        before,
        after,
        ratio,
        None,
        clipped,
        assumption,
    )


def _direct(
    layer: BNLayer, s: LayerStructure, config: CorrectionConfig, where: str
) -> tuple[BNLayer, LayerCorrection, str | None]:
    assert s.rate is not None and s.dropout_kind is not None
    kind_config = replace(config, dropout=s.dropout_kind)
    new, clipped, warning = correct_layer(layer, s.rate, kind_config, where)
    shared = " (one mask per channel: exact in expectation)" if s.channelwise else ""
    assumption = f"exact: the dropout feeds this BN directly{shared}"
    row = _row(layer, new, s, "corrected", DIRECT_FORMULA[s.dropout_kind], clipped, assumption)
    return new, row, warning


def correct_with_structure(
    stats: BNStats, config: CorrectionConfig, structure: Mapping[str, LayerStructure]
) -> CorrectionResult:
    """Correct each layer of ``stats`` by its class (module docstring).

    Parameters
    ----------
    stats:
        The stored statistics.
    config:
        Preset, batch size, method, target and ``exclude``; rates come from ``structure``.
    structure:
        Layer name (as in ``stats``) → its structure; a layer missing here is reported as
        ``unknown`` and left.

    Raises
    ------
    ValidationError
        An ``--exclude`` pattern matches no layer.
    InputFileError
        A layer's statistics are non-finite, negative, or inconsistent with its formula.
    """
    names = list(stats.layers)
    local = local_names(stats)
    for pattern in config.exclude:
        if not any(layer_matches(n, pattern, local) for n in names):
            raise ValidationError(f"{stats.where}: --exclude pattern {pattern!r} matches no layer")
    rows: list[LayerCorrection] = []
    warnings: list[str] = []
    new_layers: dict[str, BNLayer] = {}
    for name in names:
        layer = stats.layers[name]
        s = structure.get(name) or LayerStructure(name, "unknown")
        if any(layer_matches(name, p, local) for p in config.exclude):
            rows.append(left_alone(layer, s.kind, "excluded"))
        elif s.kind == "none":
            rows.append(left_alone(layer, s.kind, "untouched", "no dropout upstream"))
        elif s.kind == "direct":
            new, row, warning = _direct(layer, s, config, stats.where)
            new_layers[name] = new
            rows.append(row)
            warnings.extend([warning] if warning else [])
        elif s.kind == "through-linear":
            try:
                new, row, warning = _through_linear(layer, s, config, stats.where)
            except _Refusal as why:
                rows.append(
                    replace(left_alone(layer, s.kind, "not corrected", str(why)), rate=s.rate)
                )
                continue
            new_layers[name] = new
            rows.append(row)
            warnings.extend([warning] if warning else [])
        else:
            rows.append(
                replace(left_alone(layer, s.kind, "not corrected", _refusal_text(s)), rate=s.rate)
            )
    return CorrectionResult(tuple(rows), stats.with_layers(new_layers), tuple(warnings))
