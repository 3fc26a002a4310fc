"""How ``varshift suite`` writes a :class:`~varshift.jobs.suite.SuiteResult`: one long-form
report (CSV, Markdown, JSON) with the metadata block."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from varshift.core.errors import OutputFileError
from varshift.core.files import OutputPlan, write_unchanged_or_new
from varshift.jobs.suite import SuiteResult
from varshift.present.report import report_paths, report_texts, to_table


def plan_suite_report(
    plan: OutputPlan, folder: Path, stem: str, metadata: Mapping[str, object]
) -> list[Path]:
    """Plan ``<folder>/<stem>.csv|md|json`` before any computing.

    Existing files are kept for comparison (a rerun that reproduces them is not an error), but
    when ``<stem>.json`` records other parameters (seed, ``--quick``, version, scenarios) the
    new report cannot match it: without ``--force`` this is refused now, not after the run.
    """
    paths = [plan.add(p, replace=True) for p in report_paths(folder, stem)]
    existing = paths[-1]
    if not plan.force and existing.is_file():
        try:
            recorded = json.loads(existing.read_text()).get("metadata")
        except (OSError, ValueError, AttributeError):
            recorded = None
        if recorded != json.loads(json.dumps(metadata)):
            raise OutputFileError(
                f"{existing}: already exists from another run (other parameters or version); "
                "pass --force to overwrite it"
            )
    return paths


def write_suite_report(
    result: SuiteResult, folder: Path, stem: str, *, force: bool = False
) -> tuple[list[Path], bool]:
    """Write ``<folder>/<stem>.csv|md|json`` (planned by the caller).

    Returns the paths and whether they already held exactly these bytes (nothing written).
    """
    texts = report_texts(
        to_table(result.rows), result.metadata, title=f"varshift report suite (seed {result.seed})"
    )
    paths = report_paths(folder, stem)
    unchanged = write_unchanged_or_new(list(zip(paths, texts, strict=True)), force=force)
    return paths, unchanged
