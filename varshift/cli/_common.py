"""Shared pieces of the command line: the app, option types and parsers."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from enum import EnumMeta, StrEnum
from typing import TYPE_CHECKING, Any, TypeVar

from varshift.cli._app import app
from varshift.core.dropout import KINDS
from varshift.core.errors import ValidationError
from varshift.core.presets import PRESETS
from varshift.core.topology import ENGINE_TOPOLOGIES

__all__ = [
    "VALUES_HELP",
    "DropoutKind",
    "Framework",
    "OutputFormat",
    "Topology",
    "app",
    "linear_width",
    "parse_momentum",
    "parse_values",
]

#: How every command's help names the value grammar of :func:`parse_values`.
VALUES_HELP = "a value, a comma list, or a range start:stop:step / start:stop:xfactor"


def parse_values(
    name: str, texts: str | Sequence[str], *, integer: bool = False
) -> tuple[float, ...]:
    """The one grammar of value lists on the command line (every command uses it).

    ``0.2``, ``0.1,0.5``, ``0.1:0.9:0.1`` (inclusive, a step is required), ``1:64:x2``
    (geometric); items may be mixed and the option repeated. See
    :func:`varshift.jobs.axes.parse_axis`.
    """
    from varshift.jobs.axes import parse_axis

    return parse_axis(name, texts, integer=integer)


def linear_width(width: int | None, D: float | None) -> int:
    """``--width`` of the linear topology: as given, else the smallest width that admits
    ``--D`` (``ceil(D)``), else 1; the same meaning in theory and sweep."""
    if width is not None:
        return width
    if D is None or not math.isfinite(D) or D <= 0:
        return 1
    return max(1, math.ceil(D - 1e-9))


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
