"""``varshift simulate``: the pipeline run like a training loop, beside theory."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer

from varshift.cli._common import (
    DropoutKind,
    Framework,
    OutputFormat,
    Topology,
    app,
    parse_momentum,
)
from varshift.core.dropout import DEFAULT_KIND
from varshift.core.files import OutputPlan, transaction
from varshift.core.presets import DEFAULT_FRAMEWORK, resolve_preset
from varshift.core.topology import DEFAULT_TOPOLOGY
from varshift.engine import SimConfig
from varshift.jobs.simulate import (
    TRACE_POINTS,
    SimulateJob,
    check_applicable,
    notes,
    parse_spatial,
    run_simulate,
)
from varshift.present import simulate as show
from varshift.present.output import Visuals, plan_visuals
from varshift.present.render import message, progress_bar


class InputDist(StrEnum):
    """``--input-dist`` choices."""

    normal = "normal"
    uniform = "uniform"
    relu = "relu"


EPILOG = """\
Examples:

  varshift simulate --rate 0.2

  varshift simulate --rate 0.2 --mean 5 --std 2 --framework keras --epochs 100 --fit

  varshift simulate --rate 0.5 --topology linear --width 64 --rho 0.3 --cos2 0.5

  varshift simulate --rate 0.1 --topology conv --spatial 8x8 --channelwise --framework tf-keras

  varshift simulate --rate 0.3 --input activations.npy --momentum none --format csv

  varshift simulate --rate 0.5 --mean 1 --steps 500 --plot figs --html simulate.html
"""


@app.command(epilog=EPILOG)
def simulate(
    rate: Annotated[
        float, typer.Option("--rate", "-r", help="Dropout rate (probability of dropping).")
    ] = 0.2,
    dropout: Annotated[DropoutKind, typer.Option(help="Dropout kind.")] = DropoutKind(DEFAULT_KIND),
    beta: Annotated[float, typer.Option(help="uout noise half-width (uout only).")] = 0.1,
    framework: Annotated[Framework, typer.Option(help="BatchNorm convention.")] = Framework(
        DEFAULT_FRAMEWORK
    ),
    momentum: Annotated[
        str | None,
        typer.Option(help="Momentum in the framework's own meaning; torch also 'none'."),
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Rows per mini-batch.")] = 32,
    samples: Annotated[
        int | None,
        typer.Option(
            help="Dataset rows, drawn once [default: 10000; with --input: the file's rows, "
            "or this many rows resampled from it]."
        ),
    ] = None,
    epochs: Annotated[
        int | None, typer.Option(help="Passes over the dataset [default: 10].")
    ] = None,
    steps: Annotated[
        int | None, typer.Option(help="Exact number of batches instead of --epochs.")
    ] = None,
    drop_last: Annotated[
        bool,
        typer.Option(
            "--drop-last",
            help="Drop the smaller last batch of each epoch (default: train on it, like "
            "DataLoader(drop_last=False) and Keras fit).",
        ),
    ] = False,
    features: Annotated[
        int | None,
        typer.Option(help="BN features: columns, linear units or conv channels [default: 5]."),
    ] = None,
    input_file: Annotated[
        Path | None,
        typer.Option("--input", "-i", help="Recorded dropout inputs (.npy or .csv)."),
    ] = None,
    input_dist: Annotated[
        InputDist | None,
        typer.Option(help="Synthetic inputs: normal, uniform or relu (ReLU of a normal)."),
    ] = None,
    mean: Annotated[
        float | None, typer.Option(help="Mean of the synthetic inputs [default: 0].")
    ] = None,
    std: Annotated[
        float | None, typer.Option(help="Standard deviation of the synthetic inputs [default: 1].")
    ] = None,
    topology: Annotated[
        Topology,
        typer.Option(
            help="direct: dropout → BN; linear: dropout → linear map → BN; conv: (N, C, H, W)."
        ),
    ] = Topology(DEFAULT_TOPOLOGY),
    width: Annotated[
        int | None, typer.Option(help="Linear: inputs per unit, d [default: 64].")
    ] = None,
    rho: Annotated[float | None, typer.Option(help="Linear: correlation of the inputs.")] = None,
    cos2: Annotated[
        float | None,
        typer.Option(help="Linear: cos²θ of every unit's weights [default: random weights]."),
    ] = None,
    weights: Annotated[
        Path | None, typer.Option(help="Linear: (features, width) weights, .npy or .csv.")
    ] = None,
    spatial: Annotated[
        str | None, typer.Option(help="Conv: height x width of a channel map [default: 4x4].")
    ] = None,
    channelwise: Annotated[
        bool,
        typer.Option("--channelwise", help="Conv: one mask value per channel map (Dropout2d)."),
    ] = False,
    fit: Annotated[
        bool,
        typer.Option(
            "--fit",
            help="Also train BN's gamma, beta (Adam) to reproduce the input, with and without "
            "dropout, and compare test-time predictions with γ*.",
        ),
    ] = False,
    lr: Annotated[
        float | None, typer.Option(help="--fit: Adam learning rate [default: 0.001].")
    ] = None,
    probe: Annotated[
        float | None, typer.Option(help="--fit: test input to predict [default: 1.0].")
    ] = None,
    seed: Annotated[int, typer.Option(help="Random seed (same seed ⇒ same reports).")] = 0,
    fmt: Annotated[OutputFormat, typer.Option("--format", "-f", help="Output format.")] = (
        OutputFormat.table
    ),
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write the result to this file.")
    ] = None,
    plot: Annotated[
        Path | None,
        typer.Option(
            "--plot",
            help="Write figures (PNG and SVG) into this folder: the running variance over the "
            "steps with its predicted band, and simulated against theory per feature.",
        ),
    ] = None,
    html: Annotated[
        Path | None,
        typer.Option("--html", help="Write a self-contained HTML page (tables and figures)."),
    ] = None,
    force: Annotated[
        bool,
        typer.Option(
            help="Overwrite --output, --plot/--html files, or report files with different content."
        ),
    ] = False,
    report_dir: Annotated[
        Path,
        typer.Option(
            help="Folder for the CSV/Markdown/JSON reports, named after the key parameters, "
            "the seed and a hash of all parameters; by default reports/ in the current folder."
        ),
    ] = Path("reports"),
    no_report: Annotated[
        bool, typer.Option("--no-report", help="Do not write report files.")
    ] = False,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="Print nothing but the result.")
    ] = False,
) -> None:
    """Simulate Dropout → BatchNorm the way a training loop runs it, beside theory.

    A dataset is drawn once (or read with --input) and trained over epochs of reshuffled
    mini-batches; the BatchNorm running statistics are updated exactly as the chosen framework
    does. Per BN feature the table shows theory's train variance, the expected running variance
    with its noise sd, the simulated one and its z-score, the variance BN sees at test time
    (dropout off), the measured and theoretical shift ratios, and the data-free correction with
    its error. Reports (CSV, Markdown, JSON with all parameters and the seed) go to
    --report-dir, `reports/` in the folder you run from unless you say otherwise (or
    --no-report); rerunning the same command leaves identical files in place.

    `--plot DIR` draws the running variance of feature 0 over the training steps inside its
    predicted ±2 sd band, and each feature's (up to 64) simulated running variance against
    theory with ±2 sd error bars (PNG and SVG; needs matplotlib); `--html FILE` writes one
    self-contained page with these figures, the tables and the run metadata.
    """
    given: dict[str, Any] = dict(input_dist=input_dist and input_dist.value, mean=mean, std=std)
    given |= dict(epochs=epochs, steps=steps, width=width, rho=rho, cos2=cos2, lr=lr, probe=probe)
    flags = dict(weights=weights, spatial=spatial, channelwise=channelwise)
    check_applicable(topology.value, input_file is not None, fit, given | flags)
    visuals = Visuals(plot, html)
    plan = OutputPlan([input_file, weights], force=force)
    plan.add_all([output] if output else [], "--output")
    plan_visuals(plan, visuals, show.FIGURE_STEMS)
    config = SimConfig(
        rate=rate,
        dropout=dropout.value,
        beta=beta,
        preset=resolve_preset(framework.value, parse_momentum(momentum)),
        batch_size=batch_size,
        samples=samples,
        drop_last=drop_last,
        features=features,
        topology=topology.value,
        spatial=parse_spatial(spatial),
        channelwise=channelwise,
        fit=fit,
        **{k: v for k, v in given.items() if v is not None},
    )
    job = SimulateJob(config, seed, input_file, weights, TRACE_POINTS if visuals.wanted else 0)
    for note in notes(job):
        message(note, quiet)
    with progress_bar("simulating", 0, quiet=quiet, delay=1.0) as tick:
        result = run_simulate(job, progress=tick)
    if not no_report:
        show.plan_reports(plan, report_dir, result.report_stem)
    _deliver(result, fmt.value, output, visuals, None if no_report else report_dir, force, quiet)


def _deliver(
    result: Any,
    fmt: str,
    output: Path | None,
    visuals: Visuals,
    report_dir: Path | None,
    force: bool,
    quiet: bool,
) -> None:
    """Every file output in one transaction (all or none), then the table on stdout."""
    with transaction() as tx:
        written = show.write_visuals(result, visuals) if visuals.wanted else []
        if output is not None:
            show.show(result, fmt, output)
        if report_dir is not None:
            paths, unchanged = show.write_reports(result, report_dir, force=force)
    if output is None:
        show.show(result, fmt, output)
    kept = [output] if output is not None and tx.verb(output) == "unchanged" else []
    for path in [*kept, *written]:
        message(f"{tx.verb(path)} {path}", quiet)
    if report_dir is not None:
        verb = "unchanged" if unchanged else "written"
        message(f"reports {verb}: {', '.join(str(p) for p in paths)}", quiet)
