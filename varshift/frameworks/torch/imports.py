"""Import paths (``package.module:function``) and ``KEY=VALUE`` arguments.

Resolving an import path imports the module: that **runs the user's code**.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any

from varshift.core.errors import ValidationError


def first_line(exc: BaseException) -> str:
    """``TypeName: first line of the message``, for one-line errors."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def short(names: Sequence[str], limit: int = 5) -> str:
    """The first ``limit`` names, then ``and N more``."""
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def resolve_import_path(text: str, option: str) -> Callable[..., Any]:
    """``"pkg.mod:fn"`` → the callable (``fn`` may be dotted: ``Class.build``). Runs the
    module's import-time code.

    Raises
    ------
    ValidationError
        If the text is not ``module:attribute``, the import fails, or the target is not callable.
    """
    module_name, sep, attr = text.partition(":")
    if not sep or not module_name or not attr:
        raise ValidationError(
            f"{option} must be an import path 'package.module:function'; got {text!r}"
        )
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:  # the user's module may raise anything at import time
        raise ValidationError(
            f"{option} {text!r}: cannot import {module_name!r}: {first_line(exc)}"
        ) from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ValidationError(
                f"{option} {text!r}: {module_name!r} has no attribute {attr!r}"
            ) from None
    if not callable(obj):
        raise ValidationError(f"{option} {text!r}: {attr!r} is not callable")
    return obj  # type: ignore[no-any-return]


def parse_model_args(items: Sequence[str]) -> dict[str, Any]:
    """``["width=32", "rate=0.5", "name=mlp"]`` → ``{"width": 32, "rate": 0.5, "name": "mlp"}``.

    Values are read as int, float, ``true``/``false``/``none``, else kept as text.

    Examples
    --------
    >>> parse_model_args(["width=32", "rate=0.5", "bias=false", "name=mlp"])
    {'width': 32, 'rate': 0.5, 'bias': False, 'name': 'mlp'}
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip().isidentifier():
            raise ValidationError(f"--model-arg must be KEY=VALUE with KEY a name; got {item!r}")
        out[key.strip()] = _value(value.strip())
    return out


def _value(text: str) -> Any:
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text
