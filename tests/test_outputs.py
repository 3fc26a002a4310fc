"""No command writes over one of its inputs: an output that is an input (the same path, a
symbolic or a hard link to it) is refused before anything is written, with one line naming both
paths (exit 2); two outputs of one command may not be the same file."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from varshift.cli import app
from varshift.core.errors import OutputFileError
from varshift.core.files import OutputPlan, atomic_write, transaction

STATS_CSV = """layer,channel,mean,var,count
bn,0,0.5,2.5,500
bn,1,-0.25,1.75,500
"""

runner = CliRunner()


def run(*args: str | Path) -> tuple[int, str, str]:
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def refused(code: int, err: str, *parts: str) -> None:
    assert code == 2, err
    assert err.startswith("varshift: error: ") and err.count("\n") == 1, err
    assert "never modifies its input" in err or "choose different outputs" in err, err
    for part in parts:
        assert part in err, (part, err)


@pytest.fixture
def stats(tmp_path: Path) -> Path:
    path = tmp_path / "stats.csv"
    path.write_text(STATS_CSV)
    return path


def _links(tmp_path: Path, target: Path) -> list[Path]:
    soft = tmp_path / "soft.csv"
    soft.symlink_to(target)
    hard = tmp_path / "hard.csv"
    os.link(target, hard)
    return [soft, hard]


def test_correct_refuses_a_link_to_its_input(tmp_path: Path, stats: Path) -> None:
    before = stats.read_bytes()
    for link in _links(tmp_path, stats):
        code, out, err = run("correct", stats, "--rate", "0.5", "-o", link, "--force")
        refused(code, err, str(link), str(stats))
        assert out == ""
        assert stats.read_bytes() == before
        assert not Path(f"{link}.report.json").exists()


def test_inspect_refuses_its_input_as_output(tmp_path: Path, stats: Path) -> None:
    before = stats.read_bytes()
    for out_path in [stats, *_links(tmp_path, stats)]:
        code, out, err = run("inspect", stats, "-o", out_path, "--force", "-f", "csv")
        refused(code, err, "--output", str(out_path))
        assert out == "" and stats.read_bytes() == before


def test_simulate_refuses_its_input_as_output(tmp_path: Path) -> None:
    data = tmp_path / "x.csv"
    np.savetxt(data, np.arange(40.0).reshape(20, 2), delimiter=",")
    before = data.read_bytes()
    for option in ("-o", "--html"):
        code, out, err = run(
            "simulate", "--input", data, option, data, "--force", "--no-report", "-f", "csv"
        )
        refused(code, err, str(data))
        assert out == "" and data.read_bytes() == before


def test_check_refuses_to_write_its_markdown_over_the_baseline(tmp_path: Path) -> None:
    base = tmp_path / "base.csv"
    base.write_text(STATS_CSV)
    before = base.read_bytes()
    code, _, err = run("check", base, "--baseline", base, "--markdown", base, "--force")
    refused(code, err, "--markdown", str(base))
    assert base.read_bytes() == before


def test_two_outputs_of_one_command_may_not_be_the_same_file(tmp_path: Path, stats: Path) -> None:
    out = tmp_path / "fixed.json"
    code, _, err = run("correct", stats, "--rate", "0.5", "-o", out, "--report", out)
    refused(code, err, str(out))
    assert not out.exists()


def test_the_plan_names_the_input_behind_a_link(tmp_path: Path, stats: Path) -> None:
    soft, hard = _links(tmp_path, stats)
    plan = OutputPlan([stats], force=True)
    for link in (soft, hard):
        with pytest.raises(OutputFileError, match=f"{link}: is the input file {stats};"):
            plan.add(link)
    assert plan.add(tmp_path / "new.csv") == tmp_path / "new.csv"
    # an existing output is compared when written: different bytes are refused, nothing written
    target = tmp_path / "old.csv"
    target.write_text("old")
    OutputPlan([]).add(target)
    with pytest.raises(OutputFileError, match="already exists; pass force=True to overwrite it"):
        with transaction():
            atomic_write(target, "new", force=True)
    assert target.read_text() == "old"


def test_the_page_shows_the_figure_as_written_to_plot(tmp_path: Path, stats: Path) -> None:
    """The page's inline SVG is drawn after the --plot files, so it is the same drawing (a
    figure's first drawing settles its layout and the ids of its clip paths)."""
    pytest.importorskip("matplotlib")
    page, figs = tmp_path / "page.html", tmp_path / "figs"
    code, _, err = run(
        "correct", stats, "--rate", "0.5", "--dry-run", "--plot", figs, "--html", page
    )
    assert code == 0, err
    html = page.read_text()
    inline = html[html.index("<svg") : html.index("</svg>") + len("</svg>")]
    written = (figs / "correct_before_after.svg").read_text()
    assert "clipPath id=" in inline
    assert inline == written[written.index("<svg") : written.index("</svg>") + len("</svg>")]
