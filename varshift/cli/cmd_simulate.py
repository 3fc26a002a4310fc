"""``varshift simulate``: the pipeline run like a training loop, beside theory."""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from dataclasses import asdict
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import pandas as pd
import typer
from rich import box

from varshift import __version__
from varshift.cli._common import (
    DropoutKind,
    Framework,
    OutputFormat,
    app,
    handle_errors,
    parse_momentum,
)
from varshift.cli._outputs import Drawn, flat_headers, inline, preflight, save_all, write_page
from varshift.core.errors import OutputFileError, ValidationError
from varshift.core.files import atomic_write
from varshift.core.presets import Preset, resolve_preset
from varshift.engine import SimConfig, SimResult, load_activations
from varshift.engine import simulate as run_simulation
from varshift.present.render import frame_table, progress_bar, stderr_console, stdout_console
from varshift.present.report import render_text, to_frame, write_report


class Topology(StrEnum):
    """``--topology`` choices."""

    direct = "direct"
    linear = "linear"
    conv = "conv"


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

#: The running variance is recorded at up to this many steps for --plot/--html.
TRACE_POINTS = 2000

#: The per-feature figure shows at most this many features.
MAX_FEATURES_SHOWN = 64

#: Figure file stems of --plot.
FIGURE_STEMS = ("simulate_running_var", "simulate_vs_theory")

#: Terminal columns: result field → (header, significant digits); csv/json/report files get
#: every field. Errors are shown in percent; z-scores with two decimals.
MAIN_COLUMNS: dict[str, tuple[str, int]] = {
    "feature": ("feature", 0),
    "input_mean": ("c", 3),
    "D": ("D", 3),
    "train_var_theory": ("train var\ntheory", 4),
    "running_var_expected": ("E[run var]\ntheory", 4),
    "running_var_sd": ("± sd", 3),
    "running_var": ("run var\nsimulated", 4),
    "z_var": ("z", 0),
    "test_var": ("test var\n(real)", 4),
    "shift_ratio_measured": ("Δ sim", 4),
    "shift_ratio_theory": ("Δ\ntheory", 4),
    "error_debiased": ("corrected\nerr %", 3),
    "error_naive": ("naive\nerr %", 3),
}

FIT_COLUMNS: dict[str, tuple[str, int]] = {
    "feature": ("feature", 0),
    "gamma_star": ("γ*", 4),
    "gamma_dropout": ("γ\ndropout", 4),
    "gamma_clean": ("γ\nno dropout", 4),
    "beta_dropout": ("β\ndropout", 4),
    "pred_clean": ("output\nno dropout", 4),
    "pred_dropout": ("output\ndropout", 4),
    "pred_corrected": ("output\ncorrected", 4),
    "pred_dropout_theory": ("theory\ndropout", 4),
    "pred_corrected_theory": ("theory\ncorrected", 4),
}

PERCENT = ("error_debiased", "error_naive")


def _short(value: Any, digits: int) -> Any:
    """A float rounded for the terminal: ``digits`` significant digits, or 2 decimals if 0."""
    if not isinstance(value, float) or value != value or abs(value) == float("inf"):
        return value
    return round(value, 2) if digits == 0 else float(f"{value:.{digits}g}")


def display_frame(df: pd.DataFrame, columns: dict[str, tuple[str, int]]) -> pd.DataFrame:
    """The terminal layout: chosen columns, short headers, few digits."""
    out = pd.DataFrame()
    for field, (header, digits) in columns.items():
        if field not in df.columns or not df[field].notna().any():
            continue
        values = list(df[field])
        if field in PERCENT:
            values = [None if v is None or v != v else 100.0 * v for v in values]
        out[header] = [_short(v, digits) for v in values]
    return out


def parse_spatial(text: str | None) -> tuple[int, int] | None:
    """``--spatial HxW`` → ``(H, W)``."""
    if text is None:
        return None
    parts = text.lower().replace("×", "x").split("x")
    try:
        h, w = (int(p) for p in parts)
    except ValueError:
        raise ValidationError(
            f"spatial must be HxW with positive integers, e.g. 4x4; got {text!r}"
        ) from None
    if h < 1 or w < 1:
        raise ValidationError(f"spatial must be HxW with positive integers, e.g. 4x4; got {text!r}")
    return h, w


def _given(**options: object) -> list[str]:
    """The option names that were given (not None, not an unset flag)."""
    return [
        "--" + k.replace("_", "-") for k, v in options.items() if v is not None and v is not False
    ]


def _check_applicable(
    topology: Topology, has_input: bool, fit: bool, steps: int | None, **options: object
) -> None:
    """Reject options that do not apply to the chosen topology or mode (one-line errors)."""
    synthetic = _given(**{k: options[k] for k in ("input_dist", "mean", "std")})
    if has_input and synthetic:
        raise ValidationError(f"{synthetic[0]} describes synthetic inputs; --input replaces them")
    lin = _given(**{k: options[k] for k in ("width", "rho", "cos2", "weights")})
    if topology is not Topology.linear and lin:
        raise ValidationError(f"{lin[0]} applies to --topology linear only; got {topology.value}")
    conv = _given(**{k: options[k] for k in ("spatial", "channelwise")})
    if topology is not Topology.conv and conv:
        raise ValidationError(f"{conv[0]} applies to --topology conv only; got {topology.value}")
    fitting = _given(**{k: options[k] for k in ("lr", "probe")})
    if not fit and fitting:
        raise ValidationError(f"{fitting[0]} applies with --fit only")
    if steps is not None and options["epochs"] is not None:
        raise ValidationError("give either --epochs or --steps, not both")


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def config_metadata(
    config: SimConfig, seed: int, input_file: Path | None, weights_file: Path | None
) -> dict[str, object]:
    """The parameters block of the report metadata (everything that determines the result)."""
    preset: Preset = config.preset
    params: dict[str, object] = {
        "rate": config.rate,
        "dropout": config.dropout,
        "beta": config.beta,
        "framework": preset.name,
        "momentum": preset.momentum,
        "alpha": preset.alpha,
        "stored_variance": "unbiased" if preset.unbiased else "biased",
        "eps": preset.eps,
        "batch_size": config.batch_size,
        "samples": config.samples,
        "epochs": config.epochs if config.steps is None else None,
        "steps": config.steps,
        "drop_last": config.drop_last,
        "features": config.features,
        "topology": config.topology,
        "input_dist": None if input_file else config.input_dist,
        "mean": None if input_file else config.mean,
        "std": None if input_file else config.std,
        "input": str(input_file) if input_file else None,
        "input_sha256": _file_digest(input_file) if input_file else None,
        "width": config.width,
        "rho": config.rho,
        "cos2": config.cos2,
        "weights": str(weights_file) if weights_file else None,
        "weights_sha256": _file_digest(weights_file) if weights_file else None,
        "spatial": list(config.spatial) if config.spatial else None,
        "channelwise": config.channelwise,
        "fit": config.fit,
        "lr": config.lr if config.fit else None,
        "probe": config.probe if config.fit else None,
        "seed": seed,
    }
    return params


def report_stem(params: dict[str, object], version: str = __version__) -> str:
    """``simulate_<topology>_<dropout>_rate<r>_<framework>_seed<s>_<hash>``.

    The hash covers every parameter and the varshift version, so different runs (or releases)
    never share a name, and rerunning the same command reproduces the same (byte-identical)
    files, which :func:`write_reports` then leaves in place.
    """
    key = json.dumps({"params": params, "varshift": version}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:8]
    return (
        f"simulate_{params['topology']}_{params['dropout']}_rate{params['rate']:g}_"
        f"{params['framework']}_seed{params['seed']}_{digest}"
    )


def write_reports(
    df: pd.DataFrame,
    folder: Path,
    stem: str,
    metadata: dict[str, Any],
    *,
    title: str,
    force: bool,
) -> tuple[list[Path], bool]:
    """Write the CSV/Markdown/JSON reports; return the paths and whether they were unchanged.

    Existing files with identical bytes are left alone (same seed ⇒ same bytes), so rerunning
    a command is never an error; different content under the same name needs ``force``.
    """
    targets = [folder / f"{stem}.{ext}" for ext in ("csv", "md", "json")]
    if not any(t.exists() for t in targets):
        return write_report(df, folder, stem, metadata, title=title, force=force), False
    with tempfile.TemporaryDirectory() as tmp:
        fresh = [
            p.read_bytes()
            for p in write_report(df, Path(tmp), stem, metadata, title=title, force=True)
        ]
    if all(t.exists() and t.read_bytes() == data for t, data in zip(targets, fresh, strict=True)):
        return targets, True
    if not force:
        clash = next(
            t
            for t, data in zip(targets, fresh, strict=True)
            if t.exists() and t.read_bytes() != data
        )
        raise OutputFileError(
            f"{clash}: exists with different content; pass --force to overwrite it"
        )
    for target, data in zip(targets, fresh, strict=True):
        atomic_write(target, data, force=True)
    return targets, False


def result_frame(result: SimResult) -> pd.DataFrame:
    """Every column: one row per feature plus the ``mean`` row; fit columns when present."""
    df = to_frame([*result.features, result.summary.mean])
    if result.fit is not None:
        fit = to_frame([*result.fit.rows, result.fit.mean])
        df = df.merge(fit, on="feature", how="left", sort=False)
    return df


def summary_metadata(result: SimResult) -> dict[str, object]:
    """The run's summary facts (without the per-feature mean row, which is in the rows)."""
    out = {k: v for k, v in asdict(result.summary).items() if k != "mean"}
    if result.fit is not None:
        out["fit_optimizer"] = result.fit.optimizer
    return out


@app.command(epilog=EPILOG)
@handle_errors
def simulate(
    rate: Annotated[
        float, typer.Option("--rate", "-r", help="Dropout rate (probability of dropping).")
    ] = 0.2,
    dropout: Annotated[DropoutKind, typer.Option(help="Dropout kind.")] = DropoutKind.bernoulli,
    beta: Annotated[float, typer.Option(help="uout noise half-width (uout only).")] = 0.1,
    framework: Annotated[Framework, typer.Option(help="BatchNorm convention.")] = Framework.torch,
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
    ] = Topology.direct,
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
            "the seed and a hash of all parameters."
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
    --report-dir; rerunning the same command leaves identical files in place.

    `--plot DIR` draws the running variance of feature 0 over the training steps inside its
    predicted ±2 sd band, and each feature's (up to 64) simulated running variance against
    theory with ±2 sd error bars (PNG and SVG; needs matplotlib); `--html FILE` writes one
    self-contained page with these figures, the tables and the run metadata.
    """
    _check_applicable(
        topology,
        input_file is not None,
        fit,
        steps,
        input_dist=input_dist,
        mean=mean,
        std=std,
        width=width,
        rho=rho,
        cos2=cos2,
        weights=weights,
        spatial=spatial,
        channelwise=channelwise,
        lr=lr,
        probe=probe,
        epochs=epochs,
    )
    preflight(plot, html, FIGURE_STEMS, force=force, output=output)
    data = load_activations(input_file) if input_file is not None else None
    weight_array = load_activations(weights) if weights is not None else None
    preset = resolve_preset(framework.value, parse_momentum(momentum))
    config = SimConfig(
        rate=rate,
        dropout=dropout.value,
        beta=beta,
        preset=preset,
        batch_size=batch_size,
        samples=samples,
        epochs=10 if epochs is None else epochs,
        steps=steps,
        drop_last=drop_last,
        features=features,
        input_dist=(input_dist or InputDist.normal).value,
        mean=0.0 if mean is None else mean,
        std=1.0 if std is None else std,
        data=data,
        topology=topology.value,
        width=width,
        rho=0.0 if rho is None else rho,
        cos2=cos2,
        weights=weight_array,
        spatial=parse_spatial(spatial),
        channelwise=channelwise,
        fit=fit,
        lr=1e-3 if lr is None else lr,
        probe=1.0 if probe is None else probe,
    )
    if preset.name == "tf-keras" and topology is not Topology.conv:
        # conventions.py: the tf-keras preset is TF's fused kernel, used for 4-D/5-D inputs only.
        stderr_console(quiet).print(
            "note: tf-keras stores the unbiased variance only on its fused (4-D) path; after a "
            "Dense layer tf.keras stores the biased one, like --framework keras",
            highlight=False,
        )
    with progress_bar("simulating", 0, quiet=quiet, delay=1.0) as tick:
        result = run_simulation(
            config,
            rng=seed,
            progress=tick,
            trace=TRACE_POINTS if plot is not None or html is not None else 0,
        )

    params = config_metadata(config, seed, input_file, weights)
    meta = {
        "varshift": __version__,
        "command": "simulate",
        "parameters": params,
        "summary": summary_metadata(result),
    }
    s = result.summary
    alpha = "cumulative" if preset.alpha is None else f"alpha {preset.alpha:g}"
    title = (
        f"{dropout.value} dropout, rate {rate:g} → BatchNorm ({topology.value}), "
        f"{preset.name} ({alpha}, {'unbiased' if preset.unbiased else 'biased'}), "
        f"{s.rows} rows, batch {s.batch_size}, seed {seed}"
    )
    caption = (
        f"{s.steps} steps = {s.epochs} epochs × {s.batches_per_epoch} batches (n = "
        f"{s.elements_per_batch}); initial 0/1 weigh {s.residual_weight:.2g}; z of the running "
        f"variance: rms {s.rms_z_var:.2f}, max |z| {s.max_abs_z_var:.2f}; "
        "Δ sim = test var (real) / run var"
    )
    frame = result_frame(result)
    written: list[Path] = []
    if plot is not None or html is not None:
        drawn = figures(result)
        if plot is not None:
            written += save_all(plot, drawn)
        if html is not None:
            sections = page_sections(result, frame, drawn, title, caption)
            written.append(write_page(html, "varshift simulate", sections, meta))
    _emit(result, frame, fmt, meta, title, caption, output, force)
    for path in written:
        stderr_console(quiet).print(f"wrote {path}", highlight=False)

    if not no_report:
        paths, unchanged = write_reports(
            frame, report_dir, report_stem(params), meta, title=title, force=force
        )
        verb = "unchanged" if unchanged else "written"
        stderr_console(quiet).print(
            f"reports {verb}: {', '.join(str(p) for p in paths)}", highlight=False
        )


def figures(result: SimResult) -> list[Drawn]:
    """The running variance over the steps (feature 0) and simulated against theory."""
    from varshift.present.figures import feature_bands, running_variance

    tr = result.trace
    assert tr is not None, "figures need simulate(trace=...)"
    first = result.features[0]
    s = result.summary
    alpha = result.config.preset.alpha
    decay = "cumulative average" if alpha is None else f"EMA α = {alpha:g}"
    many = f" (of {s.features})" if s.features > 1 else ""
    trace_fig = running_variance(
        tr.steps,
        tr.running_var[:, 0],
        tr.running_var_expected[:, 0],
        tr.running_var_sd[:, 0],
        target=first.test_var,
        title=f"Running variance of feature 0{many}\n{result.config.dropout} dropout, rate "
        f"{result.config.rate:g}, {result.config.preset.name} ({decay})",
    )
    every = tr.steps.size == s.steps + 1
    points = "every step" if every else f"{tr.steps.size} evenly spaced steps"
    trace_caption = (
        f"The running variance BatchNorm stores for feature 0, at {points} of {s.steps}, "
        "beside theory's expected value and ±2 sd band for independent batches. It starts at "
        "1 and settles around the dropout-inflated training variance; the dashed line is the "
        "variance the layer sees at test time (dropout off): the gap is the variance shift. "
        "At the last step the table's band is exact (it also accounts for rows drawn without "
        "replacement within an epoch, which narrows it for long averages)."
    )
    rows = result.features[:MAX_FEATURES_SHOWN]
    vs_fig = feature_bands(
        [r.feature for r in rows],
        [r.running_var_expected for r in rows],
        [r.running_var_sd for r in rows],
        [r.running_var for r in rows],
        target=[r.test_var for r in rows],
        title=f"Running variance after {s.steps} steps: simulated against theory",
    )
    shown = f"the first {len(rows)} of {s.features} features" if len(rows) < s.features else ""
    vs_caption = (
        f"Per feature{' (' + shown + ')' if shown else ''}: the simulated running variance at "
        "the end of the run (dot) inside theory's expected value ±2 sd (band; the table's "
        "E[run var] and sd, z its distance in sd), and the variance BN sees at test time "
        "(black tick): the gap between tick and band is the variance shift."
    )
    return [
        Drawn(FIGURE_STEMS[0], trace_fig, trace_caption),
        Drawn(FIGURE_STEMS[1], vs_fig, vs_caption),
    ]


def page_sections(
    result: SimResult, frame: pd.DataFrame, drawn: list[Drawn], title: str, caption: str
) -> list[Any]:
    """The page: the trace, the per-feature comparison with its table, --fit, every column."""
    from varshift.present.html import Section, Table

    figs = inline(drawn)
    main = display_frame(to_frame([*result.features, result.summary.mean]), MAIN_COLUMNS)
    sections = [
        Section(
            "Running variance over training",
            (title + ".",),
            figures=figs[:1],
        ),
        Section(
            "Per feature: simulation beside theory",
            (
                "Errors are in percent. Δ sim = test var (real) / run var; z = (run var "
                "simulated − E[run var]) / sd.",
            ),
            figures=figs[1:],
            tables=(Table(flat_headers(main), caption),),
        ),
    ]
    if result.fit is not None:
        fit_df = display_frame(to_frame([*result.fit.rows, result.fit.mean]), FIT_COLUMNS)
        sections.append(
            Section(
                "--fit: γ and β trained to reproduce the input",
                (
                    f"Identity target, Adam lr {result.fit.lr:g}; test-time output for input "
                    f"{result.fit.rows[0].probe:g} (a perfect model returns it).",
                ),
                tables=(Table(flat_headers(fit_df)),),
            )
        )
    sections.append(
        Section(
            "Every column",
            ("One row per feature and their mean, as in the CSV report.",),
            tables=(Table(frame),),
        )
    )
    return sections


def _emit(
    result: SimResult,
    frame: pd.DataFrame,
    fmt: OutputFormat,
    meta: dict[str, Any],
    title: str,
    caption: str,
    output: Path | None,
    force: bool,
) -> None:
    """Rich tables on a terminal; Markdown of the same layout otherwise; csv/json: every column."""
    main = display_frame(to_frame([*result.features, result.summary.mean]), MAIN_COLUMNS)
    fit_df = fit_title = None
    if result.fit is not None:
        fit_df = display_frame(to_frame([*result.fit.rows, result.fit.mean]), FIT_COLUMNS)
        fit_title = (
            f"--fit: identity target, Adam lr {result.fit.lr:g}; test-time output for input "
            f"{result.fit.rows[0].probe:g} (a perfect model returns it)"
        )
    if fmt is OutputFormat.table and output is None and sys.stdout.isatty():
        console = stdout_console()
        for df, head, cap in ((main, title, caption), (fit_df, fit_title, None)):
            if df is not None:
                table = frame_table(df, title=head, caption=cap)
                table.box = box.SIMPLE_HEAD  # no vertical rules: 13 columns fit in 120
                table.columns[0].min_width = 7
                console.print(table)
        return
    if fmt in (OutputFormat.table, OutputFormat.md):
        text = render_text(main, "md", meta, title) + f"\n{caption}\n"
        if fit_df is not None:
            text += "\n" + render_text(fit_df, "md", meta, fit_title)
    else:
        text = render_text(frame, fmt.value, meta, title)
    if output is not None:
        atomic_write(output, text, force=force)
    else:
        sys.stdout.write(text)
