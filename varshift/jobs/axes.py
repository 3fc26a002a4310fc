"""Grid axes as the command line writes them: comma lists and inclusive ranges.

::

    0.1:0.9:0.1     0.1, 0.2, ..., 0.9 (stop included within float tolerance)
    1:64:x2         1, 2, 4, ..., 64 (geometric)
    1,4,16,64       a list; items may themselves be ranges
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence

from varshift.core.errors import ValidationError
from varshift.core.validate import check_choice

#: No single axis may expand to more values than this, forced or not.
MAX_AXIS_VALUES = 1_000_000

_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_RANGE = re.compile(rf"^({_NUMBER}):({_NUMBER}):([xX*]?)({_NUMBER})$")
_NO_STEP = re.compile(rf"^({_NUMBER}):({_NUMBER})$")


def clean_number(x: float) -> float:
    """Drop the float noise of ``a + i*step`` (``0.30000000000000004`` → ``0.3``)."""
    return float(f"{x:.12g}")


def _parse_number(name: str, text: str, spec: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValidationError(
            f"{name} must be numbers, comma lists or ranges start:stop:step; got {spec!r}"
        ) from None
    if not math.isfinite(value):
        raise ValidationError(f"{name} must be finite; got {spec!r}")
    return value


def _expand_range(name: str, item: str, max_values: int) -> list[float]:
    """Values of one ``start:stop:step`` or ``start:stop:xfactor`` item, stop included."""
    m = _RANGE.match(item)
    if m is None and _NO_STEP.match(item):
        raise ValidationError(
            f"{name} range {item!r} has no step: write start:stop:step or "
            "start:stop:xfactor (e.g. 0.1:0.9:0.1, 1:64:x2)"
        )
    if m is None:
        raise ValidationError(
            f"{name} range must be start:stop:step or start:stop:xfactor; got {item!r}"
        )
    start, stop = float(m.group(1)), float(m.group(2))
    geometric = bool(m.group(3))
    step = float(m.group(4))
    if not all(math.isfinite(x) for x in (start, stop, step)):
        raise ValidationError(f"{name} range must have finite bounds and step; got {item!r}")
    if geometric:
        if start <= 0 or stop <= 0 or step <= 0 or step == 1:
            raise ValidationError(
                f"{name} range {item!r} is empty: a geometric range needs start, stop > 0 and "
                "a factor > 0 other than 1"
            )
        ratio = math.log(stop / start) / math.log(step)
        count = math.floor(ratio + 1e-9) + 1
        if ratio < -1e-9:
            count = 0
    else:
        if step == 0:
            raise ValidationError(f"{name} range {item!r} is empty: the step must not be 0")
        ratio = (stop - start) / step
    if not math.isfinite(ratio):  # 0:1e300:1e-10: the count overflows a float
        raise ValidationError(
            f"{name} range {item!r} has more than {max_values} values; at most {max_values} "
            "per axis"
        )
    if not geometric:
        count = math.floor(ratio + 1e-9) + 1 if ratio > -1e-9 else 0
    if count <= 0:
        direction = "start > stop with a positive step" if step > 0 else "start < stop"
        if geometric:
            direction = "the factor moves away from stop"
        raise ValidationError(f"{name} range {item!r} is empty: {direction}")
    if count > max_values:
        raise ValidationError(
            f"{name} range {item!r} has {count} values; at most {max_values} per axis"
        )
    out = [clean_number(start * step**i if geometric else start + i * step) for i in range(count)]
    # The stop value, reached within float tolerance, is written exactly as given.
    if abs(out[-1] - stop) <= 1e-9 * max(1.0, abs(stop)):
        out[-1] = stop
    return out


def parse_axis(
    name: str,
    specs: str | Iterable[str],
    *,
    integer: bool = False,
    max_values: int = MAX_AXIS_VALUES,
) -> tuple[float, ...]:
    """Expand comma lists and inclusive ranges into the values of one grid axis.

    Parameters
    ----------
    name:
        How the axis is named in error messages (the CLI passes ``--rate``, ...).
    specs:
        One string or several (a repeated option); each is a comma list whose items are
        numbers, arithmetic ranges ``start:stop:step`` (a step is required) or
        geometric ranges ``start:stop:xfactor``. ``stop`` is included when the step reaches it
        within a relative tolerance of 1e-9.
    integer:
        Require integer values (widths, batch sizes); they are returned as floats all the same.
    max_values:
        Refuse an axis that expands to more values than this.

    Returns
    -------
    tuple of float
        The values in the order given, without repeats.

    Raises
    ------
    ValidationError
        For an empty range (``0.5:0.1:0.1``, a step of 0), a malformed item or a non-integer
        value where an integer is required.

    Examples
    --------
    >>> parse_axis("--rate", "0.1:0.5:0.1")
    (0.1, 0.2, 0.3, 0.4, 0.5)
    >>> parse_axis("--D", ["1,4", "16:64:x4"])
    (1.0, 4.0, 16.0, 64.0)
    """
    texts = [specs] if isinstance(specs, str) else list(specs)
    if not texts:
        raise ValidationError(f"{name} must have at least one value; got none")
    seen: dict[float, None] = {}
    for spec in texts:
        for raw in spec.split(","):
            item = raw.strip()
            if not item:
                raise ValidationError(f"{name} has an empty item; got {spec!r}")
            if ":" in item:
                values = _expand_range(name, item, max_values)
            else:
                values = [_parse_number(name, item, spec)]
            for v in values:
                if integer and v != round(v):
                    raise ValidationError(f"{name} must be integers; got {v:g} in {spec!r}")
                seen.setdefault(float(round(v)) if integer else v, None)
            if len(seen) > max_values:
                raise ValidationError(f"{name} has more than {max_values} values")
    return tuple(seen)


def parse_choices(name: str, specs: str | Iterable[str], choices: Sequence[str]) -> tuple[str, ...]:
    """Expand a comma list of names (``all`` means every choice), validated and without repeats.

    Examples
    --------
    >>> parse_choices("--framework", "torch,keras", ("torch", "keras", "flax"))
    ('torch', 'keras')
    """
    texts = [specs] if isinstance(specs, str) else list(specs)
    seen: dict[str, None] = {}
    for spec in texts:
        for raw in spec.split(","):
            item = raw.strip()
            if item.lower() == "all":
                seen.update(dict.fromkeys(choices))
                continue
            seen.setdefault(check_choice(name, item, choices), None)
    if not seen:
        raise ValidationError(f"{name} must have at least one value; got none")
    return tuple(seen)
