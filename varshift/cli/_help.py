"""``--help`` that reads at 80 columns: examples first, options grouped in panels, no
``<bool>``/``<list[str]>`` type labels.

Applied to each command when it is built (:func:`varshift.cli._app._load`), so the option
declarations in ``cmd_*.py`` stay plain. An option keeps its panel if it names one
(``rich_help_panel=``); otherwise :data:`PANELS` places it by its name, and anything not
listed stays under "Options".
"""

from __future__ import annotations

from typing import Any, get_args, get_origin

#: Help panel of each option, by its long name (every command uses the same panels).
PANELS: dict[str, str] = {
    **dict.fromkeys(
        (
            "--format",
            "--output",
            "--force",
            "--plot",
            "--html",
            "--report-dir",
            "--no-report",
            "--quiet",
            "--junit",
            "--markdown",
            "--all",
            "--stem",
        ),
        "Output",
    ),
    **dict.fromkeys(
        (
            "--topology",
            "--width",
            "--rho",
            "--cos2",
            "--D",
            "--weights",
            "--spatial",
            "--channelwise",
        ),
        "Topology",
    ),
    **dict.fromkeys(
        (
            "--framework",
            "--momentum",
            "--batch-size",
            "--samples",
            "--epochs",
            "--steps",
            "--drop-last",
            "--features",
            "--seed",
        ),
        "BatchNorm and training",
    ),
    **dict.fromkeys(("--fit", "--lr", "--probe"), "Fitting gamma and beta (--fit)"),
    **dict.fromkeys(
        ("--simulate", "--reps", "--workers", "--scheduler", "--seeds", "--store", "--resume"),
        "Monte Carlo",
    ),
}

#: Short type labels instead of Typer's ``<float>``, ``<list[str]>``, ``<a|b|c|...>``.
_LABELS: dict[Any, str] = {float: "NUM", int: "INT", str: "TEXT"}


def _label(annotation: Any) -> str | None:
    """A short metavar for ``annotation`` (``X | None`` and ``list[X]`` unwrapped)."""
    args = [a for a in get_args(annotation) if a is not type(None)]
    if get_origin(annotation) is list:
        return "LIST"
    if args and len(args) == 1:
        return _label(args[0])
    if isinstance(annotation, type):
        if annotation.__name__.endswith("Path") or annotation.__name__ == "Path":
            return "PATH"
        return _LABELS.get(annotation, "NAME")
    return None


def tidy(command: Any) -> None:
    """Regroup ``command``'s help: examples first, options in panels, short type labels."""
    for param in getattr(command, "params", ()):
        tidy_option(param)
    make_help = getattr(command, "get_help_option", None)
    if make_help is not None:

        def get_help_option(ctx: Any) -> Any:
            option = make_help(ctx)
            if option is not None:
                tidy_option(option)
            return option

        command.get_help_option = get_help_option
    _examples_first(command)


def tidy_option(param: Any) -> None:
    """A panel and a short type label for one option (a flag shows none)."""
    if getattr(param, "param_type_name", "") != "option":
        return
    if getattr(param, "rich_help_panel", None) is None:
        long = next((o for o in param.opts if o.startswith("--")), None)
        if long in PANELS:
            param.rich_help_panel = PANELS[long]
    if param.metavar is not None:
        return
    if param.is_flag:
        param.metavar = ""
        return
    desc = getattr(param, "type_descriptor", None)
    if desc is not None and desc.is_choice:
        choices = [str(getattr(c, "value", c)) for c in desc.choices or ()]
        param.metavar = "NAME"
        if param.help and "One of" not in param.help:
            param.help = f"{param.help} One of: {', '.join(choices)}."
        return
    label = _label(desc.annotation) if desc is not None else None
    if label is not None:
        param.metavar = label


def _examples_first(command: Any) -> None:
    """Show the summary line, then the epilog's examples, then the longer description."""
    help_text, epilog = command.help or "", command.epilog or ""
    if not epilog.lstrip().startswith("Examples"):
        return
    summary, _, rest = help_text.strip().partition("\n\n")
    command.help = f"{summary}\n\n{epilog.rstrip()}"
    command.epilog = rest.strip() or None
