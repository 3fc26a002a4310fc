"""The ``varshift`` command line: parse options, call the library once, render the result.

No numerics here. Library errors (:class:`varshift.core.errors.VarshiftError`) become a one-line
message on stderr and their exit code (2 for bad input, 1 for a regression found by ``check``)
in exactly one place, :func:`handle_errors`; anything else is a bug (exit 3, traceback shown).
"""

from __future__ import annotations

import sys
import traceback

import typer

from varshift import __version__
from varshift.cli._common import app
from varshift.cli.cmd_check import check
from varshift.cli.cmd_correct import correct, inspect
from varshift.cli.cmd_diagnose import diagnose, recalibrate  # noqa: F401 (registers them)
from varshift.cli.cmd_simulate import simulate
from varshift.cli.cmd_suite import suite
from varshift.cli.cmd_sweep import sweep
from varshift.cli.cmd_theory import theory

__all__ = ["app", "check", "correct", "inspect", "main", "simulate", "suite", "sweep", "theory"]


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
    (:func:`handle_errors`), and anything unexpected is a bug: traceback, exit 3."""
    try:
        app(prog_name="varshift")
    except Exception:
        traceback.print_exc()
        typer.echo("varshift: internal error (a bug): please report the traceback above", err=True)
        sys.exit(3)
