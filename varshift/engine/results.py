"""What a simulation returns: frozen dataclasses with one stable shape each."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any, ClassVar, TypeVar

import numpy as np
from numpy.typing import NDArray

from varshift.core.frames import TableResult
from varshift.engine.config import SimConfig

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]
_Row = TypeVar("_Row", "FeatureRow", "FitRow")


@dataclass(frozen=True)
class FeatureRow:
    """One BN feature's simulation beside theory (see :func:`varshift.engine.simulate`).

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
class SimResult(TableResult):
    """What :func:`varshift.engine.simulate` returns.

    ``features`` has one row per BN feature; ``fit`` is set when ``config.fit``; ``weights`` is
    the linear map used by the ``linear`` topology (``None`` otherwise); ``trace`` is the
    running variance along the run when ``simulate(trace=...)`` asked for it.
    ``to_frame()``: one row per feature, the columns of :class:`FeatureRow` (pandas); in a
    notebook the result shows as that table.
    """

    config: SimConfig
    features: tuple[FeatureRow, ...]
    summary: SimSummary
    fit: FitResult | None
    weights: FloatArray | None = field(default=None, compare=False, repr=False)
    trace: RunningTrace | None = field(default=None, compare=False, repr=False)

    row_type: ClassVar[type] = FeatureRow

    def table_rows(self) -> tuple[FeatureRow, ...]:
        """One row per BN feature."""
        return self.features

    def table_caption(self) -> str:
        """What the table shows."""
        return f"varshift simulate: one row per feature ({self.summary.steps} updates)"


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


def mean_row(rows: Sequence[_Row], cls: type[_Row]) -> _Row:
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
