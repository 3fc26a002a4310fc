"""`varshift simulate` through the command line: exit codes, messages, formats, report files."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from varshift.cli import app

runner = CliRunner()

SMALL = ["--samples", "400", "--features", "3", "--epochs", "2", "--no-report"]


def run(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, ["simulate", *args])
    return result.exit_code, result.stdout, result.stderr


def test_default_run_prints_the_comparison_table() -> None:
    code, out, err = run("--rate", "0.2", "--no-report")
    assert code == 0, err
    # Not a terminal: the same layout as Markdown, one row per feature and the mean.
    assert "| feature" in out and "| mean" in out
    assert "run var" in out and "Δ sim" in out and "3130 steps = 10 epochs × 313 batches" in out
    assert err == ""


def test_csv_has_every_column_and_the_closed_forms() -> None:
    code, out, _ = run("--rate", "0.5", "--mean", "2", "--std", "3", "-f", "csv", *SMALL)
    assert code == 0
    df = pd.read_csv(io.StringIO(out), dtype={"feature": str})
    assert list(df["feature"]) == ["0", "1", "2", "mean"]
    for _, row in df.iloc[:3].iterrows():
        c, v, q = row["input_mean"], row["input_var"], 0.5
        assert row["train_var_theory"] == pytest.approx((c * c + v) / q - c * c, rel=1e-8)
        assert row["shift_ratio_measured"] == pytest.approx(
            row["test_var"] / row["running_var"], rel=1e-8
        )
        z = (row["running_var"] - row["running_var_expected"]) / row["running_var_sd"]
        assert row["z_var"] == pytest.approx(z, rel=1e-6)
    assert df.loc[3, "running_var"] == pytest.approx(df["running_var"][:3].mean(), rel=1e-8)


def test_json_carries_parameters_seed_and_summary() -> None:
    code, out, _ = run(
        "--framework", "keras", "--momentum", "0.9", "--seed", "4", "-f", "json", *SMALL
    )
    assert code == 0
    doc = json.loads(out)
    meta = doc["metadata"]
    assert meta["command"] == "simulate" and meta["parameters"]["seed"] == 4
    assert meta["parameters"]["framework"] == "keras" and meta["parameters"]["alpha"] == 0.9
    assert meta["parameters"]["stored_variance"] == "biased"
    assert meta["summary"]["steps"] == 2 * 13 and meta["summary"]["elements_per_batch"] == 32
    assert len(doc["rows"]) == 4


def test_reports_are_written_and_byte_identical_for_the_same_seed(tmp_path: Path) -> None:
    args = ["--samples", "300", "--features", "2", "--epochs", "2", "--seed", "3"]
    code, _, err = run(*args, "--report-dir", str(tmp_path / "a"))
    assert code == 0 and "reports written" in err
    code, _, _ = run(*args, "--report-dir", str(tmp_path / "b"))
    files_a = sorted((tmp_path / "a").iterdir())
    files_b = sorted((tmp_path / "b").iterdir())
    assert [p.suffix for p in files_a] == [".csv", ".json", ".md"]
    assert [p.name for p in files_a] == [p.name for p in files_b]
    for fa, fb in zip(files_a, files_b, strict=True):
        assert fa.read_bytes() == fb.read_bytes()
    assert files_a[0].name.startswith("simulate_direct_bernoulli_rate0.2_torch_seed3_")
    doc = json.loads(files_a[1].read_text())
    assert doc["metadata"]["parameters"]["seed"] == 3
    assert str(tmp_path) not in files_a[0].read_text()  # no absolute paths in the data
    # Rerunning the same command leaves identical files alone: no error, no --force needed.
    code, _, err = run(*args, "--report-dir", str(tmp_path / "a"))
    assert code == 0 and "reports unchanged" in err
    # Another seed is another report.
    code, _, _ = run(*args[:-1], "4", "--report-dir", str(tmp_path / "a"))
    assert len(list((tmp_path / "a").iterdir())) == 6


def test_a_report_with_different_content_needs_force(tmp_path: Path) -> None:
    args = ["--samples", "300", "--features", "2", "--epochs", "1", "--report-dir", str(tmp_path)]
    assert run(*args)[0] == 0
    csv = next(tmp_path.glob("*.csv"))
    original = csv.read_bytes()
    csv.write_text("edited\n")
    code, _, err = run(*args)
    assert code == 2
    assert (
        err.strip()
        == f"varshift: error: {csv}: exists with different content; pass --force to overwrite it"
    )
    assert csv.read_text() == "edited\n"
    code, _, _ = run(*args, "--force")
    assert code == 0 and csv.read_bytes() == original


def test_output_file_and_quiet(tmp_path: Path) -> None:
    target = tmp_path / "out.csv"
    code, out, err = run("-f", "csv", "-o", str(target), "--quiet", *SMALL)
    assert code == 0 and out == "" and err == ""
    assert pd.read_csv(target).shape[0] == 4
    before = target.read_bytes()
    code, _, err = run("-f", "csv", "-o", str(target), *SMALL)  # a rerun: identical bytes
    assert code == 0 and f"unchanged {target}" in err and target.read_bytes() == before
    code, _, err = run("-f", "csv", "-o", str(target), *SMALL, "--seed", "1")
    assert code == 2 and "already exists; pass --force" in err and target.read_bytes() == before


def test_fit_reports_predictions_next_to_gamma_star() -> None:
    # The classic Keras demonstration, shortened to 20 epochs.
    code, out, err = run(
        "--rate", "0.2", "--mean", "5", "--std", "2", "--framework", "keras",
        "--samples", "10000", "--features", "5", "--epochs", "20", "--fit", "-f", "csv",
        "--no-report",
    )  # fmt: skip
    assert code == 0, err
    df = pd.read_csv(io.StringIO(out), dtype={"feature": str}).set_index("feature")
    for _, row in df.drop(index="mean").iterrows():
        c, v, eps = row["input_mean"], row["input_var"], 1e-3
        train = (c * c + v) / 0.8 - c * c
        assert row["gamma_star"] == pytest.approx(v / math.sqrt(train + eps), rel=1e-8)
        assert row["gamma_star_clean"] == pytest.approx(v / math.sqrt(v + eps), rel=1e-8)
        assert row["probe"] == 1.0
        # Inference after training with dropout is far from the clean model's, and the
        # corrected statistics move it part of the way back (gamma stays shrunk).
        assert abs(row["pred_clean"] - 1.0) < abs(row["pred_corrected"] - 1.0)
        assert abs(row["pred_corrected"] - 1.0) < abs(row["pred_dropout"] - 1.0)


def test_fit_table_on_stdout() -> None:
    code, out, _ = run("--fit", "--probe", "0.5", *SMALL)
    assert code == 0
    assert "--fit: identity target, Adam lr 0.001; test-time output for input 0.5" in out
    assert "γ*" in out


def test_input_file_and_topologies(tmp_path: Path) -> None:
    data = np.random.default_rng(0).normal(1.0, 2.0, size=(256, 4))
    np.save(tmp_path / "x.npy", data)
    code, out, err = run(
        "--input", str(tmp_path / "x.npy"), "-f", "json", "--epochs", "1", "--no-report"
    )
    assert code == 0, err
    doc = json.loads(out)
    assert doc["metadata"]["parameters"]["input"] == str(tmp_path / "x.npy")
    assert len(doc["metadata"]["parameters"]["input_sha256"]) == 64
    assert [r["input_var"] for r in doc["rows"][:4]] == pytest.approx(list(data.var(axis=0)))
    for extra in (
        ["--topology", "linear", "--width", "8", "--rho", "0.2", "--cos2", "0.5"],
        ["--topology", "conv", "--spatial", "2x3", "--channelwise"],
    ):
        code, out, err = run(*extra, *SMALL)
        assert code == 0, err


BAD = [
    (["--batch-size", "20000"], "batch_size must be <= samples (10000); got 20000"),
    (["--epochs", "0"], "epochs must be an integer >= 1; got 0"),
    (["--rate", "1"], "rate must be in [0, 1); got 1"),
    (
        ["--topology", "linear", "--width", "4", "--rho", "-0.5"],
        "rho must be in [-0.333333, 1] for width 4 (the covariance must be positive "
        "semi-definite); got -0.5",
    ),
    (["--width", "8"], "--width applies to --topology linear only; got direct"),
    (["--rho", "0"], "--rho applies to --topology linear only; got direct"),
    (["--channelwise"], "--channelwise applies to --topology conv only; got direct"),
    (["--lr", "0.1"], "--lr applies with --fit only"),
    (["--epochs", "2", "--steps", "5"], "give either --epochs or --steps, not both"),
    (["--topology", "conv", "--spatial", "4by4"], "spatial must be HxW with positive integers"),
    (["--momentum", "fast"], "momentum must be a number in [0, 1] or 'none'; got 'fast'"),
    (["--framework", "keras", "--momentum", "none"], "momentum must be a number for keras"),
    (["--samples", "97"], "the last batch of each epoch would hold 1 row"),
    (["--topology", "linear", "--fit"], "fit needs the direct topology; got linear"),
]


@pytest.mark.parametrize(("args", "message"), BAD)
def test_bad_options_exit_2_with_one_line(args: list[str], message: str) -> None:
    code, out, err = run(*args, "--no-report")
    assert code == 2
    assert out == ""
    assert err.startswith("varshift: error: ") and message in err
    assert err.count("\n") == 1  # one line, no traceback


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("missing.npy", None, "missing.npy: no such file"),
        ("empty.csv", "", "empty.csv: is empty"),
        ("words.csv", "a,b\n1,x\n", "words.csv: line 2 is not comma-separated numbers"),
        ("nan.csv", "1,2\n3,nan\n", "nan.csv: holds 1 NaN or infinite value(s)"),
        ("cube.npy", np.ones((4, 2, 2)), "data must be 2-D (rows, features) for the direct"),
    ],
)
def test_bad_input_files_exit_2(tmp_path: Path, name: str, content: object, message: str) -> None:
    path = tmp_path / name
    if isinstance(content, np.ndarray):
        np.save(path, content)
    elif isinstance(content, str):
        path.write_text(content)
    code, _, err = run("--input", str(path), "--no-report")
    assert code == 2 and message in err and err.count("\n") == 1


def test_input_replaces_the_synthetic_options(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.ones((64, 2)))
    code, _, err = run("--input", str(tmp_path / "x.npy"), "--mean", "0", "--no-report")
    assert code == 2 and "--mean describes synthetic inputs; --input replaces them" in err


def test_help_has_examples() -> None:
    result = runner.invoke(app, ["simulate", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert "Examples" in result.stdout and "varshift simulate --rate 0.2" in result.stdout


def test_report_names_change_with_parameters_and_version() -> None:
    from varshift.jobs.simulate import report_stem

    params = {
        "topology": "direct",
        "dropout": "bernoulli",
        "rate": 0.2,
        "framework": "torch",
        "seed": 0,
    }
    stem = report_stem(params, "1.0")
    assert stem.startswith("simulate_direct_bernoulli_rate0.2_torch_seed0_")
    assert report_stem(dict(params), "1.0") == stem
    assert report_stem(params, "1.1") != stem
    assert report_stem({**params, "rate": 0.3}, "1.0") != stem


def test_tf_keras_outside_conv_gets_a_note() -> None:
    code, _, err = run("--framework", "tf-keras", *SMALL)
    assert code == 0 and "note: tf-keras stores the unbiased variance only on its fused" in err
    code, _, err = run("--framework", "tf-keras", "--topology", "conv", *SMALL)
    assert code == 0 and err == ""
