"""How ``varshift check`` shows a :class:`~varshift.jobs.check.CheckResult`: the verdict line,
CI outputs (JUnit XML, Markdown summary, GitHub annotations), the chart and the page sections."""

from __future__ import annotations

import math
from typing import Any

from varshift.jobs.check import CheckResult, Comparison
from varshift.present.output import Drawn, inline
from varshift.present.report import md_cell, to_table

#: Figure file stem of --plot.
FIGURE_STEM = "check_comparison"

#: The chart shows at most this many metrics: the regressions, then the largest changes.
MAX_METRICS_SHOWN = 40

#: Columns of the human tables.
TABLE_COLUMNS = ["scenario", "metric", "baseline", "current", "ratio", "z", "mark", "reason"]


def summary_line(result: CheckResult) -> str:
    """One line: how many metrics were compared and how each came out."""
    marks: dict[str, int] = {}
    for c in result.comparisons:
        marks[c.mark] = marks.get(c.mark, 0) + 1
    parts = ", ".join(f"{n} {m}" for m, n in sorted(marks.items()))
    verdict = "REGRESSION" if result.regressed else "ok"
    rules = f"; {len(result.rule_failures)} fail-if rule hits" if result.rule_failures else ""
    return f"varshift check: {verdict}: {len(result.comparisons)} metrics ({parts}){rules}"


def _describe(c: Comparison) -> str:
    return (
        f"{c.scenario}/{c.metric} {c.mark}: baseline {c.baseline:.6g}, "
        f"current {c.current:.6g} ({c.reason})"
    )


def junit_xml(result: CheckResult, suite: str = "varshift check") -> str:
    """JUnit XML: one test case per metric (class = scenario), a ``<failure>`` per regression."""
    from xml.sax.saxutils import quoteattr

    cases = list(result.comparisons) + list(result.rule_failures)
    failures = sum(1 for c in cases if c.regressed)
    # The whole check (reading both files and comparing) is timed; one comparison takes no
    # measurable time, so each case gets the check's time divided evenly.
    total = f"{result.seconds:.3f}"
    each = f"{result.seconds / max(len(cases), 1):.6f}"
    lines = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        f'<testsuites name={quoteattr(suite)} tests="{len(cases)}" failures="{failures}" '
        f'time="{total}">',
        f'  <testsuite name={quoteattr(suite)} tests="{len(cases)}" failures="{failures}" '
        f'errors="0" skipped="0" time="{total}">',
    ]
    for c in cases:
        name = c.metric if c.mark != "rule" else f"{c.metric} [{c.reason}]"
        head = (
            f"    <testcase classname={quoteattr(c.scenario or 'report')} name={quoteattr(name)} "
            f'time="{each}"'
        )
        if c.regressed:
            msg = _describe(c)
            lines.append(head + ">")
            lines.append(f"      <failure message={quoteattr(msg)} type={quoteattr(c.mark)}/>")
            lines.append("    </testcase>")
        else:
            lines.append(head + "/>")
    lines += ["  </testsuite>", "</testsuites>", ""]
    return "\n".join(lines)


def markdown_summary(result: CheckResult, *, show_all: bool = False) -> str:
    """A Markdown report: the verdict, then the regressed (or all) metrics as a table."""
    head = "## " + summary_line(result) + "\n\n"
    rows = result.comparisons + result.rule_failures if show_all else result.regressions
    if not rows:
        return head + "No metric regressed.\n"
    lines = [
        "| scenario | metric | baseline | current | ratio | z | mark | reason |",
        "|---|---|---:|---:|---:|---:|---|---|",
    ]
    for c in rows:
        lines.append(
            f"| {md_cell(c.scenario)} | {md_cell(c.metric)} | {c.baseline:.6g} | "
            f"{c.current:.6g} | {c.ratio:.4g} | {'' if math.isnan(c.z) else f'{c.z:.2f}'} | "
            f"{'**' + c.mark + '**' if c.regressed else c.mark} | {md_cell(c.reason)} |"
        )
    return head + "\n".join(lines) + "\n"


def github_annotations(result: CheckResult) -> list[str]:
    """``::error`` workflow-command lines, one per regression, naming the current report as
    ``file=`` (GitHub shows the annotation on that file when it is in the repository)."""
    source = str(result.metadata.get("parameters", {}).get("current", ""))
    where = f"file={_gh_property(source)}," if source else ""
    out = []
    for c in result.regressions:
        msg = _gh_escape(_describe(c))
        out.append(f"::error {where}title=varshift check::{msg}")
    return out


def _gh_escape(text: str) -> str:
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _gh_property(text: str) -> str:
    return _gh_escape(text).replace(":", "%3A").replace(",", "%2C")


def regression_message(result: CheckResult) -> str:
    """The message of the failing exit: how many regressed and the first five names."""
    names = ", ".join(f"{c.scenario}/{c.metric}" for c in result.regressions[:5])
    more = f" and {len(result.regressions) - 5} more" if len(result.regressions) > 5 else ""
    return f"{len(result.regressions)} regressed: {names}{more}"


def shown_rows(result: CheckResult, fmt: str, *, show_all: bool) -> list[Comparison]:
    """The rows printed: regressions, or every metric with ``--all`` or a machine format."""
    every = list(result.comparisons + result.rule_failures)
    return every if show_all or fmt in ("csv", "json") else list(result.regressions)


def chart(result: CheckResult) -> Drawn | None:
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


def sections(result: CheckResult, drawn: Drawn | None) -> list[Any]:
    """The page: the verdict with the regressions, the chart, every metric."""
    from varshift.present.html import Section, Table

    columns = ["scenario", "metric", "baseline", "current", "ratio", "difference"]
    columns += ["threshold", "z", "mark", "reason"]
    verdict = summary_line(result).removeprefix("varshift check: ")
    regressions = list(result.regressions)
    out = [
        Section(
            "Verdict",
            (
                verdict + ".",
                f"{len(regressions)} regression(s): the check exits 1."
                if regressions
                else "No metric regressed: the check exits 0.",
            ),
            tables=(Table(to_table(regressions).select(columns), "Regressions"),)
            if regressions
            else (),
        )
    ]
    if drawn is not None:
        out.append(Section("Changes against the baseline", figures=inline([drawn])))
    every = list(result.comparisons + result.rule_failures)
    if every:
        out.append(
            Section(
                "Every metric",
                ("One row per compared metric, then the --fail-if hits.",),
                tables=(Table(to_table(every).select(columns)),),
            )
        )
    return out


def append_step_summary(markdown: str) -> None:
    """Append the Markdown report to ``$GITHUB_STEP_SUMMARY`` when it is set (GitHub Actions)."""
    import os

    summary_file = os.environ.get("GITHUB_STEP_SUMMARY")
    if summary_file:
        with open(summary_file, "a", encoding="utf-8") as fh:
            fh.write(markdown + "\n")


def annotate(result: CheckResult) -> None:
    """Print each regression as an ``::error`` line on stdout when ``$GITHUB_ACTIONS`` is set."""
    import os
    import sys

    if os.environ.get("GITHUB_ACTIONS"):
        for line in github_annotations(result):
            sys.stdout.write(line + "\n")
