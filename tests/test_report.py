"""Atomic writes: refuse to overwrite, leave no temporary file behind, usual file mode."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from varshift.core.errors import OutputFileError
from varshift.core.files import atomic_write, replacing


def test_atomic_write_gives_the_usual_mode_and_leaves_nothing_behind(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        target = atomic_write(tmp_path / "a.txt", "x")
    finally:
        os.umask(old)
    assert target.read_text() == "x"
    assert target.stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]
    with pytest.raises(OutputFileError, match="already exists; pass force=True"):
        atomic_write(target, "y")
    assert target.read_text() == "x"


def test_a_failed_write_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "a.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), replacing(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("interrupted")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin"]


def test_an_unwritable_folder_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(OutputFileError, match="cannot write here"):
        atomic_write(blocker / "out.csv", "x")
