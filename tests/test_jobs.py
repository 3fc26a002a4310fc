"""The library jobs give what the commands print and write: one function per command, called
from Python, with the same numbers, metadata and file names, and the same refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from varshift.cli import app
from varshift.core.errors import OutputFileError, ValidationError
from varshift.core.presets import resolve_preset
from varshift.engine import SimConfig
from varshift.jobs.checkpoint import CorrectJob, correct_file, inspect_file
from varshift.jobs.simulate import SimulateJob, run_simulate
from varshift.jobs.theory import TheoryConfig, input_variance, run_theory
from varshift.present.report import frame_records, to_table

STATS_CSV = """layer,channel,mean,var,count
bn,0,0.5,2.5,500
bn,1,-0.25,1.75,500
head,0,0.0,4.0,500
"""

runner = CliRunner()


def cli_json(*args: str | Path) -> dict[str, object]:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.stderr
    doc: dict[str, object] = json.loads(result.stdout)
    return doc


def test_run_theory_is_what_theory_prints() -> None:
    doc = cli_json("theory", "--rate", "0.3", "--std", "2", "--framework", "keras", "-f", "json")
    config = TheoryConfig(
        rates=(0.3,), var=input_variance(None, 2.0), preset=resolve_preset("keras")
    )
    result = run_theory(config)
    assert doc["metadata"] == json.loads(json.dumps(result.metadata))
    assert doc["rows"] == frame_records(to_table(result.rows))


def test_run_theory_refuses_both_D_and_cos2() -> None:
    config = TheoryConfig(rates=(0.5,), topology="linear", width=4, cos2=0.5, D=2.0)
    with pytest.raises(ValidationError, match="give either D or cos2, not both"):
        run_theory(config)


def test_run_simulate_names_the_reports_the_command_writes(tmp_path: Path) -> None:
    args = ["--rate", "0.2", "--samples", "300", "--epochs", "2", "--seed", "3"]
    result = runner.invoke(app, ["simulate", *args, "--report-dir", str(tmp_path), "-f", "csv"])
    assert result.exit_code == 0, result.stderr
    job = SimulateJob(SimConfig(rate=0.2, samples=300, epochs=2), seed=3)
    run = run_simulate(job)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        f"{run.report_stem}.{ext}" for ext in ("csv", "json", "md")
    ]
    report = json.loads((tmp_path / f"{run.report_stem}.json").read_text())
    meta = json.loads(json.dumps(run.metadata))
    assert report["metadata"]["parameters"] == meta["parameters"]
    for key, value in meta["summary"].items():  # reports keep 10 significant digits
        want = pytest.approx(value, rel=1e-9) if isinstance(value, float) else value
        assert report["metadata"]["summary"][key] == want, key


def test_correct_file_writes_what_the_command_writes(tmp_path: Path) -> None:
    stats = tmp_path / "stats.csv"
    stats.write_text(STATS_CSV)
    by_cli, by_lib = tmp_path / "cli.csv", tmp_path / "lib.csv"
    doc = cli_json("correct", stats, "--rate", "0.5", "-o", by_cli, "--no-report", "-f", "json")
    result = correct_file(CorrectJob(stats, output=by_lib, rate=0.5))
    assert result.written == (by_lib,)
    assert by_lib.read_bytes() == by_cli.read_bytes()
    assert doc["rows"] == frame_records(to_table(result.rows))
    assert stats.read_text() == STATS_CSV


def test_correct_file_never_writes_over_its_input_from_python(tmp_path: Path) -> None:
    stats = tmp_path / "stats.csv"
    stats.write_text(STATS_CSV)
    with pytest.raises(OutputFileError, match="is the input file"):
        correct_file(CorrectJob(stats, output=stats, rate=0.5, force=True))
    link = tmp_path / "link.csv"
    link.symlink_to(stats)
    with pytest.raises(OutputFileError, match=f"is the input file {stats}"):
        correct_file(CorrectJob(stats, output=link, rate=0.5, force=True))
    assert stats.read_text() == STATS_CSV
    dry = correct_file(CorrectJob(stats, rate=0.5))
    assert dry.written == () and dry.correction.corrected == 2


def test_inspect_file_notes_a_file_that_does_not_name_its_framework(tmp_path: Path) -> None:
    stats = tmp_path / "stats.csv"
    stats.write_text(STATS_CSV)
    result = inspect_file(stats)
    assert result.preset.name == "torch" and "assuming torch" in result.notes[0]
    assert [r.layer for r in result.rows] == ["bn", "head"]
    assert inspect_file(stats, "keras").notes == ()
