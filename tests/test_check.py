"""`varshift check`: the comparison rule, CI outputs, exit codes."""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from scipy import stats
from typer.testing import CliRunner

from varshift.cli import app
from varshift.core.errors import ValidationError
from varshift.jobs.check import Metric, compare, parse_rule

runner = CliRunner()


def write_report(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text(json.dumps({"metadata": {"suite": "test"}, "rows": rows}))
    return path


def base_rows() -> list[dict[str, object]]:
    return [
        {
            "scenario": "classic",
            "metric": "shift_ratio",
            "value": 0.36,
            "sd": 0.01,
            "better": "higher",
        },
        {
            "scenario": "classic",
            "metric": "correction_error",
            "value": 0.02,
            "sd": 0.005,
            "better": "lower",
        },
        {"scenario": "theory", "metric": "train_var", "value": 11.25, "sd": 0.0},
    ]


def invoke(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    r = runner.invoke(app, list(args), env=env)
    return r.exit_code, r.stdout, r.stderr


def test_same_report_passes(tmp_path: Path) -> None:
    b = write_report(tmp_path / "b.json", base_rows())
    code, _, err = invoke("check", str(b), "--baseline", str(b))
    assert code == 0 and "varshift check: ok: 3 metrics (3 unchanged)" in err


def test_noise_within_the_band_passes_and_beyond_it_fails(tmp_path: Path) -> None:
    b = write_report(tmp_path / "b.json", base_rows())
    rows = base_rows()
    rows[0]["value"] = 0.36 - 3.9 * math.hypot(0.01, 0.01)  # inside z = 4
    ok = write_report(tmp_path / "ok.json", rows)
    assert invoke("check", str(ok), "--baseline", str(b))[0] == 0
    rows[0]["value"] = 0.36 - 4.1 * math.hypot(0.01, 0.01)  # outside: worse (higher is better)
    bad = write_report(tmp_path / "bad.json", rows)
    code, out, err = invoke("check", str(bad), "--baseline", str(b), "-f", "md")
    assert code == 1
    assert "classic/shift_ratio" in err and "worse" in out
    rows[0]["value"] = 0.36 + 4.1 * math.hypot(0.01, 0.01)  # outside, but better
    better = write_report(tmp_path / "better.json", rows)
    code, out, _ = invoke("check", str(better), "--baseline", str(b), "--all", "-f", "csv")
    assert code == 0 and ",better," in out


def test_a_deterministic_metric_fails_on_any_change_beyond_rtol(tmp_path: Path) -> None:
    b = write_report(tmp_path / "b.json", base_rows())
    rows = base_rows()
    rows[2]["value"] = 11.25 * (1 + 1e-4)  # a wrong formula, say
    cur = write_report(tmp_path / "c.json", rows)
    code, out, _ = invoke("check", str(cur), "--baseline", str(b), "-f", "json")
    assert code == 1
    doc = json.loads(out)
    (row,) = [r for r in doc["rows"] if r["metric"] == "train_var"]
    assert row["mark"] == "changed" and row["regressed"] is True
    assert invoke("check", str(cur), "--baseline", str(b), "--rtol", "1e-3")[0] == 0


def test_regressions_are_named_in_every_output_format(tmp_path: Path) -> None:
    b = write_report(tmp_path / "b.json", base_rows())
    rows = base_rows()
    rows[1]["value"] = 0.2  # correction error grew: worse
    cur = write_report(tmp_path / "c.json", rows)
    summary = tmp_path / "summary.md"
    summary.write_text("# earlier step\n")
    code, out, _ = invoke(
        "check",
        str(cur),
        "--baseline",
        str(b),
        "--junit",
        str(tmp_path / "j.xml"),
        "--markdown",
        str(tmp_path / "m.md"),
        "-f",
        "md",
        env={"GITHUB_ACTIONS": "true", "GITHUB_STEP_SUMMARY": str(summary)},
    )
    assert code == 1
    root = ET.parse(tmp_path / "j.xml").getroot()
    failures = root.findall(".//failure")
    assert len(failures) == 1 and "classic/correction_error worse" in failures[0].attrib["message"]
    assert len(root.findall(".//testcase")) == 3
    assert "correction_error" in (tmp_path / "m.md").read_text()
    assert (
        summary.read_text().startswith("# earlier step\n")
        and "correction_error" in summary.read_text()
    )
    assert "::error file=" in out
    assert ",title=varshift check::classic/correction_error worse" in out


def test_fail_if_rules(tmp_path: Path) -> None:
    b = write_report(tmp_path / "b.json", base_rows())
    code, _, err = invoke("check", str(b), "--baseline", str(b), "--fail-if", "shift_ratio < 0.9")
    assert code == 1 and "classic/shift_ratio" in err
    assert (
        invoke("check", str(b), "--baseline", str(b), "--fail-if", "classic/shift_ratio < 0.1")[0]
        == 0
    )
    code, _, err = invoke("check", str(b), "--baseline", str(b), "--fail-if", "nothing > 1")
    assert code == 2 and "fail-if rule 'nothing > 1' matches no metric" in err
    code, _, err = invoke("check", str(b), "--baseline", str(b), "--fail-if", "shift_ratio ~ 1")
    assert code == 2 and "fail-if must look like 'METRIC OP NUMBER'" in err


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "the file is empty"),
        ("{not json", "not a JSON report"),
        ('{"metadata": {}}', "not a varshift report"),
        ('{"rows": []}', "the report has no rows"),
        (
            '{"rows": [{"scenario": "a", "metric": "m", "value": "x"}]}',
            "column value must be a number",
        ),
    ],
)
def test_malformed_reports_exit_2(tmp_path: Path, content: str, message: str) -> None:
    b = write_report(tmp_path / "b.json", base_rows())
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    code, _, err = invoke("check", str(bad), "--baseline", str(b))
    assert code == 2 and message in err and err.count("\n") == 1


def test_mismatched_reports_exit_2(tmp_path: Path) -> None:
    b = write_report(tmp_path / "b.json", base_rows())
    cur = write_report(tmp_path / "c.json", base_rows()[:2])
    code, _, err = invoke("check", str(cur), "--baseline", str(b))
    assert code == 2 and "reports do not match" in err and "theory/train_var" in err
    code, _, err = invoke("check", str(tmp_path / "missing.json"), "--baseline", str(b))
    assert code == 2 and "missing.json: no such file" in err


def test_outputs_are_not_overwritten_without_force(tmp_path: Path) -> None:
    b = write_report(tmp_path / "b.json", base_rows())
    (tmp_path / "j.xml").write_text("keep")
    code, _, err = invoke("check", str(b), "--baseline", str(b), "--junit", str(tmp_path / "j.xml"))
    assert code == 2 and "already exists" in err and (tmp_path / "j.xml").read_text() == "keep"


def test_parse_rule() -> None:
    assert parse_rule("a/b_* >= -1e-3").op == ">="
    with pytest.raises(ValidationError):
        parse_rule("x < y")


def test_false_alarm_rate_of_the_rule_is_nominal() -> None:
    """Two honest noisy measurements of the same quantity: alarms at the two-sided z rate."""
    rng = np.random.default_rng(4)
    n, z = 20_000, 2.0
    sd = rng.uniform(0.1, 3.0, n)
    truth = rng.normal(size=n)
    base = {
        ("s", str(i)): Metric("s", str(i), truth[i] + sd[i] * rng.normal(), sd[i]) for i in range(n)
    }
    cur = {
        ("s", str(i)): Metric("s", str(i), truth[i] + sd[i] * rng.normal(), sd[i]) for i in range(n)
    }
    result = compare(base, cur, z=z, rtol=0, atol=0)
    rate = sum(c.mark != "unchanged" for c in result.comparisons) / n
    nominal = 2 * stats.norm.sf(z)
    assert abs(rate - nominal) < 4 * math.sqrt(nominal * (1 - nominal) / n)


@pytest.mark.torch
def test_checkpoints_are_compared_layer_by_layer(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    model = torch.nn.Sequential(
        torch.nn.Linear(3, 4),
        torch.nn.Dropout(0.5),
        torch.nn.BatchNorm1d(4),
        torch.nn.BatchNorm1d(4),
    )
    model.train()
    for _ in range(5):
        model(torch.randn(16, 3))
    base = tmp_path / "base.pt"
    torch.save(model.state_dict(), base)
    same = tmp_path / "same.pt"
    torch.save(model.state_dict(), same)
    code, _, err = invoke("check", str(same), "--baseline", str(base))
    assert code == 0 and "10 metrics (10 unchanged)" in err
    state = model.state_dict()
    state["3.running_var"][2] *= 1.5  # one channel of one layer tampered with
    tampered = tmp_path / "tampered.pt"
    torch.save(state, tampered)
    code, _, err = invoke("check", str(tampered), "--baseline", str(base), "-f", "md")
    assert code == 1
    assert "3/var_" in err and "2/" not in err
    (base.with_suffix(".npz")).write_bytes(b"")
    code, _, err = invoke("check", str(tmp_path / "base.npz"), "--baseline", str(base))
    assert code == 2 and "base.npz" in err


def _rule_rows(*names: str) -> list[dict[str, object]]:
    return [
        {"scenario": s, "metric": n, "value": 0.5, "sd": 0.0}
        for s in ("classic", "keras")
        for n in names
    ]


def test_fail_if_short_names_resolve_to_one_metric(tmp_path: Path) -> None:
    b = write_report(tmp_path / "b.json", _rule_rows("theory.shift_ratio", "theory.train_var"))
    code, _, err = invoke("check", str(b), "--baseline", str(b), "--fail-if", "shift_ratio < 0.9")
    assert code == 1
    assert "classic/theory.shift_ratio" in err and "keras/theory.shift_ratio" in err
    assert "train_var" not in err.split("regressed:")[1]


def test_fail_if_ambiguous_short_name_lists_the_candidates(tmp_path: Path) -> None:
    b = write_report(tmp_path / "b.json", _rule_rows("shift_ratio_theory", "shift_ratio_measured"))
    code, _, err = invoke("check", str(b), "--baseline", str(b), "--fail-if", "shift_ratio < 0.9")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "ambiguous" in err and "shift_ratio_measured, shift_ratio_theory" in err
    # written in full, the same rule works
    code, _, _ = invoke(
        "check", str(b), "--baseline", str(b), "--fail-if", "shift_ratio_theory < 0.9"
    )
    assert code == 1


def test_fail_if_unknown_name_lists_near_misses(tmp_path: Path) -> None:
    b = write_report(tmp_path / "b.json", _rule_rows("theory.shift_ratio", "theory.train_var"))
    code, _, err = invoke("check", str(b), "--baseline", str(b), "--fail-if", "shift_ratoi < 0.9")
    assert code == 2 and "matches no metric" in err and "did you mean shift_ratio" in err
    # a short name is a whole word: 'ratio' is not a short name of 'theory.shift_ratio'
    code, _, err = invoke("check", str(b), "--baseline", str(b), "--fail-if", "ratio < 0.9")
    assert code == 2 and "matches no metric" in err


def test_a_sweep_report_is_checked_point_by_point(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep.json"
    assert invoke("sweep", "--rate", "0.1,0.2,0.5", "-f", "json", "-o", str(sweep))[0] == 0
    code, _, err = invoke("check", str(sweep), "--baseline", str(sweep))
    assert code == 0 and "varshift check: ok" in err
    # Δ = 1 - rate: only the rate 0.5 point (index 2) is below 0.6
    code, _, err = invoke(
        "check", str(sweep), "--baseline", str(sweep), "--fail-if", "shift_ratio < 0.6"
    )
    assert code == 1 and "1 regressed: " in err and "point2/shift_ratio" in err


def _regressed_result(reason: str, scenario: str = "classic") -> object:
    from varshift.jobs.check import CheckResult, Comparison

    c = Comparison(scenario, "shift_ratio", 0.36, 0.2, 0.2 / 0.36, -0.16, 0.01, -16.0, "worse",
                   True, reason)  # fmt: skip
    return CheckResult((c,), (), {"parameters": {"current": "reports/new,1.json"}}, seconds=0.5)


def _md_table_cells(markdown: str) -> list[list[str]]:
    """The body cells of the first table, as a real GFM parser reads them."""
    MarkdownIt = pytest.importorskip("markdown_it").MarkdownIt  # rich >= 13.2 depends on it

    tokens = MarkdownIt("commonmark").enable("table").parse(markdown)
    rows: list[list[str]] = []
    in_body = False
    for t in tokens:
        if t.type == "tbody_open":
            in_body = True
        elif t.type == "tr_open" and in_body:
            rows.append([])
        elif t.type == "inline" and in_body and rows:
            rows[-1].append(t.content)
    return rows


def test_markdown_cells_survive_pipes_and_newlines() -> None:
    from varshift.present.check import markdown_summary

    reason = "higher is better; |diff| 0.16 > 0.01\nsecond line"
    md = markdown_summary(_regressed_result(reason, "a|b"))  # type: ignore[arg-type]
    rows = _md_table_cells(md)
    assert len(rows) == 1 and len(rows[0]) == 8
    scenario, metric, *_, mark, cell = rows[0]
    assert scenario == "a|b" and metric == "shift_ratio" and mark == "**worse**"
    assert cell.startswith("higher is better; |diff| 0.16 > 0.01")
    MarkdownIt = pytest.importorskip("markdown_it").MarkdownIt
    html = MarkdownIt("commonmark").enable("table").render(md)
    assert "higher is better; |diff| 0.16 &gt; 0.01<br>second line" in html


def test_junit_has_times_and_annotations_name_the_file() -> None:
    from varshift.present.check import github_annotations, junit_xml

    result = _regressed_result("higher is better")
    root = ET.fromstring(junit_xml(result))  # type: ignore[arg-type]
    assert float(root.attrib["time"]) == 0.5
    assert float(root.find("testsuite").attrib["time"]) == 0.5  # type: ignore[union-attr]
    assert all(float(tc.attrib["time"]) >= 0 for tc in root.iter("testcase"))
    [line] = github_annotations(result)  # type: ignore[arg-type]
    # property values escape ',' and ':' (GitHub's workflow-command rules)
    assert line.startswith("::error file=reports/new%2C1.json,title=varshift check::")


def test_update_baseline_writes_the_report_with_the_output_rules(tmp_path: Path) -> None:
    cur = write_report(tmp_path / "cur.json", base_rows())
    base = tmp_path / "base.json"
    code, _, err = invoke("check", str(cur), "--baseline", str(base), "--update-baseline")
    assert code == 0 and base.read_bytes() == cur.read_bytes()
    # identical: success, nothing to force
    assert invoke("check", str(cur), "--baseline", str(base), "--update-baseline")[0] == 0
    rows = base_rows()
    rows[0]["value"] = 0.5
    write_report(cur, rows)
    code, _, err = invoke("check", str(cur), "--baseline", str(base), "--update-baseline")
    assert code == 2 and "pass --force" in err and base.read_bytes() != cur.read_bytes()
    args = ("check", str(cur), "--baseline", str(base), "--update-baseline", "--force")
    assert invoke(*args)[0] == 0 and base.read_bytes() == cur.read_bytes()
    # only a report can become a baseline
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    code, _, err = invoke("check", str(bad), "--baseline", str(base), "--update-baseline")
    assert code == 2 and "not a varshift report" in err
