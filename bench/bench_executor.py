"""Throughput of the executors on a simulated sweep: process pool and Dask, one worker vs two.

    python bench/bench_executor.py [--points-factor 1] [--steps 1000] [--reps 256] [--out FILE]

The grid is 216 points (9 rates x 2 dropout kinds x 3 means x 4 framework presets, dropout
directly before BN), each one :func:`varshift.jobs.sweep.simulate_point`. Measured, in one run:

* ``local 1`` — tasks one after the other in this process; each task's compute time is taken
  inside the task, giving the median point's compute.
* ``local 2`` — :class:`LocalExecutor` with two processes (pool start-up included).
* ``dask 1`` / ``dask 2`` — a ``distributed.LocalCluster`` of one / two single-thread worker
  processes (cluster start-up excluded, client connection included), results streamed to a
  SQLite store as the CLI's ``--store`` does. Task compute is timed on the workers too, so the
  cluster path's overhead per point is ``(wall x workers - sum of compute) / points``.
* client memory: peak Python allocation (tracemalloc) of the client while mapping N tiny tasks
  through :class:`DaskExecutor` with results discarded, for N = 500, 2000 and 8000, scheduler
  and worker in their own processes — flat (the last interval adds < 0.1 kB per task) means
  windowing works and nothing is kept per task.

Targets (issue 13): two workers >= 1.7x one worker, for Dask and the process pool; cluster
overhead per point <= 10% of a median point's compute. The load of the machine is printed
beside the numbers: on a shared machine, two workers cannot be faster than the free cores.
The exit code is 0 whatever the numbers (this is a report).
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from varshift.jobs.executor import DaskExecutor, Executor, LocalExecutor  # noqa: E402
from varshift.jobs.replicates import replicate_seed  # noqa: E402
from varshift.jobs.store import ResultStore, run_tasks  # noqa: E402
from varshift.jobs.sweep import (  # noqa: E402
    SimStats,
    SweepConfig,
    _SimTask,
    grid_points,
    simulate_point,
)


def timed_point(task: _SimTask) -> tuple[float, SimStats]:
    """``simulate_point`` and its compute time in seconds, measured where it runs."""
    start = time.perf_counter()
    value = simulate_point(task)
    return time.perf_counter() - start, value


def tasks_of(steps: int, reps: int, factor: int) -> list[_SimTask]:
    rates = tuple(round(0.1 * i, 1) for i in range(1, 10))
    means = tuple(float(m) for m in range(3 * factor))
    config = SweepConfig(
        rates=rates,
        dropouts=("bernoulli", "uout"),
        frameworks=("torch", "keras", "tf-keras", "flax"),
        means=means,
        steps=steps,
        reps=reps,
        simulate=True,
    )
    root = np.random.SeedSequence(2026)
    return [
        _SimTask(p, config.beta, config.momentum, steps, reps, replicate_seed(root, p.index, 0))
        for p in grid_points(config)
    ]


def run(executor: Executor, tasks: Sequence[_SimTask], store: Path | None) -> tuple[float, list]:
    start = time.perf_counter()
    if store is None:
        out = run_tasks(executor, timed_point, tasks, decode=_never)
    else:
        with ResultStore.open(store, {"command": "bench"}, force=True) as kept:
            out = run_tasks(executor, timed_point, tasks, decode=_never, store=kept)
    return time.perf_counter() - start, out


def _never(value: Any) -> Any:
    raise AssertionError("a fresh store has nothing to decode")


def client_memory(sizes: Sequence[int], port: int = 8799) -> dict[int, int]:
    """Peak bytes Python allocates in the client while ``n`` tiny tasks stream through.

    The scheduler and the worker run as separate processes (``dask scheduler``, ``dask
    worker``): a ``LocalCluster`` would put the scheduler, and its task bookkeeping, in here.
    """
    dask = str(Path(sys.executable).with_name("dask"))
    address = f"tcp://127.0.0.1:{port}"
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    scheduler = subprocess.Popen(
        [dask, "scheduler", "--port", str(port), "--dashboard-address", ":0"], **quiet
    )
    worker = subprocess.Popen(
        [dask, "worker", address, "--nthreads", "1", "--dashboard-address", ":0"], **quiet
    )
    try:
        executor = DaskExecutor(address, timeout=60)
        list(executor.map(abs, range(20)))  # connected and warm
        peaks = {}
        for n in sizes:
            tracemalloc.start()
            # abs: almost no compute, and importable on any worker.
            for _ in executor.map(abs, range(n)):
                pass
            peaks[n] = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        return peaks
    finally:
        for proc in (worker, scheduler):
            proc.terminate()
            proc.wait()


def worker_environ() -> dict[str, Any]:
    """The Dask nanny's worker environment with glibc's default allocator behaviour restored.

    ``distributed`` starts workers with ``MALLOC_TRIM_THRESHOLD_=65536``, which also fixes the
    mmap threshold at 128 KiB: every large temporary array is mapped and unmapped again, and
    one engine point ran 2.6x slower (739 ms against 279 ms, measured here on one point of this
    grid). Large thresholds give the default speed back (288 ms); the README's cluster recipe
    says the same.
    """
    import dask

    environ = dict(dask.config.get("distributed.nanny.pre-spawn-environ", {}))
    environ |= {"MALLOC_TRIM_THRESHOLD_": 2**30, "MALLOC_MMAP_THRESHOLD_": 2**26}
    return environ


#: Client memory is measured for these numbers of tiny tasks.
MEMORY_SIZES = (500, 2000, 8000)


def memory_rows(memory: dict[int, int]) -> list[str]:
    """Peak client allocation per size, and its growth per task over each interval.

    Flat means the last interval adds under 0.1 kB per task. Over the first thousands of tasks
    the client does grow: ``distributed`` keeps the last ``distributed.admin.low-level-log-length``
    (default 1000) message batches it sent to the scheduler, a log for developers that stops
    growing once full; the executor's own buffers are bounded by its window.
    """
    sizes = sorted(memory)
    peaks = " / ".join(f"{memory[n] / 1e6:.2f} MB" for n in sizes)
    rows = [f"| client peak allocation, {' / '.join(map(str, sizes))} tiny tasks | {peaks} | | |"]
    for a, b in itertools.pairwise(sizes):
        slope = (memory[b] - memory[a]) / (b - a) / 1e3
        last = b == sizes[-1]
        rows.append(
            f"| client growth from {a} to {b} tasks | {slope:.3f} kB per task | "
            + (f"flat: < 0.1 kB per task | {slope < 0.1} |" if last else "| |")
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--reps", type=int, default=256)
    parser.add_argument("--points-factor", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    import dask
    import distributed

    # Fresh tasks for every run: a task's SeedSequence counts the children the engine spawns
    # from it, so a task object run once in this process must not be sent to a worker again.
    def tasks() -> list[_SimTask]:
        return tasks_of(args.steps, args.reps, args.points_factor)

    n = len(tasks())
    reference: list[SimStats] = []
    lines = [f"# executor benchmark: {n} points, steps {args.steps}, reps {args.reps}", ""]
    lines.append(f"load average before: {os.getloadavg()}, cpus: {os.cpu_count()}")
    tmp = Path(tempfile.mkdtemp(prefix="varshift-bench-"))

    wall: dict[str, float] = {}
    compute: dict[str, list[float]] = {}
    for name, make in (
        ("local 1", lambda: LocalExecutor(1)),
        ("local 2", lambda: LocalExecutor(2)),
    ):
        wall[name], out = run(make(), tasks(), None)
        compute[name] = [t for t, _ in out]
        reference = reference or [v for _, v in out]
        assert [v for _, v in out] == reference, name
        print(name, f"{wall[name]:.2f} s", flush=True)
    for workers in (1, 2):
        name = f"dask {workers}"
        with (
            dask.config.set({"distributed.nanny.pre-spawn-environ": worker_environ()}),
            distributed.LocalCluster(
                n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0"
            ) as cluster,
        ):
            # Warm-up: the workers import varshift once (not part of a sweep's steady cost).
            list(DaskExecutor(cluster.scheduler_address).map(timed_point, tasks()[:workers]))
            wall[name], out = run(
                DaskExecutor(cluster.scheduler_address), tasks(), tmp / "s.sqlite"
            )
            compute[name] = [t for t, _ in out]
            assert [v for _, v in out] == reference, name
        print(name, f"{wall[name]:.2f} s", flush=True)
    memory = client_memory(MEMORY_SIZES)
    lines.append(f"load average after: {os.getloadavg()}")
    median = statistics.median(compute["local 1"])
    lines += ["", "| measurement | value | target | met |", "|---|---|---|---|"]
    lines.append(f"| median point compute (in process) | {median * 1e3:.1f} ms | | |")
    for kind in ("local", "dask"):
        t1, t2 = wall[f"{kind} 1"], wall[f"{kind} 2"]
        lines.append(f"| {kind} 1 worker | {t1:.2f} s ({n / t1:.1f} points/s) | | |")
        lines.append(f"| {kind} 2 workers | {t2:.2f} s ({n / t2:.1f} points/s) | | |")
        speed = t1 / t2
        lines.append(f"| {kind}: 2 workers / 1 | {speed:.2f}x | >= 1.7x | {speed >= 1.7} |")
    for workers in (1, 2):
        name = f"dask {workers}"
        over = (wall[name] * workers - sum(compute[name])) / n
        med = statistics.median(compute[name])
        share = over / med
        lines.append(
            f"| {name}: overhead per point | {over * 1e3:.2f} ms = {share:.1%} of its median "
            f"compute {med * 1e3:.1f} ms | <= 10% | {share <= 0.10} |"
        )
    lines += memory_rows(memory)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out is not None:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
