"""How ``varshift theory`` shows a :class:`~varshift.jobs.theory.TheoryResult`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from varshift.core.theory import TheoryRow
from varshift.jobs.theory import TheoryResult
from varshift.present.table import Grid

#: Rows of the human (transposed) layout: field → description.
DESCRIPTIONS: dict[str, str] = {
    "keep": "keep probability q = 1 - rate",
    "beta": "uout half-width",
    "kappa": "E[m²]/E[m]² of the noise",
    "train_mean": "BN input mean, training",
    "train_var": "BN input variance, training",
    "test_var": "BN input variance, test",
    "shift_ratio": "Δ = test / train variance",
    "inverse_ratio": "1/Δ",
    "stored_batch_var": "E[stored batch variance]",
    "stored_batch_var_sd": "sd of one stored batch variance",
    "running_var": "E[running variance] after steps",
    "running_var_sd": "noise sd of the running variance",
    "residual_weight": "weight of the initial value 1",
    "updates_to_1pct": "updates until that weight < 1%",
    "corrected_var_debiased": "data-free correction (debiased)",
    "corrected_var_naive": "data-free correction (naive)",
    "gamma_star": "γ* of an identity-trained BN",
}


def human_layout(rows: Sequence[TheoryRow]) -> Grid:
    """Quantities down, one column per rate: what a person compares."""
    records = Grid.from_records(rows).records()
    keep = [k for k in DESCRIPTIONS if any(not _missing(r[k]) for r in records)]
    columns: dict[str, list[Any]] = {
        "quantity": keep,
        "meaning": [DESCRIPTIONS[k] for k in keep],
    }
    for i, row in enumerate(records):
        label = f"rate {row['rate']:g}"
        columns[label if label not in columns else f"{label} #{i + 1}"] = [row[k] for k in keep]
    return Grid.from_columns(columns)


def _missing(value: Any) -> bool:
    return value is None or value != value


def title(result: TheoryResult) -> str:
    """The table's title: the input, the dropout kind and the BatchNorm convention."""
    config = result.config
    first = result.rows[0]
    return (
        f"variance shift, {config.dropout} dropout, input mean {config.mean:g} var "
        f"{config.var:g}, {first.framework} (alpha {first.alpha}), n={config.batch_size}, "
        f"T={config.steps}"
    )
