"""The executor seam, replicates and the resumable store (jobs.executor, .replicates, .store).

The Dask tests start their own ``distributed.LocalCluster`` (two worker processes, one thread
each) and skip cleanly when dask.distributed is not installed.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import signal
import sqlite3
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import varshift.jobs.sweep as sweep_module
from varshift.core.errors import (
    InputFileError,
    Interrupted,
    MissingDependencyError,
    OutputFileError,
    ValidationError,
)
from varshift.jobs.executor import DaskExecutor, LocalExecutor, make_executor
from varshift.jobs.replicates import ReplicateRow, replicate_seed
from varshift.jobs.store import ResultStore, run_tasks, task_key
from varshift.jobs.sweep import SimStats, SweepConfig, simulate_point, sweep

needs_dask = pytest.mark.skipif(
    importlib.util.find_spec("distributed") is None, reason="needs dask.distributed"
)


def _draw(seed: np.random.SeedSequence) -> float:
    return float(np.random.default_rng(seed).standard_normal(500).mean())


def _seeds(n: int) -> list[np.random.SeedSequence]:
    return [np.random.SeedSequence(99, spawn_key=(i,)) for i in range(n)]


def _config(**kw: Any) -> SweepConfig:
    base: dict[str, Any] = {
        "rates": (0.2, 0.5, 0.8),
        "means": (0.0, 1.0),
        "steps": 60,
        "reps": 16,
        "simulate": True,
    }
    return SweepConfig(**{**base, **kw})


# --- the local executor -----------------------------------------------------------------------


@pytest.mark.parametrize("workers", [1, 2])
def test_local_executor_yields_in_task_order_and_reports_every_result(workers: int) -> None:
    seen: list[int] = []
    out = list(LocalExecutor(workers).map(_draw, _seeds(5), on_result=lambda i, v: seen.append(i)))
    assert out == [_draw(s) for s in _seeds(5)]
    assert sorted(seen) == [0, 1, 2, 3, 4]


def test_make_executor_chooses_and_refuses_both() -> None:
    assert isinstance(make_executor(3), LocalExecutor) and make_executor(3).workers == 3
    with pytest.raises(ValidationError, match="either --workers or --scheduler"):
        make_executor(2, "tcp://127.0.0.1:8786")
    with pytest.raises(ValidationError, match="workers must be an integer >= 1; got 0"):
        make_executor(0)


def test_without_distributed_the_scheduler_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "distributed", None)  # import distributed -> ImportError
    with pytest.raises(MissingDependencyError, match=r"pip install 'varshift\[dask\]'"):
        DaskExecutor("tcp://127.0.0.1:8786")


# --- replicates -------------------------------------------------------------------------------


def test_one_seed_keeps_the_streams_of_a_plain_sweep() -> None:
    root = np.random.SeedSequence(5)
    spawned = np.random.SeedSequence(5).spawn(4)
    for i in range(4):
        assert np.array_equal(
            replicate_seed(root, i, 0).generate_state(4), spawned[i].generate_state(4)
        )
    states = {
        tuple(replicate_seed(root, i, r).generate_state(4)) for i in range(4) for r in range(3)
    }
    assert len(states) == 12


def test_replicates_report_mean_spread_and_the_band() -> None:
    config = _config(rates=(0.3, 0.6), means=(0.0,), seeds=3)
    res = sweep(config, rng=11)
    for row in res.rows:
        assert isinstance(row, ReplicateRow) and row.seeds == 3
        # Oracle: the three replicate runs, seeded by hand as the docs promise.
        keys = [(row.index,), (row.index, 1), (row.index, 2)]
        sims = [
            simulate_point(
                sweep_module._SimTask(
                    sweep_module.GridPoint(**{f: getattr(row, f) for f in _POINT}),
                    config.beta,
                    config.momentum,
                    config.steps,
                    config.reps,
                    np.random.SeedSequence(11, spawn_key=k),
                )
            )
            for k in keys
        ]
        run = np.array([s.running_var for s in sims])
        mean, sd = run.sum() / 3, np.sqrt(((run - run.sum() / 3) ** 2).sum() / 2)
        assert row.sim_running_var == pytest.approx(mean, rel=1e-12)
        assert row.sim_running_var_sd == pytest.approx(sd, rel=1e-9)
        assert row.sim_running_var_se == pytest.approx(sd / np.sqrt(3), rel=1e-9)
        inside = abs(mean - row.running_var) <= 2 * sd / np.sqrt(3)
        assert row.running_var_within_2se == inside
    assert res.records()[0]["seeds"] == 3


_POINT = "index dropout framework batch_size mean var topology rho width D rate".split()


def test_seeds_need_simulate() -> None:
    with pytest.raises(ValidationError, match="seeds > 1 needs simulate"):
        sweep(SweepConfig(seeds=2))


# --- the store and resume ---------------------------------------------------------------------


class _Stop(KeyboardInterrupt):
    """Ctrl-C after a given number of results."""


def _stop_after(k: int) -> Any:
    def progress(done: int, total: int) -> None:
        if done >= k:
            raise _Stop

    return progress


def test_resume_recomputes_only_what_is_missing(tmp_path: Path) -> None:
    calls: list[np.random.SeedSequence] = []

    @functools.wraps(_draw)
    def counted(seed: np.random.SeedSequence) -> float:
        calls.append(seed)
        return _draw(seed)

    tasks = _seeds(8)
    path = tmp_path / "run.sqlite"
    kept = r"3 of 8 results are kept in .*run\.sqlite; the same command with --resume"
    with (
        ResultStore.open(path, {"command": "test"}) as store,
        pytest.raises(Interrupted, match=kept),
    ):
        run_tasks(
            LocalExecutor(1), counted, tasks, decode=float, store=store, progress=_stop_after(3)
        )
    assert len(calls) == 3
    calls.clear()
    with ResultStore.open(path, {"command": "test"}, resume=True) as store:
        assert len(store) == 3
        out = run_tasks(LocalExecutor(1), counted, tasks, decode=float, store=store)
    assert out == [_draw(s) for s in tasks]
    assert calls == tasks[3:]


def test_ctrl_c_without_a_store_is_a_plain_interrupt() -> None:
    with pytest.raises(_Stop):
        run_tasks(LocalExecutor(1), _draw, _seeds(4), progress=_stop_after(2))


def test_ctrl_c_in_the_cli_says_what_is_kept_and_how_to_go_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from varshift.cli import app

    real, calls = sweep_module.simulate_point, []

    def interrupted(task: Any) -> SimStats:
        if len(calls) == 3:
            raise KeyboardInterrupt  # Ctrl-C while the fourth point runs
        calls.append(task)
        return real(task)

    monkeypatch.setattr(sweep_module, "simulate_point", interrupted)
    store = tmp_path / "run.sqlite"
    run = ["sweep", "--rate", "0.2,0.4,0.6", "--simulate", "--steps", "20", "--reps", "8"]
    run += ["--seeds", "2", "--seed", "3", "--workers", "1", "-q"]
    args = [*run, "--store", str(store)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 130, result.output
    assert result.stderr.splitlines() == [
        f"varshift: interrupted: 3 of 6 results are kept in {store}; the same command with "
        "--resume computes only the rest"
    ]
    monkeypatch.setattr(sweep_module, "simulate_point", real)
    resumed = CliRunner().invoke(app, [*args, "--resume"])
    assert resumed.exit_code == 0, resumed.stderr
    whole = CliRunner().invoke(app, run)  # uninterrupted, no store
    assert resumed.stdout == whole.stdout


def test_resumed_sweep_equals_an_uninterrupted_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    real = sweep_module.simulate_point

    @functools.wraps(real)
    def counted(task: Any) -> SimStats:
        calls.append(task.point.index)
        return real(task)

    monkeypatch.setattr(sweep_module, "simulate_point", counted)
    config = _config(seeds=2)
    path = tmp_path / "sweep.sqlite"
    with pytest.raises(Interrupted, match=f"5 of {2 * config.n_points} results are kept"):
        sweep(config, rng=7, progress=_stop_after(5), store=path)
    assert len(calls) == 5
    calls.clear()
    resumed = sweep(config, progress=None, store=path, resume=True)  # the seed comes from the store
    assert len(calls) == 2 * config.n_points - 5
    whole = sweep(config, rng=7)
    assert resumed.rows == whole.rows and resumed.seed_entropy == whole.seed_entropy == 7


def test_a_store_of_another_run_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "sweep.sqlite"
    sweep(_config(), rng=1, store=path)
    with pytest.raises(OutputFileError, match="exists; pass --resume"):
        sweep(_config(), rng=1, store=path)
    with pytest.raises(ValidationError, match=r"made by another run \(rates differ\)"):
        sweep(_config(rates=(0.2, 0.5)), rng=1, store=path, resume=True)
    with pytest.raises(ValidationError, match=r"--seed gives entropy 2 .* made with 1"):
        sweep(_config(), rng=2, store=path, resume=True)
    sweep(_config(force=True), rng=2, store=path)  # --force starts the store over
    assert sweep(_config(), store=path, resume=True).seed_entropy == 2
    (tmp_path / "junk.sqlite").write_text("not a database " * 100)
    with pytest.raises(InputFileError, match="not a varshift store"):
        sweep(_config(), rng=1, store=tmp_path / "junk.sqlite", resume=True)


def test_every_result_is_committed_as_it_arrives(tmp_path: Path) -> None:
    path = tmp_path / "run.sqlite"
    rows_seen = []

    def progress(done: int, total: int) -> None:
        # Another connection (as after a crash) sees each result the moment it is reported.
        with sqlite3.connect(path) as db:
            rows_seen.append(db.execute("SELECT COUNT(*) FROM results").fetchone()[0])

    with ResultStore.open(path, {"command": "test"}) as store:
        run_tasks(LocalExecutor(1), _draw, _seeds(4), decode=float, store=store, progress=progress)
    assert rows_seen == [0, 1, 2, 3, 4]
    assert task_key(_draw, _seeds(1)[0]) != task_key(_draw, _seeds(2)[1])


# --- a Dask cluster ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(
        n_workers=2, processes=True, threads_per_worker=1, dashboard_address=":0"
    ) as c:
        yield c


@needs_dask
def test_dask_gives_the_table_of_the_process_pool_and_of_one_worker(cluster: Any) -> None:
    config = _config()
    dask = sweep(replace(config, scheduler=cluster.scheduler_address), rng=3)
    assert dask.rows == sweep(replace(config, workers=2), rng=3).rows
    assert dask.rows == sweep(config, rng=3).rows


@needs_dask
def test_dask_results_come_back_in_task_order_through_a_small_window(cluster: Any) -> None:
    seen: list[int] = []
    executor = DaskExecutor(cluster.scheduler_address, window=3)
    out = list(executor.map(_draw, _seeds(10), on_result=lambda i, v: seen.append(i)))
    assert out == [_draw(s) for s in _seeds(10)]
    assert sorted(seen) == list(range(10))


@needs_dask
def test_an_interrupted_dask_sweep_resumes_locally(tmp_path: Path, cluster: Any) -> None:
    config = _config(seeds=2)
    path = tmp_path / "sweep.sqlite"
    with pytest.raises(Interrupted):
        sweep(
            replace(config, scheduler=cluster.scheduler_address),
            rng=4,
            progress=_stop_after(4),
            store=path,
        )
    with ResultStore.open(path, sweep_module._fingerprint(config), resume=True) as store:
        assert 4 <= len(store) < 2 * config.n_points
    assert sweep(config, store=path, resume=True).rows == sweep(config, rng=4).rows


@needs_dask
def test_a_killed_worker_loses_no_point(cluster: Any) -> None:
    # Last in the module: the nanny restarts the killed worker, the cluster closes after.
    distributed = pytest.importorskip("distributed")
    with distributed.Client(cluster, set_as_default=False) as client:
        victim = next(iter(client.run(os.getpid).values()))
    killed = []

    def progress(done: int, total: int) -> None:
        if done >= 1 and not killed:
            os.kill(victim, signal.SIGKILL)
            killed.append(done)

    config = _config(rates=(0.1, 0.3, 0.5, 0.7, 0.9), steps=100, reps=32)
    res = sweep(replace(config, scheduler=cluster.scheduler_address), rng=8, progress=progress)
    assert killed and killed[0] < config.n_points
    with pytest.raises(ProcessLookupError):
        os.kill(victim, 0)  # it really died
    assert res.rows == sweep(config, rng=8).rows
