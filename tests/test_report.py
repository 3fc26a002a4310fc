"""Atomic writes: refuse to overwrite, leave no temporary file behind, usual file mode."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from varshift.core.errors import OutputFileError
from varshift.core.files import atomic_write, replacing
from varshift.present.report import pipe_table, to_markdown, to_table


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


# --- Markdown tables: pipe_table against tabulate (the library varshift used before) ---------

_CELL_TEXT = st.text(
    # Printable text as report cells hold it (already escaped: no line breaks, no ANSI codes).
    alphabet=st.characters(
        blacklist_categories=("Cs", "Cc"), blacklist_characters="\u2028\u2029\x85"
    ),
    max_size=12,
)


_PIPE_EXAMPLES = int(os.environ.get("VARSHIFT_PIPE_EXAMPLES", "200"))


@settings(max_examples=_PIPE_EXAMPLES, derandomize=True, deadline=None)
@given(
    data=st.integers(min_value=1, max_value=5).flatmap(
        lambda ncol: st.tuples(
            st.lists(_CELL_TEXT, min_size=ncol, max_size=ncol),
            st.lists(st.lists(_CELL_TEXT, min_size=ncol, max_size=ncol), max_size=6),
        )
    )
)
def test_pipe_table_matches_tabulate(data: tuple[list[str], list[list[str]]]) -> None:
    tabulate = pytest.importorskip("tabulate")
    headers, rows = data
    wide, tabulate.WIDE_CHARS_MODE = tabulate.WIDE_CHARS_MODE, False  # widths in code points
    try:
        expected = tabulate.tabulate(
            rows, headers=headers, tablefmt="pipe", showindex=False, disable_numparse=True
        )
    finally:
        tabulate.WIDE_CHARS_MODE = wide
    assert pipe_table(headers, rows) == expected


def test_markdown_cells_are_escaped() -> None:
    grid = to_table([{"layer": "a|b", "note": "x\\y\nz", "value": 1.5}])
    text = to_markdown(grid)
    assert text.splitlines()[2] == "| a\\|b    | x\\\\y<br>z | 1.5     |"
