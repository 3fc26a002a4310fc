"""Figures of the variance shift (optional extra: ``pip install 'varshift[plot]'``).

matplotlib is imported inside the functions, never at module import, and only through its
object-oriented API with the Agg canvas (no pyplot, no global figure state, no display). Every
function returns a :class:`matplotlib.figure.Figure`; :func:`save_figure` writes it as PNG and
SVG atomically and :func:`svg_text` gives the SVG to inline in an HTML page.

Figures draw what the library computed; they never recompute numerics.
"""

from __future__ import annotations

import io
import math
import re
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import ArrayLike

from varshift.core.errors import MissingDependencyError, OutputFileError
from varshift.core.files import OutputPlan, atomic_write

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from varshift.present.sweep import RateFigure

_SVG_META: dict[str, Any] = {"Date": None, "Creator": None, "Format": None, "Type": None}
_PNG_META: dict[str, Any] = {"Software": None}

INSTALL_HINT = "pip install 'varshift[plot]' (or pip install matplotlib)"


def require_matplotlib(option: str = "--plot") -> None:
    """Raise :class:`MissingDependencyError` naming ``option`` if matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise MissingDependencyError(
            f"{option} needs matplotlib, which is not installed; install it with: {INSTALL_HINT}"
        ) from None


def check_output_folder(folder: Path, option: str = "--plot") -> Path:
    """Create ``folder`` if needed and check it can be written; name ``option`` if not.

    Call before long work, so an unwritable destination fails at once.
    """
    path = Path(folder)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputFileError(
            f"{option} {folder}: cannot create this folder ({exc.strerror})"
        ) from None
    if not path.is_dir():
        raise OutputFileError(f"{option} {folder}: not a folder")
    probe = path / ".varshift-write-test"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise OutputFileError(f"{option} {folder}: cannot write here ({exc.strerror})") from None
    return path


def _new_figure(width: float, height: float) -> Figure:
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def shift_vs_rate(data: RateFigure) -> Figure:
    """Shift ratio ``Delta`` against the dropout rate: the paper's width argument.

    One panel per ``rho``, one curve per width/``D``, and the case-(a) curve (dashed black:
    dropout directly before BN, equal to ``rho = 0`` at any width) for contrast. Simulated
    points, when present, are drawn with ±2 standard-error bars.

    Parameters
    ----------
    data:
        What :func:`varshift.present.sweep.rate_figures` returns for one figure.
    """
    n = len(data.panels)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig = _new_figure(max(6.4, 4.6 * cols + 0.6), (4.6 if n == 1 else 3.9) * rows + 0.4)
    axes = fig.subplots(rows, cols, squeeze=False, sharey=True)
    for k, panel in enumerate(data.panels):
        ax = axes[k // cols][k % cols]
        if panel.contrast is not None:
            ax.plot(
                panel.contrast.rates,
                panel.contrast.ratio,
                color="black",
                linestyle="--",
                linewidth=1.6,
                label=panel.contrast.label,
                zorder=3,
            )
        for i, curve in enumerate(panel.curves):
            color = f"C{i % 10}"
            ax.plot(
                curve.rates,
                curve.ratio,
                color=color,
                marker="o",
                markersize=3.5,
                linewidth=1.6,
                label=curve.label,
            )
            if curve.sim is not None and curve.sim_se is not None:
                ax.errorbar(
                    curve.rates,
                    curve.sim,
                    yerr=2.0 * np.asarray(curve.sim_se, dtype=np.float64),
                    fmt="s",
                    markersize=4,
                    markerfacecolor="white",
                    color=color,
                    capsize=2.5,
                    label=f"{curve.label}, simulated ±2 SE",
                )
        ax.set_title(panel.title)
        ax.set_xlabel("dropout rate r")
        if k % cols == 0:
            ax.set_ylabel("shift ratio Δ = Var_test / Var_train")
        ax.set_ylim(0.0, 1.03)
        ax.axhline(1.0, color="0.6", linewidth=0.8)
        ax.grid(True, color="0.9")
        ax.legend(fontsize="small", loc="lower left")
    for k in range(n, rows * cols):
        axes[k // cols][k % cols].set_visible(False)
    fig.suptitle(f"Variance shift against dropout rate\n{data.title}", fontsize="medium")
    return fig


def sim_vs_theory(
    theory: ArrayLike,
    simulated: ArrayLike,
    se: ArrayLike,
    *,
    quantity: str = "shift ratio Δ",
    title: str | None = None,
) -> Figure:
    """Simulated values against their closed forms, with ±2 standard-error bars.

    Points on the diagonal agree; a point whose bar misses it disagrees at about the 5% level.
    """
    t = np.asarray(theory, dtype=np.float64).ravel()
    s = np.asarray(simulated, dtype=np.float64).ravel()
    e = np.asarray(se, dtype=np.float64).ravel()
    fig = _new_figure(5.2, 5.0)
    ax = fig.subplots()
    finite = np.concatenate([t[np.isfinite(t)], s[np.isfinite(s)]])
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    pad = 0.05 * (hi - lo or 1.0)
    ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="0.5", linewidth=1, label="y = x")
    ax.errorbar(t, s, yerr=2.0 * e, fmt="o", markersize=4, capsize=2.5, label="simulated ±2 SE")
    ax.set_xlabel(f"{quantity}, closed form")
    ax.set_ylabel(f"{quantity}, Monte Carlo")
    ax.set_title(title or f"Monte Carlo against closed form: {quantity}")
    ax.grid(True, color="0.9")
    ax.legend(fontsize="small")
    return fig


def running_variance(
    steps: ArrayLike,
    trace: ArrayLike,
    expected: ArrayLike,
    sd: ArrayLike,
    *,
    k: float = 2.0,
    target: float | None = None,
    title: str | None = None,
) -> Figure:
    """The stored running variance over training steps, with its predicted ``±k sd`` band.

    Parameters
    ----------
    steps:
        ``(T,)`` update numbers.
    trace:
        ``(T,)`` one run's running variance, or ``(runs, T)`` several runs.
    expected, sd:
        ``(T,)`` (or scalars): ``E[R_t]`` and its noise sd, from
        :func:`varshift.core.theory.running_stats`.
    target:
        The test-time variance, drawn as a horizontal line: the gap is the variance shift.
    """
    x = np.asarray(steps, dtype=np.float64)
    y = np.atleast_2d(np.asarray(trace, dtype=np.float64))
    mu = np.broadcast_to(np.asarray(expected, dtype=np.float64), x.shape)
    band = k * np.broadcast_to(np.asarray(sd, dtype=np.float64), x.shape)
    fig = _new_figure(7.0, 4.2)
    ax = fig.subplots()
    ax.fill_between(
        x, mu - band, mu + band, color="C0", alpha=0.18, linewidth=0, label=f"predicted ±{k:g} sd"
    )
    ax.plot(x, mu, color="C0", linewidth=1.8, label="predicted E[running var]")
    for i, row in enumerate(y):
        ax.plot(
            x,
            row,
            color="C1",
            linewidth=0.9,
            alpha=0.8 if len(y) == 1 else 0.45,
            label="simulated running var" if i == 0 else None,
        )
    if target is not None:
        ax.axhline(target, color="black", linestyle="--", linewidth=1.2, label="test-time variance")
    ax.set_xlabel("training step t")
    ax.set_ylabel("running variance R_t")
    ax.set_title(title or "Running variance drifts to its dropout-inflated target")
    ax.grid(True, color="0.9")
    ax.legend(fontsize="small")
    return fig


def layer_before_after(
    names: Sequence[str],
    before: ArrayLike,
    after: ArrayLike,
    *,
    ylabel: str = "running variance",
    labels: tuple[str, str] = ("stored (before)", "corrected (after)"),
    title: str | None = None,
) -> Figure:
    """Per-layer grouped bars: a statistic before and after a correction."""
    b = np.asarray(before, dtype=np.float64).ravel()
    a = np.asarray(after, dtype=np.float64).ravel()
    if not (len(names) == b.size == a.size):
        raise ValueError(
            f"names, before and after must have one value per layer; got "
            f"{len(names)}, {b.size}, {a.size}"
        )
    x = np.arange(len(names), dtype=np.float64)
    fig = _new_figure(max(5.0, 0.55 * len(names) + 2.5), 4.4)
    ax = fig.subplots()
    ax.bar(x - 0.2, b, width=0.4, color="C3", label=labels[0])
    ax.bar(x + 0.2, a, width=0.4, color="C2", label=labels[1])
    ax.set_xticks(
        x,
        list(names),
        rotation=45 if len(names) > 6 else 0,
        ha="right" if len(names) > 6 else "center",
    )
    ax.set_ylabel(ylabel)
    ax.set_title(title or "Per-layer statistics before and after the correction")
    ax.grid(True, axis="y", color="0.9")
    ax.legend(fontsize="small")
    return fig


def feature_bands(
    names: Sequence[str],
    expected: ArrayLike,
    sd: ArrayLike,
    simulated: ArrayLike,
    *,
    k: float = 2.0,
    target: ArrayLike | None = None,
    quantity: str = "running variance",
    title: str | None = None,
) -> Figure:
    """Per feature: theory's expected value with its ``±k sd`` band, and the simulated value.

    A dot outside its band disagrees with theory at about the 5% level (``k = 2``).
    ``target`` (per feature, optional) is drawn as a black tick: for the running variance, the
    variance the layer sees at test time, so the gap is the variance shift.
    """
    mu = np.asarray(expected, dtype=np.float64).ravel()
    band = k * np.asarray(sd, dtype=np.float64).ravel()
    sim = np.asarray(simulated, dtype=np.float64).ravel()
    if not (len(names) == mu.size == band.size == sim.size):
        raise ValueError(
            f"names, expected, sd and simulated must have one value per feature; got "
            f"{len(names)}, {mu.size}, {band.size}, {sim.size}"
        )
    x = np.arange(mu.size, dtype=np.float64)
    fig = _new_figure(min(14.0, max(5.5, 0.3 * mu.size + 2.5)), 4.4)
    ax = fig.subplots()
    ax.bar(
        x,
        2.0 * band,
        bottom=mu - band,
        width=0.6,
        color="C0",
        alpha=0.25,
        label=f"theory ±{k:g} sd",
    )
    ax.plot(x, mu, linestyle="none", marker="_", markersize=14, color="C0", label="theory E")
    ax.plot(x, sim, linestyle="none", marker="o", markersize=5, color="C1", label="simulated")
    if target is not None:
        tgt = np.asarray(target, dtype=np.float64).ravel()
        ax.plot(
            x,
            tgt,
            linestyle="none",
            marker="_",
            markersize=14,
            markeredgewidth=2,
            color="black",
            label="test-time variance (dropout off)",
        )
    many = len(names) > 12
    ax.set_xticks(x, list(names), rotation=90 if many else 0, fontsize="small" if many else None)
    ax.set_xlabel("feature")
    ax.set_ylabel(quantity)
    ax.set_title(title or f"Simulated {quantity} against theory, per feature")
    ax.grid(True, axis="y", color="0.9")
    ax.legend(fontsize="small")
    return fig


#: Colours of :func:`comparison_chart` by ``check`` mark.
_MARK_COLORS = {"worse": "C3", "changed": "C1", "better": "C2", "unchanged": "0.65"}


def comparison_chart(
    labels: Sequence[str],
    difference: ArrayLike,
    threshold: ArrayLike,
    marks: Sequence[str],
    *,
    title: str | None = None,
) -> Figure:
    """``varshift check``: each metric's change in units of its tolerance, one bar per metric.

    The bar is ``difference / threshold``: beyond ±1 (dashed) the change is significant; for a
    noisy metric it is the z-score over ``--z``. The axis is linear within ±1 and logarithmic
    beyond, so small and huge changes share one chart. A NaN change (a metric that became or
    stopped being NaN) is drawn as a cross at 0.

    Parameters
    ----------
    labels:
        ``scenario/metric`` per bar, drawn top to bottom.
    difference, threshold:
        ``current - baseline`` and the tolerance it was compared with
        (:class:`varshift.jobs.check.Comparison`).
    marks:
        ``better``, ``worse``, ``changed`` or ``unchanged``: the bar's colour.
    """
    d = np.asarray(difference, dtype=np.float64).ravel()
    t = np.asarray(threshold, dtype=np.float64).ravel()
    if not (len(labels) == d.size == t.size == len(marks)):
        raise ValueError(
            f"labels, difference, threshold and marks must have one value per metric; got "
            f"{len(labels)}, {d.size}, {t.size}, {len(marks)}"
        )
    with np.errstate(divide="ignore", invalid="ignore"):
        scaled = np.where(t > 0, d / np.where(t > 0, t, 1.0), np.sign(d) * np.inf)
    big = 1e6  # a change with a zero tolerance: drawn at the end of the axis
    shown = np.clip(np.nan_to_num(scaled, nan=0.0), -big, big)
    y = np.arange(d.size, dtype=np.float64)
    fig = _new_figure(7.0, 0.26 * max(d.size, 3) + 1.6)
    ax = fig.subplots()
    colors = [_MARK_COLORS.get(m, "C3") for m in marks]
    ax.barh(y, shown, color=colors, height=0.7)
    nan = np.isnan(scaled)
    if nan.any():
        ax.plot(np.zeros(int(nan.sum())), y[nan], "x", color="C1", markersize=8)
    for edge in (-1.0, 1.0):
        ax.axvline(edge, color="black", linestyle="--", linewidth=1.0)
    ax.axvline(0.0, color="0.4", linewidth=0.8)
    ax.set_axisbelow(True)
    ax.set_xscale("symlog", linthresh=1.0)
    lim = max(1.5, 1.15 * float(np.max(np.abs(shown)))) if shown.size else 1.5
    ax.set_xlim(-lim, lim)
    ticks = _symlog_ticks(lim)
    ax.set_xticks(ticks, [f"{v:g}" for v in ticks])
    ax.set_yticks(y, list(labels), fontsize="small")
    ax.set_ylim(d.size - 0.5, -0.5)
    ax.set_xlabel("change / tolerance  (beyond ±1: significant; noisy metrics: z / --z)")
    ax.grid(True, axis="x", color="0.9")
    from matplotlib.patches import Patch

    present = [m for m in _MARK_COLORS if m in marks]
    ax.legend(
        handles=[Patch(color=_MARK_COLORS[m], label=m) for m in present],
        fontsize="small",
        loc="lower right",
    )
    # A suptitle is laid out by the figure (constrained layout), and wrapping keeps a long
    # verdict inside the figure's width instead of clipping it at the edges.
    fig.suptitle(
        textwrap.fill(title or "Each metric's change against the baseline", _TITLE_CHARS),
        fontsize="medium",
    )
    return fig


#: Characters per title line of the 7-inch comparison chart (medium font, ~7 pt per character).
_TITLE_CHARS = 64


def _symlog_ticks(lim: float) -> list[float]:
    """Ticks of the comparison chart's symlog axis up to ``lim``: fine steps near ±1 while the
    axis is short, then at most three decades a side, so labels never crowd."""
    if lim <= 12.0:
        steps = [0.5, 1.0] + [v for v in (2.0, 5.0, 10.0) if v <= lim]
    else:
        top = math.floor(math.log10(lim))
        stride = max(1, math.ceil(top / 3))
        steps = [1.0] + [10.0**k for k in range(top, 0, -stride)]
    return sorted({0.0, *steps, *(-v for v in steps)})


def figure_bytes(fig: Figure, fmt: str) -> bytes:
    """The figure encoded as ``png`` or ``svg``, deterministically (no dates, fixed ids)."""
    from matplotlib import rc_context

    buf = io.BytesIO()
    meta = _SVG_META if fmt == "svg" else _PNG_META
    # A fixed hash salt makes SVG ids (and so the bytes) the same on every run; text as paths
    # needs no font files.
    with rc_context({"svg.hashsalt": "varshift", "svg.fonttype": "path"}):
        fig.savefig(buf, format=fmt, dpi=110, metadata=meta)
    return buf.getvalue()


_PROLOG = re.compile(r"^\s*(<\?xml[^>]*\?>\s*)?(<!DOCTYPE[^>]*>\s*)?", re.DOTALL)
_METADATA = re.compile(r"<metadata>.*?</metadata>\s*", re.DOTALL)


def svg_text(fig: Figure) -> str:
    """The figure as an ``<svg>`` element to inline in HTML: no XML prolog, DOCTYPE or metadata.

    Text is drawn as paths (no font files); the only URLs left are the SVG and XLink namespace
    declarations.
    """
    text = figure_bytes(fig, "svg").decode()
    text = _PROLOG.sub("", text, count=1)
    return _METADATA.sub("", text).strip()


def save_figure(fig: Figure, folder: Path, stem: str, *, force: bool = False) -> list[Path]:
    """Write ``<folder>/<stem>.png`` and ``.svg`` atomically; return their paths.

    Both targets are checked before either is written.

    Raises
    ------
    OutputFileError
        If a target exists and ``force`` is False, or the folder cannot be written.
    """
    paths = [Path(folder) / f"{stem}.{ext}" for ext in ("png", "svg")]
    targets = OutputPlan(force=force).add_all(paths)
    return [atomic_write(t, figure_bytes(fig, t.suffix[1:]), force=True) for t in targets]
