"""`--plot DIR` and `--html FILE` of simulate, correct and check: figures (PNG and SVG), one
self-contained page each, every check made before any work; and the engine's running-variance
trace that the simulate figures draw (`simulate(trace=...)`)."""

from __future__ import annotations

import io
import json
import math
import re
import sys
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from varshift.cli import app
from varshift.core.errors import ValidationError
from varshift.core.presets import Preset, resolve_preset
from varshift.engine import Chunk, SimConfig, simulate
from varshift.formats import read_stats

runner = CliRunner()

SIM = ["simulate", "--rate", "0.5", "--mean", "1", "--samples", "600", "--features", "3"]
SIM += ["--steps", "120", "--no-report"]
NAMESPACES = {"http://www.w3.org/2000/svg", "http://www.w3.org/1999/xlink"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run(*args: str | Path) -> tuple[int, str, str]:
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def assert_self_contained(page: str) -> None:
    """No URL but the SVG namespace declarations; nothing loaded from anywhere."""
    urls = set(re.findall(r"https?://[^\s\"'<>)]*", page))
    assert urls <= NAMESPACES, urls - NAMESPACES
    for pattern in (r"<script", r"<link\b", r"<img\b", r"<iframe", r"@import", r"src="):
        assert not re.search(pattern, page, re.IGNORECASE), pattern
    for m in re.finditer(r"(?:href|xlink:href)=\"([^\"]*)\"", page):
        assert m.group(1).startswith("#"), m.group(0)


def assert_figures(folder: Path, *stems: str) -> None:
    """Exactly these figures, each as a non-empty PNG and SVG."""
    expected = sorted(f"{s}.{ext}" for s in stems for ext in ("png", "svg"))
    assert sorted(p.name for p in folder.iterdir()) == expected
    for stem in stems:
        assert (folder / f"{stem}.png").read_bytes().startswith(PNG_MAGIC)
        svg = (folder / f"{stem}.svg").read_text()
        assert "<svg" in svg and svg.rstrip().endswith("</svg>") and len(svg) > 1000


class _Tables(HTMLParser):
    """The page's tables as lists of rows of cell texts (the standard library's parser)."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self.cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self.cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self.cell is not None:
            self.tables[-1][-1].append("".join(self.cell))
            self.cell = None

    def handle_data(self, data: str) -> None:
        if self.cell is not None:
            self.cell.append(data)


def read_tables(page: str) -> list[pd.DataFrame]:
    """Every ``<table>`` of a page as a DataFrame of strings (header row → columns)."""
    parser = _Tables()
    parser.feed(page)
    return [pd.DataFrame(t[1:], columns=t[0]) for t in parser.tables]


def one_line_error(code: int, out: str, err: str, *parts: str) -> None:
    assert code == 2, (out, err)
    assert err.startswith("varshift: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for part in parts:
        assert part in err, (part, err)


@pytest.fixture
def stats_csv(tmp_path: Path) -> Path:
    """Three BN layers' statistics in the long csv form (no torch needed)."""
    rng = np.random.default_rng(0)
    lines = ["layer,channel,mean,var"]
    for layer in ("stem.bn", "block1.bn", "head.bn"):
        for c in range(4):
            lines.append(f"{layer},{c},{rng.uniform(-0.5, 0.5):.6f},{rng.uniform(1, 4):.6f}")
    path = tmp_path / "stats.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def reports(tmp_path: Path, *, worse: bool) -> tuple[Path, Path]:
    """A baseline and a current report; ``worse`` makes ``wide/shift_ratio`` regress at 8 sd."""
    rows = [
        {"scenario": s, "metric": m, "value": v, "sd": sd, "better": b}
        for s, m, v, sd, b in (
            ("classic", "shift_ratio", 0.36, 0.01, "higher"),
            ("classic", "correction_error", 0.02, 0.005, "lower"),
            ("wide", "shift_ratio", 0.9, 0.01, "higher"),
            ("theory", "train_var", 11.25, 0.0, "none"),
        )
    ]
    base = tmp_path / "base.json"
    base.write_text(json.dumps({"metadata": {}, "rows": rows}))
    cur_rows = [dict(r) for r in rows]
    if worse:
        cur_rows[2]["value"] = 0.9 - 8 * math.hypot(0.01, 0.01)
    cur = tmp_path / "cur.json"
    cur.write_text(json.dumps({"metadata": {}, "rows": cur_rows}))
    return cur, base


# --- the engine's trace ------------------------------------------------------------------------


def _oracle_trace(chunks: list[Chunk], preset: Preset, features: int) -> Iterator[np.ndarray]:
    """Every step's running variance from the BN inputs, one batch at a time."""
    r = np.ones(features)
    t = 0
    yield r.copy()
    for chunk in chunks:
        for _, _, z in chunk.batches():
            n = z.shape[0]
            s = z.var(axis=0) * (n / (n - 1) if preset.unbiased else 1.0)
            t += 1
            r = (
                r + (s - r) / t
                if preset.alpha is None
                else preset.alpha * r + (1 - preset.alpha) * s
            )
            yield r.copy()


@pytest.mark.parametrize(
    ("framework", "momentum"), [("torch", "default"), ("torch", None), ("keras", "default")]
)
def test_trace_follows_the_running_variance_step_by_step(
    framework: str, momentum: float | str | None
) -> None:
    preset = resolve_preset(framework, momentum)
    # 200 rows in batches of 32: a smaller last batch of 8; small chunks: several per run.
    config = SimConfig(
        rate=0.3, preset=preset, samples=200, features=2, epochs=5, chunk_elements=300
    )
    chunks: list[Chunk] = []
    res = simulate(config, rng=7, observer=chunks.append, trace=12)
    assert res.trace is not None and len(chunks) > 3
    oracle = np.array(list(_oracle_trace(chunks, preset, 2)))
    steps = res.trace.steps
    assert steps[0] == 0 and steps[-1] == res.summary.steps == 35 and steps.size == 12
    assert np.all(np.diff(steps) > 0)
    np.testing.assert_allclose(res.trace.running_var, oracle[steps], rtol=1e-12)
    # The last point is the engine's own final state, bit for bit.
    assert res.trace.running_var[-1].tolist() == [f.running_var for f in res.features]


def test_every_step_is_kept_when_there_are_few() -> None:
    res = simulate(SimConfig(samples=64, features=1, steps=9), rng=0, trace=2000)
    assert res.trace is not None and res.trace.steps.tolist() == list(range(10))


def test_trace_band_is_the_independent_batch_formula() -> None:
    for momentum, alpha in (("default", 0.9), (None, None)):
        preset = resolve_preset("torch", momentum)
        res = simulate(SimConfig(preset=preset, samples=640, features=2, epochs=3), rng=1, trace=40)
        tr = res.trace
        assert tr is not None
        for j, row in enumerate(res.features):
            es, vs = row.batch_var_expected, row.batch_var_sd**2
            for i, t in enumerate(tr.steps.tolist()):
                if alpha is None:
                    e, sd = (1.0, 0.0) if t == 0 else (es, math.sqrt(vs / t))
                else:
                    e = alpha**t + (1 - alpha**t) * es
                    sd = math.sqrt((1 - alpha) / (1 + alpha) * (1 - alpha ** (2 * t)) * vs)
                assert tr.running_var_expected[i, j] == pytest.approx(e, rel=1e-12)
                assert tr.running_var_sd[i, j] == pytest.approx(sd, rel=1e-12, abs=1e-300)


def test_the_band_holds_early_in_the_run() -> None:
    """Across 400 independent features, the z-scores along the transient (steps 2, 5 and 20 of
    the first epoch, where batches are nearly independent) are standard: mean 0 and mean square
    1, each within 4 of its standard errors."""
    res = simulate(SimConfig(rate=0.4, mean=1.0, features=400, steps=20), rng=3, trace=21)
    tr = res.trace
    assert tr is not None
    for i in (2, 5, 20):
        z = (tr.running_var[i] - tr.running_var_expected[i]) / tr.running_var_sd[i]
        n = z.size
        assert abs(z.mean()) < 4 / math.sqrt(n), (i, z.mean())
        z2 = z * z
        assert abs(z2.mean() - 1) < 4 * z2.std() / math.sqrt(n), (i, z2.mean())


def test_trace_is_off_by_default_and_changes_nothing() -> None:
    config = SimConfig(samples=500, features=2, epochs=2)
    plain, traced = simulate(config, rng=2), simulate(config, rng=2, trace=7)
    assert plain.trace is None and traced.trace is not None
    assert plain == traced  # the result's numbers do not depend on tracing
    assert traced.trace.running_var.shape == (7, 2)
    with pytest.raises(ValidationError, match=r"trace must be 0 \(off\) or >= 2 points; got 1"):
        simulate(config, rng=2, trace=1)
    with pytest.raises(ValidationError, match="trace must be an integer >= 0"):
        simulate(config, rng=2, trace=-3)


# --- simulate ---------------------------------------------------------------------------------


def test_simulate_writes_figures_and_a_page(tmp_path: Path) -> None:
    figs, page = tmp_path / "figs", tmp_path / "out" / "sim.html"
    code, out, err = run(*SIM, "-f", "csv", "--plot", figs, "--html", page)
    assert code == 0, err
    assert pd.read_csv(io.StringIO(out)).shape[0] == 4  # the result still goes to stdout
    assert_figures(figs, "simulate_running_var", "simulate_vs_theory")
    for stem in ("simulate_running_var", "simulate_vs_theory"):
        assert f"wrote {figs / stem}.png" in err
    assert f"wrote {page}" in err
    text = page.read_text()
    assert_self_contained(text)
    assert text.count("<svg") == 2 and "<title>varshift simulate</title>" in text
    assert "Running variance over training" in text and "±2 sd" in text
    # The simulate table (one-line headers), every column, and the metadata block.
    assert "<th>run var simulated</th>" in text and "<th>E[run var] theory</th>" in text
    assert "<th>shift_ratio_measured</th>" in text and '<td class="text">mean</td>' in text
    assert "Run metadata" in text and '"command": "simulate"' in text


def test_simulate_page_with_fit_and_plot_only(tmp_path: Path) -> None:
    page = tmp_path / "fit.html"
    code, _, err = run(*SIM, "--fit", "--html", page, "-q")
    assert code == 0 and err == ""
    text = page.read_text()
    assert "--fit: γ and β trained" in text and "<th>γ*</th>" in text
    code, _, err = run(*SIM, "--plot", tmp_path / "only", "-q")
    assert code == 0 and err == ""
    assert_figures(tmp_path / "only", "simulate_running_var", "simulate_vs_theory")


def test_simulate_refuses_changed_figures_and_writes_nothing(tmp_path: Path) -> None:
    figs = tmp_path / "figs"
    assert run(*SIM, "--plot", figs, "-q")[0] == 0
    before = {p.name: p.read_bytes() for p in figs.iterdir()}
    code, _, err = run(*SIM, "--plot", figs)  # a rerun draws identical files
    assert code == 0 and f"unchanged {figs}/simulate_running_var.png" in err, err
    reports = tmp_path / "reports"
    code, out, err = run(*SIM[:-1], "--report-dir", reports, "--plot", figs, "--seed", "1")
    one_line_error(code, out, err, f"--plot {figs}/simulate_running_var.png: already exists")
    assert out == "" and not reports.exists()  # all or none: no report written either
    assert {p.name: p.read_bytes() for p in figs.iterdir()} == before
    code, _, err = run(*SIM, "--plot", figs, "--force", "-q")
    assert code == 0, err
    # Same seed, same figures: the files are deterministic.
    assert {p.name: p.read_bytes() for p in figs.iterdir()} == before


# --- correct ----------------------------------------------------------------------------------


def test_correct_dry_run_writes_the_preview_only(tmp_path: Path, stats_csv: Path) -> None:
    figs, page = tmp_path / "figs", tmp_path / "correct.html"
    code, out, err = run(
        "correct", stats_csv, "--layer", "block1.*=0.5", "--layer", "head.bn=0.2",
        "--dry-run", "--plot", figs, "--html", page,
    )  # fmt: skip
    assert code == 0, err
    assert "dry run: no corrected file or report written" in err and f"wrote {page}" in err
    assert_figures(figs, "correct_before_after")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["correct.html", "figs", "stats.csv"]
    text = page.read_text()
    assert_self_contained(text)
    assert text.count("<svg") == 1 and "<title>varshift correct</title>" in text
    assert "<th>var_before</th>" in text and "<th>var_after</th>" in text
    for name in ("stem.bn", "block1.bn", "head.bn"):
        assert f'<td class="text">{name}</td>' in text
    assert '<td class="text">not selected</td>' in text and "corrected" in out


def test_correct_writes_the_file_the_report_and_the_page(tmp_path: Path, stats_csv: Path) -> None:
    fixed, page = tmp_path / "fixed.csv", tmp_path / "fixed.html"
    code, _, err = run("correct", stats_csv, "--rate", "0.5", "-o", fixed, "--html", page, "-q")
    assert code == 0 and err == ""
    assert fixed.exists() and (tmp_path / "fixed.csv.report.json").exists()
    after = read_stats(fixed).layers["head.bn"].var
    rows = read_tables(page.read_text())[0].set_index("layer")
    assert float(rows.loc["head.bn", "var_after"]) == pytest.approx(float(np.mean(after)), 1e-9)
    # The page exists now: a run that would change it needs --force, and writes nothing.
    fixed.unlink()
    Path(f"{fixed}.report.json").unlink()
    before = page.read_bytes()
    code, out, err = run("correct", stats_csv, "--rate", "0.4", "-o", fixed, "--html", page)
    one_line_error(code, out, err, f"--html {page}: already exists; pass --force")
    assert not fixed.exists() and page.read_bytes() == before


# --- check ------------------------------------------------------------------------------------


def test_check_page_and_chart_are_written_on_a_regression(tmp_path: Path) -> None:
    cur, base = reports(tmp_path, worse=True)
    figs, page = tmp_path / "figs", tmp_path / "check.html"
    code, _, err = run("check", cur, "--baseline", base, "--plot", figs, "--html", page)
    assert code == 1 and "check failed: 1 regressed: wide/shift_ratio" in err
    assert_figures(figs, "check_comparison")
    text = page.read_text()
    assert_self_contained(text)
    assert "REGRESSION: 4 metrics (3 unchanged, 1 worse)" in text
    assert "1 regression(s): the check exits 1." in text
    tables = read_tables(text)
    assert len(tables) == 2  # the regressions, then every metric
    assert tables[0]["metric"].tolist() == ["shift_ratio"] and tables[0]["mark"][0] == "worse"
    assert len(tables[1]) == 4 and set(tables[1]["mark"]) == {"worse", "unchanged"}
    assert text.count("<svg") == 1


def test_check_page_when_nothing_regressed(tmp_path: Path) -> None:
    cur, base = reports(tmp_path, worse=False)
    page = tmp_path / "ok.html"
    code, _, err = run("check", cur, "--baseline", base, "--html", page, "-q")
    assert code == 0, err
    text = page.read_text()
    assert "No metric regressed: the check exits 0." in text and "ok: 4 metrics" in text
    assert len(read_tables(text)) == 1


def test_big_inputs_chart_a_readable_subset(tmp_path: Path) -> None:
    """50 metrics: the chart shows the regressions and the largest other changes (40); 70
    layers: the before/after chart shows the first 60. The tables keep every row."""
    rows = [
        {"scenario": f"s{i:02d}", "metric": "shift_ratio", "value": 0.5, "sd": 0.01}
        for i in range(50)
    ]
    base = tmp_path / "base.json"
    base.write_text(json.dumps({"metadata": {}, "rows": rows}))
    rows[7] = {**rows[7], "value": 0.3}
    cur = tmp_path / "cur.json"
    cur.write_text(json.dumps({"metadata": {}, "rows": rows}))
    page = tmp_path / "check.html"
    assert run("check", cur, "--baseline", base, "--html", page, "-q")[0] == 1
    text = page.read_text()
    assert "for the 40 largest changes of 50 metrics, regressions first" in text
    assert len(read_tables(text)[1]) == 50
    lines = ["layer,channel,mean,var"] + [f"bn{i:02d},0,0.0,2.0" for i in range(70)]
    stats = tmp_path / "many.csv"
    stats.write_text("\n".join(lines) + "\n")
    page = tmp_path / "correct.html"
    code, _, err = run("correct", stats, "--rate", "0.5", "--dry-run", "--html", page, "-q")
    assert code == 0, err
    text = page.read_text()
    assert "(the first 60 of 70 layers)" in text and len(read_tables(text)[0]) == 70


def test_check_of_two_checkpoints_has_a_page(tmp_path: Path, stats_csv: Path) -> None:
    fixed = tmp_path / "fixed.csv"
    assert run("correct", stats_csv, "--rate", "0.5", "-o", fixed, "--no-report", "-q")[0] == 0
    page, figs = tmp_path / "ck.html", tmp_path / "figs"
    code, _, _ = run("check", fixed, "--baseline", stats_csv, "--html", page, "--plot", figs)
    assert code == 1  # every variance changed, and checkpoint metrics have no orientation
    assert_figures(figs, "check_comparison")
    table = read_tables(page.read_text())[1]
    assert len(table) == 3 * 5 and set(table["mark"]) == {"changed", "unchanged"}


# --- bad input, the same for every command -----------------------------------------------------


def command(name: str, tmp_path: Path) -> list[str | Path]:
    if name == "simulate":
        return list(SIM)
    if name == "correct":
        stats = tmp_path / "s.csv"
        stats.write_text("layer,channel,mean,var\nbn,0,0.1,2.0\nbn,1,-0.2,3.0\n")
        return ["correct", stats, "--rate", "0.5", "--dry-run"]
    cur, base = reports(tmp_path, worse=False)
    return ["check", cur, "--baseline", base]


COMMANDS = ["simulate", "correct", "check"]


@pytest.mark.parametrize("name", COMMANDS)
@pytest.mark.parametrize("option", ["--plot", "--html"])
def test_an_unwritable_folder_is_one_line_before_any_work(
    tmp_path: Path, name: str, option: str
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a regular file")
    target = blocker / "sub" / ("page.html" if option == "--html" else "figs")
    code, out, err = run(*command(name, tmp_path), option, target)
    one_line_error(code, out, err, f"varshift: error: {option} ", "Not a directory")
    assert out == ""


@pytest.mark.parametrize("name", COMMANDS)
@pytest.mark.parametrize("option", ["--plot", "--html"])
def test_missing_matplotlib_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, option: str
) -> None:
    args = command(name, tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    code, out, err = run(*args, option, tmp_path / "x")
    assert code == 2 and out == ""
    assert err == (
        f"varshift: error: {option} needs matplotlib, which is not installed; install it "
        "with: pip install 'varshift[plot]' (or pip install matplotlib)\n"
    )
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("name", COMMANDS)
def test_existing_outputs_need_force(tmp_path: Path, name: str) -> None:
    args = command(name, tmp_path)
    page, figs = tmp_path / "p.html", tmp_path / "figs"
    page.write_text("keep")
    code, out, err = run(*args, "--html", page)
    one_line_error(code, out, err, f"--html {page}: already exists; pass --force to overwrite it")
    assert page.read_text() == "keep"
    code, out, err = run(*args, "--html", tmp_path)
    one_line_error(code, out, err, f"--html {tmp_path}: is a folder; expected a file name")
    assert run(*args, "--html", page, "--plot", figs, "--force", "-q")[0] == 0
    assert page.read_text().startswith("<!DOCTYPE html>") and any(figs.iterdir())


@pytest.mark.parametrize("name", COMMANDS)
def test_help_names_the_options_with_an_example(name: str) -> None:
    result = runner.invoke(app, [name, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert "--plot" in result.stdout and "--html" in result.stdout
    assert re.search(rf"varshift {name} .*--plot \S+ --html \S+\.html", result.stdout)
