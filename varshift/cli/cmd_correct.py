"""``varshift inspect`` and ``varshift correct``: BatchNorm statistics in checkpoint files."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from varshift.cli._common import DropoutKind, Framework, OutputFormat, app, parse_momentum
from varshift.core.dropout import DEFAULT_KIND
from varshift.core.errors import ValidationError
from varshift.core.files import OutputPlan, Transaction, transaction
from varshift.jobs.checkpoint import CorrectJob, correct_file, default_report, inspect_file
from varshift.present import checkpoint as show
from varshift.present.output import Visuals, emit, outcome, plan_visuals
from varshift.present.render import message
from varshift.present.report import to_table


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
    ".weights.h5 (Keras 3), .keras (Keras archive), legacy Keras .h5 (model.save), "
    ".msgpack (Flax state), an Orbax checkpoint folder, .safetensors, .npz, .csv/.tsv, .json; "
    "for correct also a "
    "torch.export archive .pt2 (its own structure)."
)

INSPECT_EPILOG = """\
Examples:

  varshift inspect model.pt

  varshift inspect model.weights.h5 --format csv

  varshift inspect stats.npz --framework keras --momentum 0.9

  varshift inspect last.ckpt --key state_dict_ema
"""

CORRECT_EPILOG = """\
Examples:

  varshift correct model.pt --rate 0.5 -o fixed.pt

  varshift correct model.pt --model mypkg.nets:build -o fixed.pt

  varshift correct net.pt2 --input-shape 3,32,32 -o fixed.pt2

  varshift correct model.pt -m mypkg.nets:build --data train.npz -o fixed.pt

  varshift correct model.weights.h5 --rate 0.3 --batch-size 64 -o fixed.weights.h5

  varshift correct model.pt --layer 'block*.bn=0.2' --layer head.bn=0.5 -o fixed.pt

  varshift correct model.pt --rate 0.1 --exclude 'stem.*' -o fixed.safetensors

  varshift correct model.pt --rate 0.5 --dry-run

  varshift correct last.ckpt --rate 0.2 --key state_dict_ema -o fixed.ckpt

  varshift correct model.pt --rate 0.5 --dry-run --plot figs --html correct.html
"""


#: ``--key`` of ``inspect`` and ``correct``.
KeyOption = Annotated[
    list[str] | None,
    typer.Option(
        "--key",
        metavar="NAME",
        help="In a checkpoint holding several state dicts (state_dict and state_dict_ema; a "
        "Lightning EMA callback's): only these (repeatable or a comma list) [default: every one].",
    ),
]


@app.command(epilog=INSPECT_EPILOG)
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
    key: KeyOption = None,
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
    `varshift theory` calls updates_to_1pct), non-finite or non-positive variances. A
    checkpoint holding several state dicts (state_dict and state_dict_ema) gets rows for
    each, named STATE_DICT:LAYER; --key chooses some.
    """
    plan = OutputPlan([file], force=force)
    plan.add_all([output] if output else [], "--output")
    result = inspect_file(
        file, framework and framework.value, parse_momentum(momentum), tuple(key or ())
    )
    _notes(result.notes, quiet)
    df, human, title = show.inspect_tables(result)
    with transaction() as tx:
        emit(df, fmt.value, metadata=result.metadata, title=title, output=output, table_df=human)
    _notes([f"unchanged {output}"] if output and tx.verb(output) == "unchanged" else [], quiet)
    _notes([f"{len(result.rows)} BatchNorm layer(s), {result.flagged} flagged"], quiet)


@app.command(epilog=CORRECT_EPILOG)
def correct(
    file: Annotated[Path, typer.Argument(help=FILE_HELP, show_default=False)],
    rate: Annotated[
        float | None,
        typer.Option(
            "--rate",
            "-r",
            help="Dropout rate (probability of dropping) for every layer (without --model).",
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
    key: KeyOption = None,
    dropout: Annotated[DropoutKind, typer.Option(help="Dropout kind before the BN layers.")] = (
        DropoutKind(DEFAULT_KIND)
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
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            "-m",
            help="The model's structure: package.module:factory (imports and runs that code; "
            "FILE is loaded into it strictly) or a torch.export archive .pt2 (runs no code). "
            "Each BatchNorm then gets its class's formula; rates are read from the model.",
        ),
    ] = None,
    model_arg: Annotated[
        list[str] | None,
        typer.Option("--model-arg", help="KEY=VALUE argument of the factory (repeatable)."),
    ] = None,
    data: Annotated[
        str | None,
        typer.Option(
            "--data",
            "-d",
            help="With --model: data (npy, npz, safetensors, csv, or package.module:function) "
            "to measure E[x²] of the dropout inputs of through-linear layers.",
        ),
    ] = None,
    input_key: Annotated[
        str | None, typer.Option(help="Input array of an .npz/.safetensors --data file.")
    ] = None,
    max_batches: Annotated[
        int | None, typer.Option(help="Read at most this many --data batches.")
    ] = None,
    input_shape: Annotated[
        str | None,
        typer.Option(
            metavar="C,H,W",
            help="With --model: shape of one input sample; one forward pass on zeros gives "
            "each convolution's input size, so its zero padding is counted.",
        ),
    ] = None,
) -> None:
    """Correct the running variances of BatchNorm layers behind dropout, without data.

    Without --model the structure is unknown: each selected layer is assumed to follow the
    dropout directly, and its stored variance V and mean mu become what it sees at test time,
    v = (V + mu²)/kappa - mu² (bernoulli: q (V + mu²) - mu², q = 1 - rate), after undoing the
    (n-1)/n of biased conventions when --batch-size is given.

    With --model (or a .pt2 FILE) every BatchNorm is classified from the graph: direct gets
    that formula (exact); through-linear (dropout → Linear/Conv → BN) gets
    V − (1/q − 1)·Σ W²·E[x²], mean unchanged, E[x²] from the feeding BN's γ, β through the
    activation (Gaussian) or measured with --data; stacked (noise further up) is not
    corrected (use `varshift recalibrate`); none is left untouched. The report says, per layer,
    the class, formula, assumption and the dropout term. Prints a before/after table per layer and
    writes the corrected file and a report; the input is never modified. A corrected
    variance ≤ 0 is an error unless it is within noise of zero, then it is clipped to the
    framework's eps with a warning.

    A checkpoint holding several state dicts with BatchNorm statistics (timm's state_dict
    and state_dict_ema; a Lightning checkpoint's state_dict and an EMA callback's) gets each
    corrected, its rows named STATE_DICT:LAYER; --key chooses some. --layer and --exclude
    globs match either name (bn1 or state_dict_ema:bn1).

    `--plot DIR` draws each layer's mean running variance before and after (PNG and SVG;
    needs matplotlib); `--html FILE` writes one self-contained page with the chart and the
    before/after table. Both are written with `--dry-run` too, as a preview.
    """
    visuals = Visuals(plot, html)
    plan = OutputPlan([file], force=force)
    plan_visuals(plan, visuals, [show.FIGURE_STEM])
    if not dry_run and output is None:
        raise ValidationError("--output/-o is required (or --dry-run to only show the table)")
    job = CorrectJob(
        file=file,
        output=None if dry_run else output,
        rate=rate,
        layers=tuple(layer or ()),
        exclude=tuple(exclude or ()),
        dropout=dropout.value,
        beta=beta,
        framework=framework and framework.value,
        batch_size=batch_size,
        method=method.value,
        target=target.value,
        report=None if dry_run or no_report or output is None else report or default_report(output),
        force=force,
        model=model,
        model_args=tuple(model_arg or ()),
        data=data,
        input_key=input_key,
        max_batches=max_batches,
        input_shape=parse_shape(input_shape),
        keys=tuple(key or ()),
    )
    with transaction() as tx:  # every output or none
        result = correct_file(job, plan)
        written = [*result.written, *filter(None, [show.write_correct_report(result)])]
        shown = show.write_visuals(result, visuals) if visuals.wanted else []
    _notes(result.notes, quiet)
    emit(
        to_table(result.rows), fmt.value, metadata=result.metadata, title=show.correct_title(result)
    )
    _notes([f"warning: {w}" for w in result.correction.warnings], False)  # clipping: never quiet
    _written(tx, dry_run, written, shown, quiet)


def _written(
    tx: Transaction, dry_run: bool, written: list[Path], shown: list[Path], quiet: bool
) -> None:
    """What ``correct`` wrote or left unchanged (the corrected file and report; the visuals)."""
    what = "no corrected file or report written" if shown else "nothing written"
    _notes(outcome(tx, written) if not dry_run else [f"dry run: {what}"], quiet)
    _notes([line for path in shown for line in outcome(tx, [path])], quiet)


def parse_shape(text: str | None) -> tuple[int, ...] | None:
    """``"1,8,8"`` → ``(1, 8, 8)``."""
    if text is None:
        return None
    try:
        shape = tuple(int(part) for part in text.replace("x", ",").split(","))
    except ValueError:
        shape = ()
    if not shape or min(shape) < 1:
        raise ValidationError(f"--input-shape must be positive integers like 1,8,8; got {text!r}")
    return shape


def _notes(lines: list[str] | tuple[str, ...], quiet: bool) -> None:
    for line in lines:
        message(f"varshift: {line}", quiet)
