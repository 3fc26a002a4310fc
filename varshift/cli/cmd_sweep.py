"""``varshift sweep``: a grid of variance shifts as one tidy table, figures and an HTML page."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import pandas as pd
import typer

from varshift import __version__
from varshift.cli._common import OutputFormat, app, emit, handle_errors, parse_momentum
from varshift.cli._outputs import Drawn, inline, preflight, refuse_figures, save_all, write_page
from varshift.core.dropout import DROPOUT_KINDS
from varshift.core.errors import ValidationError
from varshift.core.presets import FRAMEWORKS
from varshift.core.validate import check_range
from varshift.jobs.sweep import (
    MAX_POINTS,
    SweepConfig,
    SweepResult,
    parse_axis,
    parse_choices,
    rate_figures,
)
from varshift.jobs.sweep import sweep as run_sweep
from varshift.present.render import progress_bar, stderr_console
from varshift.present.report import format_value, to_frame

if TYPE_CHECKING:
    from varshift.present.html import Section

EPILOG = f"""\
Examples:

  varshift sweep --rate 0.1:0.9:0.1 --D 1,4,16,64 --rho 0.1 --plot figs --html sweep.html

  varshift sweep --rate 0.1:0.9:0.2 --mean 0,1,5 --dropout bernoulli,gaussian -f csv

  varshift sweep --rate 0.2,0.5 --framework all --batch-size 8:64:x2 -f json -o grid.json

  varshift sweep --rate 0.1:0.5:0.1 --width 1:256:x4 --rho 0,0.05,0.2 --cos2 0.5 -f md

Axes take comma lists and inclusive ranges: start:stop:step (0.1:0.9:0.1) or start:stop:xfactor
(1:64:x2). The grid is their Cartesian product; more than {MAX_POINTS} points needs --force.
"""

_AXES_HELP = "comma list or range start:stop:step / start:stop:xfactor"


def _axis(values: list[str] | None, default: str) -> list[str]:
    return values if values else [default]


@app.command(epilog=EPILOG)
@handle_errors
def sweep(
    rate: Annotated[
        list[str] | None,
        typer.Option("--rate", "-r", help=f"Dropout rates: {_AXES_HELP}. [default: 0.1:0.9:0.1]"),
    ] = None,
    dropout: Annotated[
        list[str] | None,
        typer.Option(help=f"Dropout kinds, comma list or all ({', '.join(DROPOUT_KINDS)})."),
    ] = None,
    framework: Annotated[
        list[str] | None,
        typer.Option(help=f"BatchNorm presets, comma list or all ({', '.join(FRAMEWORKS)})."),
    ] = None,
    batch_size: Annotated[
        list[str] | None,
        typer.Option("--batch-size", help=f"Elements per channel in a batch: {_AXES_HELP}."),
    ] = None,
    mean: Annotated[
        list[str] | None, typer.Option(help=f"Mean c of the dropout input: {_AXES_HELP}.")
    ] = None,
    var: Annotated[
        list[str] | None,
        typer.Option("--var", help=f"Variance v of the dropout input: {_AXES_HELP}. [default: 1]"),
    ] = None,
    std: Annotated[
        list[str] | None,
        typer.Option("--std", help="Standard deviation of the input instead of --var."),
    ] = None,
    topology: Annotated[
        str | None,
        typer.Option(
            help="direct (dropout → BN) or linear (dropout → linear unit → BN) "
            "[default: linear if --width, --D or --rho is given]."
        ),
    ] = None,
    width: Annotated[
        list[str] | None,
        typer.Option(help=f"Linear: inputs per unit d: {_AXES_HELP}."),
    ] = None,
    D: Annotated[
        list[str] | None,
        typer.Option(
            "--D",
            help=f"Linear: D = d·cos²θ: {_AXES_HELP}. Without --width, d = ceil(D).",
        ),
    ] = None,
    rho: Annotated[
        list[str] | None, typer.Option(help=f"Linear: input correlation ρ: {_AXES_HELP}.")
    ] = None,
    cos2: Annotated[
        float, typer.Option(help="Linear: cos²θ of the weights when --D is not given.")
    ] = 1.0,
    beta: Annotated[float, typer.Option(help="uout noise half-width (uout only).")] = 0.1,
    momentum: Annotated[
        str | None,
        typer.Option(help="Momentum in each framework's own meaning; torch also 'none'."),
    ] = None,
    steps: Annotated[
        int, typer.Option(help="Training updates T of the running statistics.")
    ] = 1000,
    simulate: Annotated[
        bool, typer.Option("--simulate", help="Also run the Monte Carlo at every point.")
    ] = False,
    reps: Annotated[int, typer.Option(help="--simulate: independent BN features per point.")] = 256,
    workers: Annotated[
        int, typer.Option(help="Processes for --simulate (results do not depend on it).")
    ] = 1,
    seed: Annotated[int | None, typer.Option(help="Seed of the Monte Carlo.")] = None,
    fmt: Annotated[OutputFormat, typer.Option("--format", "-f", help="Output format.")] = (
        OutputFormat.table
    ),
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write the table to this file.")
    ] = None,
    plot: Annotated[
        Path | None,
        typer.Option("--plot", help="Write figures (PNG and SVG) into this folder."),
    ] = None,
    html: Annotated[
        Path | None,
        typer.Option("--html", help="Write a self-contained HTML page (tables and figures)."),
    ] = None,
    force: Annotated[
        bool,
        typer.Option(help=f"Overwrite outputs; allow grids of more than {MAX_POINTS} points."),
    ] = False,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="Print nothing but the results.")
    ] = False,
    # --- executor, replicates and store (issue 13) ---
    scheduler: Annotated[
        str | None,
        typer.Option(
            envvar="DASK_SCHEDULER_ADDRESS",
            help="--simulate on this Dask cluster, tcp://HOST:PORT (pip install "
            "'varshift[dask]'); results do not depend on it.",
        ),
    ] = None,
    seeds: Annotated[
        int,
        typer.Option(help="--simulate: replicates per point; > 1 adds mean, sd and se over seeds."),
    ] = 1,
    store: Annotated[
        Path | None,
        typer.Option(help="--simulate: append each result to this SQLite file as it finishes."),
    ] = None,
    resume: Annotated[
        bool,
        typer.Option("--resume", help="Continue --store: compute only the missing results."),
    ] = False,
) -> None:
    """Evaluate the variance shift over a grid of rates, widths, correlations, inputs, kinds,
    frameworks and batch sizes.

    Prints one tidy table: a row per grid point with its coordinates, the closed-form train and
    test variance, the shift ratio Δ and the expected running variance (and, with `--simulate`,
    the Monte Carlo estimates with standard errors and z-scores). `--plot` draws Δ against the
    rate, one curve per D and a panel per ρ, beside the ρ = 0 curve: width rescues the shift
    only when inputs are correlated.
    """
    if std is not None and var is not None:
        raise ValidationError("give either --var or --std, not both")
    if std is not None:
        variances = tuple(check_range("--std", s, 0.0, None) ** 2 for s in parse_axis("--std", std))
    else:
        variances = parse_axis("--var", _axis(var, "1"))
    linear_axes = width is not None or D is not None or rho is not None
    topo = topology if topology is not None else ("linear" if linear_axes else "direct")
    if topo not in ("direct", "linear"):
        raise ValidationError(f"--topology must be one of direct, linear; got {topology!r}")
    if topo == "direct" and linear_axes:
        raise ValidationError("--width, --D and --rho need --topology linear; got direct")
    config = SweepConfig(
        rates=parse_axis("--rate", _axis(rate, "0.1:0.9:0.1")),
        dropouts=parse_choices("--dropout", _axis(dropout, "bernoulli"), DROPOUT_KINDS),
        frameworks=parse_choices("--framework", _axis(framework, "torch"), FRAMEWORKS),
        batch_sizes=tuple(
            int(b) for b in parse_axis("--batch-size", _axis(batch_size, "32"), integer=True)
        ),
        means=parse_axis("--mean", _axis(mean, "0")),
        variances=variances,
        topology=topo,
        rhos=parse_axis("--rho", _axis(rho, "0")),
        widths=tuple(int(w) for w in parse_axis("--width", width, integer=True)) if width else (),
        Ds=parse_axis("--D", D) if D else (),
        cos2=cos2,
        beta=beta,
        momentum=parse_momentum(momentum),
        steps=steps,
        simulate=simulate,
        reps=reps,
        workers=workers,
        force=force,
        seeds=seeds,
        scheduler=scheduler,
    )
    if resume and store is None:
        raise ValidationError("--resume needs --store PATH, the store to continue")
    if store is not None and not simulate:
        raise ValidationError("--store keeps Monte Carlo results: it needs --simulate")
    preflight(plot, html, (), force=force, output=output)

    with progress_bar("sweep", config.n_points, quiet=quiet) as progress:
        result = run_sweep(config, rng=seed, progress=progress, store=store, resume=resume)

    df = to_frame(result.records())
    meta = {
        "varshift": __version__,
        "command": "sweep",
        "parameters": config_metadata(config),
        "seed": seed,
        "seed_entropy": result.seed_entropy,
        "points": len(result.rows),
    }
    title = f"variance shift sweep, {len(result.rows)} points"
    tty_table = fmt is OutputFormat.table and output is None and sys.stdout.isatty()
    written: list[Path] = []
    figures = _figures(result) if plot is not None or html is not None else []
    if plot is not None:
        refuse_figures(plot, [d.stem for d in figures], force=force)
        written += save_all(plot, figures)
    if html is not None:
        written.append(write_page(html, "varshift sweep", _sections(result, df, figures), meta))
    emit(
        df,
        fmt,
        metadata=meta,
        title=title,
        output=output,
        force=force,
        table_df=compact_layout(result, df) if tty_table else None,
    )
    if output is not None:
        written.append(output)
    console = stderr_console(quiet)
    if plot is not None and not figures:
        console.print("varshift: nothing to plot: sweep at least two rates for the figures")
    for path in written:
        console.print(f"wrote {path}", highlight=False)


def _figures(result: SweepResult) -> list[Drawn]:
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
                if result.config.topology == "linear"
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


#: At most this many shift-ratio figures are drawn (one per dropout/mean/variance combination).
MAX_FIGURES = 20


def _sections(result: SweepResult, df: pd.DataFrame, figures: list[Drawn]) -> list[Section]:
    from varshift.present.html import Section, Table

    sections = []
    if figures:
        sections.append(
            Section(
                "Shift ratio against dropout rate",
                (
                    "During training dropout inflates the variance BatchNorm records; at test "
                    "time the layer sees the smaller clean variance. Δ = Var_test / Var_train "
                    "measures the mismatch (1 means none).",
                ),
                inline(figures),
            )
        )
    other = [a for a in result.varying if a != "rate"]
    if "rate" in result.varying and len(other) == 1:
        pivot = df.pivot_table(index="rate", columns=other[0], values="shift_ratio", sort=False)
        pivot.columns = [f"{other[0]} = {format_value(c)}" for c in pivot.columns]
        sections.append(
            Section(
                "Shift ratio Δ",
                (f"Closed-form Δ, rate down and {other[0]} across.",),
                tables=(Table(pivot.reset_index()),),
            )
        )
    sections.append(
        Section(
            "Grid",
            (
                f"One row per grid point ({len(df)} points); varying axes: "
                f"{', '.join(result.varying) or 'none'}.",
            ),
            tables=(Table(df),),
        )
    )
    return sections


def compact_layout(result: SweepResult, df: pd.DataFrame) -> pd.DataFrame:
    """The terminal table: the axes that vary, then the main results."""
    cols = list(result.varying) or ["rate"]
    cols += ["train_var", "test_var", "shift_ratio", "running_var", "running_var_sd"]
    if result.config.simulate:
        cols += ["sim_running_var", "z_running_var", "recorded_ratio", "sim_shift_ratio"]
        cols += ["z_shift_ratio"]
    if result.config.seeds > 1:
        cols += ["sim_shift_ratio_sd", "recorded_ratio_within_2se"]
    return df[cols]


def config_metadata(config: SweepConfig) -> dict[str, object]:
    """The parameters block of the report metadata (no worker count: it changes nothing)."""
    return {
        "rates": list(config.rates),
        "dropouts": list(config.dropouts),
        "frameworks": list(config.frameworks),
        "batch_sizes": list(config.batch_sizes),
        "means": list(config.means),
        "variances": list(config.variances),
        "topology": config.topology,
        "rhos": list(config.rhos),
        "widths": list(config.widths),
        "Ds": list(config.Ds),
        "cos2": config.cos2,
        "beta": config.beta,
        "momentum": config.momentum,
        "steps": config.steps,
        "simulate": config.simulate,
        "reps": config.reps if config.simulate else None,
        **({"seeds": config.seeds} if config.seeds > 1 else {}),
    }
