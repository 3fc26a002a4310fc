"""Shared pieces of the command line: the app, option types, error handling, output."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterable, Mapping
from enum import EnumMeta, StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

import pandas as pd
import typer

from varshift.core.dropout import KINDS
from varshift.core.errors import RegressionFound, ValidationError, VarshiftError
from varshift.core.files import atomic_write
from varshift.core.presets import PRESETS
from varshift.core.topology import ENGINE_TOPOLOGIES
from varshift.present.render import frame_table, stdout_console
from varshift.present.report import render_text

app = typer.Typer(
    name="varshift",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
    context_settings={"help_option_names": ["-h", "--help"]},
)

P = ParamSpec("P")
R = TypeVar("R")


def _choices(name: str, values: Iterable[str], doc: str) -> Any:
    """A ``StrEnum`` of ``values`` (member names with ``-`` as ``_``) for a typer option."""
    enum = StrEnum(name, {v.replace("-", "_"): v for v in values})  # type: ignore[misc]
    enum.__doc__ = doc
    return enum


# Generated from the core registries, so a new preset, dropout kind or topology appears in every
# command's choices. mypy cannot see generated members: for it, any member name is a member.
if TYPE_CHECKING:
    _E = TypeVar("_E")

    class _Generated(EnumMeta):
        def __getattr__(cls: type[_E], name: str) -> _E: ...

    class Framework(StrEnum, metaclass=_Generated):
        """``--framework`` choices."""

    class DropoutKind(StrEnum, metaclass=_Generated):
        """``--dropout`` choices."""

    class Topology(StrEnum, metaclass=_Generated):
        """``--topology`` choices of simulate."""

else:
    Framework = _choices("Framework", PRESETS, "``--framework`` choices (DESIGN §2 presets).")
    DropoutKind = _choices("DropoutKind", KINDS, "``--dropout`` choices.")
    Topology = _choices("Topology", ENGINE_TOPOLOGIES, "``--topology`` choices of simulate.")


class OutputFormat(StrEnum):
    """``--format`` choices."""

    table = "table"
    csv = "csv"
    json = "json"
    md = "md"


def fail(message: str) -> typer.Exit:
    """Print ``varshift: error: <message>`` on stderr; return the exit to raise (code 2)."""
    typer.echo(f"varshift: error: {message}", err=True)
    return typer.Exit(2)


def handle_errors(fn: Callable[P, R]) -> Callable[P, R]:
    """Turn a :class:`VarshiftError` into its one-line message and exit code."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except VarshiftError as exc:
            label = "check failed" if isinstance(exc, RegressionFound) else "error"
            typer.echo(f"varshift: {label}: {exc}", err=True)
            raise typer.Exit(exc.exit_code) from None

    return wrapper


def parse_momentum(text: str | None) -> float | str | None:
    """``--momentum``: a number, ``none`` (torch's cumulative average) or unset (default)."""
    if text is None:
        return "default"
    if text.strip().lower() == "none":
        return None
    try:
        return float(text)
    except ValueError:
        raise ValidationError(
            f"momentum must be a number in [0, 1] or 'none'; got {text!r}"
        ) from None


def emit(
    df: pd.DataFrame,
    fmt: OutputFormat,
    *,
    metadata: Mapping[str, Any] | None = None,
    title: str | None = None,
    caption: str | None = None,
    output: Path | None = None,
    force: bool = False,
    table_df: pd.DataFrame | None = None,
) -> None:
    """Send a result to stdout (or ``output``) in the chosen format.

    ``table`` is a Rich table on a terminal and Markdown when stdout is not one (or when
    writing to a file); ``table_df`` is an alternative layout for the human formats.
    """
    human = table_df if table_df is not None else df
    if fmt is OutputFormat.table and output is None and sys.stdout.isatty():
        stdout_console().print(frame_table(human, title=title, caption=caption))
        return
    if fmt in (OutputFormat.table, OutputFormat.md):
        text = render_text(human, "md", metadata, title)
    else:
        text = render_text(df, fmt.value, metadata, title)
    if output is not None:
        atomic_write(output, text, force=force)
    else:
        sys.stdout.write(text)
