"""All outputs of one command or none (issue 15), and identical reruns (issue 14).

A command's outputs are staged as finished temporary files and committed together
(:class:`varshift.core.files.Transaction`). These tests break the second output in three ways:
an injected ``OSError`` on its commit (monkeypatched), a real failure of the real rename (a
folder put at the target path between staging and commit), and a real failure while staging
(the output's folder replaced by a file, or made read-only, between the plan and the write).
Afterwards no output exists, or, with ``--force``, every old file holds its old bytes; no
temporary or backup file is left.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from varshift.cli import app
from varshift.core import files
from varshift.core.errors import OutputFileError
from varshift.core.files import OutputPlan, atomic_write, transaction

STATS_CSV = """layer,channel,mean,var,count
bn,0,0.5,2.5,500
bn,1,-0.25,1.75,500
"""
ROWS = [
    {"scenario": "s", "metric": "m1", "value": 0.36, "sd": 0.01, "better": "higher"},
    {"scenario": "s", "metric": "m2", "value": 0.02, "sd": 0.001, "better": "lower"},
]

runner = CliRunner()


def run(*args: object) -> tuple[int, str, str]:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.stdout, result.stderr


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if files.TMP_MARK in p.name)


def fail_on_commit(monkeypatch: pytest.MonkeyPatch, n: int, action: Callable[[Any], None]) -> None:
    """Run ``action(item)`` just before the ``n``-th commit of a staged output (1-based)."""
    real = files._commit_one
    calls = {"n": 0}

    def commit(item: Any) -> None:
        calls["n"] += 1
        if calls["n"] == n:
            action(item)
        real(item)

    monkeypatch.setattr(files, "_commit_one", commit)


def inject_oserror(item: Any) -> None:
    raise OSError(5, "Input/output error (injected)")


@pytest.fixture
def stats(tmp_path: Path) -> Path:
    path = tmp_path / "stats.csv"
    path.write_text(STATS_CSV)
    return path


@pytest.fixture
def report(tmp_path: Path) -> Path:
    path = tmp_path / "cur.json"
    path.write_text(json.dumps({"metadata": {"suite": "t"}, "rows": ROWS}))
    return path


# --- the library: Transaction ------------------------------------------------------------


def test_a_failed_second_commit_rolls_back_the_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fail_on_commit(monkeypatch, 2, inject_oserror)
    a, b = tmp_path / "a.txt", tmp_path / "sub" / "b.txt"
    with pytest.raises(OutputFileError, match=r"b\.txt: cannot write it \(Input/output error"):
        with transaction():
            atomic_write(a, "A")
            atomic_write(b, "B")
            assert not a.exists()  # staged, not committed, inside the block
    assert not a.exists() and not b.exists() and not (tmp_path / "sub").exists()
    assert leftovers(tmp_path) == []


def test_a_failed_forced_commit_restores_the_old_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b, c = (tmp_path / f"{n}.txt" for n in "abc")
    for path in (a, b, c):
        path.write_text(f"old {path.name}")
    link = tmp_path / "a.link"
    os.link(a, link)  # the old inode itself comes back, not a copy
    fail_on_commit(monkeypatch, 3, inject_oserror)
    with pytest.raises(OutputFileError, match=r"c\.txt: cannot write it"):
        with transaction():
            for path in (a, b, c):
                atomic_write(path, f"new {path.name}", force=True)
    assert [p.read_text() for p in (a, b, c)] == ["old a.txt", "old b.txt", "old c.txt"]
    assert os.path.samefile(a, link)
    assert leftovers(tmp_path) == []


def test_an_error_inside_the_block_commits_nothing(tmp_path: Path) -> None:
    a = tmp_path / "a.txt"
    with pytest.raises(RuntimeError, match="late"):
        with transaction():
            atomic_write(a, "A")
            raise RuntimeError("late")
    assert not a.exists() and leftovers(tmp_path) == []


def test_identical_outputs_are_left_in_place_and_different_ones_refused(tmp_path: Path) -> None:
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("A")
    b.write_text("B")
    stamp = a.stat().st_mtime_ns
    plan = OutputPlan()
    with transaction() as tx:
        for path, text in ((plan.add(a), "A"), (tmp_path / "new.txt", "N")):
            atomic_write(path, text, force=True)
    assert tx.unchanged == [a] and tx.written == [tmp_path / "new.txt"]
    assert a.stat().st_mtime_ns == stamp and tx.verb(a) == "unchanged"
    plan = OutputPlan()
    with pytest.raises(OutputFileError, match=r"b\.txt: already exists; pass force=True"):
        with transaction():
            atomic_write(plan.add(tmp_path / "c.txt"), "C", force=True)
            atomic_write(plan.add(b), "other", force=True)
    assert b.read_text() == "B" and not (tmp_path / "c.txt").exists()


# --- correct ---------------------------------------------------------------------------------


def test_correct_writes_nothing_when_the_report_commit_fails(
    tmp_path: Path, stats: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "fixed.csv"
    fail_on_commit(monkeypatch, 2, inject_oserror)
    code, _, err = run("correct", stats, "--rate", "0.5", "-o", out)
    assert code == 2 and err.count("\n") == 1 and "fixed.csv.report.json: cannot write" in err
    assert not out.exists() and not Path(f"{out}.report.json").exists()
    assert leftovers(tmp_path) == [] and stats.read_text() == STATS_CSV


def test_correct_force_keeps_the_old_files_when_the_report_commit_fails(
    tmp_path: Path, stats: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out, rep = tmp_path / "fixed.csv", tmp_path / "fixed.csv.report.json"
    out.write_text("old checkpoint")
    rep.write_text("old report")
    fail_on_commit(monkeypatch, 2, inject_oserror)
    code, _, err = run("correct", stats, "--rate", "0.5", "-o", out, "--force")
    assert code == 2 and "report.json: cannot write" in err
    assert out.read_text() == "old checkpoint" and rep.read_text() == "old report"
    assert leftovers(tmp_path) == []


def test_correct_real_failure_of_the_second_rename(
    tmp_path: Path, stats: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A folder appears at the report's path between staging and commit: the real hard link
    fails, and the corrected file already committed is removed again."""
    out, rep = tmp_path / "fixed.csv", tmp_path / "fixed.csv.report.json"
    fail_on_commit(monkeypatch, 2, lambda item: item.path.mkdir())
    code, _, err = run("correct", stats, "--rate", "0.5", "-o", out)
    assert code == 2 and err.count("\n") == 1 and str(rep) in err
    assert not out.exists() and rep.is_dir() and leftovers(tmp_path) == []


def test_correct_real_failure_while_staging_the_second_output(
    tmp_path: Path, stats: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The report's folder becomes a file after the plan checked it: nothing is committed."""
    from varshift.cli import cmd_correct

    out, folder = tmp_path / "fixed.csv", tmp_path / "reports"
    folder.mkdir()
    real = cmd_correct.correct_file

    def correct_then_break(*args: Any, **kwargs: Any) -> Any:
        result = real(*args, **kwargs)  # the corrected file is staged now
        folder.rmdir()
        folder.write_text("not a folder")
        return result

    monkeypatch.setattr(cmd_correct, "correct_file", correct_then_break)
    code, _, err = run("correct", stats, "--rate", "0.5", "-o", out, "--report", folder / "r.json")
    assert code == 2 and err.count("\n") == 1 and "cannot write here" in err, err
    assert not out.exists() and leftovers(tmp_path) == []


# --- check -----------------------------------------------------------------------------------


def test_check_writes_neither_report_when_the_second_commit_fails(
    tmp_path: Path, report: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    junit, md = tmp_path / "j.xml", tmp_path / "s.md"
    fail_on_commit(monkeypatch, 2, inject_oserror)
    code, _, err = run("check", report, "--baseline", report, "--junit", junit, "--markdown", md)
    assert code == 2 and err.count("\n") == 1 and "s.md: cannot write it" in err
    assert not junit.exists() and not md.exists() and leftovers(tmp_path) == []
    junit.write_text("old junit")
    md.write_text("old md")
    fail_on_commit(monkeypatch, 2, inject_oserror)  # a fresh count
    code, _, err = run(
        "check", report, "--baseline", report, "--junit", junit, "--markdown", md, "--force"
    )
    assert code == 2 and junit.read_text() == "old junit" and md.read_text() == "old md"
    assert leftovers(tmp_path) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_check_read_only_folder_after_the_plan(
    tmp_path: Path, report: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from varshift.cli import cmd_check

    junit, folder = tmp_path / "j.xml", tmp_path / "md"
    folder.mkdir()
    real = cmd_check.check_reports

    def check_then_lock(*args: Any, **kwargs: Any) -> Any:
        folder.chmod(0o500)
        return real(*args, **kwargs)

    monkeypatch.setattr(cmd_check, "check_reports", check_then_lock)
    try:
        code, _, err = run(
            "check", report, "--baseline", report, "--junit", junit, "--markdown", folder / "s.md"
        )
    finally:
        folder.chmod(0o700)
    assert code == 2 and err.count("\n") == 1 and "cannot write" in err
    assert not junit.exists() and list(folder.iterdir()) == []


def test_check_folder_replaced_by_a_file_after_the_plan(
    tmp_path: Path, report: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from varshift.cli import cmd_check

    junit, folder = tmp_path / "j.xml", tmp_path / "md"
    folder.mkdir()
    real = cmd_check.check_reports

    def check_then_break(*args: Any, **kwargs: Any) -> Any:
        folder.rmdir()
        folder.write_text("a file now")
        return real(*args, **kwargs)

    monkeypatch.setattr(cmd_check, "check_reports", check_then_break)
    code, _, err = run(
        "check", report, "--baseline", report, "--junit", junit, "--markdown", folder / "s.md"
    )
    assert code == 2 and err.count("\n") == 1 and "cannot write here" in err, err
    assert not junit.exists() and leftovers(tmp_path) == []


# --- identical reruns ------------------------------------------------------------------------


def test_correct_rerun_is_unchanged(tmp_path: Path, stats: Path) -> None:
    out = tmp_path / "fixed.csv"
    args = ("correct", stats, "--rate", "0.5", "-o", out)
    assert run(*args)[0] == 0
    before = {p: p.read_bytes() for p in (out, Path(f"{out}.report.json"))}
    stamps = {p: p.stat().st_mtime_ns for p in before}
    code, _, err = run(*args)
    assert code == 0 and f"unchanged {out} and {out}.report.json" in err, err
    assert {p: p.read_bytes() for p in before} == before
    assert {p: p.stat().st_mtime_ns for p in before} == stamps  # not even rewritten
    code, _, err = run("correct", stats, "--rate", "0.4", "-o", out)
    assert code == 2 and f"{out}: already exists; pass --force" in err
    assert {p: p.read_bytes() for p in before} == before


def test_simulate_html_rerun_is_unchanged(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    page = tmp_path / "sim.html"
    args = ["simulate", "--rate", "0.5", "--samples", "300", "--features", "2", "--steps", "60"]
    args += ["--no-report", "--html", str(page), "-f", "csv"]
    code, _, err = run(*args)
    assert code == 0 and f"wrote {page}" in err, err
    before = page.read_bytes()
    code, _, err = run(*args)
    assert code == 0 and f"unchanged {page}" in err and page.read_bytes() == before, err
    code, _, err = run(*args, "--seed", "3")
    assert code == 2 and f"--html {page}: already exists; pass --force" in err
    assert page.read_bytes() == before


def test_without_hard_links_forced_replacements_are_still_restored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a file system without hard links the old file is moved aside, not linked; a failed
    later commit moves it back."""

    def no_links(*args: Any, **kwargs: Any) -> None:
        raise OSError(1, "Operation not permitted (no hard links here)")

    monkeypatch.setattr(files.os, "link", no_links)
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("old a")
    b.write_text("old b")
    fail_on_commit(monkeypatch, 2, inject_oserror)
    with pytest.raises(OutputFileError, match=r"b\.txt: cannot write it"):
        with transaction():
            atomic_write(a, "new a", force=True)
            atomic_write(b, "new b", force=True)
    assert (a.read_text(), b.read_text()) == ("old a", "old b")
    assert leftovers(tmp_path) == []
