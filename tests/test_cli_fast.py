"""Option values converted without pydantic equal what Typer's pydantic conversion gives, and
anything not in a plain form is left to Typer (same values, same error messages)."""

from __future__ import annotations

import subprocess
import sys
from enum import StrEnum
from pathlib import Path
from typing import Any

import pytest

from varshift.cli._fast import _Fallback, converter

TypeAdapter = pytest.importorskip("pydantic").TypeAdapter


class Kind(StrEnum):
    a = "a"
    tf_keras = "tf-keras"


CASES: list[tuple[Any, Any]] = [
    (float, "0.2"),
    (float, "-1e-3"),
    (float, ".5"),
    (float, "5."),
    (float, 3),
    (int, "32"),
    (int, "-7"),
    (int, "007"),
    (Path, "a/b.csv"),
    (Path, Path("x")),
    (Kind, "tf-keras"),
    (Kind, Kind.a),
    (list[float], ("0.1", "2")),
    (float | None, None),
    (bool, True),
]


@pytest.mark.parametrize(("annotation", "value"), CASES)
def test_plain_values_convert_as_pydantic_does(annotation: Any, value: Any) -> None:
    convert = converter(annotation)
    assert convert is not None
    got = convert(value)
    want = TypeAdapter(annotation).validate_python(value)
    assert got == want and type(got) is type(want)
    if isinstance(got, list):
        assert [type(v) for v in got] == [type(v) for v in want]


@pytest.mark.parametrize(
    ("annotation", "value"),
    [(int, "3.0"), (float, "abc"), (float, "1_000"), (Kind, "A"), (Path, ""), (int, True)],
)
def test_anything_else_is_left_to_typer(annotation: Any, value: Any) -> None:
    convert = converter(annotation)
    assert convert is not None
    with pytest.raises(_Fallback):
        convert(value)


def test_a_plain_run_imports_no_pydantic_pandas_or_rich() -> None:
    code = (
        "import sys\nfrom varshift.cli import main\n"
        "sys.argv = ['varshift', 'theory', '-f', 'csv']\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "bad = [m for m in ('pydantic', 'pandas', 'rich', 'scipy', 'matplotlib') "
        "if m in sys.modules]\nassert not bad, bad\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("dropout,rate,keep")
