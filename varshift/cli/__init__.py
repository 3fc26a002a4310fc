"""The ``varshift`` command line: parse options, call the library once, render the result.

No numerics here. Each command lives in its own module, imported only when it runs
(:mod:`varshift.cli._app`). Library errors (:class:`varshift.core.errors.VarshiftError`) become a
one-line message on stderr and their exit code (2 for bad input, 1 for a regression found by
``check``) in exactly one place, :meth:`varshift.cli._app.LazyGroup.invoke`; anything else is a
bug (exit 3, traceback shown).
"""

from __future__ import annotations

import sys
import traceback

import typer

from varshift import __version__
from varshift.cli._app import COMMANDS, app

__all__ = ["COMMANDS", "app", "main"]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"varshift {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", help="Print the version and exit.", callback=_version, is_eager=True
    ),
) -> None:
    """Measure, simulate and correct the Dropout → BatchNorm variance shift.

    During training, dropout inflates the variance a following BatchNorm layer records; at test
    time dropout is off and the frozen statistics normalise wrongly. varshift computes the
    closed forms, simulates the pipeline as the frameworks run it, and corrects checkpoints.
    """


def main() -> None:
    """Console entry point. Usage errors exit 2 (click), library errors their own code
    (:class:`varshift.cli._app.LazyGroup`), and anything unexpected is a bug: traceback, exit 3."""
    try:
        app(prog_name="varshift")
    except Exception:
        traceback.print_exc()
        typer.echo("varshift: internal error (a bug): please report the traceback above", err=True)
        sys.exit(3)
