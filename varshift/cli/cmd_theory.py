"""``varshift theory``: the closed forms as a table."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

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
from varshift.core.errors import ValidationError
from varshift.core.presets import resolve_preset
from varshift.core.theory import TheoryConfig, TheoryRow, theory_table
from varshift.core.validate import check_range
from varshift.present.report import to_frame

#: Rows of the human (transposed) layout: field → description.
DESCRIPTIONS: dict[str, str] = {
    "keep": "keep probability q = 1 - rate",
    "beta": "uout half-width",
    "kappa": "E[m²]/E[m]² of the noise",
    "train_mean": "BN input mean, training",
    "train_var": "BN input variance, training",
    "test_var": "BN input variance, test",
    "shift_ratio": "Δ = test / train variance",
    "inverse_ratio": "1/Δ",
    "stored_batch_var": "E[stored batch variance]",
    "stored_batch_var_sd": "sd of one stored batch variance",
    "running_var": "E[running variance] after steps",
    "running_var_sd": "noise sd of the running variance",
    "residual_weight": "weight of the initial value 1",
    "updates_to_1pct": "updates until that weight < 1%",
    "corrected_var_debiased": "data-free correction (debiased)",
    "corrected_var_naive": "data-free correction (naive)",
    "gamma_star": "γ* of an identity-trained BN",
}

EPILOG = """\
Examples:

  varshift theory --rate 0.2

  varshift theory --rate 0.1 --rate 0.5 --mean 5 --std 2 --framework keras

  varshift theory --rate 0.5 --topology linear --width 64 --rho 0.1 --cos2 0.5

  varshift theory --rate 0.3 --dropout gaussian --format csv
"""


def human_layout(rows: list[TheoryRow]) -> pd.DataFrame:
    """Quantities down, one column per rate: what a person compares."""
    df = to_frame(rows)
    keep = [k for k in DESCRIPTIONS if df[k].notna().any()]
    table = pd.DataFrame(
        {"quantity": keep, "meaning": [DESCRIPTIONS[k] for k in keep]},
    )
    for i, row in enumerate(df.to_dict("records")):
        label = f"rate {row['rate']:g}"
        table[label if label not in table else f"{label} #{i + 1}"] = [row[k] for k in keep]
    return table


@app.command(epilog=EPILOG)
@handle_errors
def theory(
    rate: Annotated[
        list[float] | None,
        typer.Option("--rate", "-r", help="Dropout rate (probability of dropping); repeatable."),
    ] = None,
    mean: Annotated[float, typer.Option(help="Mean c of the dropout input.")] = 0.0,
    var: Annotated[
        float | None, typer.Option("--var", help="Variance v of the dropout input [default: 1].")
    ] = None,
    std: Annotated[
        float | None, typer.Option("--std", help="Standard deviation of the input (or --var).")
    ] = None,
    dropout: Annotated[DropoutKind, typer.Option(help="Dropout kind.")] = DropoutKind.bernoulli,
    beta: Annotated[float, typer.Option(help="uout noise half-width (uout only).")] = 0.1,
    topology: Annotated[
        str, typer.Option(help="direct: dropout → BN; linear: dropout → linear unit → BN.")
    ] = "direct",
    width: Annotated[int, typer.Option(help="Linear topology: inputs per unit, d.")] = 1,
    rho: Annotated[float, typer.Option(help="Linear topology: input correlation.")] = 0.0,
    cos2: Annotated[
        float | None, typer.Option(help="Linear topology: cos²θ of the weights [default: 1].")
    ] = None,
    D: Annotated[
        float | None, typer.Option("--D", help="Linear topology: D = d·cos²θ (or --cos2).")
    ] = None,
    framework: Annotated[Framework, typer.Option(help="BatchNorm convention.")] = Framework.torch,
    momentum: Annotated[
        str | None,
        typer.Option(help="Momentum in the framework's own meaning; torch also 'none'."),
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Elements per channel in one batch, n.")] = 32,
    steps: Annotated[
        int, typer.Option(help="Training updates T of the running statistics.")
    ] = 1000,
    fmt: Annotated[OutputFormat, typer.Option("--format", "-f", help="Output format.")] = (
        OutputFormat.table
    ),
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write the result to this file.")
    ] = None,
    force: Annotated[bool, typer.Option(help="Overwrite --output if it exists.")] = False,
) -> None:
    """Closed-form variance shift for one or several dropout rates.

    Prints the train and test variance of what BatchNorm sees, the shift ratio, the expected
    stored running variance with its noise, the data-free correction and γ*. `table` and `md`
    show quantities down and rates across; `csv` and `json` give one record per rate.
    """
    if std is not None and var is not None:
        raise ValidationError("give either --var or --std, not both")
    v = 1.0 if var is None and std is None else var
    if std is not None:
        v = check_range("std", std, 0.0, None) ** 2
    assert v is not None
    if topology not in ("direct", "linear"):
        raise ValidationError(f"topology must be one of direct, linear; got {topology!r}")
    if D is not None and cos2 is not None:
        raise ValidationError("give either --D or --cos2, not both")
    rates = tuple(rate) if rate else (0.5,)
    preset = resolve_preset(framework.value, parse_momentum(momentum))
    config = TheoryConfig(
        rates=rates,
        mean=mean,
        var=v,
        dropout=dropout.value,
        beta=beta,
        topology=topology,
        width=width,
        rho=rho,
        cos2=cos2,
        D=D,
        preset=preset,
        batch_size=batch_size,
        steps=steps,
    )
    rows = theory_table(config)
    meta = {"varshift": __version__, "command": "theory", "parameters": config_metadata(config)}
    title = (
        f"variance shift, {dropout.value} dropout, input mean {mean:g} var {v:g}, "
        f"{preset.name} (alpha {preset.alpha}), n={batch_size}, T={steps}"
    )
    emit(
        to_frame(rows),
        fmt,
        metadata=meta,
        title=title,
        output=output,
        force=force,
        table_df=human_layout(rows),
    )


def config_metadata(config: TheoryConfig) -> dict[str, object]:
    """The parameters block of the report metadata."""
    preset = config.preset
    return {
        "rates": list(config.rates),
        "mean": config.mean,
        "var": config.var,
        "dropout": config.dropout,
        "beta": config.beta,
        "topology": config.topology,
        "width": config.width,
        "rho": config.rho,
        "cos2": config.cos2,
        "D": config.D,
        "framework": preset.name if preset else None,
        "momentum": preset.momentum if preset else None,
        "batch_size": config.batch_size,
        "steps": config.steps,
    }
