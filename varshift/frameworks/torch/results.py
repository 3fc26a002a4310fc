"""The results of :func:`~varshift.frameworks.torch.passes.diagnose` and
:func:`~varshift.frameworks.torch.passes.recalibrate`: frozen dataclasses with ``to_frame()``.

Variance conventions, per name: ``stored_var`` is what torch stores (``running_var``, an
average of *unbiased* batch variances); ``eval_var`` is the *population* variance (÷ n) of what
the layer sees at test time (model in ``eval()``, dropout off), over every element of a channel
in the data pass; ``dropout_on_var`` is the mean over batches of the *unbiased* batch variance
in training mode with dropout on — what the running variance converges to in training.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from numpy.typing import NDArray

from varshift.core.frames import TableResult
from varshift.frameworks.torch.graph import BNPath, ModelGraph

if TYPE_CHECKING:
    import pandas as pd
    from torch import nn

FloatArray = NDArray[np.float64]


def _median(values: FloatArray | None) -> float:
    if values is None or values.size == 0 or not np.isfinite(values).any():
        return math.nan
    return float(np.nanmedian(np.where(np.isfinite(values), values, np.nan)))


def _extreme(values: FloatArray | None, fn: Any) -> float:
    if values is None or not np.isfinite(values).any():
        return math.nan
    return float(fn(values[np.isfinite(values)]))


def _ratio(num: FloatArray | None, den: FloatArray | None) -> FloatArray | None:
    if num is None or den is None:
        return None
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.asarray(num / den, dtype=np.float64)


def _live(values: FloatArray | None, live: NDArray[np.bool_]) -> FloatArray | None:
    return None if values is None else values[live]


def _mean(values: FloatArray | None) -> float:
    return math.nan if values is None or values.size == 0 else float(np.mean(values))


@dataclass(frozen=True)
class Scores:
    """Accuracy, mean negative log-likelihood and expected calibration error of one variant.

    ``ece``: top-label ECE over 15 equal-width confidence bins, ``sum_b n_b/n |acc_b - conf_b|``.
    """

    variant: str
    samples: int
    accuracy: float
    nll: float
    ece: float


@dataclass(frozen=True)
class DiagnoseRow:
    """One BatchNorm, summarised over channels (the table ``varshift diagnose`` prints).

    Means over channels for ``stored_*``, ``eval_*`` and ``dropout_on_var``; the median, minimum
    and maximum over live channels (eval-mode variance >= eps; the others are
    ``dead_channels``, whose ratios are 0/0 or x/0) for ``shift_ratio`` = stored/eval variance,
    and ratios over live channels below too; ``predicted_ratio``
    is the closed form's median (direct layers: ``Var_train/Var_test`` of case (a) from the
    measured eval mean and variance); ``dropout_on_ratio`` the median of dropout-on/eval;
    ``flag_tol`` how far ``shift_ratio`` may lie from 1 before the layer is flagged
    ``shifted`` (``FLAG_SE`` standard errors, :mod:`varshift.frameworks.torch.flags`).
    """

    layer: str
    cls: str
    kind: str
    dropout: str
    dropout_kind: str
    rate: float
    channels: int
    num_batches_tracked: float
    stored_mean: float
    stored_var: float
    eval_mean: float
    eval_var: float
    dropout_on_var: float
    shift_ratio: float
    shift_ratio_min: float
    shift_ratio_max: float
    predicted_ratio: float
    dropout_on_ratio: float
    dead_channels: int
    flag_tol: float
    flags: str
    path: str


@dataclass(frozen=True, eq=False)
class LayerDiagnosis:
    """One BatchNorm's per-channel numbers (float64 arrays of length ``channels``).

    ``stored_*`` are ``None`` when the layer does not track running statistics;
    ``dropout_on_var`` is ``None`` when that pass was skipped; ``predicted_ratio`` is ``None``
    where no closed form applies. ``shift_tol``/``rebake_tol``: the relative thresholds of the
    ``shifted``/``shift re-baked`` flags (:mod:`varshift.frameworks.torch.flags`).
    """

    path: BNPath
    channels: int
    eps: float
    momentum: float | None
    num_batches_tracked: int | None
    stored_mean: FloatArray | None
    stored_var: FloatArray | None
    eval_mean: FloatArray
    eval_var: FloatArray
    count: int
    dropout_on_var: FloatArray | None
    predicted_ratio: FloatArray | None
    flags: tuple[str, ...]
    shift_tol: float = math.nan
    rebake_tol: float = math.nan

    @property
    def shift_ratio(self) -> FloatArray | None:
        """Per channel: stored running variance / eval-mode population variance."""
        return _ratio(self.stored_var, self.eval_var)

    @property
    def dead(self) -> int:
        """Channels whose eval-mode variance is below the layer's eps."""
        return int(np.sum(self.eval_var < self.eps))

    def row(self) -> DiagnoseRow:
        """The one-line summary; ratios over live channels (eval variance >= eps)."""
        live = self.eval_var >= self.eps
        p, ratio = self.path, _live(self.shift_ratio, live)
        d = p.dropout
        return DiagnoseRow(
            layer=p.layer,
            cls=p.cls,
            kind=p.kind,
            dropout=d.name if d else "",
            dropout_kind=(d.cls if d else ""),
            rate=d.rate if d else math.nan,
            channels=self.channels,
            num_batches_tracked=(
                math.nan if self.num_batches_tracked is None else float(self.num_batches_tracked)
            ),
            stored_mean=_mean(self.stored_mean),
            stored_var=_mean(self.stored_var),
            eval_mean=_mean(self.eval_mean),
            eval_var=_mean(self.eval_var),
            dropout_on_var=_mean(self.dropout_on_var),
            shift_ratio=_median(ratio),
            shift_ratio_min=_extreme(ratio, np.min),
            shift_ratio_max=_extreme(ratio, np.max),
            predicted_ratio=_median(_live(self.predicted_ratio, live)),
            dropout_on_ratio=_median(_live(_ratio(self.dropout_on_var, self.eval_var), live)),
            dead_channels=self.dead,
            flag_tol=self.shift_tol,
            flags=", ".join(self.flags),
            path=p.path,
        )


#: Metrics of the ``--format json`` report and their orientation for ``varshift check``.
#: ``shift_ratio`` (stored/eval) is best at 1, so a significant change either way counts.
REPORT_METRICS: tuple[tuple[str, str], ...] = (
    ("shift_ratio", "none"),
    ("shift_ratio_min", "none"),
    ("shift_ratio_max", "none"),
    ("predicted_ratio", "none"),
    ("dropout_on_ratio", "none"),
    ("stored_var", "none"),
    ("eval_var", "none"),
    ("dead_channels", "lower"),
)
SCORE_METRICS: tuple[tuple[str, str], ...] = (
    ("accuracy", "higher"),
    ("nll", "lower"),
    ("ece", "lower"),
)


@dataclass(frozen=True, eq=False)
class DiagnoseResult(TableResult):
    """What :func:`~varshift.frameworks.torch.passes.diagnose` found.

    Attributes
    ----------
    layers:
        One :class:`LayerDiagnosis` per BatchNorm, in execution order.
    scores:
        Accuracy/NLL/ECE of the model as saved, when labels were given.
    graph:
        The classified graph.
    mode_audit:
        Dropout or BatchNorm modules still in training mode after ``model.eval()``.
    samples, batches:
        Size of the data pass.
    warnings:
        One line each (untraceable model, mode audit, ...).
    """

    layers: tuple[LayerDiagnosis, ...]
    scores: Scores | None
    graph: ModelGraph
    mode_audit: tuple[str, ...]
    samples: int
    batches: int
    warnings: tuple[str, ...]

    row_type: ClassVar[type] = DiagnoseRow

    @property
    def rows(self) -> tuple[DiagnoseRow, ...]:
        """One summary row per BatchNorm."""
        return tuple(layer.row() for layer in self.layers)

    def table_rows(self) -> tuple[DiagnoseRow, ...]:
        """The summary rows (``to_frame()``: a DataFrame, one row per BatchNorm)."""
        return self.rows

    def table_caption(self) -> str:
        """What the table shows."""
        return f"varshift diagnose: {len(self.rows)} BatchNorm layer(s), {self.samples} samples"

    def metric_rows(self) -> list[dict[str, Any]]:
        """Long-form rows ``scenario, metric, value, better`` that ``varshift check`` reads:
        per layer (scenario = layer name) :data:`REPORT_METRICS`, and with labels the scores
        (scenario ``model``)."""
        out: list[dict[str, Any]] = []
        for row in self.rows:
            values = asdict(row)
            for name, better in REPORT_METRICS:
                out.append(
                    {"scenario": row.layer, "metric": name, "value": values[name], "better": better}
                )
        if self.scores is not None:
            for name, better in SCORE_METRICS:
                value = getattr(self.scores, name)
                out.append({"scenario": "model", "metric": name, "value": value, "better": better})
        return out


@dataclass(frozen=True)
class RecalibratedLayer:
    """One BatchNorm before and after recalibration (means over channels).

    ``var_*`` are stored running variances (unbiased, as torch stores them: the population
    variance times ``n/(n-1)``, ``n`` = ``count`` elements per channel); ``ratio_before`` is
    the median over channels of stored-before / recalibrated; ``single_pass_diff`` the largest
    relative difference between the single-pass and the topological variance (``nan`` when
    only one method ran).
    """

    layer: str
    kind: str
    depth: int
    channels: int
    count: int
    action: str
    mean_before: float
    mean_after: float
    var_before: float
    var_after: float
    ratio_before: float
    single_pass_diff: float


@dataclass(frozen=True, eq=False)
class RecalibrateResult(TableResult):
    """What :func:`~varshift.frameworks.torch.passes.recalibrate` did.

    Attributes
    ----------
    layers:
        One :class:`RecalibratedLayer` per BatchNorm.
    scores:
        With labels: ``as saved``, ``correct (data-free)``, ``recalibrated`` and
        ``recalibrated, dropout on (update_bn)``.
    model:
        The recalibrated copy (only BatchNorm ``running_mean``/``running_var`` differ).
    method, passes:
        ``topological`` or ``single-pass``, and the data passes the estimate took.
    warnings:
        One line each.
    """

    layers: tuple[RecalibratedLayer, ...]
    scores: tuple[Scores, ...]
    model: nn.Module
    graph: ModelGraph
    method: str
    passes: int
    warnings: tuple[str, ...]

    row_type: ClassVar[type] = RecalibratedLayer

    def table_rows(self) -> tuple[RecalibratedLayer, ...]:
        """The per-layer rows (``to_frame()``: a DataFrame)."""
        return self.layers

    def table_caption(self) -> str:
        """What the table shows."""
        return f"varshift recalibrate ({self.method}): one row per BatchNorm layer"

    def scores_frame(self) -> pd.DataFrame:
        """The before/after table (empty without labels)."""
        import pandas as pd

        columns = ["variant", "samples", "accuracy", "nll", "ece"]
        return pd.DataFrame.from_records([asdict(s) for s in self.scores], columns=columns)
