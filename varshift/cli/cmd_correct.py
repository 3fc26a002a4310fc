"""``varshift inspect`` and ``varshift correct``: BatchNorm statistics in checkpoint files."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import pandas as pd
import typer

from varshift import __version__
from varshift.cli._common import (
    DropoutKind,
    Framework,
    OutputFormat,
    app,
    emit,
    handle_errors,
    parse_momentum,
)
from varshift.cli._outputs import Drawn, inline, preflight, save_all, write_page
from varshift.core.errors import InputFileError, OutputFileError, ValidationError
from varshift.core.files import atomic_write
from varshift.core.presets import resolve_preset
from varshift.formats import BNStats, format_from_extension, read_stats, write_stats
from varshift.jobs.correct import (
    CorrectionConfig,
    CorrectionResult,
    LayerCorrection,
    correct_stats,
    inspect_stats,
    parse_layer_rule,
)
from varshift.present.report import render_text, to_frame

if TYPE_CHECKING:
    from varshift.present.html import Section


class Method(StrEnum):
    """``--method`` choices (:func:`varshift.core.theory.corrected_variance`)."""

    debiased = "debiased"
    naive = "naive"


class Target(StrEnum):
    """``--target`` choices."""

    framework = "framework"
    population = "population"


FILE_HELP = (
    "Checkpoint or statistics file: .pt/.pth (PyTorch state dict or training checkpoint), "
    ".weights.h5 (Keras 3), .safetensors, .npz, .csv/.tsv, .json."
)

INSPECT_EPILOG = """\
Examples:

  varshift inspect model.pt

  varshift inspect model.weights.h5 --format csv

  varshift inspect stats.npz --framework keras --momentum 0.9
"""

CORRECT_EPILOG = """\
Examples:

  varshift correct model.pt --rate 0.5 -o fixed.pt

  varshift correct model.weights.h5 --rate 0.3 --batch-size 64 -o fixed.weights.h5

  varshift correct model.pt --layer 'block*.bn=0.2' --layer head.bn=0.5 -o fixed.pt

  varshift correct model.pt --rate 0.1 --exclude 'stem.*' -o fixed.safetensors

  varshift correct model.pt --rate 0.5 --dry-run

  varshift correct model.pt --rate 0.5 --dry-run --plot figs --html correct.html
"""

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


def _note(message: str, quiet: bool) -> None:
    if not quiet:
        typer.echo(f"varshift: {message}", err=True)


def _framework(stats: BNStats, option: Framework | None, quiet: bool) -> str:
    """``--framework``, else what the file implies, else torch with a note."""
    if option is not None:
        return option.value
    if stats.framework is not None:
        return stats.framework
    _note(
        f"note: {stats.where} does not say which framework wrote it; assuming torch "
        "conventions (unbiased stored variance, momentum 0.1); pass --framework to change",
        quiet,
    )
    return "torch"


def _require_layers(stats: BNStats) -> None:
    if not stats.layers:
        raise InputFileError(
            f"{stats.where}: no BatchNorm statistics found (looked for running_mean/running_var, "
            "moving_mean/moving_variance or mean/var keys, or Keras batch_normalization layers)"
        )


@app.command(epilog=INSPECT_EPILOG)
@handle_errors
def inspect(
    file: Annotated[Path, typer.Argument(help=FILE_HELP, show_default=False)],
    framework: Annotated[
        Framework | None,
        typer.Option(help="BatchNorm convention [default: from the file, else torch]."),
    ] = None,
    momentum: Annotated[
        str | None,
        typer.Option(help="Momentum in the framework's own meaning; torch also 'none'."),
    ] = None,
    fmt: Annotated[OutputFormat, typer.Option("--format", "-f", help="Output format.")] = (
        OutputFormat.table
    ),
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write the table to this file.")
    ] = None,
    force: Annotated[bool, typer.Option(help="Overwrite --output if it exists.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only print results.")] = False,
) -> None:
    """Show the BatchNorm statistics stored in a checkpoint, one row per layer.

    Per layer: channels, the stored update count, mean/min/max of the running variance and
    running mean, and flags: statistics still at their initial values (mean 0, var 1), too
    few updates for the momentum to forget the initial value (fewer than
    `varshift theory` calls updates_to_1pct), non-finite or non-positive variances.
    """
    stats = read_stats(file)
    _require_layers(stats)
    preset = resolve_preset(_framework(stats, framework, quiet), parse_momentum(momentum))
    rows = inspect_stats(stats, preset)
    df = to_frame(rows)
    meta = {
        "varshift": __version__,
        "command": "inspect",
        "parameters": {
            "file": file.name,
            "format": stats.format,
            "container": stats.container,
            "framework": preset.name,
            "momentum": preset.momentum,
        },
    }
    title = f"BatchNorm statistics in {file.name} ({stats.format}, {preset.name} conventions)"
    emit(
        df,
        fmt,
        metadata=meta,
        title=title,
        output=output,
        force=force,
        table_df=df[INSPECT_COLUMNS],
    )
    flagged = sum(bool(r.flags) for r in rows)
    _note(f"{len(rows)} BatchNorm layer(s), {flagged} flagged", quiet)


@app.command(epilog=CORRECT_EPILOG)
@handle_errors
def correct(
    file: Annotated[Path, typer.Argument(help=FILE_HELP, show_default=False)],
    rate: Annotated[
        float | None,
        typer.Option(
            "--rate", "-r", help="Dropout rate (probability of dropping) for every layer."
        ),
    ] = None,
    layer: Annotated[
        list[str] | None,
        typer.Option(
            "--layer",
            metavar="PATTERN=RATE",
            help="PATTERN=RATE: correct layers matching the glob with this rate; repeatable, "
            "the last match wins; without --rate only matching layers are corrected.",
        ),
    ] = None,
    exclude: Annotated[
        list[str] | None,
        typer.Option(metavar="PATTERN", help="Glob of layers to leave alone; repeatable."),
    ] = None,
    dropout: Annotated[DropoutKind, typer.Option(help="Dropout kind before the BN layers.")] = (
        DropoutKind.bernoulli
    ),
    beta: Annotated[float, typer.Option(help="uout noise half-width (uout only).")] = 0.1,
    framework: Annotated[
        Framework | None,
        typer.Option(
            help="Convention that stored the statistics [default: from the file, else torch]."
        ),
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option(
            help="Elements per channel in one training batch, n (N; N·H·W for images): undoes "
            "the (n-1)/n of biased conventions (keras, flax) and sizes the clipping noise."
        ),
    ] = None,
    method: Annotated[
        Method, typer.Option(help="debiased: undo the stored bias first; naive: invert as stored.")
    ] = Method.debiased,
    target: Annotated[
        Target,
        typer.Option(
            help="framework: what the framework would have stored without dropout; "
            "population: the test-time population variance."
        ),
    ] = Target.framework,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="Corrected file; its format follows the extension (else the input's).",
        ),
    ] = None,
    report: Annotated[
        Path | None,
        typer.Option(help="Report file (.json, .csv or .md) [default: OUTPUT.report.json]."),
    ] = None,
    no_report: Annotated[bool, typer.Option("--no-report", help="Write no report file.")] = False,
    plot: Annotated[
        Path | None,
        typer.Option(
            "--plot",
            help="Write the per-layer before/after chart (PNG and SVG) into this folder.",
        ),
    ] = None,
    html: Annotated[
        Path | None,
        typer.Option("--html", help="Write a self-contained HTML page (table and chart)."),
    ] = None,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Show what would change; write no corrected file and no report (--plot and "
            "--html are still written: a preview).",
        ),
    ] = False,
    force: Annotated[
        bool, typer.Option(help="Overwrite the output, the report and --plot/--html files.")
    ] = False,
    fmt: Annotated[OutputFormat, typer.Option("--format", "-f", help="Table format.")] = (
        OutputFormat.table
    ),
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only print results.")] = False,
) -> None:
    """Correct the running variances of BatchNorm layers that follow dropout, without data.

    Each selected layer's stored variance V and mean mu become what the layer sees at test
    time, v = (V + mu²)/kappa - mu² (bernoulli: q (V + mu²) - mu², q = 1 - rate), after
    undoing the (n-1)/n of biased conventions when --batch-size is given (DESIGN §2, case
    (a): the BN directly follows the dropout). Prints a before/after table per layer and
    writes the corrected file and a report; the input is never modified. A corrected
    variance ≤ 0 is an error unless it is within noise of zero, then it is clipped to the
    framework's eps with a warning.

    `--plot DIR` draws each layer's mean running variance before and after (PNG and SVG;
    needs matplotlib); `--html FILE` writes one self-contained page with the chart and the
    before/after table. Both are written with `--dry-run` too, as a preview.
    """
    preflight(plot, html, (FIGURE_STEM,), force=force)
    stats = read_stats(file)
    _require_layers(stats)
    preset = resolve_preset(_framework(stats, framework, quiet))
    config = CorrectionConfig(
        rate=rate,
        rules=tuple(parse_layer_rule(text) for text in layer or ()),
        exclude=tuple(exclude or ()),
        dropout=dropout.value,
        beta=beta,
        preset=preset,
        batch_size=batch_size,
        method=method.value,
        target=target.value,
    )
    targets = None
    if not dry_run:
        if output is None:
            raise ValidationError("--output/-o is required (or --dry-run to only show the table)")
        targets = _targets(stats, output, report, not no_report, force)
    result = correct_stats(stats, config)
    meta = {
        "varshift": __version__,
        "command": "correct",
        "parameters": {
            "file": file.name,
            "format": stats.format,
            "output": output.name if output is not None else None,
            "rate": rate,
            "layer": list(layer or ()),
            "exclude": list(exclude or ()),
            "dropout": config.dropout,
            "beta": beta if config.dropout == "uout" else None,
            "framework": preset.name,
            "batch_size": batch_size,
            "method": config.method,
            "target": config.target,
        },
        "warnings": list(result.warnings),
    }
    df = to_frame(result.rows)
    written: list[Path] = []
    if targets is not None:
        written.append(write_stats(result.stats, targets.output, targets.format, force=force))
        if targets.report is not None:
            text = render_text(
                df, targets.report.suffix.lower().lstrip("."), meta, "varshift correct"
            )
            written.append(atomic_write(targets.report, text, force=force))
    title = (
        f"{result.corrected} of {len(result.rows)} BatchNorm layer(s) corrected in {file.name} "
        f"({config.dropout} dropout, {preset.name}, {config.method}, target {config.target})"
    )
    shown: list[Path] = []
    if plot is not None or html is not None:
        drawn = _chart(result.rows, title)
        if plot is not None:
            shown += save_all(plot, [drawn])
        if html is not None:
            shown.append(write_page(html, "varshift correct", _sections(result, df, drawn), meta))
    emit(df, fmt, metadata=meta, title=title)
    for warning in result.warnings:
        _note(f"warning: {warning}", quiet)
    if not dry_run:
        _note(f"wrote {' and '.join(map(str, written))}", quiet)
    elif shown:
        _note("dry run: no corrected file or report written", quiet)
    else:
        _note("dry run: nothing written", quiet)
    for path in shown:
        _note(f"wrote {path}", quiet)


def _chart(rows: Sequence[LayerCorrection], title: str) -> Drawn:
    """Mean running variance per layer, before and after."""
    from varshift.present.figures import layer_before_after

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
        f"{title}{more}. Each layer's running variance, averaged over its channels, as stored "
        "(before) and corrected to what the layer sees at test time (after); layers left "
        "alone have equal bars."
    )
    return Drawn(FIGURE_STEM, fig, caption)


def _sections(result: CorrectionResult, df: pd.DataFrame, drawn: Drawn) -> list[Section]:
    from varshift.present.html import Section, Table

    notes = tuple(f"Warning: {w}" for w in result.warnings)
    return [
        Section(
            "Per-layer running variance",
            (
                "var_before and var_after are each layer's running variance averaged over its "
                "channels; ratio = var_after / var_before (bernoulli with a zero mean: the keep "
                "probability 1 − rate).",
                *notes,
            ),
            figures=inline([drawn]),
            tables=(Table(df, "Before and after, one row per BatchNorm layer"),),
        )
    ]


@dataclass(frozen=True)
class _Targets:
    output: Path
    format: str
    report: Path | None


def _targets(
    stats: BNStats, output: Path, report: Path | None, want_report: bool, force: bool
) -> _Targets:
    """Check every output before anything is written: format, existence, not the input."""
    fmt = format_from_extension(output) or stats.format
    report_path = None
    if want_report:
        report_path = report or output.with_name(output.name + ".report.json")
        if report_path.suffix.lower() not in (".json", ".csv", ".md"):
            raise ValidationError(
                f"--report must end in .json, .csv or .md; got {report_path.name!r}"
            )
    for path in (output, report_path):
        if path is None or not path.exists():
            continue
        if stats.source is not None and path.samefile(stats.source):
            raise OutputFileError(
                f"{path}: is the input file; varshift never modifies its input, choose another "
                "output"
            )
        if not force:
            raise OutputFileError(f"{path}: already exists; pass --force to overwrite it")
    return _Targets(output, fmt, report_path)
