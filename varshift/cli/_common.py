"""Shared pieces of the command line: the app, option types and parsers."""

from __future__ import annotations

from collections.abc import Iterable
from enum import EnumMeta, StrEnum
from typing import TYPE_CHECKING, Any, TypeVar

from varshift.cli._app import app
from varshift.core.dropout import KINDS
from varshift.core.errors import ValidationError
from varshift.core.presets import PRESETS
from varshift.core.topology import ENGINE_TOPOLOGIES

__all__ = ["DropoutKind", "Framework", "OutputFormat", "Topology", "app", "parse_momentum"]


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
