"""The one way varshift writes a file: checked first, then a temporary file and a rename.

Every output (reports, checkpoints, figures, pages) goes through :func:`replacing` or
:func:`atomic_write`, so a kill or an error never leaves a partial file at the target path.
A command collects its outputs in an :class:`OutputPlan` before its first write: each is
checked against every input (the same file, also through a symbolic or hard link), against the
outputs already planned, and its folder is probed. It then writes them inside one
:func:`transaction`: every output is staged as a finished, fsynced temporary file, and only
then are they all renamed into place, or none (a failed rename rolls back the ones before
it). Without ``force`` an existing output is kept if the new bytes are identical (a rerun)
and refused otherwise. The refusal messages are written once, here.

One module on purpose, though over 600 lines: the plan, the temporary files and the
transaction share the per-command marks (``_EXCLUSIVE``, ``_MATCH``) that the plan sets and
the commit reads; split, that state would cross a module boundary.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import shutil
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from varshift.core.errors import OutputFileError

__all__ = [
    "OutputPlan",
    "Transaction",
    "atomic_write",
    "forget_marks",
    "refuse_existing",
    "remove_stale_temps",
    "replacing",
    "replacing_folder",
    "same_file",
    "temp_name",
    "transaction",
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


def refuse_existing_folder(path: Path, *, force: bool, option: str | None = None) -> None:
    """Raise :class:`OutputFileError` if the output folder ``path`` is a file, or exists and
    ``force`` is off."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputFileError(f"{_label(path, option)}: is a file; this output is a folder")
    if path.exists() and not force:
        raise OutputFileError(
            f"{_label(path, option)}: already exists; pass force=True to overwrite it"
        )


def inside(path: Path, folder: Path) -> bool:
    """Whether ``path`` lies inside ``folder`` (real paths; ``folder`` itself is not inside)."""
    real, root = os.path.realpath(path), os.path.realpath(folder)
    return real.startswith(root.rstrip(os.sep) + os.sep)


def same_file(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` name one file: equal real paths, or (both existing) one inode."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _check_writable_folder(path: Path, label: str) -> None:
    """Refuse ``path`` now if its folder (or the nearest existing ancestor, when the folder is
    to be created) is not a writable folder, so no other output is written before that fails."""
    folder = Path(os.path.abspath(path)).parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise OutputFileError(f"{label}: {folder} is not a folder")
    remove_stale_temps(folder / path.name)  # also probes left by killed runs
    probe = temp_name(folder / path.name)
    try:  # os.access says yes to root everywhere, also on read-only or virtual file systems
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        pass
    except OSError as exc:
        raise OutputFileError(f"{label}: cannot write in {folder} ({exc.strerror})") from None
    probe.unlink(missing_ok=True)


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

    def add(
        self, path: Path, option: str | None = None, *, replace: bool = False, folder: bool = False
    ) -> Path:
        """Check ``path`` and plan it; return it.

        Without ``force`` an existing ``path`` is not refused here: the command's
        :func:`transaction` leaves it in place if the new bytes are identical (rerunning a
        seeded command is not an error) and refuses it, writing nothing, if they differ.
        ``replace`` only changes that refusal's wording (``exists with different content``,
        for reports a rerun reproduces). ``folder``: the output is a folder
        (:func:`replacing_folder`), which must not contain an input; an existing folder is
        refused here without ``force`` (a folder is never compared byte for byte).

        Raises
        ------
        OutputFileError
            ``path`` is an input, lies inside an input folder, is already planned, is a folder
            (a file when ``folder``), exists as a folder without ``force``, or its folder
            cannot be written.
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
            _refuse_nested(path, source, label, folder)
        for other, other_option in self.outputs:
            if same_file(path, other):
                raise OutputFileError(
                    f"{label}: is also {_label(other, other_option)}; choose different outputs"
                )
        if not str(path) or str(path) == ".":
            raise OutputFileError(f"{label or repr(str(path))}: is not a file name")
        if folder:
            refuse_existing_folder(path, force=self.force, option=option)
        elif path.is_dir():
            raise OutputFileError(f"{label}: is a folder; expected a file name")
        _check_writable_folder(path, label)
        # Planned without force: created exclusively, or, if it exists, kept when the new bytes
        # are identical (a rerun) and refused otherwise, with nothing written (Transaction). A
        # later plan of the same path with force (a writer re-checking what its caller
        # planned) must not undo these marks.
        key = str(path.absolute())
        if not self.force and os.path.lexists(path):
            _MATCH[key] = (
                f"{path}: exists with different content; pass force=True to overwrite it"
                if replace
                else f"{label}: already exists; pass force=True to overwrite it"
            )
            _EXCLUSIVE.discard(key)
        elif not self.force:
            _EXCLUSIVE.add(key)
        self.outputs.append((path, option))
        return path

    def add_all(self, paths: Sequence[Path], option: str | None = None) -> list[Path]:
        """:meth:`add` each of ``paths``."""
        return [self.add(p, option) for p in paths]


def _refuse_nested(path: Path, source: Path, label: str, folder: bool) -> None:
    """Refuse an output inside an input folder, and an output folder holding an input."""
    if source.is_dir() and inside(path, source):
        raise OutputFileError(
            f"{label}: is inside the input folder {source}; varshift never modifies its input, "
            "choose an output outside it"
        )
    if folder and inside(source, path):
        raise OutputFileError(
            f"{label}: contains the input {source}; varshift never modifies its input, choose "
            "another output folder"
        )


#: Temporary files are named ``.<name>.varshift-tmp-<pid>`` next to their target, so a kill
#: leaves a file that is recognisably varshift's; the next write to that target removes it.
TMP_MARK = ".varshift-tmp-"

#: Paths planned without ``--force``: :func:`replacing` creates them exclusively (a hard link
#: of the finished temporary file), so of two processes writing the same new output one wins
#: and the other is refused, instead of the later silently replacing the earlier.
_EXCLUSIVE: set[str] = set()

#: Existing paths planned without ``--force``, with the refusal if the new bytes differ: a
#: :class:`Transaction` leaves an identical file in place and refuses a different one.
_MATCH: dict[str, str] = {}


def forget_marks() -> None:
    """Forget the exclusive and compare-first marks of plans never written (the CLI calls this
    around each command, so one command's plan never applies to the next in one process)."""
    _EXCLUSIVE.clear()
    _MATCH.clear()


def temp_name(path: Path, pid: int | None = None) -> Path:
    """The temporary file :func:`replacing` writes for ``path`` in process ``pid``."""
    return path.with_name(f".{path.name}{TMP_MARK}{os.getpid() if pid is None else pid}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temps(path: Path) -> list[Path]:
    """Remove temporary files of ``path`` left by killed varshift processes; return them."""
    removed = []
    folder = path.parent if str(path.parent) else Path(".")
    for tmp in folder.glob(f".{glob.escape(path.name)}{TMP_MARK}*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            if tmp.is_dir() and not tmp.is_symlink():  # a folder output's (replacing_folder)
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def _write_error(path: Path, exc: OSError) -> OutputFileError:
    """An :class:`OutputFileError` naming ``path`` (and the free space when the disk is full)."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        folder = path.parent if str(path.parent) else Path(".")
        free = shutil.disk_usage(folder).free
        return OutputFileError(
            f"{path}: the disk is full ({free:,} bytes free in {folder}); nothing was written"
        )
    return OutputFileError(f"{path}: cannot write it ({exc.strerror or exc})")


def _fsync_folder(folder: Path) -> None:
    """Make the renames in ``folder`` durable where the OS allows it."""
    with contextlib.suppress(OSError):
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _same_bytes(a: Path, b: Path) -> bool:
    """Whether the regular files ``a`` and ``b`` hold the same bytes (read in blocks)."""
    if not b.is_file() or a.stat().st_size != b.stat().st_size:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            block = fa.read(1 << 20)
            if block != fb.read(1 << 20):
                return False
            if not block:
                return True


@dataclass
class _Staged:
    """One finished, fsynced temporary file waiting to become ``path``."""

    tmp: Path
    path: Path
    exclusive: bool  # planned as new (without force): created by a hard link, never replaced
    match: str | None  # existed when planned without force: kept if identical, else this error
    backup: Path | None = None  # the replaced file's old content until every commit succeeded
    done: bool = False


@dataclass
class _StagedFolder:
    """A finished temporary folder (files fsynced) waiting to become the folder ``path``."""

    tmp: Path
    path: Path
    exclusive: bool  # planned as new: renamed onto a path that does not exist
    old: Path | None = None  # the replaced folder, set aside until every commit succeeded
    done: bool = False


class Transaction:
    """The outputs of one command, staged as finished temporary files and committed together.

    Inside ``with transaction() as tx:`` every :func:`replacing` (so every
    :func:`atomic_write`) writes and fsyncs its temporary file but does not rename it. When the
    block succeeds the outputs are committed: first every output planned without ``--force``
    over an existing file is compared with it (identical: left in place and listed in
    :attr:`unchanged`; different: refused, nothing written); then each is renamed into place,
    a replaced file's old content kept in a backup (a hard link) until all are in place. If a
    rename fails, the outputs already committed are rolled back (new files removed, replaced
    files restored) and the error is raised: all outputs or none. On an error in the block the
    temporary files are removed and nothing is committed.

    A kill during the final renames (after all outputs are written and fsynced; typically
    milliseconds) can leave some outputs committed: each is still complete.
    """

    def __init__(self) -> None:
        self.staged: list[_Staged] = []
        #: Outputs whose existing file already held exactly the new bytes (nothing written).
        self.unchanged: list[Path] = []
        #: Outputs written (renamed into place).
        self.written: list[Path] = []
        #: Folders made for the outputs, removed again (if empty) when nothing is committed.
        self.folders: list[Path] = []
        #: Folder outputs (:func:`replacing_folder`), committed after the files.
        self.staged_folders: list[_StagedFolder] = []

    def make_folder(self, folder: Path) -> None:
        """Create ``folder`` and its missing parents, remembering them for a roll-back."""
        missing = []
        while not os.path.lexists(folder) and folder != folder.parent:
            missing.append(folder)
            folder = folder.parent
        for made in reversed(missing):
            made.mkdir(exist_ok=True)
            self.folders.append(made)

    def stage(self, tmp: Path, path: Path) -> None:
        """Take the finished temporary file ``tmp`` of ``path`` (fsynced, mode set)."""
        key = str(path.absolute())
        self.staged = [s for s in self.staged if s.path.absolute() != path.absolute()]
        self.staged.append(_Staged(tmp, path, key in _EXCLUSIVE, _MATCH.pop(key, None)))
        _EXCLUSIVE.discard(key)

    def stage_folder(self, tmp: Path, path: Path) -> None:
        """Take the finished temporary folder ``tmp`` of the folder output ``path``."""
        key = str(path.absolute())
        self.staged_folders.append(_StagedFolder(tmp, path, key in _EXCLUSIVE))
        _EXCLUSIVE.discard(key)

    def verb(self, path: Path) -> str:
        """``unchanged`` if ``path`` kept its identical content, else ``wrote``."""
        return "unchanged" if Path(path) in self.unchanged else "wrote"

    def commit(self) -> None:
        """Compare, then rename every staged output into place, or none (see the class)."""
        try:
            pending = self._compare()
            for item in pending:
                try:
                    _commit_one(item)
                except OSError as exc:
                    raise _write_error(item.path, exc) from None
            for staged in self.staged_folders:
                _commit_staged_folder(staged)
        except BaseException:
            self._roll_back()
            raise
        for item in pending:
            if item.backup is not None:
                item.backup.unlink(missing_ok=True)
            self.written.append(item.path)
        for staged in self.staged_folders:
            if staged.old is not None:
                shutil.rmtree(staged.old, ignore_errors=True)
            self.written.append(staged.path)
        parents = {_folder(item.path) for item in pending}
        parents |= {_folder(staged.path) for staged in self.staged_folders}
        self.staged_folders = []
        for folder in parents:
            _fsync_folder(folder)
        self.staged = []

    def _compare(self) -> list[_Staged]:
        """Drop the outputs identical to their existing file; refuse a different one."""
        pending = []
        for item in self.staged:
            if item.match is not None and item.path.exists():
                if not _same_bytes(item.tmp, item.path):
                    raise OutputFileError(item.match)
                item.tmp.unlink(missing_ok=True)
                self.unchanged.append(item.path)
            else:
                pending.append(item)
        return pending

    def _roll_back(self) -> None:
        """Undo the committed outputs (latest first) and remove every temporary file."""
        for item in reversed(self.staged):
            with contextlib.suppress(OSError):
                moved_aside = item.backup is not None and not os.path.lexists(item.path)
                if item.backup is not None and (item.done or moved_aside):
                    os.replace(item.backup, item.path)
                elif item.done:
                    item.path.unlink()
            with contextlib.suppress(OSError):
                item.tmp.unlink(missing_ok=True)
                if item.backup is not None:
                    item.backup.unlink(missing_ok=True)
        self.staged = []
        for folder in reversed(self.staged_folders):
            _roll_back_folder(folder)
        self.staged_folders = []
        self._remove_folders()

    def _remove_folders(self) -> None:
        for folder in reversed(self.folders):
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if empty
        self.folders = []

    def abort(self) -> None:
        """Remove every temporary file; commit nothing."""
        for item in self.staged:
            item.tmp.unlink(missing_ok=True)
        self.staged = []
        for folder in self.staged_folders:
            shutil.rmtree(folder.tmp, ignore_errors=True)
        self.staged_folders = []
        self._remove_folders()


def _folder(path: Path) -> Path:
    return path.parent if str(path.parent) else Path(".")


def _commit_one(item: _Staged) -> None:
    """Move ``item.tmp`` to ``item.path``: exclusively (a hard link) if it was planned new,
    else by an atomic rename after keeping the old file as ``item.backup``."""
    tmp, path = item.tmp, item.path
    if item.exclusive or item.match is not None:
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise OutputFileError(
                f"{path}: was created by another process while varshift wrote it; pass force=True "
                "to overwrite it"
            ) from None
        except OSError:  # a file system without hard links: check, then rename
            if path.exists():
                raise OutputFileError(
                    f"{path}: already exists; pass force=True to overwrite it"
                ) from None
            os.replace(tmp, path)
            item.done = True
        else:
            item.done = True
            tmp.unlink()
        return
    if os.path.lexists(path):
        backup = path.with_name(f".{path.name}{TMP_MARK}bak-{os.getpid()}")
        backup.unlink(missing_ok=True)
        try:
            os.link(path, backup, follow_symlinks=False)
        except OSError:  # no hard links here: move the old file aside instead
            os.replace(path, backup)
        item.backup = backup
    os.replace(tmp, path)
    item.done = True


#: The transaction :func:`replacing` stages into (innermost last); empty: commit at once.
_ACTIVE: list[Transaction] = []


@contextmanager
def transaction() -> Iterator[Transaction]:
    """Commit every output written in the block together, or none (:class:`Transaction`).

    Nested blocks join the outermost one.

    Examples
    --------
    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> with transaction() as tx:
    ...     _ = atomic_write(folder / "a.txt", "a")
    ...     (folder / "a.txt").exists()
    False
    >>> (folder / "a.txt").read_text(), tx.written == [folder / "a.txt"]
    ('a', True)
    """
    if _ACTIVE:
        yield _ACTIVE[0]
        return
    tx = Transaction()
    _ACTIVE.append(tx)
    try:
        yield tx
    except BaseException:
        tx.abort()
        raise
    finally:
        _ACTIVE.remove(tx)
    tx.commit()


def _stage_file(tmp: Path, path: Path) -> None:
    """fsync ``tmp`` and give it the mode a plain ``open()`` would."""
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)


@contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A temporary file next to ``path`` that atomically replaces it when the block succeeds.

    The temporary file (:func:`temp_name`) is created exclusively, gets the mode a plain
    ``open()`` would give (``0666 & ~umask``), is fsynced before the rename, and is removed on
    any error, leaving ``path`` as it was. Stale temporary files of killed runs are removed
    first (:func:`remove_stale_temps`). Inside a :func:`transaction` the rename waits for the
    end of the transaction; outside, the file is committed as a transaction of its own.

    Raises
    ------
    OutputFileError
        If the folder cannot be created or written, or the disk is full (naming the path and
        the free space), or ``path`` was planned as new and another process created it.
    """
    path = Path(path)
    folder = _folder(path)
    tmp = temp_name(path)
    with transaction() as tx:
        try:
            tx.make_folder(folder.absolute())
            remove_stale_temps(path)
            tmp.unlink(missing_ok=True)
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except OSError as exc:
            raise OutputFileError(f"{folder}: cannot write here ({exc.strerror})") from None
        try:
            try:
                yield tmp
                _stage_file(tmp, path)
            except OSError as exc:
                raise _write_error(path, exc) from None
        except BaseException:
            tmp.unlink(missing_ok=True)
            _EXCLUSIVE.discard(str(path.absolute()))  # the marks were for this one write
            _MATCH.pop(str(path.absolute()), None)
            raise
        tx.stage(tmp, path)


@contextmanager
def replacing_folder(path: Path) -> Iterator[Path]:
    """A temporary sibling folder path that becomes the folder ``path`` when the block succeeds.

    The block creates the folder at the yielded path (:func:`temp_name`: ``.<name>.varshift-
    tmp-<pid>``, which does not exist yet); on success every file in it is fsynced and it is
    renamed into place. A folder cannot be hard-linked, so a new output (planned without
    ``force``) is renamed onto a path that does not exist: the rename fails if another process
    created a non-empty folder there meanwhile (an empty one is replaced: nothing is lost). An
    existing folder (``force``) is first renamed aside to ``.<name>.varshift-old-<pid>``, the
    new one renamed into place, then the old one removed; if the second rename fails the old
    folder is put back. Only a kill between the two renames leaves ``path`` missing, with the
    old folder intact under that name. On any error the temporary folder is removed. Inside a
    :func:`transaction` the renames wait for the end of it, with the command's other outputs.

    Raises
    ------
    OutputFileError
        The folder cannot be written, the disk is full, or ``path`` was planned as new and
        another process created it.
    """
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    tmp = temp_name(path)
    try:
        parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(path)
        if tmp.is_dir():
            shutil.rmtree(tmp)
        tmp.unlink(missing_ok=True)
    except OSError as exc:
        raise OutputFileError(f"{parent}: cannot write here ({exc.strerror})") from None
    # committed with the command's other outputs, or none; alone, as its own transaction
    with transaction() as tx:
        try:
            try:
                yield tmp
                if not tmp.is_dir():
                    raise OutputFileError(f"{path}: the folder was not written")
                _fsync_files(tmp)
            except OSError as exc:
                raise _write_error(path, exc) from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            _EXCLUSIVE.discard(str(path.absolute()))
            raise
        tx.stage_folder(tmp, path)


def _fsync_files(folder: Path) -> None:
    for root, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as fh:
                os.fsync(fh.fileno())


def _commit_staged_folder(item: _StagedFolder) -> None:
    """Rename a staged folder into place, an existing one set aside (kept for a roll-back)."""
    if not item.exclusive and os.path.lexists(item.path):
        item.old = item.path.with_name(f".{item.path.name}.varshift-old-{os.getpid()}")
        os.rename(item.path, item.old)
    try:
        os.rename(item.tmp, item.path)
    except OSError as exc:
        if exc.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
            raise OutputFileError(
                f"{item.path}: was created by another process while varshift wrote it; pass "
                "force=True to overwrite it"
            ) from None
        raise _write_error(item.path, exc) from None
    item.done = True


def _roll_back_folder(item: _StagedFolder) -> None:
    """Undo :func:`_commit_staged_folder`: the new folder removed, the old one put back."""
    with contextlib.suppress(OSError):
        if item.done:
            shutil.rmtree(item.path)
        if item.old is not None and not os.path.lexists(item.path):
            os.rename(item.old, item.path)
    shutil.rmtree(item.tmp, ignore_errors=True)


def atomic_write(path: Path, data: str | bytes, *, force: bool = False) -> Path:
    """Write ``data`` to ``path`` through a temporary file and a rename (:func:`replacing`).

    Raises
    ------
    OutputFileError
        If ``path`` exists and ``force`` is False, or its folder cannot be written.
    """
    path = Path(path)
    refuse_existing(path, force=force)
    if not force:
        _EXCLUSIVE.add(str(path.absolute()))
    with replacing(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def write_unchanged_or_new(
    files: Sequence[tuple[Path, str | bytes]], *, force: bool = False
) -> bool:
    """Write a set of files that a rerun reproduces byte for byte; return True if unchanged.

    Files that already hold exactly their data are left in place (rerunning a seeded command is
    not an error); one that holds other data needs ``force`` (then nothing is written); missing
    targets are written. All in one :func:`transaction`.

    Raises
    ------
    OutputFileError
        A target exists with different content and ``force`` is False.
    """
    blobs = [(Path(p), d.encode() if isinstance(d, str) else d) for p, d in files]
    unchanged = all(p.is_file() and p.read_bytes() == d for p, d in blobs)
    plan = OutputPlan(force=force)
    with transaction():
        for p, d in blobs:
            plan.add(p, replace=True)
            atomic_write(p, d, force=True)
    return unchanged
