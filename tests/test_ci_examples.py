"""The shipped CI examples: the GitHub Actions workflow and the pre-commit hook parse, and every
varshift command line in them names a real command with real options."""

from __future__ import annotations

import shlex
from pathlib import Path

import click
import pytest
import typer

from varshift.cli import app

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = typer.main.get_command(app).commands  # type: ignore[attr-defined]


def _assert_valid(argv: list[str]) -> None:
    """``varshift CMD ARGS...``: CMD exists and every ``--option`` is one of its options."""
    assert argv[0] == "varshift" and argv[1] in COMMANDS, argv
    command: click.Command = COMMANDS[argv[1]]
    known = {opt for p in command.params for opt in (*p.opts, *p.secondary_opts)}
    options = [a for a in argv[2:] if a.startswith("-")]
    assert options and all(o in known for o in options), (argv, sorted(known))


def test_the_example_workflow_runs_real_commands() -> None:
    doc = yaml.safe_load((ROOT / "docs" / "examples" / "varshift-check.yml").read_text())
    steps = doc["jobs"]["check"]["steps"]
    lines = [s["run"] for s in steps if "run" in s and s["run"].startswith("varshift")]
    assert len(lines) == 2
    for line in lines:
        _assert_valid(shlex.split(line))
    assert any("upload-artifact" in s.get("uses", "") for s in steps)


def test_the_pre_commit_hook_runs_a_real_command() -> None:
    [hook] = yaml.safe_load((ROOT / ".pre-commit-hooks.yaml").read_text())
    assert hook["id"] == "varshift-check" and hook["language"] == "python"
    _assert_valid([*shlex.split(hook["entry"]), *hook["args"]])
    # the entry point it calls is the one the package installs
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert shlex.split(hook["entry"])[0] in scripts
