"""``varshift sweep``: a grid of variance shifts as one tidy table, figures and an HTML page."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from varshift.cli._common import VALUES_HELP, OutputFormat, app, parse_momentum
from varshift.core.dropout import DROPOUT_KINDS
from varshift.core.files import OutputPlan, transaction
from varshift.core.presets import FRAMEWORKS
from varshift.jobs.sweep import MAX_POINTS, axes_config, check_store_options, run_sweep
from varshift.present import sweep as show
from varshift.present.output import Visuals, emit, on_terminal, plan_figures, plan_visuals
from varshift.present.render import message, progress_bar
from varshift.present.report import to_table

EPILOG = f"""\
Examples:

  varshift sweep --rate 0.1:0.9:0.1 --D 1,4,16,64 --rho 0.1 --plot figs --html sweep.html

  varshift sweep --rate 0.1:0.9:0.2 --mean 0,1,5 --dropout bernoulli,gaussian -f csv

  varshift sweep --rate 0.2,0.5 --framework all --batch-size 8:64:x2 -f json -o grid.json

  varshift sweep --rate 0.1:0.5:0.1 --width 1:256:x4 --rho 0,0.05,0.2 --cos2 0.5 -f md

Axes take comma lists and inclusive ranges: start:stop:step (0.1:0.9:0.1) or start:stop:xfactor
(1:64:x2); a range needs its step. The grid is their Cartesian product; more than {MAX_POINTS}
points needs --force.
"""

_AXES_HELP = VALUES_HELP


@app.command(epilog=EPILOG)
def sweep(  # long: 23 of its 42 lines hand the options to axes_config, one per line
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
        typer.Option(
            help=f"Overwrite outputs; allow grids of more than {MAX_POINTS} points and "
            "simulated sweeps of more than 1e11 values of work (steps × batch × row, summed)."
        ),
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
    config = axes_config(
        rate=rate,
        dropout=dropout,
        framework=framework,
        batch_size=batch_size,
        mean=mean,
        var=var,
        std=std,
        topology=topology,
        width=width,
        D=D,
        rho=rho,
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
    check_store_options(config, store, resume)
    visuals = Visuals(plot, html)
    plan = OutputPlan(force=force)
    plan.add_all([output] if output else [], "--output")
    plan_visuals(plan, visuals, ())
    with progress_bar("sweep", config.n_points, quiet=quiet) as progress:
        result = run_sweep(config, seed, progress, store=store, resume=resume)
    df = to_table(result.records())
    drawn = show.figures(result) if visuals.wanted else []
    if plot is not None:
        plan_figures(plan, plot, [d.stem for d in drawn])
    table_df = show.compact_layout(result, df) if on_terminal(fmt.value, output) else None
    title = f"variance shift sweep, {len(result.rows)} points"
    keys = len(result.varying) or 1
    with transaction() as tx:  # every output or none; the table on stdout after them
        written = show.write_visuals(result, df, visuals, drawn)
        if output is not None:
            emit(df, fmt.value, metadata=result.metadata, title=title, output=output)
    if output is None:
        emit(df, fmt.value, metadata=result.metadata, title=title, table_df=table_df, keys=keys)
    if plot is not None and not drawn:
        message("varshift: nothing to plot: sweep at least two rates for the figures", quiet)
    for path in [*written, *([output] if output is not None else [])]:
        message(f"{tx.verb(path)} {path}", quiet)
