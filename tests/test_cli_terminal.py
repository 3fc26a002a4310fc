"""What a terminal shows: tables readable at 80, 100 and 120 columns (the key column in every
part, numbers whole), verdict colours (plain when piped or under NO_COLOR), a smoothed ETA."""

from __future__ import annotations

import io
import os
import pty
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from rich.cells import cell_len
from rich.console import Console
from typer.testing import CliRunner

from varshift.cli import app
from varshift.present import output, render
from varshift.present import simulate as present_simulate
from varshift.present.render import SmoothedRate, column_chunks, frame_table, print_table
from varshift.present.table import Grid

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]
WIDTHS = (80, 100, 120)

#: Layer names longer than any other cell: the key column must never lose them.
STATS_CSV = """layer,channel,mean,var,count
encoder.layers.11.block1.bn,0,0.5,2.5,500
encoder.layers.11.block1.bn,1,-0.25,1.75,500
head.bn,0,2.0,9.0,500
head.bn,1,0.0,1.2,500
"""


def md_cells(text: str) -> set[str]:
    """The body cells of every Markdown table in ``text`` (the piped rendering)."""
    cells: set[str] = set()
    for line in text.splitlines():
        if line.startswith("|") and not set(line) <= set("|:- "):
            cells.update(c.strip() for c in line.strip("|").split("|"))
    return cells


@pytest.fixture
def terminal(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Make stdout a terminal of the width in the yielded list (colour off, as TERM=dumb)."""
    width = [80]

    def console(width_: int | None = None) -> Console:
        return Console(file=sys.stdout, width=width[0], force_terminal=True, color_system=None)

    def on_terminal(fmt: str, out: Path | None) -> bool:
        return fmt == "table" and out is None

    monkeypatch.setattr(render, "stdout_console", console)
    monkeypatch.setattr(output, "on_terminal", on_terminal)
    monkeypatch.setattr(present_simulate, "on_terminal", on_terminal)
    import varshift.cli.cmd_sweep as cmd_sweep  # it imports on_terminal by name

    monkeypatch.setattr(cmd_sweep, "on_terminal", on_terminal)
    yield width


def shown(args: list[str], width: int) -> str:
    r = runner.invoke(app, args)
    assert r.exit_code in (0, 1), r.stderr
    return r.stdout


def assert_readable(text: str, width: int, key: str, expected: set[str]) -> None:
    lines = text.splitlines()
    assert all(cell_len(line) <= width for line in lines), f"a line is wider than {width}"
    own = [c for c in expected if "…" in c]  # cells whose data holds an ellipsis (a path)
    assert text.count("…") <= sum(text.count(c) for c in own), "a cell was cut"
    tables = sum(1 for ln in lines if re.fullmatch(r"\s*(┡[━╇]+┩|─+)\s*", ln))
    assert tables >= 1
    header_lines = [ln for ln in lines if re.search(rf"(┃|^)\s*{re.escape(key)}\s", ln)]
    assert len(header_lines) >= tables, f"the key column {key!r} is missing from a part"
    words = set(re.split(r"[\s│┃]+", text))
    whole = {c for c in expected if c and " " not in c and c != "—"}  # names and numbers
    missing = {c for c in whole if c not in words}
    assert not missing, f"cells not shown whole at {width} columns: {sorted(missing)[:5]}"


CASES: dict[str, tuple[list[str], str, bool]] = {
    # name: (arguments, key column, the piped table has the same cells)
    "theory": (["theory", "--rate", "0.1,0.3,0.5,0.7,0.9", "--mean", "5"], "quantity", True),
    "simulate": (
        ["simulate", "--samples", "300", "--epochs", "2", "--no-report", "-q"],
        "feature",
        True,
    ),
    "inspect": (["inspect", "{stats}", "--framework", "torch"], "layer", True),
    "correct": (
        ["correct", "{stats}", "--rate", "0.5", "--framework", "torch", "-o", "{out}", "--force"],
        "layer",
        True,
    ),
    "sweep": (["sweep", "--rate", "0.1:0.9:0.2", "--D", "1,16", "--rho", "0.1", "-q"], "D", False),
    "sweep --simulate": (
        ["sweep", "--rate", "0.1:0.5:0.2", "--simulate", "--reps", "16", "--seed", "1", "-q"],
        "rate",
        False,
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_tables_keep_the_key_column_and_whole_numbers(
    case: str, terminal: list[int], tmp_path: Path
) -> None:
    template, key, same_cells = CASES[case]
    (tmp_path / "stats.csv").write_text(STATS_CSV)
    args = [a.format(stats=tmp_path / "stats.csv", out=tmp_path / "o.csv") for a in template]
    terminal[0] = 10_000
    piped = runner.invoke(app, [*args, "-f", "md"]).stdout
    assert "|" in piped
    expected = md_cells(piped) if same_cells else set()
    if case in ("inspect", "correct"):
        expected |= {"encoder.layers.11.block1.bn", "head.bn"}
    for width in WIDTHS:
        terminal[0] = width
        assert_readable(shown(args, width), width, key, expected)


def test_check_tables_with_wide_keys_switch_to_a_long_format() -> None:
    """check's table (scenario, metric, long reasons): the keys are never cut, long text
    wraps, numbers stay whole."""
    grid = Grid.from_records(
        {
            "scenario": f"framework-torch-cumulative-{i}",
            "metric": "theory.running_var_expected",
            "baseline": 10.8984375 + i,
            "current": 7.126666417,
            "ratio": 0.6539163451,
            "z": -1.897537002,
            "mark": "worse",
            "reason": "significant change of a metric with no better direction; "
            "|diff| 3.77 > 1e-05",
        }
        for i in range(3)
    )
    for width in WIDTHS:
        buf = io.StringIO()
        print_table(Console(file=buf, width=width, color_system=None), grid, keys=2)
        text = buf.getvalue()
        assert all(cell_len(line) <= width for line in text.splitlines())
        assert "…" not in text
        for i in range(3):
            assert f"framework-torch-cumulative-{i}" in text
        for number in ("10.8984375", "12.8984375", "7.126666417", "-1.897537002"):
            assert number in text
        # the keys fill over half of any of these widths: one field | value block per row
        assert text.count("│ scenario │ framework-torch-cumulative-") == 3
        assert text.count("│ mark     │ worse") == 3


def test_chunks_repeat_the_keys_and_keep_every_column_once() -> None:
    grid = Grid.from_records([{"name": "a" * 10, **{f"c{i}": 123456.789 for i in range(12)}}])
    chunks = column_chunks(grid, 80)
    assert len(chunks) > 1 and all(c[0] == "name" for c in chunks)
    assert [c for chunk in chunks for c in chunk[1:]] == [f"c{i}" for i in range(12)]
    # "name" (10) + five columns of 10: 1 + 13 + 5 * 13 = 79 cells fit in 80, a sixth not
    assert [len(c) - 1 for c in chunks] == [5, 5, 2]
    assert column_chunks(grid, 1000) == [list(grid.columns)]


def test_a_real_pseudo_terminal_of_80_columns(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "FORCE_COLOR")}
    env.update(COLUMNS="80", LINES="50", TERM="dumb", PYTHONPATH=str(ROOT))
    leader, follower = pty.openpty()
    cmd = [sys.executable, "-m", "varshift", "theory", "--rate", "0.1,0.5,0.9"]
    with subprocess.Popen(cmd, env=env, stdout=follower, stderr=subprocess.PIPE) as proc:
        os.close(follower)
        chunks = []
        while True:
            try:
                data = os.read(leader, 65536)
            except OSError:
                break
            if not data:
                break
            chunks.append(data)
        assert proc.wait(timeout=120) == 0
    os.close(leader)
    text = b"".join(chunks).decode().replace("\r\n", "\n")
    assert_readable(text, 80, "quantity", {"0.3162276079", "0.948679029", "1.747871252e-46"})


# --- verdict colours ------------------------------------------------------------------------

RED, GREEN = "\x1b[31m", "\x1b[32m"


def coloured(monkeypatch: pytest.MonkeyPatch, no_color: bool, terminal: bool) -> str:
    if no_color:
        monkeypatch.setenv("NO_COLOR", "1")
    else:
        monkeypatch.delenv("NO_COLOR", raising=False)
    grid = Grid.from_records(
        [
            {"metric": "a", "mark": "worse"},
            {"metric": "b", "mark": "better"},
            {"metric": "c", "mark": "unchanged"},
        ]
    )
    buf = io.StringIO()
    colours = "standard" if terminal else "auto"  # piped: Rich's own choice
    console = Console(file=buf, width=80, force_terminal=terminal, color_system=colours)
    console.print(frame_table(grid))
    return buf.getvalue()


def test_verdicts_are_red_and_green_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    text = coloured(monkeypatch, no_color=False, terminal=True)
    assert f"{RED}worse" in text and f"{GREEN}better" in text
    assert "unchanged" in text and "\x1b[31munchanged" not in text


@pytest.mark.parametrize(("no_color", "terminal"), [(True, True), (False, False)])
def test_verdicts_are_plain_under_no_color_or_piped(
    monkeypatch: pytest.MonkeyPatch, no_color: bool, terminal: bool
) -> None:
    text = coloured(monkeypatch, no_color=no_color, terminal=terminal)
    assert "worse" in text and "better" in text
    assert RED not in text and GREEN not in text


def test_the_check_verdict_line_is_red_on_a_terminal_and_plain_when_piped(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    line = "varshift check: REGRESSION: 3 metrics (1 better, 1 unchanged, 1 worse)"
    for name in ("NO_COLOR", "FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TERM", "xterm-256color")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)  # a terminal
    render.verdict_message(line)
    err = capsys.readouterr().err
    assert "\x1b[1;31mREGRESSION" in err and f"{GREEN}better" in err and f"{RED}worse" in err
    monkeypatch.setenv("NO_COLOR", "1")
    render.verdict_message(line)
    assert capsys.readouterr().err == line + "\n"
    monkeypatch.delenv("NO_COLOR")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)  # piped
    render.verdict_message(line)
    assert capsys.readouterr().err == line + "\n"


# --- a smoothed ETA ---------------------------------------------------------------------------


def test_the_eta_does_not_swing_with_irregular_steps() -> None:
    """Steps arrive in bursts (gaps 0.2 s and 3.8 s alternate, 1 step each): the true mean
    rate is 0.5 step/s, so the ETA is 2 s per remaining step. The gap-by-gap rate swings by a
    factor 19; the smoothed ETA stays within 15% of the truth after a warm-up of 60 s."""
    est = SmoothedRate(tau=20.0)
    t, total = 0.0, 400
    est.update(t, 0)
    etas = []
    for done in range(1, total):
        t += 0.2 if done % 2 else 3.8
        est.update(t, done)
        truth = 2.0 * (total - done)
        if t > 60:
            etas.append(est.remaining(total) / truth)  # type: ignore[operator]
    assert etas and max(abs(r - 1) for r in etas) < 0.15


def test_the_eta_follows_a_lasting_change_of_speed() -> None:
    """1 step/s for 100 s, then 0.25 step/s: after 5 tau the ETA uses the new speed."""
    est = SmoothedRate(tau=10.0)
    t, done = 0.0, 0
    est.update(t, done)
    while t < 100:
        t, done = t + 1.0, done + 1
        est.update(t, done)
    assert est.remaining(done + 10) == pytest.approx(10.0, rel=1e-9)
    while t < 150:
        t, done = t + 4.0, done + 1
        est.update(t, done)
    assert est.remaining(done + 10) == pytest.approx(40.0, rel=0.02)
    assert SmoothedRate().remaining(10) is None


@pytest.mark.torch
def test_diagnose_tables_keep_the_layer_column(
    terminal: list[int], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch = pytest.importorskip("torch")
    pytest.importorskip("sklearn")
    import numpy as np

    from tests._digits import digits, trained

    (tmp_path / "vs_term_nets.py").write_text("from tests._digits import stacked_net\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    x, _ = digits()
    torch.save(trained("stacked").state_dict(), tmp_path / "stacked.pt")
    np.savez(tmp_path / "digits.npz", x=x.numpy())  # no labels: only the layer table
    args = [
        "diagnose",
        str(tmp_path / "stacked.pt"),
        "--model",
        "vs_term_nets:stacked_net",
        "--data",
        str(tmp_path / "digits.npz"),
        "--quiet",
    ]
    # the dropout-on pass draws from torch's global generator: seed it for equal runs
    terminal[0] = 10_000
    torch.manual_seed(0)
    piped = runner.invoke(app, [*args, "-f", "md"])
    assert piped.exit_code == 0, piped.stderr
    expected = md_cells(piped.stdout)
    key = piped.stdout.split("|")[1].strip()  # the first column of the table
    for width in WIDTHS:
        terminal[0] = width
        torch.manual_seed(0)
        assert_readable(shown(args, width), width, key, expected)
