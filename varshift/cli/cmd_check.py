"""``varshift check``: compare a report or checkpoint with a baseline; exit 1 on a regression."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from varshift.cli._common import OutputFormat, app
from varshift.core.errors import RegressionFound
from varshift.core.files import OutputPlan, atomic_write, transaction
from varshift.jobs.check import CheckJob, check_reports
from varshift.present import check as show
from varshift.present.output import Visuals, emit, plan_visuals, write_visuals
from varshift.present.render import message, verdict_message
from varshift.present.report import to_table

EPILOG = """\
Examples:

  varshift check reports/suite.json --baseline reports/baseline.json

  varshift check reports/suite.json --baseline reports/baseline.json --z 3 --junit check.xml

  varshift check new.json --baseline old.json --fail-if 'shift_ratio < 0.9' --markdown check.md

  varshift check fixed.pt --baseline model.pt --rtol 0.05

  varshift check new.json --baseline old.json --all --plot figs --html check.html
"""


@app.command(epilog=EPILOG)
def check(
    current: Annotated[Path, typer.Argument(help="Report (.json) or checkpoint to check.")],
    baseline: Annotated[
        Path, typer.Option("--baseline", "-b", help="The committed baseline to compare with.")
    ],
    z: Annotated[
        float, typer.Option("--z", help="Noise threshold in combined standard errors.")
    ] = 4.0,
    rtol: Annotated[
        float, typer.Option(help="Relative tolerance (the floor for metrics without noise).")
    ] = 1e-6,
    atol: Annotated[float, typer.Option(help="Absolute tolerance.")] = 1e-12,
    fail_if: Annotated[
        list[str] | None,
        typer.Option("--fail-if", help="Rule on current values, e.g. 'shift_ratio < 0.9'."),
    ] = None,
    junit: Annotated[Path | None, typer.Option(help="Write a JUnit XML report here.")] = None,
    markdown: Annotated[Path | None, typer.Option(help="Write a Markdown report here.")] = None,
    plot: Annotated[
        Path | None,
        typer.Option(
            "--plot",
            help="Write a chart of every metric's change in units of its tolerance (PNG and "
            "SVG) into this folder.",
        ),
    ] = None,
    html: Annotated[
        Path | None,
        typer.Option(
            "--html",
            help="Write a self-contained HTML page: verdict, regressions, chart, every metric.",
        ),
    ] = None,
    show_all: Annotated[
        bool, typer.Option("--all", help="List every metric, not only the regressions.")
    ] = False,
    fmt: Annotated[OutputFormat, typer.Option("--format", "-f", help="Output format.")] = (
        OutputFormat.table
    ),
    force: Annotated[
        bool, typer.Option(help="Overwrite --junit/--markdown/--plot/--html files.")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only the verdict.")] = False,
    update_baseline: Annotated[
        bool,
        typer.Option(
            "--update-baseline",
            help="Write CURRENT as the new --baseline instead of comparing (--force to replace).",
        ),
    ] = False,
) -> None:
    """Compare CURRENT with a baseline metric by metric (reports) or layer by layer (checkpoints).

    A difference counts when it exceeds max(z·√(sd_base² + sd_current²), atol + rtol·|base|):
    Monte-Carlo metrics are compared within their noise bands, deterministic ones within rtol.
    Each metric is marked better, worse, changed (significant, no better direction) or unchanged.
    Exit 0 when nothing regressed, 1 when something did, 2 on bad input.
    When GITHUB_STEP_SUMMARY is set the Markdown report is appended there; when GITHUB_ACTIONS
    is set, each regression is also printed as an `::error` annotation.

    `--plot DIR` charts every metric's change divided by its tolerance (beyond ±1:
    significant; PNG and SVG, needs matplotlib); `--html FILE` writes one self-contained page
    with the verdict, the regressions, the chart and the full comparison table. Both are
    written before the exit code is decided, so a failing CI job still has them.
    """
    if update_baseline:
        return _update_baseline(current, baseline, force=force, quiet=quiet)
    visuals = Visuals(plot, html)
    plan = OutputPlan([current, baseline], force=force)
    plan_visuals(plan, visuals, [show.FIGURE_STEM])
    plan.add_all([junit] if junit else [], "--junit")
    plan.add_all([markdown] if markdown else [], "--markdown")
    result = check_reports(CheckJob(current, baseline, z, rtol, atol, tuple(fail_if or ())))
    md = show.markdown_summary(result, show_all=show_all)
    drawn = show.chart(result) if visuals.wanted else None
    page = ("varshift check", lambda: show.sections(result, drawn), result.metadata)
    with transaction() as tx:  # every output or none
        shown = write_visuals(visuals, [drawn] if drawn else [], page)
        for path, text in ((junit, show.junit_xml(result)), (markdown, md)):
            if path is not None:
                atomic_write(path, text, force=True)
    show.append_step_summary(md)
    verdict_message(show.summary_line(result))
    rows = show.shown_rows(result, fmt.value, show_all=show_all)
    if rows and not quiet:
        df = to_table(rows)
        table_df = df.select(show.TABLE_COLUMNS)
        emit(df, fmt.value, title="varshift check", table_df=table_df, keys=2)
    for path in shown:
        message(f"varshift: {tx.verb(path)} {path}", quiet)
    show.annotate(result)
    if result.regressed:
        raise RegressionFound(show.regression_message(result))


def _update_baseline(current: Path, baseline: Path, *, force: bool, quiet: bool) -> None:
    from varshift.jobs.check import update_baseline

    same = update_baseline(current, baseline, force=force)
    message(f"varshift: {baseline} {'unchanged' if same else f'updated from {current}'}", quiet)
