"""The one way varshift writes a file: a temporary file beside the target, then a rename.

Every output (reports, checkpoints, figures, pages) goes through :func:`replacing` or
:func:`atomic_write`, so a kill or an error never leaves a partial file at the target path.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from varshift.core.errors import OutputFileError

__all__ = ["atomic_write", "replacing"]


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
    if path.exists() and not force:
        raise OutputFileError(f"{path}: already exists; pass --force to overwrite it")
    with replacing(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    return path
