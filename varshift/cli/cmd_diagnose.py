"""``varshift diagnose`` and ``varshift recalibrate``: a PyTorch model run on real data."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import pandas as pd
import typer

from varshift.cli._common import OutputFormat, app
from varshift.core.files import OutputPlan, transaction
from varshift.jobs.diagnose import (
    DataSpec,
    DiagnoseConfig,
    ModelSpec,
    RecalibrateConfig,
    diagnose_metadata,
    run_diagnose,
    run_recalibrate,
)
from varshift.present.output import emit
from varshift.present.render import pass_progress
from varshift.present.report import frame_records


class Device(StrEnum):
    """``--device`` choices."""

    cpu = "cpu"
    cuda = "cuda"


class RecalibrationMethod(StrEnum):
    """``--method`` choices of recalibrate."""

    topological = "topological"
    single_pass = "single-pass"


DIAGNOSE_EPILOG = """\
Examples:

  varshift diagnose model.pt --model mypkg.nets:build --data val.npz

  varshift diagnose model.pt -m mypkg.nets:build --model-arg width=64 --data val.npz --label-key y

  varshift diagnose --model exported.pt2 --data images.npy --labels labels.npy --max-batches 20

  varshift diagnose model.pt -m mypkg.nets:build --data mypkg.data:loader -f json -o diag.json

  varshift check diag.json --baseline diag.json --fail-if 'shift_ratio > 1.1'
"""

RECALIBRATE_EPILOG = """\
Examples:

  varshift recalibrate model.pt --model mypkg.nets:build --data train.npz -o fixed.pt

  varshift recalibrate model.pt -m mypkg.nets:build -d train.npz --method single-pass -o fixed.pt

  varshift recalibrate --model exported.pt2 --data train.npz -o fixed.pt2 --force
"""

CHECKPOINT_HELP = (
    "Weights to load into the model: a state dict or a training checkpoint holding one "
    "(read with torch.load(weights_only=True), loaded strictly). Optional with a factory that "
    "sets its own weights or a .pt2 archive."
)
MODEL_HELP = (
    "The model: an import path package.module:factory returning the nn.Module (imports and "
    "runs that code), or a torch.export archive .pt2 (graph and weights; runs no user code)."
)
DATA_HELP = (
    "Data: a .npy, .npz, .safetensors or .csv file (never unpickled), or an import path "
    "package.module:function returning an iterable of batches, e.g. a DataLoader (runs code)."
)

Checkpoint = Annotated[Path | None, typer.Argument(help=CHECKPOINT_HELP, show_default=False)]
Model = Annotated[str, typer.Option("--model", "-m", help=MODEL_HELP, show_default=False)]
ModelArg = Annotated[
    list[str] | None,
    typer.Option("--model-arg", help="KEY=VALUE argument of the factory (repeatable)."),
]
Data = Annotated[str, typer.Option("--data", "-d", help=DATA_HELP, show_default=False)]
InputKey = Annotated[
    str | None, typer.Option(help="Input array of an .npz/.safetensors file (default: x, ...).")
]
LabelKey = Annotated[
    str | None,
    typer.Option(help="Label array of an .npz/.safetensors file, or label column of a .csv."),
]
Labels = Annotated[
    Path | None, typer.Option(help="File of class indices, one per sample (npy, npz, csv, txt).")
]
BatchSize = Annotated[int, typer.Option(help="Samples per batch of file data.")]
MaxBatches = Annotated[int | None, typer.Option(help="Read at most this many batches per pass.")]
DeviceOpt = Annotated[
    Device | None, typer.Option(help="cpu or cuda (default: cuda when present, else cpu).")
]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Print only the results.")]
Fmt = Annotated[OutputFormat, typer.Option("--format", "-f", help="Output format.")]
Seed = Annotated[
    int,
    typer.Option(
        help="Seed of the dropout masks of the dropout-on pass, so two runs agree (torch's "
        "global RNG is left as it was)."
    ),
]


@app.command(epilog=DIAGNOSE_EPILOG)
def diagnose(
    model: Model,
    data: Data,
    checkpoint: Checkpoint = None,
    model_arg: ModelArg = None,
    input_key: InputKey = None,
    label_key: LabelKey = None,
    labels: Labels = None,
    batch_size: BatchSize = 256,
    max_batches: MaxBatches = None,
    device: DeviceOpt = None,
    dropout_on: Annotated[
        bool,
        typer.Option(
            "--dropout-on/--no-dropout-on",
            help="Also run the training-mode pass (dropout on) that measures what training "
            "records; --no-dropout-on halves the cost.",
        ),
    ] = True,
    seed: Seed = 0,
    train_batch_size: Annotated[
        int | None,
        typer.Option(
            help="Batch size the model was trained with: adds the noise of the stored running "
            "statistics to the flag thresholds (without it only the data pass's error counts).",
            show_default=False,
        ),
    ] = None,
    fmt: Fmt = OutputFormat.table,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write the report here, not stdout.")
    ] = None,
    force: Annotated[bool, typer.Option(help="Overwrite --output.")] = False,
    quiet: Quiet = False,
) -> None:
    """Show which BatchNorm layers are shifted by dropout, why, and by how much.

    Runs the model on the data with dropout off (`eval()`) and measures, per BatchNorm and
    channel, the mean and variance the layer really sees at test time; compares them with the
    stored running statistics (`shift_ratio` = stored/eval variance: median, min, max over
    channels) and with the closed-form prediction where one exists (direct, and dropout →
    Linear → BN). Each
    layer's class comes from the model graph: direct, through-linear, stacked (noise further
    up), none, or unknown (untraceable). Flags: shifted, shift re-baked (stored matches the
    dropout-on statistics, as training and update_bn leave them), unconverged, initial values,
    dead channels, mode audit, track_running_stats=False. `shifted` means the median ratio
    lies more than 4 standard errors from 1 (`flag_tol` in the table): the data pass's
    sampling error, plus the stored statistics' noise given `--train-batch-size`. With labels:
    accuracy, NLL and ECE.

    `--format json` is a report `varshift check` gates, e.g. `--fail-if 'shift_ratio > 1.1'`.
    """
    config = DiagnoseConfig(
        ModelSpec(model, tuple(model_arg or ()), checkpoint),
        DataSpec(data, input_key, label_key, labels, batch_size, max_batches),
        device=None if device is None else device.value,
        dropout_on=dropout_on,
        seed=seed,
        train_batch_size=train_batch_size,
    )
    inputs = [Path(model), checkpoint, Path(data), labels]
    OutputPlan(inputs, force=force).add_all([output] if output else [], "--output")
    with pass_progress(quiet) as progress:
        result = run_diagnose(config, progress)
    if not quiet:
        for line in result.warnings:
            typer.echo(f"varshift: warning: {line}", err=True)
        if train_batch_size is None:
            typer.echo(
                "varshift: note: flag thresholds count only the data pass's sampling error; "
                "--train-batch-size adds the stored statistics' noise",
                err=True,
            )
    table = result.to_frame()
    meta = diagnose_metadata(config, result)
    with transaction() as tx:
        if fmt is OutputFormat.json:
            meta["layers"] = frame_records(table)
            long = pd.DataFrame.from_records(result.metric_rows())
            emit(long, fmt.value, metadata=meta, output=output)
        else:
            title = f"varshift diagnose: {result.samples} samples"
            emit(table, fmt.value, metadata=meta, title=title, output=output)
    if output is not None and tx.verb(output) == "unchanged" and not quiet:
        typer.echo(f"varshift: unchanged {output}", err=True)
    if fmt is OutputFormat.json:
        return
    if result.scores is not None and output is None and fmt is not OutputFormat.csv:
        scores = pd.DataFrame.from_records([result.scores.__dict__])
        emit(scores, fmt.value, title="the model as saved")


@app.command(epilog=RECALIBRATE_EPILOG)
def recalibrate(
    model: Model,
    data: Data,
    output: Annotated[
        Path, typer.Option("--output", "-o", help="The new checkpoint.", show_default=False)
    ],
    checkpoint: Checkpoint = None,
    model_arg: ModelArg = None,
    input_key: InputKey = None,
    label_key: LabelKey = None,
    labels: Labels = None,
    batch_size: BatchSize = 256,
    max_batches: MaxBatches = None,
    device: DeviceOpt = None,
    method: Annotated[
        RecalibrationMethod,
        typer.Option(
            help="topological: exact, one data pass per BatchNorm depth; single-pass: one pass "
            "with the stored statistics upstream (PreciseBN-style)."
        ),
    ] = RecalibrationMethod.topological,
    seed: Seed = 0,
    force: Annotated[bool, typer.Option(help="Overwrite --output.")] = False,
    fmt: Fmt = OutputFormat.table,
    quiet: Quiet = False,
) -> None:
    """Write a checkpoint whose BatchNorm statistics are what each layer sees at test time.

    Dropout off, every BatchNorm in eval mode, layers estimated in topological order (each
    with the already recalibrated layers upstream), batches weighted by size; `running_var` is
    stored unbiased as torch stores it. Only BatchNorm buffers change; the output loads with
    `strict=True`; the input is never touched. With labels, a before/after table of accuracy,
    NLL and ECE: as saved, data-free `correct`, recalibrated, and recalibrated with dropout on
    (what `torch.optim.swa_utils.update_bn` does) — a fix is not automatically better.
    """
    config = RecalibrateConfig(
        ModelSpec(model, tuple(model_arg or ()), checkpoint),
        DataSpec(data, input_key, label_key, labels, batch_size, max_batches),
        output=output,
        method=method.value,
        device=None if device is None else device.value,
        force=force,
        seed=seed,
    )
    with pass_progress(quiet) as progress, transaction() as tx:
        job = run_recalibrate(config, progress)
    result = job.result
    if not quiet:
        for line in result.warnings:
            typer.echo(f"varshift: warning: {line}", err=True)
        typer.echo(
            f"varshift: {tx.verb(job.output)} {job.output} ({result.method}, "
            f"{result.passes} data pass(es))",
            err=True,
        )
    layers, scores = result.to_frame(), result.scores_frame()
    if fmt is OutputFormat.json:
        meta = {"method": result.method, "scores": frame_records(scores)}
        emit(layers, fmt.value, metadata=meta)
        return
    emit(layers, fmt.value, title="varshift recalibrate: BatchNorm statistics")
    if result.scores and fmt is not OutputFormat.csv:
        emit(scores, fmt.value, title="before/after")
