"""``varshift check``: compare a report or checkpoint with a baseline; exit 1 on a regression."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from varshift.check import (
    CheckResult,
    compare,
    github_annotations,
    junit_xml,
    load_metrics,
    markdown_summary,
    parse_rule,
    summary_line,
)
from varshift.cli._common import OutputFormat, app, emit, handle_errors
from varshift.errors import RegressionFound
from varshift.report import atomic_write, to_frame

EPILOG = """\
Examples:

  varshift check reports/suite.json --baseline reports/baseline.json

  varshift check reports/suite.json --baseline reports/baseline.json --z 3 --junit check.xml

  varshift check new.json --baseline old.json --fail-if 'shift_ratio < 0.9' --markdown check.md

  varshift check fixed.pt --baseline model.pt --rtol 0.05
"""


@app.command(epilog=EPILOG)
@handle_errors
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
    show_all: Annotated[
        bool, typer.Option("--all", help="List every metric, not only the regressions.")
    ] = False,
    fmt: Annotated[OutputFormat, typer.Option("--format", "-f", help="Output format.")] = (
        OutputFormat.table
    ),
    force: Annotated[bool, typer.Option(help="Overwrite --junit/--markdown files.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only the verdict.")] = False,
) -> None:
    """Compare CURRENT with a baseline metric by metric (reports) or layer by layer (checkpoints).

    A difference counts when it exceeds max(z·√(sd_base² + sd_current²), atol + rtol·|base|):
    Monte-Carlo metrics are compared within their noise bands, deterministic ones within rtol.
    Each metric is marked better, worse, changed (significant, no better direction) or unchanged.
    Exit 0 when nothing regressed, 1 when something did, 2 on bad input.
    When GITHUB_STEP_SUMMARY is set the Markdown report is appended there; when GITHUB_ACTIONS
    is set, each regression is also printed as an `::error` annotation.
    """
    rules = [parse_rule(r) for r in fail_if or []]
    _, base_metrics = load_metrics(baseline)
    _, cur_metrics = load_metrics(current)
    result = compare(
        base_metrics,
        cur_metrics,
        z=z,
        rtol=rtol,
        atol=atol,
        rules=rules,
        baseline_name=str(baseline),
        current_name=str(current),
    )
    md = markdown_summary(result, show_all=show_all)
    if junit is not None:
        atomic_write(junit, junit_xml(result), force=force)
    if markdown is not None:
        atomic_write(markdown, md, force=force)
    summary_file = os.environ.get("GITHUB_STEP_SUMMARY")
    if summary_file:
        with open(summary_file, "a", encoding="utf-8") as fh:
            fh.write(md + "\n")
    _print(result, fmt, show_all=show_all, quiet=quiet)
    if os.environ.get("GITHUB_ACTIONS"):
        for line in github_annotations(result):
            sys.stdout.write(line + "\n")
    if result.regressed:
        names = ", ".join(f"{c.scenario}/{c.metric}" for c in result.regressions[:5])
        more = f" and {len(result.regressions) - 5} more" if len(result.regressions) > 5 else ""
        raise RegressionFound(f"{len(result.regressions)} regressed: {names}{more}")


def _print(result: CheckResult, fmt: OutputFormat, *, show_all: bool, quiet: bool) -> None:
    typer.echo(summary_line(result), err=True)
    if quiet:
        return
    rows = list(result.comparisons + result.rule_failures) if show_all else list(result.regressions)
    if fmt in (OutputFormat.csv, OutputFormat.json):
        rows = list(result.comparisons + result.rule_failures)
    if not rows:
        return
    df = to_frame(rows)
    table = df[["scenario", "metric", "baseline", "current", "ratio", "z", "mark", "reason"]]
    emit(df, fmt, title="varshift check", table_df=table)
