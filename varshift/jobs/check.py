"""Compare a report (or checkpoint statistics) against a baseline, metric by metric.

A *metric* is one number with an optional noise band (its standard deviation) and an
orientation (``higher`` or ``lower`` is better, or ``none``). A difference counts only when it
exceeds the tolerance::

    threshold = max(z * sqrt(sd_baseline² + sd_current²), atol + rtol * |baseline|)

so noisy Monte-Carlo metrics are compared at ``z`` standard errors and deterministic ones
(``sd = 0``) at ``rtol``/``atol``. A significant change is ``better`` or ``worse`` per the
orientation, or ``changed`` when the metric has none; ``worse`` and ``changed`` are regressions.
Explicit rules (``shift_ratio < 0.9``) fail on the current value alone.
"""

from __future__ import annotations

import fnmatch
import json
import math
import operator
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from varshift.core.errors import InputFileError, ValidationError
from varshift.core.validate import check_range
from varshift.jobs._meta import run_metadata

#: Orientation of metrics in reports that do not state one, by glob on the metric name.
DEFAULT_ORIENTATION: tuple[tuple[str, str], ...] = (
    ("shift_ratio*", "higher"),
    ("*_error", "lower"),
    ("*abs_err*", "lower"),
)

_OPS: dict[str, Callable[[float, float], bool]] = {
    "<=": operator.le,
    ">=": operator.ge,
    "==": operator.eq,
    "!=": operator.ne,
    "<": operator.lt,
    ">": operator.gt,
}


@dataclass(frozen=True)
class Metric:
    """One comparable number: ``value`` with noise sd ``sd`` (0 if deterministic)."""

    scenario: str
    name: str
    value: float
    sd: float = 0.0
    better: str = "none"

    @property
    def key(self) -> tuple[str, str]:
        """``(scenario, name)``: how a metric is matched between two reports."""
        return (self.scenario, self.name)


@dataclass(frozen=True)
class Rule:
    """An explicit ``--fail-if`` rule: ``pattern op threshold`` on the current value."""

    pattern: str
    op: str
    threshold: float

    def __str__(self) -> str:
        return f"{self.pattern} {self.op} {self.threshold:g}"

    def matches(self, metric: Metric) -> bool:
        """True if the rule's pattern names this metric (``name`` or ``scenario/name``)."""
        full = f"{metric.scenario}/{metric.name}"
        return fnmatch.fnmatchcase(metric.name, self.pattern) or fnmatch.fnmatchcase(
            full, self.pattern
        )

    def violated_by(self, metric: Metric) -> bool:
        """True if the current value satisfies the failure condition."""
        return self.matches(metric) and _OPS[self.op](metric.value, self.threshold)


def parse_rule(text: str) -> Rule:
    """Parse ``'shift_ratio < 0.9'`` (or ``'classic/*_error >= 0.1'``) into a :class:`Rule`.

    Examples
    --------
    >>> parse_rule("shift_ratio < 0.9")
    Rule(pattern='shift_ratio', op='<', threshold=0.9)
    """
    m = re.fullmatch(r"\s*(\S+?)\s*(<=|>=|==|!=|<|>)\s*(\S+)\s*", text)
    if not m:
        raise ValidationError(
            f"fail-if must look like 'METRIC OP NUMBER' with OP one of <, <=, >, >=, ==, !=; "
            f"got {text!r}"
        )
    try:
        threshold = float(m.group(3))
    except ValueError:
        raise ValidationError(
            f"fail-if threshold must be a number; got {m.group(3)!r} in {text!r}"
        ) from None
    return Rule(m.group(1), m.group(2), threshold)


@dataclass(frozen=True)
class Comparison:
    """The verdict on one metric.

    ``mark`` is ``better``, ``worse``, ``changed`` (significant, no orientation) or
    ``unchanged`` (within tolerance); ``z`` is the difference in units of the combined band
    (``nan`` when both are deterministic).
    """

    scenario: str
    metric: str
    baseline: float
    current: float
    ratio: float
    difference: float
    threshold: float
    z: float
    mark: str
    regressed: bool
    reason: str


@dataclass(frozen=True)
class CheckResult:
    """All comparisons plus the explicit rules that failed (and, from :func:`check_reports`,
    the run metadata and the seconds the check took)."""

    comparisons: tuple[Comparison, ...]
    rule_failures: tuple[Comparison, ...]
    metadata: Mapping[str, Any] = field(default_factory=dict, compare=False)
    seconds: float = field(default=0.0, compare=False)

    @property
    def regressions(self) -> tuple[Comparison, ...]:
        """Every comparison that fails the check (regressed metrics, then rule failures)."""
        return tuple(c for c in self.comparisons if c.regressed) + self.rule_failures

    @property
    def regressed(self) -> bool:
        """True if anything failed."""
        return bool(self.regressions)


def orientation(name: str) -> str:
    """The default orientation of a metric name (see :data:`DEFAULT_ORIENTATION`)."""
    for pattern, better in DEFAULT_ORIENTATION:
        if fnmatch.fnmatchcase(name, pattern):
            return better
    return "none"


def compare(
    baseline: Mapping[tuple[str, str], Metric],
    current: Mapping[tuple[str, str], Metric],
    *,
    z: float = 4.0,
    rtol: float = 1e-6,
    atol: float = 1e-12,
    rules: Sequence[Rule] = (),
    baseline_name: str = "baseline",
    current_name: str = "current",
) -> CheckResult:
    """Compare two metric sets; see the module docstring for the rule.

    Raises
    ------
    ValidationError
        If the two sets do not hold the same metrics (a mismatched report), or a rule names
        no metric.
    """
    z = check_range("z", z, 0.0, None, closed="neither")
    rtol = check_range("rtol", rtol, 0.0, None)
    atol = check_range("atol", atol, 0.0, None)
    if not baseline:
        raise ValidationError(
            f"{baseline_name} holds no metrics; nothing to compare (a gate that compares "
            "nothing cannot fail)"
        )
    missing = [k for k in baseline if k not in current]
    extra = [k for k in current if k not in baseline]
    if missing or extra:
        what = (
            f"{current_name} lacks {'/'.join(missing[0])}"
            if missing
            else f"{baseline_name} lacks {'/'.join(extra[0])}"
        )
        raise ValidationError(
            f"reports do not match: {what} ({len(missing)} missing, {len(extra)} extra metrics); "
            "regenerate the baseline on purpose if the suite changed"
        )
    rows = []
    for key, base in baseline.items():
        rows.append(_compare_one(base, current[key], z, rtol, atol))
    failures = []
    for rule in rules:
        for m in rule_hits(rule, list(current.values()), current_name):
            if _OPS[rule.op](m.value, rule.threshold):
                base = baseline[m.key]
                failures.append(
                    Comparison(
                        m.scenario,
                        m.name,
                        base.value,
                        m.value,
                        _ratio(m.value, base.value),
                        m.value - base.value,
                        rule.threshold,
                        math.nan,
                        "rule",
                        True,
                        f"fail-if {rule}",
                    )
                )
    return CheckResult(tuple(rows), tuple(failures))


def short_name_matches(pattern: str, name: str) -> bool:
    """True if ``pattern`` is a short name of the metric ``name``.

    A short name drops the scope before a dot and the qualifier after an underscore:
    ``shift_ratio`` names ``theory.shift_ratio`` (suite reports) and ``shift_ratio_theory``
    or ``shift_ratio_measured`` (simulate reports), but not ``inverse_shift_ratio``.

    Examples
    --------
    >>> short_name_matches("shift_ratio", "theory.shift_ratio")
    True
    >>> short_name_matches("shift_ratio", "shift_ratio_theory")
    True
    >>> short_name_matches("ratio", "theory.shift_ratio")
    False
    """
    last = name.rsplit(".", 1)[-1]
    return name.endswith("." + pattern) or last.startswith(pattern + "_")


def rule_hits(rule: Rule, metrics: Sequence[Metric], source: str) -> list[Metric]:
    """The metrics a ``--fail-if`` rule names in ``metrics``.

    The pattern is first matched as written (a glob on ``name`` or ``scenario/name``); if
    nothing matches, as a short name (:func:`short_name_matches`), which must then name a
    single metric.

    Raises
    ------
    ValidationError
        If the short name names several metrics (the error lists them) or nothing matches (the
        error lists the closest names).
    """
    hits = [m for m in metrics if rule.matches(m)]
    if hits:
        return hits
    names = sorted({m.name for m in metrics})
    candidates = [n for n in names if short_name_matches(rule.pattern, n)]
    if len(candidates) == 1:
        return [m for m in metrics if m.name == candidates[0]]
    if candidates:
        raise ValidationError(
            f"fail-if rule '{rule}' is ambiguous in {source}: "
            f"{rule.pattern!r} names {', '.join(candidates)}; write one of them"
        )
    import difflib

    shorts = {n.rsplit(".", 1)[-1]: n for n in names}
    close = difflib.get_close_matches(rule.pattern, [*names, *shorts], n=5, cutoff=0.6)
    hint = f"; did you mean {', '.join(dict.fromkeys(close))}?" if close else ""
    raise ValidationError(f"fail-if rule '{rule}' matches no metric in {source}{hint}")


def _ratio(current: float, base: float) -> float:
    if base == 0.0:
        return 1.0 if current == 0.0 else math.inf
    return current / base


def _compare_one(base: Metric, cur: Metric, z: float, rtol: float, atol: float) -> Comparison:
    diff = cur.value - base.value
    band = math.hypot(base.sd, cur.sd)
    threshold = max(z * band, atol + rtol * abs(base.value))
    zscore = diff / band if band > 0 else math.nan
    both_nan = math.isnan(cur.value) and math.isnan(base.value)
    if both_nan:
        significant = False
    elif math.isnan(cur.value) or math.isnan(base.value):
        significant = True
    else:
        significant = abs(diff) > threshold
    better = base.better if base.better != "none" else cur.better
    if not significant:
        mark, reason = "unchanged", "within tolerance"
    elif math.isnan(diff):
        mark, reason = "changed", "became or stopped being NaN"
    elif better == "none":
        mark, reason = "changed", "significant change of a metric with no better direction"
    elif (diff > 0) == (better == "higher"):
        mark, reason = "better", f"{better} is better"
    else:
        mark, reason = "worse", f"{better} is better"
    if significant and band > 0:
        reason += f"; |z| = {abs(zscore):.2f} > {z:g}"
    elif significant:
        reason += f"; |diff| {abs(diff):.3g} > {threshold:.3g}"
    return Comparison(
        base.scenario,
        base.name,
        base.value,
        cur.value,
        _ratio(cur.value, base.value),
        diff,
        threshold,
        zscore,
        mark,
        mark in ("worse", "changed"),
        reason,
    )


# --- reading metric reports -----------------------------------------------------------------


def metrics_from_rows(
    rows: Sequence[Mapping[str, Any]], source: str
) -> dict[tuple[str, str], Metric]:
    """Metrics from report rows, long form (``scenario, metric, value[, sd, better]``) or wide.

    Wide rows: every numeric column is a metric of the row, keyed by the row's text columns;
    a column ``<name>_sd`` is that metric's band.
    """
    out: dict[tuple[str, str], Metric] = {}
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise InputFileError(f"{source}: row {i} is not an object")
        if "metric" in row and "value" in row:
            metric = Metric(
                scenario=str(row.get("scenario", "")),
                name=str(row["metric"]),
                value=_number(row["value"], source, i, "value"),
                sd=_number(row.get("sd", 0.0) or 0.0, source, i, "sd"),
                better=str(row.get("better") or orientation(str(row["metric"]))),
            )
            _add(out, metric, source)
            continue
        scenario = _wide_scenario(row, i)
        for name, value in row.items():
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or name.endswith("_sd")
                or name == "index"
            ):
                continue
            sd = row.get(f"{name}_sd", 0.0) or 0.0
            _add(
                out,
                Metric(
                    scenario,
                    str(name),
                    float(value),
                    _number(sd, source, i, f"{name}_sd"),
                    orientation(str(name)),
                ),
                source,
            )
    return out


def _wide_scenario(row: Mapping[str, Any], i: int) -> str:
    """The key of a wide row: its text columns, and its grid point when it has an ``index``
    (a sweep's rows share their text columns and differ in numbers)."""
    parts = [str(v) for v in row.values() if isinstance(v, str)]
    index = row.get("index")
    if isinstance(index, int) and not isinstance(index, bool):
        parts.append(f"point{index}")
    return "/".join(parts) if parts else f"row{i}"


def _add(out: dict[tuple[str, str], Metric], metric: Metric, source: str) -> None:
    if metric.key in out:
        raise InputFileError(f"{source}: metric {'/'.join(metric.key)} appears twice")
    out[metric.key] = metric


def _number(value: Any, source: str, row: int, column: str) -> float:
    if value is None:
        return math.nan
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InputFileError(f"{source}: row {row} column {column} must be a number; got {value!r}")
    if column.endswith("sd") and (value < 0 or not math.isfinite(value)):
        raise InputFileError(f"{source}: row {row} column {column} must be >= 0; got {value!r}")
    return float(value)


def load_report(path: Path) -> tuple[dict[str, Any], dict[tuple[str, str], Metric]]:
    """Read a varshift JSON report: ``(metadata, metrics)``.

    Raises
    ------
    InputFileError
        If the file is missing, empty, not JSON, or lacks ``rows``.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise InputFileError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputFileError(f"{path}: cannot read ({exc})") from None
    if not text.strip():
        raise InputFileError(f"{path}: the file is empty")
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputFileError(
            f"{path}: not a JSON report ({exc.msg} at line {exc.lineno})"
        ) from None
    except RecursionError:
        raise InputFileError(f"{path}: not a JSON report (nested too deeply)") from None
    except ValueError as exc:  # an integer over sys.get_int_max_str_digits() digits
        raise InputFileError(f"{path}: not a JSON report ({str(exc)[:120]})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("rows"), list):
        raise InputFileError(f"{path}: not a varshift report (expected an object with 'rows')")
    if not doc["rows"]:
        raise InputFileError(f"{path}: the report has no rows")
    meta = doc["metadata"] if isinstance(doc.get("metadata"), dict) else {}
    return meta, metrics_from_rows(doc["rows"], str(path))


def load_metrics(path: Path) -> tuple[dict[str, Any], dict[tuple[str, str], Metric]]:
    """Metrics of a JSON report, or of a checkpoint's BatchNorm statistics (any stats format).

    A checkpoint gives five metrics per layer, from its running statistics over channels:
    ``var_mean``, ``var_min``, ``var_max``, ``mean_mean`` and ``mean_absmax``. They carry no
    noise band, so checkpoints are compared with ``rtol``/``atol``; a change to any single
    channel moves at least one of them.
    """
    from varshift.formats import check_input_file

    path = Path(path)
    check_input_file(path)
    if path.suffix.lower() == ".json" and _is_report(path):
        return load_report(path)
    return {"source": str(path)}, _checkpoint_metrics(path)


def _is_report(path: Path) -> bool:
    """A ``.json`` file is a report unless it parses as JSON without a ``rows`` list."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):  # incl. UnicodeDecodeError, JSONDecodeError
        return True  # load_report names the problem
    return not isinstance(doc, dict) or "rows" in doc or "metadata" in doc


def _checkpoint_metrics(path: Path) -> dict[tuple[str, str], Metric]:
    from varshift.formats import read_stats

    stats = read_stats(path)
    out: dict[tuple[str, str], Metric] = {}
    if not stats.layers:
        raise InputFileError(
            f"{path}: no BatchNorm layers; nothing to compare (a gate that compares nothing "
            "cannot fail)"
        )
    for name, layer in stats.layers.items():
        var = np.asarray(layer.var, dtype=np.float64)
        mean = np.asarray(layer.mean, dtype=np.float64)
        if var.size == 0:
            raise InputFileError(f"{path}: layer {name!r} has no channels; nothing to compare")
        values = {
            "var_mean": float(var.mean()),
            "var_min": float(var.min()),
            "var_max": float(var.max()),
            "mean_mean": float(mean.mean()),
            "mean_absmax": float(np.abs(mean).max()),
        }
        for metric, value in values.items():
            _add(out, Metric(name, metric, value), str(path))
    return out


# --- the job --------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckJob:
    """One ``check``: a current report or checkpoint against a baseline.

    ``z``, ``rtol``, ``atol`` set the tolerance (module docstring); ``fail_if`` are rule texts
    (:func:`parse_rule`).
    """

    current: Path
    baseline: Path
    z: float = 4.0
    rtol: float = 1e-6
    atol: float = 1e-12
    fail_if: tuple[str, ...] = ()


def check_reports(job: CheckJob) -> CheckResult:
    """Load both files' metrics and compare them (:func:`compare`), with the run metadata.

    Raises
    ------
    InputFileError, ValidationError
        An unreadable file, mismatched reports, or an invalid rule or tolerance.
    """
    import time

    start = time.perf_counter()
    rules = [parse_rule(r) for r in job.fail_if]
    _, base_metrics = load_metrics(job.baseline)
    _, cur_metrics = load_metrics(job.current)
    result = compare(
        base_metrics,
        cur_metrics,
        z=job.z,
        rtol=job.rtol,
        atol=job.atol,
        rules=rules,
        baseline_name=str(job.baseline),
        current_name=str(job.current),
    )
    params = {
        "current": str(job.current),
        "baseline": str(job.baseline),
        "z": job.z,
        "rtol": job.rtol,
        "atol": job.atol,
        "fail_if": [str(r) for r in rules],
    }
    return replace(
        result,
        metadata=run_metadata("check", params),
        seconds=time.perf_counter() - start,
    )


def update_baseline(current: Path, baseline: Path, *, force: bool = False) -> bool:
    """Make the report ``current`` the new ``baseline`` (its bytes, written atomically).

    Returns True if ``baseline`` already held exactly these bytes (nothing written).

    Raises
    ------
    InputFileError
        If ``current`` is not a readable varshift JSON report.
    OutputFileError
        If ``baseline`` exists with other content and ``force`` is False.
    """
    from varshift.core.files import write_unchanged_or_new

    current, baseline = Path(current), Path(baseline)
    load_report(current)  # refuses anything that is not a report
    return write_unchanged_or_new([(baseline, current.read_bytes())], force=force)
