"""``varshift check``: compare a report or checkpoint with a baseline; exit 1 on a regression."""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from varshift import __version__
from varshift.cli._common import OutputFormat, app, emit, handle_errors
from varshift.cli._outputs import Drawn, inline, preflight, save_all, write_page
from varshift.core.errors import RegressionFound
from varshift.core.files import atomic_write
from varshift.jobs.check import (
    CheckResult,
    Comparison,
    compare,
    github_annotations,
    junit_xml,
    load_metrics,
    markdown_summary,
    parse_rule,
    summary_line,
)
from varshift.present.report import to_frame

if TYPE_CHECKING:
    from varshift.present.html import Section

EPILOG = """\
Examples:

  varshift check reports/suite.json --baseline reports/baseline.json

  varshift check reports/suite.json --baseline reports/baseline.json --z 3 --junit check.xml

  varshift check new.json --baseline old.json --fail-if 'shift_ratio < 0.9' --markdown check.md

  varshift check fixed.pt --baseline model.pt --rtol 0.05

  varshift check new.json --baseline old.json --all --plot figs --html check.html
"""

#: Figure file stem of --plot.
FIGURE_STEM = "check_comparison"

#: The chart shows at most this many metrics: the regressions, then the largest changes.
MAX_METRICS_SHOWN = 40


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
    rules = [parse_rule(r) for r in fail_if or []]
    preflight(plot, html, (FIGURE_STEM,), force=force)
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
    shown: list[Path] = []
    if plot is not None or html is not None:
        drawn = _chart(result)
        if plot is not None and drawn is not None:
            shown += save_all(plot, [drawn])
        if html is not None:
            meta = {
                "varshift": __version__,
                "command": "check",
                "parameters": {
                    "current": str(current),
                    "baseline": str(baseline),
                    "z": z,
                    "rtol": rtol,
                    "atol": atol,
                    "fail_if": [str(r) for r in rules],
                },
            }
            shown.append(write_page(html, "varshift check", _sections(result, drawn), meta))
    if junit is not None:
        atomic_write(junit, junit_xml(result), force=force)
    if markdown is not None:
        atomic_write(markdown, md, force=force)
    summary_file = os.environ.get("GITHUB_STEP_SUMMARY")
    if summary_file:
        with open(summary_file, "a", encoding="utf-8") as fh:
            fh.write(md + "\n")
    _print(result, fmt, show_all=show_all, quiet=quiet)
    if not quiet:
        for path in shown:
            typer.echo(f"varshift: wrote {path}", err=True)
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


def _chart(result: CheckResult) -> Drawn | None:
    """The regressions, then the largest changes, in units of their tolerance."""
    from varshift.present.figures import comparison_chart

    rows = result.comparisons
    if not rows:
        return None

    def size(c: Comparison) -> float:
        if c.threshold > 0 and math.isfinite(c.difference):
            return abs(c.difference) / c.threshold
        return math.inf if c.difference != 0 else 0.0

    order = sorted(rows, key=lambda c: (not c.regressed, -size(c)))
    shown = order[:MAX_METRICS_SHOWN]
    fig = comparison_chart(
        [f"{c.scenario}/{c.metric}" if c.scenario else c.metric for c in shown],
        [c.difference for c in shown],
        [c.threshold for c in shown],
        [c.mark for c in shown],
        title=summary_line(result).removeprefix("varshift check: "),
    )
    what = (
        f"the {len(shown)} largest changes of {len(rows)} metrics"
        if len(shown) < len(rows)
        else f"all {len(rows)} metric(s)"
    )
    caption = (
        f"Current against baseline for {what}, regressions first: each change divided "
        "by its tolerance max(z·√(sd_base² + sd_cur²), atol + rtol·|base|). Beyond the dashed "
        "lines at ±1 a change is significant; for a noisy metric the bar is its z-score "
        "divided by --z. The axis is logarithmic beyond ±1. --fail-if hits are in the tables."
    )
    return Drawn(FIGURE_STEM, fig, caption)


def _sections(result: CheckResult, drawn: Drawn | None) -> list[Section]:
    from varshift.present.html import Section, Table

    columns = ["scenario", "metric", "baseline", "current", "ratio", "difference"]
    columns += ["threshold", "z", "mark", "reason"]
    verdict = summary_line(result).removeprefix("varshift check: ")
    regressions = list(result.regressions)
    sections = [
        Section(
            "Verdict",
            (
                verdict + ".",
                f"{len(regressions)} regression(s): the check exits 1."
                if regressions
                else "No metric regressed: the check exits 0.",
            ),
            tables=(Table(to_frame(regressions)[columns], "Regressions"),) if regressions else (),
        )
    ]
    if drawn is not None:
        sections.append(Section("Changes against the baseline", figures=inline([drawn])))
    every = list(result.comparisons + result.rule_failures)
    if every:
        sections.append(
            Section(
                "Every metric",
                ("One row per compared metric, then the --fail-if hits.",),
                tables=(Table(to_frame(every)[columns]),),
            )
        )
    return sections
