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


#: Modules below the presentation layer: they never import the CLI libraries or a framework.
LOWER_LAYERS = ("core", "engine", "formats", "jobs")


def _modules(*packages: str) -> list[str]:
    import pkgutil

    import varshift

    names = []
    for pkg in packages:
        mod = importlib.import_module(f"varshift.{pkg}")
        names.append(mod.__name__)
        names += [m.name for m in pkgutil.walk_packages(mod.__path__, prefix=f"{mod.__name__}.")]
    assert names, varshift.__path__
    return sorted(names)


def test_numerics_do_not_import_the_cli_libraries() -> None:
    modules = _modules(*LOWER_LAYERS)
    assert "varshift.core.theory" in modules and "varshift.engine.run" in modules
    # the torch package itself imports torch only when one of its functions is used
    modules += ["varshift.frameworks", "varshift.frameworks.torch", "varshift.jobs.diagnose"]
    code = "import sys\n" + "".join(f"import {m}\n" for m in modules)
    # pandas too: results import it inside to_frame() only (varshift.core.frames)
    code += "heavy = ('typer', 'rich', 'click', 'torch', 'h5py', 'keras', 'matplotlib', 'pandas')\n"
    code += "bad = [m for m in heavy if m in sys.modules]\n"
    code += "assert not bad, bad\n"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("module", _modules("core", "engine", "formats", "jobs", "present"))
def test_doctests(module: str) -> None:
    mod = importlib.import_module(module)
    result = doctest.testmod(mod, optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
    assert result.failed == 0


def test_the_public_modules_have_doctests() -> None:
    for module in (
        "varshift.core.presets",
        "varshift.core.dropout",
        "varshift.core.theory",
        "varshift.engine",
        "varshift.engine.run",
        "varshift.engine.bn",
        "varshift.jobs.correct",
        "varshift.formats.registry",
    ):
        mod = importlib.import_module(module)
        assert any(t.examples for t in doctest.DocTestFinder().find(mod)), module


def test_the_readme_check_example_runs_as_written(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The README's --fail-if example, run as written on two reports the tool wrote."""
    import shlex

    line = next(
        ln for ln in (ROOT / "README.md").read_text().splitlines() if "--fail-if 'shift_ratio" in ln
    )
    argv = shlex.split(line.split("#")[0])
    assert argv[:2] == ["varshift", "check"]
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    for rate, expected in (("0.05", 0), ("0.2", 1)):  # Δ = 1 - rate against 'shift_ratio < 0.9'
        for name in ("new.json", "old.json"):
            args = ["theory", "--rate", rate, "-f", "json", "-o", name, "--force"]
            assert runner.invoke(app, args).exit_code == 0
        result = runner.invoke(app, argv[1:])
        assert result.exit_code == expected, result.stderr


def test_the_api_page_names_what_exists() -> None:
    """Every ``from X import a, b`` in docs/api.md imports, and every ``module.function`` of its
    job table resolves."""
    import re

    text = (ROOT / "docs" / "api.md").read_text()
    imports = re.findall(r"^from (varshift[\w.]*) import ([\w, ]+)", text, re.M)
    assert len(imports) >= 4
    for module, names in imports:
        mod = importlib.import_module(module)
        for name in names.split(","):
            assert hasattr(mod, name.strip()), (module, name)
    dotted = re.findall(r"`(varshift(?:\.\w+)+)\(", text)
    assert len(dotted) >= 5
    for path in dotted:
        module, _, attr = path.rpartition(".")
        assert hasattr(importlib.import_module(module), attr), path
