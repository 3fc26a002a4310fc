"""Boundary checks: each raises :class:`ValidationError` naming the parameter, value and rule."""

from __future__ import annotations

import math
from collections.abc import Sequence

from varshift.core.errors import ValidationError


def _fmt(value: object) -> str:
    if isinstance(value, float):
        short = f"{value:g}"
        return short if float(short) == value else repr(value)
    return repr(value) if isinstance(value, str) else f"{value}"


def check_finite(name: str, value: float) -> float:
    """Return ``float(value)``; reject NaN and infinities."""
    x = float(value)
    if not math.isfinite(x):
        raise ValidationError(f"{name} must be a finite number; got {_fmt(value)}")
    return x


def check_range(
    name: str,
    value: float,
    low: float | None = None,
    high: float | None = None,
    *,
    closed: str = "both",
) -> float:
    """Return ``float(value)`` if it lies in the interval; ``closed`` is both|left|right|neither."""
    x = check_finite(name, value)
    lo_ok = low is None or (x >= low if closed in ("both", "left") else x > low)
    hi_ok = high is None or (x <= high if closed in ("both", "right") else x < high)
    if lo_ok and hi_ok:
        return x
    if high is None:
        rule = f">= {low:g}" if closed in ("both", "left") else f"> {low:g}"
    elif low is None:
        rule = f"<= {high:g}" if closed in ("both", "right") else f"< {high:g}"
    else:
        left = "[" if closed in ("both", "left") else "("
        right = "]" if closed in ("both", "right") else ")"
        rule = f"in {left}{low:g}, {high:g}{right}"
    raise ValidationError(f"{name} must be {rule}; got {_fmt(value)}")


def check_int(name: str, value: int, low: int | None = None, high: int | None = None) -> int:
    """Return ``value`` if it is an integer within ``[low, high]``."""
    if isinstance(value, bool) or int(value) != value:
        raise ValidationError(f"{name} must be an integer; got {_fmt(value)}")
    v = int(value)
    if (low is not None and v < low) or (high is not None and v > high):
        if high is None:
            rule = f">= {low}"
        elif low is None:
            rule = f"<= {high}"
        else:
            rule = f"in [{low}, {high}]"
        raise ValidationError(f"{name} must be an integer {rule}; got {v}")
    return v


def check_choice(name: str, value: str, choices: Sequence[str]) -> str:
    """Return ``value`` if it is one of ``choices`` (case-insensitive), normalised to lower case."""
    v = str(value).lower()
    if v not in choices:
        raise ValidationError(f"{name} must be one of {', '.join(choices)}; got {_fmt(value)}")
    return v


#: The largest |mean|, std or variance varshift accepts. Theory and the engine raise values to
#: the fourth power (kurtosis terms); 1e60⁴ = 1e240 stays finite in float64, 1e308² does not.
MAX_MAGNITUDE = 1e60

#: The most float64 values one simulation may hold in memory at once (2 GiB).
MAX_ELEMENTS = 2**28

#: The most values one simulation may push through the pipeline (steps × batch × row size);
#: ~1e11 is tens of minutes on one core, so more is refused before anything runs.
MAX_WORK = 10**11


def check_magnitude(name: str, value: float, *, nonnegative: bool = False) -> float:
    """Return ``float(value)`` if it is finite, within ±:data:`MAX_MAGNITUDE` (and >= 0)."""
    x = check_range(name, value, 0.0 if nonnegative else None, None)
    if abs(x) > MAX_MAGNITUDE:
        raise ValidationError(
            f"{name} must be within ±{MAX_MAGNITUDE:g} (its fourth power must stay finite in "
            f"float64); got {_fmt(value)}"
        )
    return x


def check_seed(value: int) -> int:
    """Return ``value`` if it is a valid seed: an integer in [0, 2**64 - 1]."""
    return check_int("seed", value, 0, 2**64 - 1)


def check_budget(what: str, amount: float, limit: float, hint: str) -> None:
    """Refuse a job whose estimated ``amount`` (values) exceeds ``limit``, before it starts."""
    if amount > limit:
        raise ValidationError(f"{what} would be {amount:.3g} values; at most {limit:.3g} ({hint})")


def check_stem(name: str, value: str) -> str:
    """Return ``value`` if it is a plain file-name stem: not empty, no folder separator, no
    ``..``, so the files it names stay inside their folder."""
    text = str(value)
    if not text.strip() or "/" in text or "\\" in text or text in (".", "..") or "\0" in text:
        raise ValidationError(
            f"{name} must be a file name stem without folders (no '/', '\\\\', '..'); got {text!r}"
        )
    return text
