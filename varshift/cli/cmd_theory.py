"""``varshift theory``: the closed forms as a table."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from varshift.cli._common import (
    VALUES_HELP,
    DropoutKind,
    Framework,
    OutputFormat,
    app,
    linear_width,
    parse_momentum,
    parse_values,
)
from varshift.core.dropout import DEFAULT_KIND
from varshift.core.files import OutputPlan, transaction
from varshift.core.presets import DEFAULT_FRAMEWORK, resolve_preset
from varshift.core.topology import DEFAULT_TOPOLOGY
from varshift.jobs.theory import TheoryConfig, input_variance, run_theory
from varshift.present import theory as show
from varshift.present.output import emit
from varshift.present.render import message
from varshift.present.report import to_table

EPILOG = """\
Examples:

  varshift theory --rate 0.2

  varshift theory --rate 0.1,0.5 --mean 5 --std 2 --framework keras

  varshift theory --rate 0.5 --topology linear --width 64 --rho 0.1 --cos2 0.5

  varshift theory --rate 0.1:0.9:0.1 --topology linear --D 64 --rho 0.1

  varshift theory --rate 0.3 --dropout gaussian --format csv
"""


@app.command(epilog=EPILOG)
def theory(
    rate: Annotated[
        list[str] | None,
        typer.Option("--rate", "-r", help=f"Dropout rates: {VALUES_HELP} [default: 0.5]."),
    ] = None,
    mean: Annotated[float, typer.Option(help="Mean c of the dropout input.")] = 0.0,
    var: Annotated[
        float | None, typer.Option("--var", help="Variance v of the dropout input [default: 1].")
    ] = None,
    std: Annotated[
        float | None, typer.Option("--std", help="Standard deviation of the input (or --var).")
    ] = None,
    dropout: Annotated[DropoutKind, typer.Option(help="Dropout kind.")] = DropoutKind(DEFAULT_KIND),
    beta: Annotated[float, typer.Option(help="uout noise half-width (uout only).")] = 0.1,
    topology: Annotated[
        str, typer.Option(help="direct: dropout → BN; linear: dropout → linear unit → BN.")
    ] = DEFAULT_TOPOLOGY,
    width: Annotated[
        int | None,
        typer.Option(
            help="Linear topology: inputs per unit, d [default: ceil(D) with --D, else 1]."
        ),
    ] = None,
    rho: Annotated[float, typer.Option(help="Linear topology: input correlation.")] = 0.0,
    cos2: Annotated[
        float | None, typer.Option(help="Linear topology: cos²θ of the weights [default: 1].")
    ] = None,
    D: Annotated[
        float | None, typer.Option("--D", help="Linear topology: D = d·cos²θ (or --cos2).")
    ] = None,
    framework: Annotated[Framework, typer.Option(help="BatchNorm convention.")] = Framework(
        DEFAULT_FRAMEWORK
    ),
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
    OutputPlan(force=force).add_all([output] if output else [], "--output")
    config = TheoryConfig(
        rates=parse_values("--rate", rate or ["0.5"]),
        mean=mean,
        var=input_variance(var, std, names=("--var", "--std")),
        dropout=dropout.value,
        beta=beta,
        topology=topology,
        width=linear_width(width, D),
        rho=rho,
        cos2=cos2,
        D=D,
        preset=resolve_preset(framework.value, parse_momentum(momentum)),
        batch_size=batch_size,
        steps=steps,
    )
    result = run_theory(config)
    human = show.human_layout(result.rows)
    with transaction() as tx:
        emit(
            to_table(result.rows),
            fmt.value,
            metadata=result.metadata,
            title=show.title(result),
            output=output,
            table_df=human,
        )
    if output is not None and tx.verb(output) == "unchanged":
        message(f"varshift: unchanged {output}")
