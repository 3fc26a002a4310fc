"""The ``varshift`` Typer app: subcommands imported when used, errors mapped to exit codes here.

A command's module (and so what it imports: the engine, pandas, Rich, matplotlib) is loaded
only when that command runs or its help is shown; ``varshift --help`` still lists them all,
from :data:`COMMANDS`. :class:`VarshiftError` becomes ``varshift: error: <message>`` on stderr
and its exit code in exactly one place, :meth:`LazyGroup.invoke`.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, MutableMapping
from typing import Any

import typer
from typer.core import TyperGroup

from varshift.cli import _fast
from varshift.core.errors import RegressionFound, VarshiftError

#: Command name → module that defines it, in the order ``--help`` lists them.
COMMANDS: dict[str, str] = {
    "check": "varshift.cli.cmd_check",
    "inspect": "varshift.cli.cmd_correct",
    "correct": "varshift.cli.cmd_correct",
    "diagnose": "varshift.cli.cmd_diagnose",
    "recalibrate": "varshift.cli.cmd_diagnose",
    "simulate": "varshift.cli.cmd_simulate",
    "suite": "varshift.cli.cmd_suite",
    "sweep": "varshift.cli.cmd_sweep",
    "theory": "varshift.cli.cmd_theory",
}


def _load(name: str) -> Any:
    """Import the command's module (it registers on :data:`app`) and build its click command."""
    importlib.import_module(COMMANDS[name])
    for info in app.registered_commands:
        callback = info.callback
        if callback is not None and (info.name or callback.__name__) == name:
            command = typer.main.get_command_from_info(
                info,
                pretty_exceptions_short=app.pretty_exceptions_short,
                rich_markup_mode=app.rich_markup_mode,
            )
            _fast.install(command)
            return command
    raise KeyError(name)  # pragma: no cover - COMMANDS names a module without the command


class _Commands(MutableMapping[str, Any]):
    """Every command name at once; a command is built the first time it is looked up."""

    def __init__(self, loaded: MutableMapping[str, Any]) -> None:
        self._loaded = dict(loaded)

    def __getitem__(self, name: str) -> Any:
        if name not in self._loaded:
            if name not in COMMANDS:
                raise KeyError(name)
            self._loaded[name] = _load(name)
        return self._loaded[name]

    def __setitem__(self, name: str, command: Any) -> None:
        self._loaded[name] = command

    def __delitem__(self, name: str) -> None:
        del self._loaded[name]

    def __iter__(self) -> Iterator[str]:
        yield from COMMANDS
        yield from (n for n in self._loaded if n not in COMMANDS)

    def __len__(self) -> int:
        return len(set(COMMANDS) | set(self._loaded))


class LazyGroup(TyperGroup):
    """A Typer group whose commands load on demand and whose errors map to exit codes."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.commands = _Commands(self.commands)
        _fast.install(self)

    def list_commands(self, ctx: Any) -> list[str]:
        """Every command name, in :data:`COMMANDS` order, without loading any."""
        return list(self.commands)

    def invoke(self, ctx: Any) -> Any:
        """Run the command; a :class:`VarshiftError` is its one-line message and exit code."""
        try:
            return super().invoke(ctx)
        except VarshiftError as exc:
            label = "check failed" if isinstance(exc, RegressionFound) else "error"
            # Library messages name the keyword (force=True); on the command line it is --force.
            text = str(exc).replace("force=True", "--force")
            typer.echo(f"varshift: {label}: {text}", err=True)
            raise typer.Exit(exc.exit_code) from None


app = typer.Typer(
    name="varshift",
    cls=LazyGroup,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
    context_settings={"help_option_names": ["-h", "--help"]},
)
