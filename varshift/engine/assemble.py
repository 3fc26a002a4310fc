"""A run's result: the simulated statistics beside theory, with z-scores and corrections."""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from numpy.typing import NDArray

from varshift.core.theory import corrected_variance, shift_direct, shift_linear
from varshift.engine.band import Band, band, schedule
from varshift.engine.bn import BNState
from varshift.engine.config import Plan, SimConfig
from varshift.engine.fit import AdamFit, fit_result
from varshift.engine.results import FeatureRow, SimResult, SimSummary, mean_row
from varshift.engine.trace import Tracer

FloatArray = NDArray[np.float64]


class _Measured(NamedTuple):
    """Moments of the dataset per BN feature: the dropout input's (``linear``: averaged over the
    unit's inputs, with the full mean vector and covariance) and what BN sees at test time."""

    in_mean: FloatArray
    in_var: FloatArray
    test_mean: FloatArray
    test_var: FloatArray
    c_vec: FloatArray | None = None
    cov: FloatArray | None = None


def _measure(plan: Plan, data: FloatArray, weights: FloatArray | None) -> _Measured:
    """Input and test-time moments, measured on the dataset with dropout off."""
    ts = plan.dropout.test_scale
    if plan.topo.spatial:
        axes = plan.topo.reduce_axes
        test = ts * data
        return _Measured(
            data.mean(axis=axes), data.var(axis=axes), test.mean(axis=axes), test.var(axis=axes)
        )
    if not plan.topo.mixes:
        in_mean = data.mean(axis=0)
        return _Measured(in_mean, data.var(axis=0), ts * in_mean, (ts * data).var(axis=0))
    assert weights is not None
    c_vec = data.mean(axis=0)
    cov = np.cov(data, rowvar=False, bias=True).reshape(plan.width, plan.width)
    test = (ts * data) @ weights.T
    f = plan.features
    return _Measured(
        np.full(f, c_vec.mean()),
        np.full(f, np.diag(cov).mean()),
        test.mean(axis=0),
        test.var(axis=0),
        c_vec,
        cov,
    )


def _closed_forms(
    plan: Plan, meas: _Measured, weights: FloatArray | None
) -> tuple[FloatArray, FloatArray, FloatArray | None]:
    """Theory's train and test variance per feature, and ``D`` of each linear unit."""
    if plan.topo.mixes:
        assert weights is not None and meas.c_vec is not None and meas.cov is not None
        train_var, test_var = shift_linear(meas.c_vec, meas.cov, weights, plan.dropout)
        d_eff = weights.sum(axis=1) ** 2 / (weights * weights).sum(axis=1)
        return train_var, test_var, d_eff
    shifts = [
        shift_direct(float(c), float(v), plan.dropout)
        for c, v in zip(meas.in_mean, meas.in_var, strict=True)
    ]
    return (
        np.array([s.train_var for s in shifts]),
        np.array([s.test_var for s in shifts]),
        None,
    )


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


def _rms(z: FloatArray) -> float:
    ok = z[np.isfinite(z)]
    return float(np.sqrt(np.mean(ok * ok))) if ok.size else math.nan


def _max_abs(z: FloatArray) -> float:
    ok = z[np.isfinite(z)]
    return float(np.max(np.abs(ok))) if ok.size else math.nan


def _corrections(plan: Plan, state: BNState, test_var: FloatArray) -> dict[str, FloatArray | None]:
    """Data-free corrections of the simulated running statistics (population target) and their
    relative errors against the measured test variance; ``None`` for ``linear``."""
    if plan.topo.mixes:
        return dict.fromkeys(("debiased", "naive", "error_debiased", "error_naive"))
    rm, rv, n = state.running_mean, state.running_var, plan.batch * plan.positions
    _, deb = corrected_variance(rm, rv, plan.dropout, plan.preset, n, target="population")
    _, naive = corrected_variance(rm, rv, plan.dropout, plan.preset, n, method="naive")
    return {
        "debiased": deb,
        "naive": naive,
        "error_debiased": _ratio(deb - test_var, test_var),
        "error_naive": _ratio(naive - test_var, test_var),
    }


def _feature_rows(
    plan: Plan, meas: _Measured, bnd: Band, state: BNState, weights: FloatArray | None
) -> tuple[tuple[FeatureRow, ...], FloatArray, FloatArray]:
    """One :class:`FeatureRow` per BN feature, and the z-scores of the running mean and
    variance."""
    train_var_th, test_var_th, d_eff = _closed_forms(plan, meas, weights)
    ratio_th = _ratio(test_var_th, train_var_th)
    rm, rv = state.running_mean, state.running_var
    z_mean = _z(rm, bnd.running_mean_expected, bnd.running_mean_sd)
    z_var = _z(rv, bnd.running_var_expected, bnd.running_var_sd)
    ratio_meas = _ratio(meas.test_var, rv)
    corr = _corrections(plan, state, meas.test_var)

    def opt(arr: FloatArray | None, j: int) -> float | None:
        return None if arr is None else float(arr[j])

    rows = tuple(
        FeatureRow(
            feature=str(j),
            input_mean=float(meas.in_mean[j]),
            input_var=float(meas.in_var[j]),
            D=opt(d_eff, j),
            train_mean_theory=float(bnd.mu[j]),
            train_var_theory=float(train_var_th[j]),
            test_var_theory=float(test_var_th[j]),
            shift_ratio_theory=float(ratio_th[j]),
            batch_var_expected=float(bnd.batch_var_expected[j]),
            batch_var_sd=float(bnd.batch_var_sd[j]),
            running_mean_expected=float(bnd.running_mean_expected[j]),
            running_mean_sd=float(bnd.running_mean_sd[j]),
            running_mean=float(rm[j]),
            z_mean=float(z_mean[j]),
            running_var_expected=float(bnd.running_var_expected[j]),
            running_var_sd=float(bnd.running_var_sd[j]),
            running_var=float(rv[j]),
            z_var=float(z_var[j]),
            test_mean=float(meas.test_mean[j]),
            test_var=float(meas.test_var[j]),
            shift_ratio_measured=float(ratio_meas[j]),
            corrected_var_debiased=opt(corr["debiased"], j),
            corrected_var_naive=opt(corr["naive"], j),
            error_debiased=opt(corr["error_debiased"], j),
            error_naive=opt(corr["error_naive"], j),
        )
        for j in range(plan.features)
    )
    return rows, z_mean, z_var


def _summary(
    plan: Plan,
    rows: tuple[FeatureRow, ...],
    residual: float,
    z_mean: FloatArray,
    z_var: FloatArray,
) -> SimSummary:
    return SimSummary(
        topology=plan.topology,
        rows=plan.rows,
        features=plan.features,
        batch_size=plan.batch,
        elements_per_batch=plan.batch * plan.positions,
        last_batch_elements=plan.last * plan.positions,
        batches_per_epoch=plan.per_epoch,
        epochs=plan.epochs,
        steps=plan.steps,
        residual_weight=residual,
        rms_z_mean=_rms(z_mean),
        max_abs_z_mean=_max_abs(z_mean),
        rms_z_var=_rms(z_var),
        max_abs_z_var=_max_abs(z_var),
        mean=mean_row(rows, FeatureRow),
    )


def assemble(
    plan: Plan,
    config: SimConfig,
    data: FloatArray,
    weights: FloatArray | None,
    state: BNState,
    clean: BNState,
    fit: AdamFit | None,
    tracer: Tracer | None = None,
) -> SimResult:
    """Theory, measurements and the result dataclasses of a finished run."""
    sched = schedule(plan)
    bnd = band(plan, data, weights, sched)
    meas = _measure(plan, data, weights)
    rows, z_mean, z_var = _feature_rows(plan, meas, bnd, state, weights)
    summary = _summary(plan, rows, sched.residual, z_mean, z_var)
    fit_res = None
    if fit is not None:
        fit_res = fit_result(plan, meas.in_mean, meas.in_var, bnd, state, clean, fit)
    trace = tracer.result(plan.preset, bnd) if tracer is not None else None
    return SimResult(config, rows, summary, fit_res, weights, trace)
