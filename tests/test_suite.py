"""The report suite and the CI check against a baseline: regressions are caught, noise is not."""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from scipy import stats
from typer.testing import CliRunner

from varshift.cli import app
from varshift.core import dropout as noise
from varshift.core import presets as conventions
from varshift.engine import bn
from varshift.jobs.check import compare, metrics_from_rows
from varshift.jobs.suite import COLUMNS, run_suite, scenarios, suite_metadata
from varshift.present.report import to_frame, to_json

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def save(rows: list, path: Path, seed: int = 0) -> Path:  # type: ignore[type-arg]
    path.write_text(to_json(to_frame(rows), suite_metadata(seed, True)))
    return path


def check(current: Path, baseline: Path, *extra: str) -> tuple[int, str, str]:
    r = runner.invoke(
        app,
        ["check", str(current), "--baseline", str(baseline), *extra],
        env={"GITHUB_ACTIONS": "true"},
    )
    return r.exit_code, r.stdout, r.stderr


def test_scenarios_cover_what_the_suite_promises() -> None:
    names = [s.name for s in scenarios()]
    assert "classic" in names
    assert {f"dropout-{k}" for k in noise.DROPOUT_KINDS} <= set(names)
    assert {"framework-torch", "framework-torch-cumulative", "framework-keras"} <= set(names)
    assert {"framework-tf-keras", "framework-flax"} <= set(names)
    assert sum(n.startswith("rate-") for n in names) >= 5
    assert sum(n.startswith("linear-") for n in names) >= 6
    classic = scenarios()[0]
    assert (classic.mean, classic.std, classic.rate, classic.batch_size) == (5.0, 2.0, 0.2, 32)
    assert (classic.rows, classic.epochs, classic.preset.alpha) == (10000, 100, 0.99)


def test_rows_are_long_form_and_deterministic() -> None:
    a = run_suite(3, quick=True)
    b = run_suite(3, quick=True)
    assert a == b
    assert list(to_frame(a).columns) == list(COLUMNS)
    theory = [r for r in a if r.metric.startswith("theory.")]
    assert theory and all(r.sd == 0 for r in theory)
    sim = [r for r in a if r.metric.startswith("sim.")]
    assert sim and all(r.sd > 0 for r in sim)
    (classic,) = [r for r in a if r.scenario == "classic" and r.metric == "theory.shift_ratio"]
    assert classic.value == pytest.approx(4 / ((25 + 4) / 0.8 - 25))


def test_the_cli_writes_byte_identical_reports(tmp_path: Path) -> None:
    for folder in ("a", "b"):
        r = runner.invoke(app, ["suite", "--quick", "--report-dir", str(tmp_path / folder), "-q"])
        assert r.exit_code == 0, r.stderr
    for ext in ("csv", "md", "json"):
        assert (tmp_path / "a" / f"suite.{ext}").read_bytes() == (
            tmp_path / "b" / f"suite.{ext}"
        ).read_bytes()


def test_rerunning_an_identical_suite_succeeds_and_other_parameters_fail_before_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "r"
    args = ["suite", "--quick", "--report-dir", str(folder)]
    assert runner.invoke(app, [*args, "-q"]).exit_code == 0
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.iterdir()}
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.stderr
    assert f"unchanged {folder / 'suite.json'}" in r.stderr
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.iterdir()} == before

    import varshift.cli.cmd_suite as cmd

    def no_work(*a: object, **k: object) -> None:
        raise AssertionError("the suite ran although its output is refused")

    monkeypatch.setattr(cmd, "suite_result", no_work)
    r = runner.invoke(app, [*args, "--seed", "1"])
    assert r.exit_code == 2
    assert r.stderr.strip() == (
        f"varshift: error: {folder / 'suite.json'}: already exists from another run "
        "(other parameters or version); pass --force to overwrite it"
    )
    monkeypatch.undo()
    (folder / "suite.csv").write_text("edited\n")  # same parameters, other bytes
    r = runner.invoke(app, args)
    assert r.exit_code == 2 and "exists with different content; pass --force" in r.stderr
    assert runner.invoke(app, [*args, "--force", "-q"]).exit_code == 0
    assert (folder / "suite.csv").read_bytes() == before["suite.csv"][0]


def test_the_report_does_not_depend_on_the_executor(tmp_path: Path) -> None:
    # Scenario i draws from spawn()[i] whichever process runs it: one worker (in this process)
    # and two spawned processes must write the same bytes.
    for folder, workers in (("one", "1"), ("two", "2")):
        args = ["suite", "--quick", "--workers", workers, "--report-dir", str(tmp_path / folder)]
        r = runner.invoke(app, [*args, "-q"])
        assert r.exit_code == 0, r.stderr
    for ext in ("csv", "md", "json"):
        assert (tmp_path / "one" / f"suite.{ext}").read_bytes() == (
            tmp_path / "two" / f"suite.{ext}"
        ).read_bytes()


def test_suite_refuses_workers_and_scheduler_together(tmp_path: Path) -> None:
    args = ["suite", "--quick", "--workers", "2", "--scheduler", "tcp://127.0.0.1:1"]
    r = runner.invoke(app, [*args, "--report-dir", str(tmp_path)])
    assert r.exit_code == 2
    assert "give either --workers or --scheduler, not both" in r.stderr
    assert not list(tmp_path.iterdir())


def test_committed_baseline_matches_the_suite_definition() -> None:
    doc = json.loads((ROOT / "reports" / "baseline.json").read_text())
    assert doc["metadata"]["scenarios"] == json.loads(
        json.dumps(suite_metadata(0, False)["scenarios"])
    )
    assert doc["metadata"]["quick"] is False and doc["metadata"]["seed"] == 0


SUBSET = ("classic", "dropout-gaussian", "framework-keras", "framework-flax", "rate-0.5")


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save(
        list(run_suite(0, quick=True, only=SUBSET)), tmp_path_factory.mktemp("b") / "b.json"
    )


def test_a_different_seed_is_no_regression(baseline: Path, tmp_path: Path) -> None:
    current = save(list(run_suite(1, quick=True, only=SUBSET)), tmp_path / "c.json")
    code, _, err = check(current, baseline)
    assert code == 0, err


def _assert_caught(baseline: Path, current: Path, tmp_path: Path, expected: str) -> None:
    """Exit 1, and ``expected`` (scenario/metric) named in every output format."""
    junit, md = tmp_path / "j.xml", tmp_path / "m.md"
    code, out, err = check(
        current, baseline, "--junit", str(junit), "--markdown", str(md), "-f", "md"
    )
    assert code == 1
    assert expected in err  # the one-line verdict
    assert expected.split("/")[1] in out  # the table
    assert f"::error file={current},title=varshift check::{expected}" in out  # GitHub annotation
    scenario, metric = expected.split("/")
    assert any(f"| {scenario} | {metric} |" in line for line in md.read_text().splitlines())
    messages = [f.attrib["message"] for f in ET.parse(junit).getroot().iter("failure")]
    assert any(m.startswith(expected) for m in messages)


def test_a_wrong_formula_is_caught(
    baseline: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Inject a 5% error into the dropout noise variance (the heart of the train-variance formula).
    original = noise.Dropout.mask_variance
    monkeypatch.setattr(noise.Dropout, "mask_variance", lambda self: 1.05 * original(self))
    current = save(list(run_suite(0, quick=True, only=SUBSET)), tmp_path / "c.json")
    _assert_caught(baseline, current, tmp_path, "classic/theory.train_var")


def test_a_changed_preset_is_caught(
    baseline: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    keras = conventions.PRESETS["keras"]
    monkeypatch.setitem(conventions.PRESETS, "keras", replace(keras, alpha=0.9, momentum=0.9))
    current = save(list(run_suite(0, quick=True, only=SUBSET)), tmp_path / "c.json")
    _assert_caught(baseline, current, tmp_path, "framework-keras/theory.running_var_sd")


def test_a_simulation_regression_is_caught(
    baseline: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The engine forgets the biased-variance convention (stores n/(n-1) too much for Keras/Flax)
    # while theory is unchanged: only the Monte-Carlo metrics can see it.
    advance = bn.advance

    def wrong(state, means, stored, preset):  # type: ignore[no-untyped-def]
        return advance(state, means, stored * 1.1 if not preset.unbiased else stored, preset)

    monkeypatch.setattr(bn, "advance", wrong)
    current = save(list(run_suite(0, quick=True, only=SUBSET)), tmp_path / "c.json")
    _assert_caught(baseline, current, tmp_path, "framework-flax/sim.z_running_var")


def test_false_alarm_rate_over_many_seeds_is_nominal() -> None:
    """Independent pairs of seeds at z = 2: the noisy metrics alarm at ~4.55%, theory never."""
    z, pairs = 2.0, 16
    alarms = total = 0
    for k in range(pairs):
        a = metrics_from_rows([r.__dict__ for r in run_suite(100 + 2 * k, quick=True)], "a")
        b = metrics_from_rows([r.__dict__ for r in run_suite(101 + 2 * k, quick=True)], "b")
        result = compare(a, b, z=z)
        for c in result.comparisons:
            if c.metric.startswith("theory."):
                assert c.mark == "unchanged"
            else:
                total += 1
                alarms += c.mark != "unchanged"
    nominal = 2 * stats.norm.sf(z)
    # The correction-error bands are estimated from 32 features (a t-like statistic with ~31
    # degrees of freedom), which alarms a little more often: allow 4 binomial SEs around nominal.
    se = math.sqrt(nominal * (1 - nominal) / total)
    assert abs(alarms / total - nominal) < 4 * se, (alarms, total)
    assert np.isfinite(alarms)
