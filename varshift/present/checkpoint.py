"""How ``varshift inspect`` and ``varshift correct`` show their results: tables, the correct
report file, the before/after chart and the page section."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from varshift.core.files import atomic_write
from varshift.jobs.checkpoint import CorrectResult, InspectResult
from varshift.present.output import Drawn, Visuals, inline
from varshift.present.output import write_visuals as _write
from varshift.present.report import render_text, to_table
from varshift.present.table import Grid

#: Figure file stem of --plot.
FIGURE_STEM = "correct_before_after"

#: The before/after chart shows at most this many layers.
MAX_LAYERS_SHOWN = 60

#: Columns of the human ``inspect`` table (the flags column summarises the boolean ones).
INSPECT_COLUMNS = [
    "layer",
    "channels",
    "count",
    "var_mean",
    "var_min",
    "var_max",
    "mean_mean",
    "mean_min",
    "mean_max",
    "flags",
]


def inspect_tables(result: InspectResult) -> tuple[Grid, Grid, str]:
    """Every column (csv/json), the human layout, and the title."""
    df = to_table(result.rows)
    title = (
        f"BatchNorm statistics in {result.file.name} ({result.format}, "
        f"{result.preset.name} conventions)"
    )
    return df, df.select(INSPECT_COLUMNS), title


def correct_title(result: CorrectResult) -> str:
    """How many layers were corrected, in which file, under which assumptions."""
    config = result.config
    dropout = "dropout from the model" if config.from_model else f"{config.dropout} dropout"
    return (
        f"{result.correction.corrected} of {len(result.rows)} BatchNorm layer(s) corrected in "
        f"{result.job.file.name} ({dropout}, {config.preset.name}, "
        f"{config.method}, target {config.target})"
    )


def write_correct_report(result: CorrectResult) -> Path | None:
    """Write the job's report file (planned by the job), in the format of its extension."""
    path = result.job.report
    if path is None or result.job.output is None:
        return None
    fmt = path.suffix.lower().lstrip(".")
    text = render_text(to_table(result.rows), fmt, result.metadata, "varshift correct")
    return atomic_write(path, text, force=True)


def chart(result: CorrectResult) -> Drawn:
    """Mean running variance per layer, before and after."""
    from varshift.present.figures import layer_before_after

    rows = result.rows
    cut = rows[:MAX_LAYERS_SHOWN]
    fig = layer_before_after(
        [r.layer for r in cut],
        [r.var_before for r in cut],
        [r.var_after for r in cut],
        ylabel="mean running variance over channels",
        title="Running variance per BatchNorm layer,\nbefore and after the correction",
    )
    more = f" (the first {len(cut)} of {len(rows)} layers)" if len(cut) < len(rows) else ""
    caption = (
        f"{correct_title(result)}{more}. Each layer's running variance, averaged over its "
        "channels, as stored (before) and corrected to what the layer sees at test time "
        "(after); layers left alone have equal bars."
    )
    return Drawn(FIGURE_STEM, fig, caption)


def sections(result: CorrectResult, drawn: Drawn) -> list[Any]:
    """The page: the chart and the before/after table."""
    from varshift.present.html import Section, Table

    notes = tuple(f"Warning: {w}" for w in result.correction.warnings)
    return [
        Section(
            "Per-layer running variance",
            (
                "var_before and var_after are each layer's running variance averaged over its "
                "channels; ratio = var_after / var_before (bernoulli with a zero mean, directly "
                "after the dropout: the keep probability 1 − rate). kind is the layer's class "
                "(direct, through-linear, stacked, none; unknown without the model's "
                "structure); formula and assumption say what was applied and what it assumes, "
                "or why the layer was left; dropout_term is the mean over channels of the "
                "through-linear term subtracted.",
                *notes,
            ),
            figures=inline([drawn]),
            tables=(Table(to_table(result.rows), "Before and after, one row per BatchNorm layer"),),
        )
    ]


def write_visuals(result: CorrectResult, visuals: Visuals) -> list[Path]:
    """The chart into ``--plot`` and the page into ``--html``."""
    drawn = chart(result)
    page = None
    if visuals.html is not None:
        page = ("varshift correct", lambda: sections(result, drawn), result.metadata)
    return _write(visuals, [drawn], page)
