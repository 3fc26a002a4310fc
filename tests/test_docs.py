"""Docs stay true: every command has help with an example and appears in the README;
numerics never import the CLI libraries; doctests in the public API run."""

from __future__ import annotations

import doctest
import importlib
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from varshift.cli import app

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = sorted(typer.main.get_command(app).commands)  # type: ignore[attr-defined]


def test_there_are_commands() -> None:
    assert "theory" in COMMANDS


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_an_example(command: str) -> None:
    result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert "Examples" in result.stdout and f"varshift {command}" in result.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_is_in_the_readme(command: str) -> None:
    readme = (ROOT / "README.md").read_text()
    assert f"varshift {command}" in readme


def test_readme_gives_the_two_setup_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme
    assert "make test" in (ROOT / ".ci" / "run").read_text()


NUMERIC_MODULES = ["conventions", "noise", "theory", "report", "errors", "validate"]
OPTIONAL = ["simulate", "correct", "stats_io"]


def test_numerics_do_not_import_the_cli_libraries() -> None:
    present = [m for m in NUMERIC_MODULES + OPTIONAL if (ROOT / "varshift" / f"{m}.py").exists()]
    code = "import sys\n" + "".join(f"import varshift.{m}\n" for m in present)
    code += "heavy = ('typer', 'rich', 'click', 'torch', 'h5py', 'keras')\n"
    code += "bad = [m for m in heavy if m in sys.modules]\n"
    code += "assert not bad, bad\n"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("module", ["conventions", "noise", "theory"])
def test_doctests(module: str) -> None:
    mod = importlib.import_module(f"varshift.{module}")
    result = doctest.testmod(mod, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
