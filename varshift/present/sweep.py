"""How ``varshift sweep`` shows a :class:`~varshift.jobs.sweep.SweepResult`: the terminal layout,
the shift-ratio figures (their plot-ready data first, no matplotlib) and the page sections."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from varshift.core.topology import TOPOLOGIES
from varshift.jobs.sweep import SweepResult, SweepRow
from varshift.present.output import Drawn, Visuals, inline
from varshift.present.output import write_visuals as _write
from varshift.present.report import format_value
from varshift.present.table import Grid

#: At most this many shift-ratio figures are drawn (one per dropout/mean/variance combination).
MAX_FIGURES = 20


# --- plot-ready data (no matplotlib here) -----------------------------------------------------


@dataclass(frozen=True)
class RateCurve:
    """One curve of a shift-ratio-against-rate panel; ``sim``/``sim_se`` are optional points."""

    label: str
    rates: tuple[float, ...]
    ratio: tuple[float, ...]
    sim: tuple[float, ...] | None = None
    sim_se: tuple[float, ...] | None = None


@dataclass(frozen=True)
class RatePanel:
    """One panel: curves (one per width/D) and the case-(a) curve for contrast."""

    title: str
    curves: tuple[RateCurve, ...]
    contrast: RateCurve | None = None


@dataclass(frozen=True)
class RateFigure:
    """The panels of one shift-ratio figure; ``key`` tells it apart in a file name."""

    key: str
    title: str
    panels: tuple[RatePanel, ...]


def _num(x: float) -> str:
    return f"{x:g}"


def _group(rows: list[SweepRow], key: Any) -> dict[Any, list[SweepRow]]:
    out: dict[Any, list[SweepRow]] = {}
    for r in rows:
        out.setdefault(key(r), []).append(r)
    return out


def rate_figures(result: SweepResult) -> list[RateFigure]:
    """Group a sweep's rows into shift-ratio-against-rate figures.

    One figure per (dropout, mean, var); one panel per ``rho``; one curve per (width, D). The
    closed-form ratio does not depend on the framework or batch size, so only the first of each
    is drawn. Each linear panel also carries case (a) — dropout directly before BN, which is
    what any width gives at ``rho = 0`` (:meth:`SweepResult.direct_ratios`) — for contrast.
    Empty when fewer than two rates.
    """
    config = result.config
    if len(config.rates) < 2:
        return []
    fw, n = config.frameworks[0], config.batch_sizes[0]
    rows = [r for r in result.rows if r.framework == fw and r.batch_size == n]
    groups = _group(rows, lambda r: (r.dropout, r.mean, r.var))
    figures = []
    for (drop, c, v), members in groups.items():
        panels = []
        for rho, prow in _group(members, lambda r: r.rho).items():
            curves = [
                RateCurve(
                    _curve_label(result, width, d_eff),
                    tuple(r.rate for r in crow),
                    tuple(r.shift_ratio for r in crow),
                )
                for (width, d_eff), unsorted in _group(prow, lambda r: (r.width, r.D)).items()
                for crow in [sorted(unsorted, key=lambda r: r.rate)]
            ]
            contrast = None
            if TOPOLOGIES[config.topology].mixes:
                rates, ratios = result.direct_ratios(drop, c, v)
                contrast = RateCurve("case (a): ρ = 0 at any D", rates, ratios)
            title = f"ρ = {_num(rho)}" if TOPOLOGIES[config.topology].mixes else "dropout → BN"
            panels.append(RatePanel(title, tuple(curves), contrast))
        title = f"{drop} dropout, input mean {_num(c)}, variance {_num(v)}"
        key = "" if len(groups) == 1 else f"{drop}_mean{_num(c)}_var{_num(v)}"
        figures.append(RateFigure(key, title, tuple(panels)))
    return figures


def _curve_label(result: SweepResult, width: int, d_eff: float) -> str:
    config = result.config
    if not TOPOLOGIES[config.topology].mixes:
        return "dropout → BN"
    if config.widths and config.Ds:
        return f"d = {width}, D = {_num(d_eff)}"
    return f"D = {_num(d_eff)}"


# --- figures, page, terminal ------------------------------------------------------------------


def figures(result: SweepResult) -> list[Drawn]:
    """The figures (file stem, matplotlib figure, caption) of everything this sweep can show."""
    from varshift.present.figures import shift_vs_rate, sim_vs_theory

    out: list[Drawn] = []
    for data in rate_figures(result)[:MAX_FIGURES]:
        stem = "shift_vs_rate" + (f"_{data.key}" if data.key else "")
        caption = (
            f"Shift ratio Δ = Var_test / Var_train against the dropout rate ({data.title}). "
            + (
                "One curve per D = d·cos²θ, one panel per input correlation ρ; the dashed "
                "curve is dropout directly before BN, which is also every width at ρ = 0."
                if TOPOLOGIES[result.config.topology].mixes
                else "Dropout directly before BatchNorm (case (a))."
            )
        )
        out.append(Drawn(stem, shift_vs_rate(data), caption))
    if result.config.simulate:
        rows = result.rows
        fig = sim_vs_theory(
            [r.recorded_ratio for r in rows],
            [math.nan if r.sim_shift_ratio is None else r.sim_shift_ratio for r in rows],
            [math.nan if r.sim_shift_ratio_se is None else r.sim_shift_ratio_se for r in rows],
            quantity="test / recorded variance",
        )
        caption = (
            "Monte Carlo against closed form: the test-time variance over the recorded running "
            "variance after the given steps (Δ with the stored-variance bias and the initial "
            "value's residual weight), one point per grid point, ±2 standard errors."
        )
        out.append(Drawn("sim_vs_theory", fig, caption))
    return out


def sections(result: SweepResult, df: Grid, drawn: list[Drawn]) -> list[Any]:
    """The page: figures, a pivot of Δ (rate × the one other varying axis), the grid."""
    from varshift.present.html import Section, Table

    out = []
    if drawn:
        out.append(
            Section(
                "Shift ratio against dropout rate",
                (
                    "During training dropout inflates the variance BatchNorm records; at test "
                    "time the layer sees the smaller clean variance. Δ = Var_test / Var_train "
                    "measures the mismatch (1 means none).",
                ),
                inline(drawn),
            )
        )
    other = [a for a in result.varying if a != "rate"]
    if "rate" in result.varying and len(other) == 1:
        out.append(
            Section(
                "Shift ratio Δ",
                (f"Closed-form Δ, rate down and {other[0]} across.",),
                tables=(Table(_pivot(df, other[0])),),
            )
        )
    out.append(
        Section(
            "Grid",
            (
                f"One row per grid point ({len(df)} points); varying axes: "
                f"{', '.join(result.varying) or 'none'}.",
            ),
            tables=(Table(df),),
        )
    )
    return out


def _pivot(df: Grid, across: str) -> Any:
    """Δ with the rate down and ``across`` across (pandas' pivot_table: mean of duplicates)."""
    import pandas as pd

    frame = pd.DataFrame.from_records(df.records())
    pivot = frame.pivot_table(index="rate", columns=across, values="shift_ratio", sort=False)
    pivot.columns = [f"{across} = {format_value(c)}" for c in pivot.columns]
    return pivot.reset_index()


def compact_layout(result: SweepResult, df: Grid) -> Grid:
    """The terminal table: the axes that vary, then the main results."""
    cols = list(result.varying) or ["rate"]
    cols += ["train_var", "test_var", "shift_ratio", "running_var", "running_var_sd"]
    if result.config.simulate:
        cols += ["sim_running_var", "z_running_var", "recorded_ratio", "sim_shift_ratio"]
        cols += ["z_shift_ratio"]
    if result.config.seeds > 1:
        cols += ["sim_shift_ratio_sd", "recorded_ratio_within_2se"]
    return df.select(cols)


def write_visuals(
    result: SweepResult, df: Grid, visuals: Visuals, drawn: list[Drawn]
) -> list[Path]:
    """The figures into ``--plot`` and the page into ``--html``."""
    page = None
    if visuals.html is not None:
        page = ("varshift sweep", lambda: sections(result, df, drawn), result.metadata)
    return _write(visuals, drawn, page)
