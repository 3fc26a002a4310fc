"""``run_theory``: the closed forms of :mod:`varshift.core.theory` as a job with its metadata."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from varshift.core.errors import ValidationError
from varshift.core.frames import TableResult
from varshift.core.theory import TheoryConfig, TheoryRow, theory_table
from varshift.core.validate import check_magnitude
from varshift.jobs._meta import run_metadata

__all__ = ["TheoryConfig", "TheoryResult", "input_variance", "run_theory"]


@dataclass(frozen=True)
class TheoryResult(TableResult):
    """The closed forms for each rate of ``config``, and the run metadata built from it.

    ``to_frame()``: one row per rate, the columns of :class:`~varshift.core.theory.TheoryRow`
    (pandas); in a notebook the result shows as that table.
    """

    config: TheoryConfig
    rows: tuple[TheoryRow, ...]
    metadata: Mapping[str, Any]

    row_type: ClassVar[type] = TheoryRow

    def table_rows(self) -> tuple[TheoryRow, ...]:
        """One row per rate."""
        return self.rows

    def table_caption(self) -> str:
        """What the table shows."""
        return "varshift theory: closed forms, one row per rate"


def input_variance(
    var: float | None, std: float | None, *, names: tuple[str, str] = ("var", "std")
) -> float:
    """The input variance from ``var`` or ``std`` (``std**2``); 1 when neither is given.

    ``names`` are how the two are called in messages (the command line passes its options).

    Examples
    --------
    >>> input_variance(None, 2.0)
    4.0
    """
    if std is not None and var is not None:
        raise ValidationError(f"give either {names[0]} or {names[1]}, not both")
    if std is not None:
        return check_magnitude(names[1].lstrip("-"), std, nonnegative=True) ** 2
    return 1.0 if var is None else var


def run_theory(config: TheoryConfig) -> TheoryResult:
    """Evaluate :func:`varshift.core.theory.theory_table` for ``config``, with its metadata.

    Raises
    ------
    ValidationError
        For an invalid parameter, or both ``D`` and ``cos2``.

    Examples
    --------
    >>> res = run_theory(TheoryConfig(rates=(0.5,)))
    >>> res.rows[0].shift_ratio, res.metadata["command"]
    (0.5, 'theory')
    """
    if config.D is not None and config.cos2 is not None:
        raise ValidationError("give either D or cos2, not both")
    rows = tuple(theory_table(config))
    return TheoryResult(config, rows, run_metadata("theory", _parameters(config)))


def _parameters(config: TheoryConfig) -> dict[str, object]:
    preset = config.preset
    return {
        "rates": list(config.rates),
        "mean": config.mean,
        "var": config.var,
        "dropout": config.dropout,
        "beta": config.beta,
        "topology": config.topology,
        "width": config.width,
        "rho": config.rho,
        "cos2": config.cos2,
        "D": config.D,
        "framework": preset.name if preset else None,
        "momentum": preset.momentum if preset else None,
        "batch_size": config.batch_size,
        "steps": config.steps,
    }
