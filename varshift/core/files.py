"""The one way varshift writes a file: checked first, then a temporary file and a rename.

Every output (reports, checkpoints, figures, pages) goes through :func:`replacing` or
:func:`atomic_write`, so a kill or an error never leaves a partial file at the target path.
A command collects its outputs in an :class:`OutputPlan` before its first write: each is
checked against every input (the same file, also through a symbolic or hard link), against the
outputs already planned, and, unless ``force``, against an existing file. The refusal messages
are written once, here.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from varshift.core.errors import OutputFileError

__all__ = [
    "OutputPlan",
    "atomic_write",
    "refuse_existing",
    "replacing",
    "same_file",
    "write_unchanged_or_new",
]


def _label(path: Path, option: str | None) -> str:
    return f"{option} {path}" if option else str(path)


def refuse_existing(path: Path, *, force: bool, option: str | None = None) -> None:
    """Raise :class:`OutputFileError` if ``path`` is a folder, or exists and ``force`` is off.

    ``option`` (``--html``, ...) prefixes the path in the message.
    """
    path = Path(path)
    if path.is_dir():
        raise OutputFileError(f"{_label(path, option)}: is a folder; expected a file name")
    if path.exists() and not force:
        raise OutputFileError(
            f"{_label(path, option)}: already exists; pass force=True to overwrite it"
        )


def same_file(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` name one file: equal real paths, or (both existing) one inode."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


class OutputPlan:
    """The outputs of one command, each checked when it is added, before anything is written.

    Parameters
    ----------
    inputs:
        Files the command reads; no output may be one of them (same path, symbolic or hard
        link).
    force:
        Allow replacing existing outputs.

    Examples
    --------
    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> source = folder / "in.csv"
    >>> _ = source.write_text("x")
    >>> plan = OutputPlan([source])
    >>> plan.add(folder / "out.csv")
    PosixPath('...out.csv')
    >>> plan.add(source, "--output")
    Traceback (most recent call last):
    ...
    varshift.core.errors.OutputFileError: --output ...in.csv: is the input file; ...
    """

    def __init__(self, inputs: Iterable[Path | None] = (), *, force: bool = False) -> None:
        self.inputs: tuple[Path, ...] = tuple(Path(p) for p in inputs if p is not None)
        self.force = force
        self.outputs: list[tuple[Path, str | None]] = []

    def add(self, path: Path, option: str | None = None, *, replace: bool = False) -> Path:
        """Check ``path`` and plan it; return it.

        ``replace`` skips the existence check for an output whose existing copy the command
        compares itself (:func:`write_unchanged_or_new`).

        Raises
        ------
        OutputFileError
            ``path`` is an input, is already planned, is a folder, or exists without ``force``.
        """
        path = Path(path)
        label = _label(path, option)
        for source in self.inputs:
            if same_file(path, source):
                which = "" if str(source) == str(path) else f" {source}"
                raise OutputFileError(
                    f"{label}: is the input file{which}; varshift never modifies its input, "
                    "choose another output"
                )
        for other, other_option in self.outputs:
            if same_file(path, other):
                raise OutputFileError(
                    f"{label}: is also {_label(other, other_option)}; choose different outputs"
                )
        if replace:
            if path.is_dir():
                raise OutputFileError(f"{label}: is a folder; expected a file name")
        else:
            refuse_existing(path, force=self.force, option=option)
        self.outputs.append((path, option))
        return path

    def add_all(self, paths: Sequence[Path], option: str | None = None) -> list[Path]:
        """:meth:`add` each of ``paths``."""
        return [self.add(p, option) for p in paths]


@contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A temporary file next to ``path`` that atomically replaces it when the block succeeds.

    The temporary file gets the mode a plain ``open()`` would give (``0666 & ~umask``, not
    mkstemp's 0600); on any error it is removed and ``path`` is left as it was.

    Raises
    ------
    OutputFileError
        If the folder cannot be created or written.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise OutputFileError(f"{folder}: cannot write here ({exc.strerror})") from None
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write(path: Path, data: str | bytes, *, force: bool = False) -> Path:
    """Write ``data`` to ``path`` through a temporary file and a rename (:func:`replacing`).

    Raises
    ------
    OutputFileError
        If ``path`` exists and ``force`` is False, or its folder cannot be written.
    """
    path = Path(path)
    refuse_existing(path, force=force)
    with replacing(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def write_unchanged_or_new(
    files: Sequence[tuple[Path, str | bytes]], *, force: bool = False
) -> bool:
    """Write a set of files that a rerun reproduces byte for byte; return True if unchanged.

    When every target already holds exactly its data nothing is written (rerunning a seeded
    command is not an error); when one holds other data it needs ``force``; missing targets
    are written.

    Raises
    ------
    OutputFileError
        A target exists with different content and ``force`` is False.
    """
    blobs = [(Path(p), d.encode() if isinstance(d, str) else d) for p, d in files]
    present = [(p, d) for p, d in blobs if p.exists()]
    if present and len(present) == len(blobs) and all(p.read_bytes() == d for p, d in present):
        return True
    if not force:
        for p, d in present:
            if p.read_bytes() != d:
                raise OutputFileError(
                    f"{p}: exists with different content; pass force=True to overwrite it"
                )
    for p, d in blobs:
        atomic_write(p, d, force=True)
    return False
