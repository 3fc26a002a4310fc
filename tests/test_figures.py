"""`varshift.present.figures`: each figure draws the data it is given; PNG + SVG, repeatable."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from varshift.core.errors import MissingDependencyError, OutputFileError
from varshift.jobs.sweep import SweepConfig, sweep
from varshift.present import figures
from varshift.present.sweep import rate_figures


def _width_figure() -> figures.Figure:
    config = SweepConfig(
        rates=(0.1, 0.3, 0.5, 0.7, 0.9), topology="linear", Ds=(1.0, 4.0, 64.0), rhos=(0.1,)
    )
    (data,) = rate_figures(sweep(config))
    return figures.shift_vs_rate(data)


def test_shift_vs_rate_draws_one_curve_per_d_and_the_case_a_contrast() -> None:
    fig = _width_figure()
    (ax,) = fig.axes
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert {"D = 1", "D = 4", "D = 64", "case (a): ρ = 0 at any D"} <= set(lines)
    y64 = np.asarray(lines["D = 64"].get_ydata())
    # eq. (12) of the paper with v = 1, rho = 0.1, D = 64: width rescues the shift
    q = 1 - np.array([0.1, 0.3, 0.5, 0.7, 0.9])
    np.testing.assert_allclose(y64, (1 + 0.1 * 63) / (1 / q + 0.1 * 63), rtol=1e-12)
    np.testing.assert_allclose(lines["case (a): ρ = 0 at any D"].get_ydata(), q, rtol=1e-12)
    assert ax.get_xlabel() == "dropout rate r"


def test_sim_vs_theory_running_variance_and_layer_bars() -> None:
    fig = figures.sim_vs_theory([0.5, 0.8], [0.49, 0.81], [0.01, 0.02])
    assert fig.axes[0].get_xlabel() == "shift ratio Δ, closed form"
    steps = np.arange(100)
    expected = 0.9**steps + (1 - 0.9**steps) * 2.0
    trace = expected + 0.01 * np.random.default_rng(0).standard_normal((3, 100))
    fig = figures.running_variance(steps, trace, expected, 0.05, target=1.0)
    ax = fig.axes[0]
    assert len([ln for ln in ax.get_lines() if ln.get_label() != "_child"]) >= 5
    assert len(ax.collections) == 1  # the predicted band
    fig = figures.layer_before_after(["bn1", "bn2", "bn3"], [2.0, 1.5, 1.2], [1.0, 1.0, 1.0])
    assert len(fig.axes[0].patches) == 6
    with pytest.raises(ValueError, match="one value per layer"):
        figures.layer_before_after(["bn1"], [1.0, 2.0], [1.0])


def test_save_figure_writes_png_and_svg_repeatably(tmp_path: Path) -> None:
    fig = _width_figure()
    paths = figures.save_figure(fig, tmp_path / "figs", "width")
    assert [p.name for p in paths] == ["width.png", "width.svg"]
    png, svg = paths[0].read_bytes(), paths[1].read_text()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and svg.lstrip().startswith("<?xml")
    assert "<dc:date>" not in svg
    figures.save_figure(_width_figure(), tmp_path / "figs", "width")  # identical: not an error
    assert paths[0].read_bytes() == png and paths[1].read_text() == svg
    other = figures.layer_before_after(["bn1"], [1.0], [2.0])
    with pytest.raises(OutputFileError, match="already exists; pass force=True"):
        figures.save_figure(other, tmp_path / "figs", "width")
    figures.save_figure(_width_figure(), tmp_path / "figs", "width", force=True)
    assert paths[0].read_bytes() == png and paths[1].read_text() == svg


def test_svg_text_is_a_bare_svg_element() -> None:
    text = figures.svg_text(_width_figure())
    assert text.startswith("<svg") and text.endswith("</svg>")
    assert "<?xml" not in text and "DOCTYPE" not in text and "<metadata" not in text


def test_missing_matplotlib_names_the_option(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(MissingDependencyError, match="--plot needs matplotlib"):
        figures.require_matplotlib("--plot")
    with pytest.raises(MissingDependencyError, match="pip install 'varshift\\[plot\\]'"):
        figures.sim_vs_theory([1.0], [1.0], [0.1])


def test_check_output_folder(tmp_path: Path) -> None:
    assert figures.check_output_folder(tmp_path / "a" / "b").is_dir()
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputFileError, match=r"--html .*: cannot create this folder"):
        figures.check_output_folder(tmp_path / "f" / "b", "--html")


@pytest.mark.parametrize("big", [0.3, 3.0, 40.0, 900.0, 1e6])
def test_comparison_chart_keeps_its_title_and_tick_labels_apart(big: float) -> None:
    """Measured with the renderer: the title lies inside the figure, x tick labels never
    overlap, y labels are not cut at the left edge."""
    from varshift.present.figures import comparison_chart

    title = "REGRESSION: 232 metrics (1 changed, 3 worse, 228 unchanged); 1 fail-if rule hits"
    labels = ["classic/theory.shift_ratio", "wide/rho0.5/width256/sim.correction_error"]
    fig = comparison_chart(labels, [big, -0.3], [1.0, 1.0], ["worse", "unchanged"], title=title)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]
    box = fig.bbox
    titles = [t for t in fig.texts if t.get_text()] + [fig.axes[0].title]
    for text in titles:
        if text.get_text():
            ext = text.get_window_extent(renderer)
            assert box.x0 <= ext.x0 and ext.x1 <= box.x1 and ext.y1 <= box.y1, text.get_text()
    assert any(title == " ".join(t.get_text().split()) for t in titles)
    ax = fig.axes[0]
    shown = [t for t in ax.get_xticklabels() if t.get_text() and t.get_visible()]
    ext = sorted((t.get_window_extent(renderer) for t in shown), key=lambda b: b.x0)
    assert len(ext) >= 3
    assert all(a.x1 <= b.x0 for a, b in itertools.pairwise(ext))
    assert min(t.get_window_extent(renderer).x0 for t in ax.get_yticklabels()) >= box.x0
