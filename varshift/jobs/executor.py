"""Where multi-run jobs get their parallelism: local processes or a Dask cluster.

A job (a sweep, a study) turns its work into a sequence of *tasks*: picklable values, each
carrying everything its computation needs, its random seed included (a grid point and a
replicate index name a :class:`numpy.random.SeedSequence` stream, see
:mod:`varshift.jobs.replicates`). An :class:`Executor` applies a module-level function to every
task and yields the results **in task order**, whichever worker finished first. Since nothing a
task draws depends on the worker that runs it, the results are identical for any executor and
any worker count.

* :class:`LocalExecutor` — ``workers`` local processes (``--workers``), the default.
* :class:`DaskExecutor` — an existing ``dask.distributed`` cluster (``--scheduler
  tcp://HOST:PORT``); needs the optional extra ``pip install 'varshift[dask]'``. Tasks are
  submitted as pure functions with Dask's own ``retries``, so the task of a worker that dies is
  run again, never dropped; at most a window of tasks is in flight, so the client's memory does
  not grow with the number of tasks.

``on_result(index, value)`` is called for every result as it arrives (completion order): that is
where a job appends to its store (:mod:`varshift.jobs.store`) and feeds its progress bar.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Protocol, TypeVar

from varshift.core.errors import MissingDependencyError, ValidationError
from varshift.core.validate import check_int

T = TypeVar("T")
U = TypeVar("U")

#: ``on_result(index, value)``: a task's result as it arrives; ``index`` is its position.
OnResult = Callable[[int, Any], None]

#: Progress callback: ``callback(done, total)``.
Progress = Callable[[int, int], None]

#: What ``pip`` installs for :class:`DaskExecutor`.
DASK_EXTRA = "pip install 'varshift[dask]'"


class Executor(Protocol):
    """Applies a function to tasks; yields results in task order."""

    def map(
        self, fn: Callable[[T], U], tasks: Sequence[T], *, on_result: OnResult | None = None
    ) -> Iterator[U]:
        """``fn(task)`` for every task, yielded in task order.

        ``fn`` must be a module-level function and the tasks picklable. ``on_result(i, value)``
        is called once per task as its result arrives. Work starts when the iterator is first
        advanced; closing the iterator early (or an exception in ``on_result``) cancels what is
        still pending.
        """
        ...


class LocalExecutor:
    """``workers`` local processes (started with ``spawn``: no inherited threads or state).

    One worker runs the tasks in this process, one after the other.

    Examples
    --------
    >>> list(LocalExecutor(1).map(abs, [-2, 3, -5]))
    [2, 3, 5]
    """

    def __init__(self, workers: int = 1) -> None:
        self.workers = check_int("workers", workers, 1)

    def __repr__(self) -> str:
        return f"LocalExecutor(workers={self.workers})"

    def map(
        self, fn: Callable[[T], U], tasks: Sequence[T], *, on_result: OnResult | None = None
    ) -> Iterator[U]:
        """See :meth:`Executor.map`; a process pool's ``map`` already keeps task order."""
        report = on_result or _ignore
        total = len(tasks)
        if self.workers <= 1 or total <= 1:
            for i, task in enumerate(tasks):
                value = fn(task)
                report(i, value)
                yield value
            return
        # Chunks of about 1/16 of a worker's share: few round trips, yet a balanced tail.
        chunk = max(1, total // (self.workers * 16))
        context = multiprocessing.get_context("spawn")
        pool = ProcessPoolExecutor(max_workers=min(self.workers, total), mp_context=context)
        try:
            for i, value in enumerate(pool.map(fn, tasks, chunksize=chunk)):
                report(i, value)
                yield value
        finally:
            # On Ctrl-C or an early close, drop the queued chunks instead of computing them.
            pool.shutdown(wait=True, cancel_futures=True)


class DaskExecutor:
    """Tasks on an existing Dask cluster, reached at the scheduler ``address``.

    Parameters
    ----------
    address:
        The scheduler, ``tcp://HOST:PORT`` (what ``dask scheduler`` prints).
    retries:
        Dask's retries of a task that raised; a task whose worker died is rescheduled by the
        scheduler in any case (up to ``distributed.scheduler.allowed-failures`` times).
    window:
        Most tasks in flight at once (default: 4 per worker thread, at least 256). Results
        that arrive ahead of an unfinished earlier task wait for it, so the window also bounds
        the client's buffer.
    timeout:
        Seconds to wait for the scheduler before giving up.

    Raises
    ------
    MissingDependencyError
        When ``dask.distributed`` is not installed (``pip install 'varshift[dask]'``).
    """

    def __init__(
        self, address: str, *, retries: int = 3, window: int | None = None, timeout: float = 10.0
    ) -> None:
        _import_distributed()
        if not isinstance(address, str) or not address.strip():
            raise ValidationError(
                f"--scheduler must be an address like tcp://HOST:PORT; got {address!r}"
            )
        self.address = address.strip()
        self.retries = check_int("retries", retries, 0)
        self.window = None if window is None else check_int("window", window, 1)
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"DaskExecutor({self.address!r})"

    def _connect(self) -> Any:
        distributed = _import_distributed()
        try:
            return distributed.Client(self.address, timeout=self.timeout, set_as_default=False)
        except (OSError, TimeoutError) as exc:
            raise ValidationError(
                f"--scheduler {self.address}: no Dask scheduler answered ({exc}); start one with "
                "'dask scheduler' or check the address"
            ) from None

    def map(
        self, fn: Callable[[T], U], tasks: Sequence[T], *, on_result: OnResult | None = None
    ) -> Iterator[U]:
        """See :meth:`Executor.map`: completions feed ``on_result``, results leave in order."""
        report = on_result or _ignore
        total = len(tasks)
        if total == 0:
            return
        distributed = _import_distributed()
        client = self._connect()
        pending: dict[Any, int] = {}  # future -> task index
        ready: dict[int, U] = {}  # finished ahead of an earlier task
        try:
            threads = sum(client.nthreads().values())
            window = self.window or max(256, 4 * threads)
            # with_results: results come gathered in batches, not one round trip per future.
            completions = distributed.as_completed(loop=client.loop, with_results=True)
            submitted = next_out = 0
            while next_out < total:
                # Refill: never more than `window` tasks past the first result not yet yielded.
                stop = min(total, next_out + window)
                if submitted < stop and len(pending) <= window // 2:
                    batch = list(range(submitted, stop))
                    futures = client.map(
                        fn,
                        [tasks[i] for i in batch],
                        key=[_task_key(fn, tasks[i], i) for i in batch],
                        retries=self.retries,
                    )
                    for i, future in zip(batch, futures, strict=True):
                        pending[future] = i
                    completions.update(futures)
                    submitted = stop
                future, value = next(completions)
                i = pending.pop(future)
                future.release()
                report(i, value)
                ready[i] = value
                while next_out in ready:
                    yield ready.pop(next_out)
                    next_out += 1
        finally:
            if pending:
                client.cancel(list(pending))
            client.close()


def make_executor(workers: int = 1, scheduler: str | None = None) -> Executor:
    """The executor for ``--workers`` and ``--scheduler``.

    ``scheduler`` (the CLI also reads ``DASK_SCHEDULER_ADDRESS``) selects a Dask cluster;
    otherwise ``workers`` local processes. Both at once is refused: the cluster's workers are
    what the cluster has.

    Examples
    --------
    >>> make_executor(2)
    LocalExecutor(workers=2)
    """
    check_int("workers", workers, 1)
    if scheduler:
        if workers > 1:
            raise ValidationError(
                f"give either --workers or --scheduler, not both; got --workers {workers} and "
                f"--scheduler {scheduler}"
            )
        return DaskExecutor(scheduler)
    return LocalExecutor(workers)


def _import_distributed() -> Any:
    try:
        import distributed
    except ImportError:
        raise MissingDependencyError(
            f"--scheduler needs dask.distributed, an optional extra: {DASK_EXTRA}"
        ) from None
    return distributed


def _task_key(fn: Callable[..., Any], task: object, index: int) -> str:
    """A pure task's Dask key: the function, the task's content and its position (no clashes)."""
    from dask.base import tokenize

    return f"{getattr(fn, '__name__', 'task')}-{tokenize(fn, task)}-{index}"


def _ignore(index: int, value: object) -> None:
    pass
