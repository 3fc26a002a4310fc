"""Option values converted without importing pydantic, when the conversion is unambiguous.

Typer (0.29) converts every option value through a pydantic ``TypeAdapter``; importing pydantic
and building ~30 adapters costs ~0.3 s per run, more than NumPy. Plain values (a float, an int,
a path, a choice, a list of those, written in their plain form) are converted here to exactly
what pydantic returns; anything else (``3.0`` for an int, a bad number, an unknown choice)
goes to typer's own conversion, so values and error messages stay Typer's. If typer's internals
differ from what this expects, nothing is changed.
"""

from __future__ import annotations

import re
import types
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Union, get_args, get_origin

_FLOAT = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_INT = re.compile(r"[+-]?\d+")


class _Fallback(Exception):
    """The value is not in a plain form: let typer convert it."""


Convert = Callable[[Any], Any]


def _to_float(value: Any) -> float:
    if isinstance(value, float):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str) and _FLOAT.fullmatch(value):
        return float(value)
    raise _Fallback


def _to_int(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and _INT.fullmatch(value):
        return int(value)
    raise _Fallback


def _to_str(value: Any) -> str:
    if isinstance(value, str):
        return value
    raise _Fallback


def _to_path(value: Any) -> Path:
    if isinstance(value, Path):
        return value
    if isinstance(value, str) and value:
        return Path(value)
    raise _Fallback


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise _Fallback


def _choice(enum: type[Enum]) -> Convert:
    by_value = {m.value: m for m in enum}

    def convert(value: Any) -> Any:
        if isinstance(value, enum):
            return value
        if isinstance(value, str) and value in by_value:
            return by_value[value]
        raise _Fallback

    return convert


_LEAVES: dict[Any, Convert] = {
    bool: _to_bool,
    float: _to_float,
    int: _to_int,
    str: _to_str,
    Path: _to_path,
}


def converter(annotation: Any) -> Convert | None:
    """A converter for ``annotation`` (a plain type, ``X | None``, ``list[X]``), or None."""
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        inner = converter(args[0]) if len(args) == 1 else None
        if inner is None:
            return None
        optional_inner = inner

        def optional(value: Any) -> Any:
            return None if value is None else optional_inner(value)

        return optional
    if origin is list:
        (item,) = get_args(annotation) or (None,)
        each = converter(item)
        if each is None:
            return None
        item_convert = each

        def many(value: Any) -> Any:
            if not isinstance(value, list | tuple):
                raise _Fallback
            return [item_convert(v) for v in value]

        return many
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        return _choice(annotation)
    return _LEAVES.get(annotation)


def install(command: Any) -> None:
    """Give each parameter of a built click command (and its help option, made later) the
    plain converter where one applies."""
    try:
        from typer._coercion import RuntimeParam, build_runtime_param
    except ImportError:  # pragma: no cover - another typer
        return

    @dataclass(frozen=True)
    class Plain(RuntimeParam):
        convert: Convert

        def _coerce_value(self, value: Any, param: Any, ctx: Any) -> Any:
            try:
                return self.convert(value)
            except _Fallback:
                real = build_runtime_param(param.type_descriptor)
                param._runtime_param = real
                return real._coerce_value(value, param=param, ctx=ctx)

    def plain(param: Any) -> None:
        desc = getattr(param, "type_descriptor", None)
        if desc is None or getattr(param, "_runtime_param", True) is not None:
            return
        convert = converter(desc.annotation) if desc.file_annotation is None else None
        if convert is not None:
            param._runtime_param = Plain(
                parameter_info=desc.parameter_info, annotation=desc.annotation, convert=convert
            )

    for param in getattr(command, "params", ()):
        plain(param)
    make_help = getattr(command, "get_help_option", None)
    if make_help is not None:

        def get_help_option(ctx: Any) -> Any:
            option = make_help(ctx)
            if option is not None:
                plain(option)
            return option

        command.get_help_option = get_help_option
