"""`varshift theory` through the command line: exit codes, messages, formats, files."""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from varshift.cli import app

runner = CliRunner()


def run(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_csv_has_one_record_per_rate_with_the_closed_forms() -> None:
    code, out, _ = run(
        "theory", "--rate", "0.1", "--rate", "0.5", "--mean", "5", "--std", "2", "-f", "csv"
    )
    assert code == 0
    df = pd.read_csv(io.StringIO(out))
    assert list(df["rate"]) == [0.1, 0.5]
    for _, row in df.iterrows():
        q = 1 - row["rate"]
        assert row["train_var"] == pytest.approx((25 + 4) / q - 25, rel=1e-9)
        assert row["test_var"] == pytest.approx(4.0)
        assert row["shift_ratio"] == pytest.approx(4 / ((25 + 4) / q - 25), rel=1e-9)


def test_json_carries_metadata_and_rows() -> None:
    code, out, _ = run(
        "theory", "--rate", "0.2", "--framework", "keras", "--momentum", "0.9", "-f", "json"
    )
    assert code == 0
    doc = json.loads(out)
    assert doc["metadata"]["command"] == "theory"
    assert doc["metadata"]["parameters"]["framework"] == "keras"
    (row,) = doc["rows"]
    assert row["alpha"] == 0.9 and row["framework"] == "keras"
    assert row["updates_to_1pct"] == math.floor(math.log(0.01) / math.log(0.9)) + 1


def test_markdown_shows_quantities_down_and_rates_across() -> None:
    code, out, _ = run("theory", "--rate", "0.2", "--rate", "0.5", "-f", "md")
    assert code == 0
    assert "| quantity" in out and "rate 0.2" in out and "rate 0.5" in out
    assert "| shift_ratio" in out


def test_linear_topology_and_torch_cumulative_average() -> None:
    code, out, _ = run(
        "theory",
        "--rate",
        "0.5",
        "--topology",
        "linear",
        "--width",
        "16",
        "--rho",
        "0.2",
        "--D",
        "8",
        "--momentum",
        "none",
        "--steps",
        "10",
        "-f",
        "json",
    )
    assert code == 0
    (row,) = json.loads(out)["rows"]
    assert row["shift_ratio"] == pytest.approx((1 + 0.2 * 7) / (2 + 0.2 * 7), rel=1e-9)
    assert row["alpha"] is None and row["residual_weight"] == 0


def test_output_file_is_written_and_not_overwritten_without_force(tmp_path: Path) -> None:
    target = tmp_path / "t.csv"
    assert run("theory", "--rate", "0.2", "-f", "csv", "-o", str(target))[0] == 0
    first = target.read_text()
    code, _, err = run("theory", "--rate", "0.3", "-f", "csv", "-o", str(target))
    assert code == 2 and "already exists; pass --force" in err
    assert target.read_text() == first
    assert run("theory", "--rate", "0.3", "-f", "csv", "-o", str(target), "--force")[0] == 0
    assert target.read_text() != first


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--rate", "1.2"], "rate must be in [0, 1); got 1.2"),
        (["--rate", "-0.1"], "rate must be in [0, 1); got -0.1"),
        (["--var", "-1"], "var must be >= 0; got -1"),
        (["--mean", "nan"], "mean must be a finite number; got nan"),
        (["--mean", "inf"], "mean must be a finite number; got inf"),
        (["--std", "-2"], "std must be >= 0; got -2"),
        (["--var", "1", "--std", "1"], "give either --var or --std, not both"),
        (["--topology", "linear", "--width", "0"], "width must be an integer >= 1; got 0"),
        (
            ["--topology", "linear", "--width", "4", "--rho", "-0.5"],
            "rho must be in [-0.333333, 1]",
        ),
        (["--topology", "linear", "--width", "4", "--rho", "1.1"], "rho must be in [-0.333333, 1]"),
        (["--dropout", "uout", "--beta", "-0.1"], "beta must be >= 0; got -0.1"),
        (["--batch-size", "1"], "batch_size must be >= 2 for torch"),
        (["--momentum", "fast"], "momentum must be a number in [0, 1] or 'none'; got 'fast'"),
        (["--framework", "keras", "--momentum", "none"], "momentum must be a number for keras"),
        (["--topology", "star"], "topology must be one of direct, linear; got 'star'"),
    ],
)
def test_bad_input_is_one_line_exit_2(args: list[str], message: str) -> None:
    code, out, err = run("theory", *args)
    assert code == 2, (out, err)
    assert err.startswith("varshift: error: ") and message in err
    assert err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize(
    "args", [["--framework", "caffe"], ["--dropout", "zoneout"], ["--format", "xml"]]
)
def test_unknown_choices_are_usage_errors(args: list[str]) -> None:
    code, _, err = run("theory", *args)
    assert code == 2 and "Invalid value" in err and "Traceback" not in err


def test_the_installed_entry_point_and_python_m_agree() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "varshift", "theory", "--rate", "0.2", "-f", "csv"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out == run("theory", "--rate", "0.2", "-f", "csv")[1]
    bad = subprocess.run(
        [sys.executable, "-m", "varshift", "theory", "--rate", "2"], capture_output=True, text=True
    )
    assert bad.returncode == 2 and bad.stderr == "varshift: error: rate must be in [0, 1); got 2\n"


def test_terminal_table_renders_in_a_fixed_width_console() -> None:
    from rich.console import Console

    from varshift.core.theory import TheoryConfig, theory_table
    from varshift.present.render import frame_table
    from varshift.present.theory import human_layout

    console = Console(width=100, record=True, file=io.StringIO())
    console.print(frame_table(human_layout(theory_table(TheoryConfig(rates=(0.2,))))))
    text = console.export_text()
    assert "E[m²]/E[m]² of the noise" in text  # brackets are not eaten as markup
    assert "shift_ratio" in text and "0.8" in text


@pytest.mark.parametrize(
    ("args", "kind"),
    [
        (["--framework", "keras", "--mean", "5", "--std", "2"], "bernoulli"),
        (["--framework", "torch", "--dropout", "gaussian", "--mean", "1"], "gaussian"),
        (["--framework", "flax", "--dropout", "alpha", "--mean", "-1", "--var", "2"], "alpha"),
        (["--framework", "tf-keras", "--dropout", "uout", "--beta", "0.5"], "uout"),
    ],
)
def test_printed_numbers_agree_with_monte_carlo(args: list[str], kind: str) -> None:
    """An independent simulation of `reps` training runs: fresh batches, EMA from 1."""
    import numpy as np

    n, steps, reps, rate = 16, 150, 3000, 0.3
    code, out, _ = run(
        "theory",
        "--rate",
        str(rate),
        "--batch-size",
        str(n),
        "--steps",
        str(steps),
        "-f",
        "json",
        *args,
    )
    assert code == 0
    (row,) = json.loads(out)["rows"]
    rng = np.random.default_rng(99)
    c, v = row["mean"], row["var"]
    q = 1 - rate
    alpha, ddof = row["alpha"], 0 if row["framework"] in ("keras", "flax") else 1
    a_ = 1 / math.sqrt(q * (1 + rate * 1.7580993408473766**2))

    def drop(x: np.ndarray) -> np.ndarray:  # the frameworks' formulas, written out again
        if kind == "bernoulli":
            return x * (rng.random(x.shape) < q) / q
        if kind == "gaussian":
            return x * rng.normal(1.0, math.sqrt(rate / q), x.shape)
        if kind == "uout":
            return x * (1 + rng.uniform(-0.5, 0.5, x.shape))
        kept = rng.random(x.shape) < q
        return a_ * np.where(kept, x, -1.7580993408473766) + a_ * 1.7580993408473766 * rate

    running = np.ones(reps)
    batch_vars = []
    for _ in range(steps):
        s = drop(rng.normal(c, math.sqrt(v), (reps, n))).var(axis=1, ddof=ddof)
        batch_vars.append(s[:100])
        running = alpha * running + (1 - alpha) * s
    one = np.concatenate(batch_vars)
    assert abs(one.mean() - row["stored_batch_var"]) < 4.5 * row["stored_batch_var_sd"] / math.sqrt(
        one.size
    )
    kurt = float(np.mean((one - one.mean()) ** 4) / one.var() ** 2)
    assert abs(one.std() - row["stored_batch_var_sd"]) < 4.5 * row[
        "stored_batch_var_sd"
    ] * math.sqrt((kurt - 1) / (4 * one.size))
    assert abs(running.mean() - row["running_var"]) < 4.5 * row["running_var_sd"] / math.sqrt(reps)
    kurt = float(np.mean((running - running.mean()) ** 4) / running.var() ** 2)
    assert abs(running.std() - row["running_var_sd"]) < 4.5 * row["running_var_sd"] * math.sqrt(
        (kurt - 1) / (4 * reps)
    )
    # The population train/test variances, by a large single sample.
    x = rng.normal(c, math.sqrt(v), 2_000_000)
    y = drop(x)
    yc = y - y.mean()
    se = math.sqrt((np.mean(yc**4) - np.mean(yc**2) ** 2) / y.size)
    assert abs(y.var() - row["train_var"]) < 4.5 * se
    assert row["shift_ratio"] == pytest.approx(row["test_var"] / row["train_var"])


def test_library_errors_name_the_keyword_and_the_cli_the_flag(tmp_path: Path) -> None:
    from varshift.core.errors import OutputFileError
    from varshift.core.files import refuse_existing

    out = tmp_path / "t.csv"
    out.write_text("x\n")
    with pytest.raises(OutputFileError, match=r"already exists; pass force=True to overwrite it$"):
        refuse_existing(out, force=False)
    code, _, err = run("theory", "--rate", "0.2", "-o", str(out))
    assert code == 2 and err.strip().endswith("already exists; pass --force to overwrite it")
