"""An on-disk store of task results, appended as they finish, so a job can resume.

``varshift sweep --store run.sqlite`` writes every result the moment it arrives; after a crash,
Ctrl-C, a killed worker or a lost scheduler, the same command with ``--resume`` reads back what
is there, recomputes only the missing tasks and returns the same table as an uninterrupted run.

Why SQLite: it is in the standard library (no new dependency, unlike Parquet), one file holds
the whole run, and every result is its own committed transaction — an interrupted run leaves
either the whole row or nothing, never a half-written line (CSV part files would need a file,
an fsync and a rename per result, and a directory scan to resume). In WAL mode a commit is
cheap (tens of microseconds, far below a point's compute) and survives the process being
killed; looking a task up by its key is an index probe.

Each result is keyed by :func:`task_key`, a SHA-256 of the function's name, the task's content
(its parameters and its seed stream) and the varshift version. The store's metadata records the
command, its parameters and the seed: resuming with anything else is refused, since the stored
rows would belong to another table. Values are stored as JSON (floats round-trip exactly), never
pickled, so opening a store cannot run code.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from collections.abc import Callable, Iterator, Mapping, Sequence
from hashlib import sha256
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import numpy as np

from varshift import __version__
from varshift.core.errors import InputFileError, Interrupted, OutputFileError, ValidationError
from varshift.jobs.executor import Executor, Progress

T = TypeVar("T")
U = TypeVar("U")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS results (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


def _plain(value: Any) -> Any:
    """JSON form of the values tasks are made of (dataclasses, seed sequences, numbers)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, np.random.SeedSequence):
        return {
            "entropy": _plain(value.entropy),
            "spawn_key": list(value.spawn_key),
            "pool_size": value.pool_size,
        }
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, str | int | float | bool):
        return value
    raise TypeError(f"cannot key a task holding {type(value).__name__}")


def canonical_json(value: Any) -> str:
    """One text per value: sorted keys, no spaces, floats as their shortest exact repr."""
    return json.dumps(_plain(value), sort_keys=True, separators=(",", ":"))


def task_key(fn: Callable[..., Any], task: object) -> str:
    """The stable key of ``fn(task)``: SHA-256 of the function, the task and the version.

    Examples
    --------
    >>> task_key(abs, (1, 2.5)) == task_key(abs, (1, 2.5)) != task_key(abs, (1, 2.25))
    True
    """
    name = f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', repr(fn))}"
    text = canonical_json({"fn": name, "task": task, "varshift": __version__})
    return sha256(text.encode()).hexdigest()


class ResultStore:
    """Task results in one SQLite file; see the module docstring.

    Open it with :meth:`open`; use it as a context manager (or call :meth:`close`).
    """

    def __init__(self, path: Path, connection: sqlite3.Connection) -> None:
        self.path = path
        self._db = connection

    @classmethod
    def open(
        cls,
        path: str | Path,
        fingerprint: Mapping[str, Any],
        *,
        resume: bool = False,
        force: bool = False,
    ) -> ResultStore:
        """Create the store at ``path``, or with ``resume`` continue the one there.

        Parameters
        ----------
        path:
            The SQLite file.
        fingerprint:
            What the stored results belong to (command and parameters, JSON-able); a resumed
            store must have been made with the same one and the same varshift version.
        resume:
            Continue an existing store (a missing one is created).
        force:
            Without ``resume``, replace an existing store instead of refusing.

        Raises
        ------
        OutputFileError
            The store exists and neither ``resume`` nor ``force`` was given.
        ValidationError
            ``resume`` of a store made by another command, other parameters or version.
        InputFileError
            The file is not a varshift store.
        """
        path = Path(path)
        expected = canonical_json({**fingerprint, "varshift": __version__})
        if path.exists() and not resume:
            if not force:
                raise OutputFileError(
                    f"--store {path} exists; pass --resume to continue it or --force to start over"
                )
            for suffix in ("", "-wal", "-shm"):
                Path(f"{path}{suffix}").unlink(missing_ok=True)
        try:
            db = sqlite3.connect(path, isolation_level=None)  # autocommit: a row, a transaction
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")  # with WAL: durable against a killed process
            db.executescript(_SCHEMA)
            row = db.execute("SELECT value FROM meta WHERE name = 'fingerprint'").fetchone()
        except sqlite3.DatabaseError as exc:
            raise InputFileError(f"--store {path} is not a varshift store ({exc})") from None
        if row is None:
            db.execute("INSERT INTO meta VALUES ('fingerprint', ?)", (expected,))
        elif row[0] != expected:
            db.close()
            raise ValidationError(
                f"--store {path} was made by another run ({_differences(row[0], expected)} "
                "differ); resume it with the same command and parameters, or give a new --store"
            )
        return cls(path, db)

    def claim_seed(self, entropy: int, *, given: bool) -> int:
        """The run's seed entropy: the stored one when resuming, else ``entropy`` (recorded).

        ``given``: the caller's seed was chosen by the user; it must then equal a stored one.
        """
        row = self._db.execute("SELECT value FROM meta WHERE name = 'seed_entropy'").fetchone()
        if row is None:
            self._db.execute("INSERT INTO meta VALUES ('seed_entropy', ?)", (str(entropy),))
            return entropy
        stored = int(row[0])
        if given and stored != entropy:
            raise ValidationError(
                f"--seed gives entropy {entropy} but --store {self.path} was made with "
                f"{stored}; resume with the same --seed (or none), or give a new --store"
            )
        return stored

    def get(self, key: str) -> Any | None:
        """The stored JSON value of ``key`` (decoded), or ``None``."""
        row = self._db.execute("SELECT value FROM results WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def put(self, key: str, value: Any) -> None:
        """Store ``value`` (a dataclass or JSON-able) under ``key``, committed at once."""
        text = canonical_json(value)
        self._db.execute("INSERT OR REPLACE INTO results VALUES (?, ?)", (key, text))

    def __len__(self) -> int:
        (n,) = self._db.execute("SELECT COUNT(*) FROM results").fetchone()
        return int(n)

    def close(self) -> None:
        """Close the file (every stored row is already committed)."""
        self._db.close()

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _differences(stored: str, expected: str) -> str:
    """Names of the top-level fingerprint entries (or parameters) that differ."""
    a, b = json.loads(stored), json.loads(expected)
    names = []
    for key in sorted(set(a) | set(b)):
        if isinstance(a.get(key), dict) and isinstance(b.get(key), dict):
            sub = a[key].keys() | b[key].keys()
            names += [k for k in sorted(sub) if a[key].get(k) != b[key].get(k)]
        elif a.get(key) != b.get(key):
            names.append(key)
    return ", ".join(names) or "the parameters"


def run_tasks(
    executor: Executor,
    fn: Callable[[T], U],
    tasks: Sequence[T],
    *,
    decode: Callable[[Any], U] | None = None,
    store: ResultStore | None = None,
    progress: Progress | None = None,
) -> list[U]:
    """``[fn(t) for t in tasks]`` in task order, on ``executor``, through ``store``.

    Results already in ``store`` are read back (``decode``, needed with a store, turns their
    JSON form into a value); only the missing tasks run, and each result is stored the moment
    it arrives. ``progress(done, total)`` counts stored results as done.

    Raises
    ------
    Interrupted
        On Ctrl-C (``KeyboardInterrupt``) with a store: how many results it keeps, and that
        ``--resume`` continues. Without a store the ``KeyboardInterrupt`` goes on.

    Examples
    --------
    >>> from varshift.jobs.executor import LocalExecutor
    >>> run_tasks(LocalExecutor(1), abs, [-1, 2])
    [1, 2]
    """
    if store is not None and decode is None:
        raise TypeError("run_tasks needs decode= to read results back from a store")
    total = len(tasks)
    report = progress or (lambda done, total: None)
    results: list[U | None] = [None] * total
    missing: list[int] = []
    keys: list[str] = []
    for i, task in enumerate(tasks):
        key = task_key(fn, task) if store is not None else ""
        keys.append(key)
        stored = store.get(key) if store is not None else None
        if stored is None:
            missing.append(i)
        else:
            results[i] = decode(stored)  # type: ignore[misc]  # checked above
    done = total - len(missing)
    report(done, total)

    def arrived(j: int, value: U) -> None:
        nonlocal done
        if store is not None:
            store.put(keys[missing[j]], value)
        done += 1
        report(done, total)

    todo = [tasks[i] for i in missing]
    try:
        for i, value in zip(missing, executor.map(fn, todo, on_result=arrived), strict=True):
            results[i] = value
    except KeyboardInterrupt:
        if store is None:
            raise
        raise Interrupted(
            f"{done} of {total} results are kept in {store.path}; the same command with "
            "--resume computes only the rest"
        ) from None
    return results  # type: ignore[return-value]  # every slot is filled above


def iter_stored(store: ResultStore) -> Iterator[tuple[str, Any]]:
    """Every ``(key, value)`` in the store, in key order (for inspection and tests)."""
    for key, text in store._db.execute("SELECT key, value FROM results ORDER BY key"):
        yield key, json.loads(text)
