"""`varshift.jobs.sweep` and `varshift sweep`: grid parsing, tidy table, closed forms, bad input."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from varshift.cli import app
from varshift.core.errors import ValidationError
from varshift.jobs.sweep import (
    MAX_POINTS,
    SweepConfig,
    map_points,
    parse_axis,
    parse_choices,
    sweep,
)
from varshift.present.sweep import rate_figures

runner = CliRunner()


def run(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, ["sweep", *args])
    return result.exit_code, result.stdout, result.stderr


# --- axis parsing ---------------------------------------------------------------------------


def test_ranges_include_the_stop_and_carry_no_float_noise() -> None:
    rates = parse_axis("--rate", "0.1:0.9:0.1")
    assert rates == (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    assert parse_axis("--rate", "0.05:0.2:0.05") == (0.05, 0.1, 0.15, 0.2)
    assert parse_axis("--x", "1:4:1") == (1.0, 2.0, 3.0, 4.0)
    assert parse_axis("--x", "1:10:4") == (1.0, 5.0, 9.0)  # stop not on the grid: not reached
    assert parse_axis("--x", "0.9:0.1:-0.4") == (0.9, 0.5, 0.1)


def test_geometric_ranges_lists_and_repeats() -> None:
    assert parse_axis("--D", "1:64:x2") == (1, 2, 4, 8, 16, 32, 64)
    assert parse_axis("--D", ["1,4", "16:64:x4", "4"]) == (1, 4, 16, 64)
    assert parse_axis("--rate", " 0.2 , 0.5 ") == (0.2, 0.5)
    assert parse_axis("--width", "8:64:x2", integer=True) == (8, 16, 32, 64)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("0.5:0.1:0.1", "--rate range '0.5:0.1:0.1' is empty: start > stop with a positive step"),
        ("0.1:0.9:0", "--rate range '0.1:0.9:0' is empty: the step must not be 0"),
        ("0.1:0.9", "--rate range '0.1:0.9' has no step: write start:stop:step or start:stop:x"),
        ("0.1:0.5:-0.1", "--rate range '0.1:0.5:-0.1' is empty: start < stop"),
        ("1:64:x1", "--rate range '1:64:x1' is empty: a geometric range needs"),
        ("0.1:0.2:0.3:0.4", "--rate range must be start:stop:step"),
        ("abc", "--rate must be numbers, comma lists or ranges"),
        ("0.1,,0.2", "--rate has an empty item"),
        ("nan", "--rate must be finite"),
    ],
)
def test_bad_axes_name_the_option_and_value(spec: str, message: str) -> None:
    with pytest.raises(ValidationError) as info:
        parse_axis("--rate", spec)
    assert message in str(info.value)


def test_integer_axes_and_huge_ranges_are_refused() -> None:
    with pytest.raises(ValidationError, match=r"--width must be integers; got 2\.5"):
        parse_axis("--width", "1,2.5", integer=True)
    with pytest.raises(ValidationError, match="has 90000001 values; at most 1000000 per axis"):
        parse_axis("--rate", "0:0.9:1e-8")


def test_choices_accept_all_and_reject_unknown_names() -> None:
    assert parse_choices("--framework", "all", ("torch", "keras")) == ("torch", "keras")
    assert parse_choices("--dropout", ["uout", "Bernoulli,uout"], ("bernoulli", "uout")) == (
        "uout",
        "bernoulli",
    )
    with pytest.raises(
        ValidationError, match="--framework must be one of torch, keras; got 'caffe'"
    ):
        parse_choices("--framework", "caffe", ("torch", "keras"))


# --- the grid and its closed forms ----------------------------------------------------------


def test_the_grid_is_the_cartesian_product_with_rate_fastest() -> None:
    config = SweepConfig(
        rates=(0.2, 0.5, 0.8),
        frameworks=("torch", "keras"),
        means=(0.0, 2.0),
        topology="linear",
        Ds=(1.0, 16.0),
        rhos=(0.1,),
    )
    result = sweep(config)
    assert config.n_points == len(result.rows) == 3 * 2 * 2 * 2
    df = pd.DataFrame(result.records())
    assert list(df["index"]) == list(range(24))
    assert list(df["rate"][:3]) == [0.2, 0.5, 0.8]
    assert list(df["D"][:6]) == [1, 1, 1, 16, 16, 16]
    assert list(df.columns[:11]) == [
        "index", "dropout", "framework", "batch_size", "mean", "var",
        "topology", "rho", "width", "D", "rate",
    ]  # fmt: skip
    assert not any(c.startswith(("sim_", "z_")) for c in df.columns)
    assert set(result.varying) == {"framework", "mean", "D", "rate"}
    assert list(df["width"].unique()) == [1, 16]  # d = ceil(D) when no width is given


def test_direct_values_are_case_a() -> None:
    rows = sweep(SweepConfig(rates=(0.1, 0.5), means=(0.0, 3.0), variances=(4.0,))).rows
    for r in rows:
        q, c, v = 1 - r.rate, r.mean, r.var
        assert r.train_var == pytest.approx((c * c + v) / q - c * c, rel=1e-12)
        assert r.test_var == v
        assert r.shift_ratio == pytest.approx(v / ((c * c + v) / q - c * c), rel=1e-12)


def test_linear_values_are_the_papers_equation_12() -> None:
    config = SweepConfig(
        rates=(0.1, 0.3, 0.5), topology="linear", Ds=(1.0, 4.0, 64.0), rhos=(0.0, 0.1, 0.5)
    )
    for r in sweep(config).rows:
        q, v, rho, d = 1 - r.rate, 1.0, r.rho, r.D
        expected = (v + v * rho * (d - 1)) / (v / q + v * rho * (d - 1))
        assert r.shift_ratio == pytest.approx(expected, rel=1e-12)
        if rho == 0:  # width does not help without correlation: case (a) for every D
            assert r.shift_ratio == pytest.approx(q, rel=1e-12)


def test_width_with_cos2_gives_d_and_d_above_width_is_refused() -> None:
    rows = sweep(
        SweepConfig(rates=(0.5,), topology="linear", widths=(4, 16), cos2=0.5, rhos=(0.2,))
    ).rows
    assert [(r.width, r.D) for r in rows] == [(4, 2.0), (16, 8.0)]
    with pytest.raises(ValidationError, match=r"D must be <= width \(4\)"):
        sweep(SweepConfig(rates=(0.5,), topology="linear", widths=(4,), Ds=(8.0,)))


def test_the_grid_limit_needs_force() -> None:
    config = SweepConfig(rates=parse_axis("r", "0.01:0.99:0.01"), means=(0, 1, 2), max_points=200)
    with pytest.raises(
        ValidationError, match="the grid has 297 points, more than the limit of 200"
    ):
        sweep(config)
    assert len(sweep(SweepConfig(**{**config.__dict__, "force": True})).rows) == 297
    assert MAX_POINTS == 10_000


def test_rate_figures_group_panels_by_rho_and_carry_case_a() -> None:
    config = SweepConfig(rates=(0.1, 0.5, 0.9), topology="linear", Ds=(1.0, 64.0), rhos=(0.0, 0.2))
    (fig,) = rate_figures(sweep(config))
    assert [p.title for p in fig.panels] == ["ρ = 0", "ρ = 0.2"]
    panel = fig.panels[1]
    assert [c.label for c in panel.curves] == ["D = 1", "D = 64"]
    assert panel.contrast is not None
    assert panel.contrast.ratio == pytest.approx((0.9, 0.5, 0.1))
    assert rate_figures(sweep(SweepConfig(rates=(0.5,)))) == []


# --- Monte Carlo plumbing ---------------------------------------------------------------------


def _draw(seed: np.random.SeedSequence) -> float:
    return float(np.random.default_rng(seed).standard_normal(1000).mean())


def test_per_point_streams_give_the_same_numbers_for_any_worker_count() -> None:
    seeds = np.random.SeedSequence(1234).spawn(6)
    one = map_points(_draw, seeds, workers=1)
    calls: list[tuple[int, int]] = []
    two = map_points(_draw, seeds, workers=2, progress=lambda d, t: calls.append((d, t)))
    assert one == two
    assert len(set(one)) == 6
    assert calls[0] == (0, 6) and calls[-1] == (6, 6)


def _sim_config(**kw: object) -> SweepConfig:
    base: dict[str, object] = {"rates": (0.2, 0.6), "steps": 200, "reps": 64, "simulate": True}
    return SweepConfig(**{**base, **kw})  # type: ignore[arg-type]


def test_simulated_sweep_is_the_same_for_one_and_two_workers() -> None:
    config = _sim_config(means=(0.0, 2.0), frameworks=("torch", "keras"))
    one = sweep(config, rng=5)
    two = sweep(SweepConfig(**{**config.__dict__, "workers": 2}), rng=5)
    assert one.rows == two.rows and one.seed_entropy == two.seed_entropy == 5
    assert sweep(config, rng=6).rows != one.rows
    df = pd.DataFrame(one.records())
    assert {"sim_running_var", "z_running_var", "sim_shift_ratio", "z_shift_ratio"} <= set(df)


@pytest.mark.parametrize("topology", ["direct", "linear"])
def test_simulated_values_agree_with_the_closed_form_within_noise(topology: str) -> None:
    extra: dict[str, object] = {}
    if topology == "linear":
        extra = {"topology": "linear", "Ds": (1.0, 16.0), "rhos": (0.2,)}
    rows = sweep(_sim_config(means=(0.0, 1.5), **extra), rng=11).rows
    for r in rows:
        assert r.sim_running_var is not None and r.z_running_var is not None
        assert r.z_shift_ratio is not None and r.sim_running_var_se is not None
        assert r.sim_running_var_se > 0
        # At most 16 z-scores of independent points: one beyond 4.5 by chance has p ≈ 1e-4.
        assert abs(r.z_running_var) < 4.5 and abs(r.z_shift_ratio) < 4.5
        # torch, unbiased, 0.9**200 ≈ 7e-10: the recorded ratio is Δ itself
        assert r.recorded_ratio == pytest.approx(r.shift_ratio, rel=1e-8)


def test_simulate_from_the_command_line_with_figures(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    figs, page = tmp_path / "figs", tmp_path / "sweep.html"
    args = ["--rate", "0.2,0.6", "--simulate", "--reps", "16", "--steps", "100", "--seed", "3"]
    code, out, err = run(*args, "--plot", str(figs), "--html", str(page), "-f", "csv")
    assert code == 0, err
    df = pd.read_csv(io.StringIO(out))
    assert len(df) == 2 and df["sim_running_var"].notna().all()
    assert sorted(p.name for p in figs.iterdir()) == [
        "shift_vs_rate.png", "shift_vs_rate.svg", "sim_vs_theory.png", "sim_vs_theory.svg",
    ]  # fmt: skip
    assert page.read_text().count("<svg") == 2
    code, _, err = run(*args[:-4], "--steps", "0")
    assert code == 2 and "steps must be an integer >= 1; got 0" in err


# --- the command line -------------------------------------------------------------------------


def test_csv_is_one_tidy_row_per_point() -> None:
    code, out, _ = run("--rate", "0.1:0.5:0.2", "--mean", "0,5", "--std", "2", "-f", "csv")
    assert code == 0
    df = pd.read_csv(io.StringIO(out))
    assert len(df) == 6 and list(df["rate"]) == [0.1, 0.3, 0.5] * 2
    for _, row in df.iterrows():
        q, c = 1 - row["rate"], row["mean"]
        assert row["var"] == 4
        assert row["shift_ratio"] == pytest.approx(4 / ((c * c + 4) / q - c * c), rel=1e-9)


def test_json_carries_metadata_and_the_done_when_grid() -> None:
    code, out, _ = run("--rate", "0.1:0.9:0.1", "--D", "1,4,16,64", "--rho", "0.1", "-f", "json")
    assert code == 0
    doc = json.loads(out)
    assert doc["metadata"]["command"] == "sweep"
    assert doc["metadata"]["parameters"]["topology"] == "linear"
    assert len(doc["rows"]) == 36
    row = next(r for r in doc["rows"] if r["D"] == 64 and r["rate"] == 0.5)
    assert row["shift_ratio"] == pytest.approx((1 + 0.1 * 63) / (2 + 0.1 * 63), rel=1e-9)


def test_markdown_and_output_file(tmp_path: Path) -> None:
    target = tmp_path / "grid.md"
    code, _, err = run("--rate", "0.2,0.4", "--framework", "all", "-f", "md", "-o", str(target))
    assert code == 0 and f"wrote {target}" in err
    text = target.read_text()
    assert "| framework" in text and "tf-keras" in text
    code, _, err = run("--rate", "0.2", "-f", "md", "-o", str(target))
    assert code == 2 and "--output" in err and "already exists; pass --force" in err


def test_plot_and_html_write_their_files(tmp_path: Path) -> None:
    figs, page = tmp_path / "figs", tmp_path / "out" / "sweep.html"
    code, _, err = run(
        "--rate", "0.1:0.9:0.2", "--D", "1,16", "--rho", "0.1",
        "--plot", str(figs), "--html", str(page), "-f", "csv",
    )  # fmt: skip
    assert code == 0, err
    assert sorted(p.name for p in figs.iterdir()) == ["shift_vs_rate.png", "shift_vs_rate.svg"]
    assert (figs / "shift_vs_rate.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = page.read_text()
    assert text.count("<svg") == 1 and "Shift ratio Δ" in text
    code, _, err = run("--rate", "0.1:0.9:0.2", "--plot", str(figs))
    assert code == 2 and "already exists; pass --force" in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--rate", "0.5:0.1:0.1"], "--rate range '0.5:0.1:0.1' is empty"),
        (["--rate", "0.1:0.9:0"], "--rate range '0.1:0.9:0' is empty: the step must not be 0"),
        (["--rate", "0.5,1.2"], "rate must be in [0, 1); got 1.2"),
        (["--width", "2.5"], "--width must be integers; got 2.5"),
        (["--dropout", "zoneout"], "--dropout must be one of bernoulli"),
        (
            ["--framework", "caffe"],
            "--framework must be one of torch, keras, tf-keras, keras2, flax",
        ),
        (["--var", "1", "--std", "1"], "give either --var or --std, not both"),
        (["--var", "-1"], "var must be >= 0; got -1"),
        (["--topology", "direct", "--D", "4"], "--width, --D and --rho need --topology linear"),
        (["--topology", "star"], "--topology must be one of direct, linear; got 'star'"),
        (["--D", "4", "--rho", "-0.5"], "rho must be in [-0.333333, 1] for width 4"),
        (["--batch-size", "1"], "batch_size must be >= 2 for torch"),
        (["--workers", "0"], "workers must be an integer >= 1; got 0"),
        (
            ["--rate", "0.01:0.99:0.01", "--mean", "0:10:0.1", "--var", "1,2"],
            "the grid has 19998 points, more than the limit of 10000; pass --force",
        ),
    ],
)
def test_bad_input_is_one_line_exit_2(args: list[str], message: str) -> None:
    code, out, err = run(*args)
    assert code == 2, (out, err)
    assert err.startswith("varshift: error: ") and message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("option", ["--plot", "--html"])
def test_an_unwritable_output_folder_fails_before_any_work(tmp_path: Path, option: str) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a regular file")
    target = blocker / "sub" / ("page.html" if option == "--html" else "figs")
    code, out, err = run("--rate", "0.1:0.5:0.2", option, str(target))
    assert code == 2 and out == ""
    assert err.startswith(f"varshift: error: {option} ") and "Not a directory" in err
    assert err.count("\n") == 1


@pytest.mark.parametrize("option", ["--plot", "--html"])
def test_missing_matplotlib_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, option: str
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    code, out, err = run("--rate", "0.1:0.5:0.2", option, str(tmp_path / "x"))
    assert code == 2 and out == ""
    assert err == (
        f"varshift: error: {option} needs matplotlib, which is not installed; install it "
        "with: pip install 'varshift[plot]' (or pip install matplotlib)\n"
    )
    assert not (tmp_path / "x").exists()


def test_a_forced_large_grid_runs() -> None:
    code, out, _ = run("--rate", "0.0001:0.5001:0.0001", "--mean", "0,1", "--force", "-f", "csv")
    assert code == 0
    df = pd.read_csv(io.StringIO(out))
    assert len(df) == 2 * 5001 > 10_000
    last = df.iloc[-1]
    q = 1 - last["rate"]
    assert last["mean"] == 1 and last["shift_ratio"] == pytest.approx(1 / (2 / q - 1), rel=1e-8)
