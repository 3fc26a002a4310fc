"""``--help`` at 80 columns, shell completion, and the one grammar of value lists."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from varshift.cli import COMMANDS, app

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


def help_text(*command: str) -> str:
    r = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "80", "TERM": "dumb"})
    assert r.exit_code == 0, r.stderr
    return r.stdout


@pytest.mark.parametrize("command", ["", *COMMANDS])
def test_help_has_no_python_type_labels_and_fits_80_columns(command: str) -> None:
    text = help_text(*([command] if command else []))
    for label in ("<bool>", "<list[", "<float>", "<int>", "<str>"):
        assert label not in text, f"{command or 'varshift'} --help shows {label}"
    assert max(len(line) for line in text.splitlines()) <= 80


def test_simulate_help_is_grouped_with_examples_first_and_readable() -> None:
    text = help_text("simulate")
    lines = text.splitlines()
    assert len(lines) < 130  # was 166 at 80 columns
    assert text.index("Examples") < text.index("╭─ Options")
    for panel in ("Options", "BatchNorm and training", "Topology", "Output"):
        assert f"╭─ {panel} ─" in text
    # descriptions get a real column: this 39-character help is no longer cut to ~22
    assert any("Dropout rate (probability of dropping)." in line for line in lines)
    assert "reports/ in the folder you run from" in " ".join(" ".join(lines).split())


def test_the_value_grammar_is_in_the_help() -> None:
    for command in ("theory", "sweep"):
        flat = " ".join(help_text(command).replace("│", " ").split())
        assert "start:stop:step" in flat


def test_shell_completion_is_on() -> None:
    # The script `varshift --show-completion bash` prints, asked for the way the shell does.
    # (`--show-completion bash` itself ignores its value with typer 0.29 on click 8.5 and detects
    # the calling shell, so under `sh` - a make recipe - it answers "Shell sh not supported".)
    r = runner.invoke(app, [], env={"_VARSHIFT_COMPLETE": "source_bash"}, prog_name="varshift")
    assert r.exit_code == 0 and "_varshift_completion" in r.stdout
    env = {**os.environ, "PYTHONPATH": str(ROOT), "_VARSHIFT_COMPLETE": "complete_bash"}
    for words, cword, want in (
        ("varshift sim", "1", "simulate"),
        ("varshift theory --framework ", "3", "tf-keras"),
    ):
        env.update(COMP_WORDS=words, COMP_CWORD=cword)
        p = subprocess.run(
            [sys.executable, "-m", "varshift"], env=env, capture_output=True, text=True, timeout=60
        )
        assert p.returncode == 0 and want in p.stdout.split(), p.stderr


# --- one grammar of values ----------------------------------------------------------------


def run(*args: str) -> tuple[int, str, str]:
    r = runner.invoke(app, list(args))
    return r.exit_code, r.stdout, r.stderr


def test_theory_takes_lists_and_ranges_like_sweep() -> None:
    code, out, err = run("theory", "--rate", "0.1,0.5", "-f", "csv")
    assert code == 0, err
    assert [line.split(",")[1] for line in out.splitlines()[1:]] == ["0.1", "0.5"]
    code, out, _ = run("theory", "--rate", "0.1:0.3:0.1", "--rate", "0.9", "-f", "csv")
    assert [line.split(",")[1] for line in out.splitlines()[1:]] == ["0.1", "0.2", "0.3", "0.9"]


@pytest.mark.parametrize("command", ["theory", "sweep"])
def test_a_range_without_a_step_is_refused(command: str) -> None:
    code, out, err = run(command, "--rate", "0.1:0.9")
    assert code == 2 and out == ""
    assert err == (
        "varshift: error: --rate range '0.1:0.9' has no step: write start:stop:step or "
        "start:stop:xfactor (e.g. 0.1:0.9:0.1, 1:64:x2)\n"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["simulate", "--rate", "0.1", "--rate=0.5"], "--rate is given 2 times (0.1, 0.5)"),
        (["theory", "--mean", "1", "--mean", "2"], "--mean is given 2 times (1, 2)"),
        (["sweep", "--steps", "10", "--steps", "20"], "--steps is given 2 times (10, 20)"),
        (["simulate", "-r", "0.1", "-r", "0.2", "-r", "0.3"], "--rate is given 3 times"),
    ],
)
def test_a_repeated_single_value_option_is_an_error_not_the_last(
    args: list[str], message: str
) -> None:
    code, out, err = run(*args, "--no-report") if args[0] == "simulate" else run(*args)
    assert code == 2 and out == ""
    assert err.startswith(f"varshift: error: {message}") and err.endswith("it takes one value\n")
    assert len(err.splitlines()) == 1


def test_theory_d_without_width_means_what_sweep_means() -> None:
    """--D 64 alone: width ceil(D) = 64, in theory as in sweep; the shift is the same."""
    code, theory_out, err = run(
        "theory", "--topology", "linear", "--D", "64", "--rho", "0.1", "--rate", "0.5", "-f", "csv"
    )
    assert code == 0, err
    code, sweep_out, err = run("sweep", "--D", "64", "--rho", "0.1", "--rate", "0.5", "-f", "csv")
    assert code == 0, err

    def field(text: str, name: str) -> str:
        head, row = text.splitlines()[:2]
        return dict(zip(head.split(","), row.split(","), strict=True))[name]

    assert field(theory_out, "width") == field(sweep_out, "width") == "64"
    assert field(theory_out, "shift_ratio") == field(sweep_out, "shift_ratio")
    # eq. (12) by hand: v = 1, c = 0, q = 0.5: (1 + 0.1*63) / (2 + 0.1*63)
    assert float(field(theory_out, "shift_ratio")) == pytest.approx(7.3 / 8.3, rel=1e-9)
