"""Notebook views of the public results (issue 14): ``to_frame()`` is a DataFrame with the
documented columns, ``_repr_html_()`` a well-formed HTML table naming the rows."""

from __future__ import annotations

import subprocess
import sys
import xml.etree.ElementTree as ET
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from varshift.core.theory import TheoryConfig, TheoryRow
from varshift.engine import SimConfig, simulate
from varshift.engine.results import FeatureRow
from varshift.formats import BNLayer, BNStats
from varshift.jobs.checkpoint import CorrectJob, correct_file, inspect_file
from varshift.jobs.correct import CorrectionConfig, correct_stats
from varshift.jobs.simulate import SimulateJob, run_simulate
from varshift.jobs.sweep import SweepConfig, SweepRow, sweep
from varshift.jobs.theory import run_theory

#: The correct report's columns (README, tests/golden/correct_json).
CORRECT_COLUMNS = [
    "layer",
    "kind",
    "action",
    "formula",
    "rate",
    "channels",
    "var_before",
    "var_after",
    "ratio",
    "dropout_term",
    "clipped",
    "assumption",
]
#: `inspect --format csv` columns.
INSPECT_COLUMNS = [
    "layer",
    "channels",
    "count",
    "var_mean",
    "var_min",
    "var_max",
    "mean_mean",
    "mean_min",
    "mean_max",
    "initial",
    "few_updates",
    "nonfinite",
    "nonpositive",
    "flags",
]


def html_cells(result: Any) -> tuple[list[str], list[list[str]]]:
    """Parse ``_repr_html_()`` as XML (well-formed, escaped): header texts and body rows."""
    text = result._repr_html_()
    assert isinstance(text, str)
    table = ET.fromstring(text)
    assert table.tag == "table"
    head = [th.text or "" for th in table.iter("th")]
    body = table.find("tbody")
    assert body is not None
    rows = [[td.text or "" for td in tr.iter("td")] for tr in body.iter("tr")]
    assert all(len(r) == len(head) for r in rows)
    return head, rows


def check(result: Any, columns: list[str], first: list[Any]) -> pd.DataFrame:
    """to_frame() has ``columns`` (in order) and its first column is ``first``; the HTML table
    has the same header and names the same rows."""
    df = result.to_frame()
    assert isinstance(df, pd.DataFrame)
    assert list(df.columns) == columns
    assert list(df.iloc[:, 0]) == first
    head, rows = html_cells(result)
    assert head == columns
    assert [r[0] for r in rows] == [str(v) for v in first]
    return df


def fields_of(row_type: type) -> list[str]:
    """The documented columns of a result whose rows are ``row_type`` (its fields, in order)."""
    return [f.name for f in fields(row_type)]


def stats() -> BNStats:
    layers = {
        "block<1>&bn": BNLayer("block<1>&bn", np.zeros(2), np.array([2.0, 4.0])),
        "head.bn": BNLayer("head.bn", np.ones(2), np.array([3.0, 5.0])),
    }
    return BNStats(layers, "json")


def test_correction_result() -> None:
    result = correct_stats(stats(), CorrectionConfig(rate=0.5))
    df = check(result, CORRECT_COLUMNS, ["block<1>&bn", "head.bn"])
    # bernoulli q (V + mu²) - mu², q = 0.5: (2, 4) with mu 0 → (1, 2); (3, 5) with mu 1 → (1, 2)
    assert df["var_after"].tolist() == [1.5, 1.5]
    assert "block&lt;1&gt;&amp;bn" in result._repr_html_()  # escaped, not markup


def test_inspect_and_correct_file_results(tmp_path: Path) -> None:
    path = tmp_path / "stats.csv"
    path.write_text("layer,channel,mean,var\nbn1,0,0.0,2.0\nbn1,1,0.5,3.0\nbn2,0,1.0,4.0\n")
    inspected = inspect_file(path, "torch")
    df = check(inspected, INSPECT_COLUMNS, ["bn1", "bn2"])
    assert df["channels"].tolist() == [2, 1]
    corrected = correct_file(CorrectJob(path, rate=0.2, framework="torch"))
    df = check(corrected, CORRECT_COLUMNS, ["bn1", "bn2"])
    q = 0.8  # q (V + mu²) - mu² per channel, then the mean over channels
    expected = [(q * 2.0 + (q * (3.0 + 0.25) - 0.25)) / 2, q * (4.0 + 1.0) - 1.0]
    assert df["var_after"].tolist() == pytest.approx(expected)
    assert "stats.csv" in corrected._repr_html_()


def test_theory_result() -> None:
    result = run_theory(TheoryConfig(rates=(0.1, 0.5)))
    df = check(result, fields_of(TheoryRow), ["bernoulli", "bernoulli"])
    assert {"rate", "shift_ratio", "train_var", "test_var"} <= set(df.columns)
    assert df["rate"].tolist() == [0.1, 0.5]
    assert df["shift_ratio"].tolist() == pytest.approx([0.9, 0.5])  # case (a), c = 0: q


def test_simulation_results() -> None:
    config = SimConfig(rate=0.2, samples=256, features=3, epochs=1)
    sim = simulate(config, rng=0)
    df = check(sim, fields_of(FeatureRow), ["0", "1", "2"])
    assert {"feature", "shift_ratio_theory", "running_var"} <= set(df.columns)
    job = run_simulate(SimulateJob(config=config, seed=0))
    assert job.to_frame().equals(simulate(config, rng=0).to_frame())
    assert job._repr_html_() == sim._repr_html_()


def test_sweep_result() -> None:
    result = sweep(SweepConfig(rates=(0.1, 0.3, 0.5)))
    df = result.to_frame()
    assert list(df.columns) == fields_of(SweepRow)
    assert {"rate", "shift_ratio", "train_var"} <= set(df.columns)
    assert df["rate"].tolist() == [0.1, 0.3, 0.5]
    assert df["shift_ratio"].tolist() == pytest.approx([0.9, 0.7, 0.5])
    head, rows = html_cells(result)
    assert head == list(df.columns) and len(rows) == 3


def test_an_empty_result_still_has_its_columns() -> None:
    result = correct_stats(BNStats({}, "json"), CorrectionConfig(rate=0.5))
    assert list(result.to_frame().columns) == CORRECT_COLUMNS
    assert html_cells(result) == (CORRECT_COLUMNS, [])


def test_long_results_are_cut_in_html_only() -> None:
    from varshift.core.frames import MAX_HTML_ROWS

    rates = tuple(round(0.01 * i, 2) for i in range(MAX_HTML_ROWS + 5))
    result = run_theory(TheoryConfig(rates=rates))
    assert len(result.to_frame()) == len(rates)
    _, rows = html_cells(result)
    assert len(rows) == MAX_HTML_ROWS
    assert f"first {MAX_HTML_ROWS} of {len(rates)} rows" in result._repr_html_()


@pytest.mark.torch
def test_diagnose_and_recalibrate_results() -> None:
    torch = pytest.importorskip("torch")
    from varshift.frameworks.torch.passes import diagnose, recalibrate
    from varshift.frameworks.torch.results import DiagnoseRow, RecalibratedLayer

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Dropout(0.5), torch.nn.BatchNorm1d(4))
    with torch.no_grad():
        for _ in range(20):
            net(torch.randn(16, 3))
    x = torch.randn(64, 3)
    found = diagnose(net, x)
    df = check(found, fields_of(DiagnoseRow), ["2"])
    assert {"layer", "kind", "shift_ratio", "stored_var", "eval_var"} <= set(df.columns)
    assert df["kind"].tolist() == ["direct"]
    redone = recalibrate(net, x)
    df = check(redone, fields_of(RecalibratedLayer), ["2"])
    assert {"layer", "var_before", "var_after"} <= set(df.columns)


def test_importing_the_results_does_not_load_pandas() -> None:
    code = (
        "import sys, varshift, varshift.jobs.checkpoint, varshift.jobs.sweep, "
        "varshift.jobs.theory, varshift.jobs.simulate, varshift.engine\n"
        "assert 'pandas' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
