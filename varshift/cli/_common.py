"""Shared pieces of the command line: the app, option types and parsers."""

from __future__ import annotations

from enum import StrEnum

from varshift.cli._app import app
from varshift.core.errors import ValidationError

__all__ = ["DropoutKind", "Framework", "OutputFormat", "app", "parse_momentum"]


class Framework(StrEnum):
    """``--framework`` choices (DESIGN §2 presets)."""

    torch = "torch"
    keras = "keras"
    tf_keras = "tf-keras"
    flax = "flax"


class DropoutKind(StrEnum):
    """``--dropout`` choices."""

    bernoulli = "bernoulli"
    vanilla = "vanilla"
    gaussian = "gaussian"
    uout = "uout"
    alpha = "alpha"


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
