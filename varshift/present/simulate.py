"""How ``varshift simulate`` shows a :class:`~varshift.jobs.simulate.SimulateResult`: terminal
and Markdown tables, every column for CSV/JSON and the report files, figures and page sections.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from varshift.core.files import OutputPlan, write_unchanged_or_new
from varshift.jobs.simulate import SimulateResult
from varshift.present.output import (
    Drawn,
    Visuals,
    deliver,
    flat_headers,
    inline,
    on_terminal,
)
from varshift.present.output import write_visuals as _write
from varshift.present.report import render_text, report_paths, report_texts, to_table
from varshift.present.table import Grid

#: The per-feature figure shows at most this many features.
MAX_FEATURES_SHOWN = 64

#: Figure file stems of --plot.
FIGURE_STEMS = ("simulate_running_var", "simulate_vs_theory")

#: Terminal columns: result field → (header, significant digits); csv/json/report files get
#: every field. Errors are shown in percent; z-scores with two decimals.
MAIN_COLUMNS: dict[str, tuple[str, int]] = {
    "feature": ("feature", 0),
    "input_mean": ("c", 3),
    "D": ("D", 3),
    "train_var_theory": ("train var\ntheory", 4),
    "running_var_expected": ("E[run var]\ntheory", 4),
    "running_var_sd": ("± sd", 3),
    "running_var": ("run var\nsimulated", 4),
    "z_var": ("z", 0),
    "test_var": ("test var\n(real)", 4),
    "shift_ratio_measured": ("Δ sim", 4),
    "shift_ratio_theory": ("Δ\ntheory", 4),
    "error_debiased": ("corrected\nerr %", 3),
    "error_naive": ("naive\nerr %", 3),
}

FIT_COLUMNS: dict[str, tuple[str, int]] = {
    "feature": ("feature", 0),
    "gamma_star": ("γ*", 4),
    "gamma_dropout": ("γ\ndropout", 4),
    "gamma_clean": ("γ\nno dropout", 4),
    "beta_dropout": ("β\ndropout", 4),
    "pred_clean": ("output\nno dropout", 4),
    "pred_dropout": ("output\ndropout", 4),
    "pred_corrected": ("output\ncorrected", 4),
    "pred_dropout_theory": ("theory\ndropout", 4),
    "pred_corrected_theory": ("theory\ncorrected", 4),
}

PERCENT = ("error_debiased", "error_naive")


def _short(value: Any, digits: int) -> Any:
    """A float rounded for the terminal: ``digits`` significant digits, or 2 decimals if 0."""
    if not isinstance(value, float) or value != value or abs(value) == float("inf"):
        return value
    return round(value, 2) if digits == 0 else float(f"{value:.{digits}g}")


def display_frame(df: Grid, columns: dict[str, tuple[str, int]]) -> Grid:
    """The terminal layout: chosen columns, short headers, few digits (percent for errors)."""
    out: dict[str, list[Any]] = {}
    for name, (header, digits) in columns.items():
        if not df.has_values(name):
            continue
        values = df.column(name)
        if name in PERCENT:
            values = [None if v is None or v != v else 100.0 * v for v in values]
        out[header] = [_short(v, digits) for v in values]
    return Grid.from_columns(out)


def result_frame(result: SimulateResult) -> Grid:
    """Every column: one row per feature plus the ``mean`` row; fit columns when present."""
    sim = result.sim
    df = to_table([*sim.features, sim.summary.mean])
    if sim.fit is not None:
        df = df.merge_left(to_table([*sim.fit.rows, sim.fit.mean]), on="feature")
    return df


def main_table(result: SimulateResult) -> Grid:
    """The per-feature comparison as shown on a terminal."""
    sim = result.sim
    return display_frame(to_table([*sim.features, sim.summary.mean]), MAIN_COLUMNS)


def fit_table(result: SimulateResult) -> tuple[Grid, str] | None:
    """The ``--fit`` table and its title, or None without ``--fit``."""
    fit = result.sim.fit
    if fit is None:
        return None
    head = (
        f"--fit: identity target, Adam lr {fit.lr:g}; test-time output for input "
        f"{fit.rows[0].probe:g} (a perfect model returns it)"
    )
    return display_frame(to_table([*fit.rows, fit.mean]), FIT_COLUMNS), head


def title(result: SimulateResult) -> str:
    """The table's title: the pipeline, the convention, the data and the seed."""
    config, s = result.sim.config, result.sim.summary
    preset = config.preset
    alpha = "cumulative" if preset.alpha is None else f"alpha {preset.alpha:g}"
    return (
        f"{config.dropout} dropout, rate {config.rate:g} → BatchNorm ({config.topology}), "
        f"{preset.name} ({alpha}, {preset.estimator.name}), "
        f"{s.rows} rows, batch {s.batch_size}, seed {result.job.seed}"
    )


def caption(result: SimulateResult) -> str:
    """The table's caption: the schedule and how well the running variance matched theory."""
    s = result.sim.summary
    return (
        f"{s.steps} steps = {s.epochs} epochs × {s.batches_per_epoch} batches (n = "
        f"{s.elements_per_batch}); initial 0/1 weigh {s.residual_weight:.2g}; z of the running "
        f"variance: rms {s.rms_z_var:.2f}, max |z| {s.max_abs_z_var:.2f}; "
        "Δ sim = test var (real) / run var"
    )


def show(result: SimulateResult, fmt: str, output: Path | None) -> None:
    """Rich tables on a terminal; Markdown of the same layout otherwise; csv/json: every column."""
    main, fit = main_table(result), fit_table(result)
    head, cap, meta = title(result), caption(result), result.metadata
    if on_terminal(fmt, output):
        from varshift.present.render import print_table, stdout_console

        console = stdout_console()
        shown = [(main, head, cap)] + ([(fit[0], fit[1], None)] if fit else [])
        for df, top, bottom in shown:
            print_table(console, df, title=top, caption=bottom, compact=True)
        return
    if fmt in ("table", "md"):
        text = render_text(main, "md", meta, head) + f"\n{cap}\n"
        if fit is not None:
            text += "\n" + render_text(fit[0], "md", meta, fit[1])
    else:
        text = render_text(result_frame(result), fmt, meta, head)
    deliver(text, output)


def plan_reports(plan: OutputPlan, folder: Path, stem: str) -> list[Path]:
    """Plan the CSV/Markdown/JSON reports; existing ones are compared when written."""
    return [plan.add(p, replace=True) for p in report_paths(folder, stem)]


def write_reports(result: SimulateResult, folder: Path, *, force: bool) -> tuple[list[Path], bool]:
    """Write the reports; return their paths and whether identical files were already there.

    Same seed ⇒ same bytes, so rerunning a command is never an error; different content under
    the same name needs ``force``.
    """
    paths = report_paths(folder, result.report_stem)
    texts = report_texts(result_frame(result), result.metadata, title=title(result))
    unchanged = write_unchanged_or_new(list(zip(paths, texts, strict=True)), force=force)
    return paths, unchanged


def figures(result: SimulateResult) -> list[Drawn]:
    """The running variance over the steps (feature 0) and simulated against theory."""
    from varshift.present.figures import feature_bands, running_variance

    sim = result.sim
    tr, s, config = sim.trace, sim.summary, sim.config
    assert tr is not None, "figures need a trace (SimulateJob.trace)"
    decay = (
        "cumulative average" if config.preset.alpha is None else f"EMA α = {config.preset.alpha:g}"
    )
    many = f" (of {s.features})" if s.features > 1 else ""
    trace_fig = running_variance(
        tr.steps,
        tr.running_var[:, 0],
        tr.running_var_expected[:, 0],
        tr.running_var_sd[:, 0],
        target=sim.features[0].test_var,
        title=f"Running variance of feature 0{many}\n{config.dropout} dropout, rate "
        f"{config.rate:g}, {config.preset.name} ({decay})",
    )
    rows = sim.features[:MAX_FEATURES_SHOWN]
    vs_fig = feature_bands(
        [r.feature for r in rows],
        [r.running_var_expected for r in rows],
        [r.running_var_sd for r in rows],
        [r.running_var for r in rows],
        target=[r.test_var for r in rows],
        title=f"Running variance after {s.steps} steps: simulated against theory",
    )
    return [
        Drawn(FIGURE_STEMS[0], trace_fig, _trace_caption(result)),
        Drawn(FIGURE_STEMS[1], vs_fig, _bands_caption(len(rows), s.features)),
    ]


def _trace_caption(result: SimulateResult) -> str:
    tr, s = result.sim.trace, result.sim.summary
    assert tr is not None
    every = tr.steps.size == s.steps + 1
    points = "every step" if every else f"{tr.steps.size} evenly spaced steps"
    return (
        f"The running variance BatchNorm stores for feature 0, at {points} of {s.steps}, "
        "beside theory's expected value and ±2 sd band for independent batches. It starts at "
        "1 and settles around the dropout-inflated training variance; the dashed line is the "
        "variance the layer sees at test time (dropout off): the gap is the variance shift. "
        "At the last step the table's band is exact (it also accounts for rows drawn without "
        "replacement within an epoch, which narrows it for long averages)."
    )


def _bands_caption(shown_count: int, features: int) -> str:
    shown = f"the first {shown_count} of {features} features" if shown_count < features else ""
    return (
        f"Per feature{' (' + shown + ')' if shown else ''}: the simulated running variance at "
        "the end of the run (dot) inside theory's expected value ±2 sd (band; the table's "
        "E[run var] and sd, z its distance in sd), and the variance BN sees at test time "
        "(black tick): the gap between tick and band is the variance shift."
    )


def page_sections(result: SimulateResult, drawn: Sequence[Drawn]) -> list[Any]:
    """The page: the trace, the per-feature comparison with its table, --fit, every column."""
    from varshift.present.html import Section, Table

    figs = inline(drawn)
    sections = [
        Section("Running variance over training", (title(result) + ".",), figures=figs[:1]),
        Section(
            "Per feature: simulation beside theory",
            (
                "Errors are in percent. Δ sim = test var (real) / run var; z = (run var "
                "simulated − E[run var]) / sd.",
            ),
            figures=figs[1:],
            tables=(Table(flat_headers(main_table(result)), caption(result)),),
        ),
    ]
    fit = result.sim.fit
    fit_shown = fit_table(result)
    if fit is not None and fit_shown is not None:
        sections.append(
            Section(
                "--fit: γ and β trained to reproduce the input",
                (
                    f"Identity target, Adam lr {fit.lr:g}; test-time output for input "
                    f"{fit.rows[0].probe:g} (a perfect model returns it).",
                ),
                tables=(Table(flat_headers(fit_shown[0])),),
            )
        )
    sections.append(
        Section(
            "Every column",
            ("One row per feature and their mean, as in the CSV report.",),
            tables=(Table(result_frame(result)),),
        )
    )
    return sections


def write_visuals(result: SimulateResult, visuals: Visuals) -> list[Path]:
    """Draw the figures and write them into ``--plot`` and the page into ``--html``."""
    drawn = figures(result)
    page = None
    if visuals.html is not None:
        page = ("varshift simulate", lambda: page_sections(result, drawn), result.metadata)
    return _write(visuals, drawn, page)
