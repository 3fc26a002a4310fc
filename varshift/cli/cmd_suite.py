"""``varshift suite``: run the standard report suite that CI checks against a baseline."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from varshift.cli._common import app
from varshift.core.files import OutputPlan
from varshift.core.validate import check_stem
from varshift.jobs.suite import scenarios, suite_metadata, suite_result
from varshift.present.render import message, progress_bar
from varshift.present.suite import plan_suite_report, write_suite_report

EPILOG = """\
Examples:

  varshift suite                                  # writes reports/suite.{csv,md,json}

  varshift suite --report-dir build/check --force

  varshift suite --seed 7 --stem suite-seed7

  varshift suite --workers 2 --report-dir build/check --force   # same files, two processes

  varshift check reports/suite.json --baseline reports/baseline.json
"""


@app.command(epilog=EPILOG)
def suite(
    report_dir: Annotated[
        Path, typer.Option("--report-dir", help="Folder for the report files.")
    ] = Path("reports"),
    stem: Annotated[str, typer.Option(help="File name stem of the report files.")] = "suite",
    seed: Annotated[int, typer.Option(help="Seed of every simulation in the suite.")] = 0,
    quick: Annotated[
        bool, typer.Option(help="Smaller simulations (same scenarios); for tests.")
    ] = False,
    force: Annotated[
        bool, typer.Option(help="Overwrite report files with different content.")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No messages.")] = False,
    workers: Annotated[
        int, typer.Option(help="Local processes for the scenarios (results do not depend on it).")
    ] = 1,
    scheduler: Annotated[
        str | None,
        typer.Option(
            envvar="DASK_SCHEDULER_ADDRESS",
            help="Run the scenarios on this Dask cluster, tcp://HOST:PORT (pip install "
            "'varshift[dask]'); results do not depend on it.",
        ),
    ] = None,
) -> None:
    """Run the standard report suite that `make test` checks against the baseline.

    Fixed scenarios (the classic experiment, a rate sweep, every dropout kind, every framework
    preset, the wide linear case at several widths and correlations), written as one long-form
    report: `scenario, metric, value, sd, better`.

    Closed-form metrics (`theory.*`) are deterministic (sd 0); Monte-Carlo metrics (`sim.*`)
    carry their standard deviation across seeds, so `varshift check` compares them within noise.
    The same seed gives byte-identical files, whatever `--workers` or `--scheduler`:
    rerunning an identical command leaves them in place and succeeds; files from other
    parameters need `--force`.
    """
    plan_suite_report(
        OutputPlan(force=force), report_dir, check_stem("--stem", stem), suite_metadata(seed, quick)
    )
    with progress_bar("suite", len(scenarios(quick)), quiet=quiet) as update:
        result = suite_result(
            seed, quick=quick, progress=update, workers=workers, scheduler=scheduler
        )
    paths, unchanged = write_suite_report(result, report_dir, stem, force=force)
    verb = "unchanged" if unchanged else "wrote"
    for p in paths:
        message(f"{verb} {p}", quiet)
