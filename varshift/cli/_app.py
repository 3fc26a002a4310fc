"""The ``varshift`` Typer app: subcommands imported when used, errors mapped to exit codes here.

A command's module (and so what it imports: the engine, pandas, Rich, matplotlib) is loaded
only when that command runs or its help is shown; ``varshift --help`` still lists them all,
from :data:`COMMANDS`. :class:`VarshiftError` becomes ``varshift: error: <message>`` on stderr
and its exit code in exactly one place, :meth:`LazyGroup.invoke`.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, MutableMapping
from typing import Any, NoReturn

import typer
from typer.core import TyperGroup

from varshift.cli import _fast, _help
from varshift.core.errors import Interrupted, RegressionFound, ValidationError, VarshiftError

try:  # typer >= 0.16 vendors click as typer._click; older typers use click itself
    from typer._click.exceptions import UsageError
except ImportError:  # pragma: no cover - depends on the installed typer
    from click.exceptions import UsageError  # type: ignore[assignment]

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
            return _prepare(command)
    raise KeyError(name)  # pragma: no cover - COMMANDS names a module without the command


def _prepare(command: Any) -> Any:
    """Give a built command the fast conversions, the refusal of repeated options and the
    tidy help, once (Typer builds already imported commands itself, without :func:`_load`)."""
    if not getattr(command, "_varshift_prepared", False):
        command._varshift_prepared = True
        _fast.install(command)
        _refuse_repeats(command)
        _help.tidy(command)
    return command


def _given(option: Any, args: list[str]) -> list[str]:
    """The values ``args`` give ``option`` (``--rate 0.1``, ``--rate=0.1``, ``-r 0.1``)."""
    values = []
    for i, arg in enumerate(args):
        for name in option.opts:
            if arg == name and i + 1 < len(args):
                values.append(args[i + 1])
            elif arg.startswith(name + "=") and name.startswith("--"):
                values.append(arg[len(name) + 1 :])
    return values


def _refuse_repeats(command: Any) -> None:
    """Make giving a single-value option twice an error: click would keep the last silently.

    Options that take a list (``multiple``) and on/off flags may repeat.
    """
    original = command.parse_args

    def parse_args(ctx: Any, args: list[str]) -> list[str]:
        if not ctx.resilient_parsing:
            _, _, order = command.make_parser(ctx).parse_args(args=list(args))
            for option in dict.fromkeys(order):
                single = getattr(option, "param_type_name", "") == "option" and not (
                    option.multiple or option.is_flag or option.count
                )
                if single and order.count(option) > 1:
                    shown = ", ".join(_given(option, list(args))) or "?"
                    raise ValidationError(
                        f"{option.opts[0]} is given {order.count(option)} times ({shown}); "
                        "it takes one value"
                    )
        parsed: list[str] = original(ctx, args)
        return parsed

    command.parse_args = parse_args


class _Commands(MutableMapping[str, Any]):
    """Every command name at once; a command is built the first time it is looked up."""

    def __init__(self, loaded: MutableMapping[str, Any]) -> None:
        self._loaded = {name: _prepare(command) for name, command in loaded.items()}

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


def _usage_error(exc: UsageError) -> NoReturn:
    """Print a click usage error as ``varshift: error: <message>`` on one line; exit 2."""
    message = " ".join(exc.format_message().split())
    command = exc.ctx.command_path if exc.ctx is not None else "varshift"
    typer.echo(f"varshift: error: {message} (see '{command} -h')", err=True)
    raise typer.Exit(exc.exit_code)


class LazyGroup(TyperGroup):
    """A Typer group whose commands load on demand and whose errors map to exit codes."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.commands = _Commands(self.commands)
        _help.tidy(self)

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        """Parse the group's options, converted by :mod:`varshift.cli._fast` (Typer adds the
        completion options after ``__init__``: without this they would load pydantic)."""
        if not getattr(self, "_plain_params", False):
            self._plain_params = True
            _fast.install(self)
        rest: list[str] = super().parse_args(ctx, args)
        return rest

    def format_help(self, ctx: Any, formatter: Any) -> None:
        """The group's help, its options (also the completion ones Typer adds) tidied."""
        for param in self.params:
            _help.tidy_option(param)
        super().format_help(ctx, formatter)

    def list_commands(self, ctx: Any) -> list[str]:
        """Every command name, in :data:`COMMANDS` order, without loading any."""
        return list(self.commands)

    def make_context(self, info_name: str | None, args: list[str], *a: Any, **kw: Any) -> Any:
        """The group's context; a usage error in the group's own options is one line."""
        try:
            return super().make_context(info_name, args, *a, **kw)
        except UsageError as exc:
            _usage_error(exc)

    def invoke(self, ctx: Any) -> Any:
        """Run the command; a :class:`VarshiftError` is its one-line message and exit code.

        A usage error (``--rate abc``, an unknown option) is one line too, exit 2, instead of
        click's usage lines and Rich box.
        """
        from varshift.core.files import forget_marks

        forget_marks()  # one command's output plan never applies to the next (one process)
        try:
            return super().invoke(ctx)
        except UsageError as exc:
            _usage_error(exc)
        except VarshiftError as exc:
            label = "check failed" if isinstance(exc, RegressionFound) else "error"
            label = "interrupted" if isinstance(exc, Interrupted) else label
            # Library messages name the keyword (force=True); on the command line it is --force.
            text = str(exc).replace("force=True", "--force")
            typer.echo(f"varshift: {label}: {text}", err=True)
            raise typer.Exit(exc.exit_code) from None


app = typer.Typer(
    name="varshift",
    cls=LazyGroup,
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
    context_settings={"help_option_names": ["-h", "--help"]},
)
