"""How ``varshift suite`` writes a :class:`~varshift.jobs.suite.SuiteResult`: one long-form
report (CSV, Markdown, JSON) with the metadata block."""

from __future__ import annotations

from pathlib import Path

from varshift.core.files import atomic_write
from varshift.jobs.suite import SuiteResult
from varshift.present.report import report_paths, report_texts, to_table


def write_suite_report(result: SuiteResult, folder: Path, stem: str) -> list[Path]:
    """Write ``<folder>/<stem>.csv|md|json`` (planned by the caller); return the paths."""
    texts = report_texts(
        to_table(result.rows), result.metadata, title=f"varshift report suite (seed {result.seed})"
    )
    paths = report_paths(folder, stem)
    return [atomic_write(p, text, force=True) for p, text in zip(paths, texts, strict=True)]
