"""Folder outputs of :mod:`varshift.core.files` (an Orbax checkpoint is a folder): planned with
``OutputPlan.add(folder=True)``, built in a temporary sibling and renamed into place by
``replacing_folder``, all or nothing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from varshift.core import files
from varshift.core.errors import OutputFileError
from varshift.core.files import (
    OutputPlan,
    atomic_write,
    remove_stale_temps,
    replacing_folder,
    transaction,
)


def build(tmp: Path, name: str = "new") -> None:
    tmp.mkdir()
    (tmp / "sub").mkdir()
    (tmp / "sub" / "data").write_text(name)


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_a_new_folder_appears_whole(tmp_path: Path) -> None:
    out = tmp_path / "ckpt"
    OutputPlan().add(out, folder=True)
    with replacing_folder(out) as tmp:
        assert tmp.name == f".ckpt.varshift-tmp-{os.getpid()}"
        assert not tmp.exists() and not out.exists()
        build(tmp)
    assert (out / "sub" / "data").read_text() == "new"
    assert names(tmp_path) == ["ckpt"]


def test_an_error_leaves_the_target_as_it_was(tmp_path: Path) -> None:
    out = tmp_path / "ckpt"
    build(out, "old")
    with pytest.raises(RuntimeError), replacing_folder(out) as tmp:
        build(tmp)
        raise RuntimeError("killed")
    assert (out / "sub" / "data").read_text() == "old" and names(tmp_path) == ["ckpt"]


def test_force_replaces_an_existing_folder(tmp_path: Path) -> None:
    out = tmp_path / "ckpt"
    build(out, "old")
    with pytest.raises(OutputFileError, match="already exists"):
        OutputPlan().add(out, folder=True)
    OutputPlan(force=True).add(out, folder=True)
    with replacing_folder(out) as tmp:
        build(tmp)
    assert (out / "sub" / "data").read_text() == "new"
    assert names(tmp_path) == ["ckpt"]  # the old folder, renamed aside, is gone


def test_a_folder_created_meanwhile_is_not_replaced(tmp_path: Path) -> None:
    out = tmp_path / "ckpt"
    OutputPlan().add(out, folder=True)  # planned as new: renamed only onto nothing
    with pytest.raises(OutputFileError, match="created by another process"):
        with replacing_folder(out) as tmp:
            build(tmp)
            build(out, "theirs")
    assert (out / "sub" / "data").read_text() == "theirs" and names(tmp_path) == ["ckpt"]


def test_plan_refusals(tmp_path: Path) -> None:
    source = tmp_path / "in"
    build(source)
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputFileError, match="is a file; this output is a folder"):
        OutputPlan(force=True).add(tmp_path / "file", folder=True)
    with pytest.raises(OutputFileError, match="inside the input folder"):
        OutputPlan([source]).add(source / "sub" / "out.json")
    with pytest.raises(OutputFileError, match="contains the input"):
        OutputPlan([source / "sub" / "data"], force=True).add(source, folder=True)
    OutputPlan([tmp_path / "file"]).add(tmp_path / "file2", folder=True)  # a sibling is fine


def test_a_killed_runs_temporary_folder_is_removed(tmp_path: Path) -> None:
    stale = tmp_path / ".ckpt.varshift-tmp-999999999"
    build(stale)
    assert remove_stale_temps(tmp_path / "ckpt") == [stale] and not stale.exists()


# --- a folder output inside a command's transaction: committed with the files, or none -------


def _fail_file_commits(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(item: object) -> None:
        raise OSError(5, "Input/output error (injected)")

    monkeypatch.setattr(files, "_commit_one", fail)


def test_a_failed_report_takes_the_new_folder_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out, report = tmp_path / "ckpt", tmp_path / "report.json"
    plan = OutputPlan()
    plan.add(out, folder=True)
    plan.add(report)
    _fail_file_commits(monkeypatch)
    with pytest.raises(OutputFileError), transaction():
        with replacing_folder(out) as tmp:
            build(tmp)
        assert not out.exists()  # staged, not yet in place
        atomic_write(report, "{}")
    assert names(tmp_path) == []  # no folder, no report, no temporary left


def test_a_failed_report_puts_the_replaced_folder_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out, report = tmp_path / "ckpt", tmp_path / "report.json"
    build(out, "old")
    plan = OutputPlan(force=True)
    plan.add(out, folder=True)
    plan.add(report)
    _fail_file_commits(monkeypatch)
    with pytest.raises(OutputFileError), transaction():
        with replacing_folder(out) as tmp:
            build(tmp)
        atomic_write(report, "{}")
    assert names(tmp_path) == ["ckpt"]
    assert (out / "sub" / "data").read_text() == "old"


def test_a_failed_folder_takes_the_report_back(tmp_path: Path) -> None:
    out, report = tmp_path / "ckpt", tmp_path / "report.json"
    plan = OutputPlan()
    plan.add(out, folder=True)
    plan.add(report)
    with pytest.raises(OutputFileError, match="created by another process"), transaction():
        atomic_write(report, "{}")
        with replacing_folder(out) as tmp:
            build(tmp)
        build(out, "theirs")  # another process makes the folder before the commit
    assert names(tmp_path) == ["ckpt"]  # theirs, untouched; no report
    assert (out / "sub" / "data").read_text() == "theirs"


def test_both_commit_together(tmp_path: Path) -> None:
    out, report = tmp_path / "ckpt", tmp_path / "report.json"
    plan = OutputPlan()
    plan.add(out, folder=True)
    plan.add(report)
    with transaction() as tx:
        with replacing_folder(out) as tmp:
            build(tmp)
        atomic_write(report, "{}")
    assert names(tmp_path) == ["ckpt", "report.json"]
    assert set(tx.written) == {out, report}
