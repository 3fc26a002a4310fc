"""Golden outputs: what `theory`, `simulate`, `correct`, `inspect` and `sweep` print and write,
byte for byte, for fixed inputs and seeds.

Each case runs the real command in a fresh process (``python -m varshift``), the terminal
formats under a pseudo-terminal 200 columns wide with ``TERM=dumb`` (a Rich table without
escape codes), and compares stdout and every file written with ``tests/golden/<case>/``.
Regenerate on purpose with ``pytest tests/test_golden.py --update-golden`` and review the diff.
"""

from __future__ import annotations

import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest

GOLDEN = Path(__file__).parent / "golden"

#: A stats file written by the test (no binary blob committed): two layers, three channels.
STATS_CSV = """layer,channel,mean,var,count
block1.bn,0,0.5,2.5,500
block1.bn,1,-0.25,1.75,500
block1.bn,2,1.5,4.0,500
head.bn,0,2.0,9.0,500
head.bn,1,0.0,1.2,500
head.bn,2,-1.0,3.3,500
"""

#: case → (arguments, files the command writes relative to its working folder (a name ending in
#: "/" stands for every file in that folder), terminal?)
CASES: dict[str, tuple[list[str], list[str], bool]] = {
    "theory_table": ("theory --rate 0.2 --rate 0.5 --mean 5".split(), [], True),
    "theory_md": ("theory --rate 0.2 --format md".split(), [], False),
    "theory_json": (
        "theory --rate 0.3 --framework keras --dropout gaussian -f json".split(),
        [],
        False,
    ),
    "theory_linear_csv": (
        "theory --rate 0.5 --topology linear --width 64 --rho 0.1 --cos2 0.5 -f csv".split(),
        [],
        False,
    ),
    "simulate_table": (
        "simulate --rate 0.2 --samples 600 --epochs 3 --no-report".split(),
        [],
        True,
    ),
    "simulate_reports": (
        (
            "simulate --rate 0.2 --samples 600 --epochs 3 --mean 5 --framework keras --fit "
            "--report-dir rep -f md"
        ).split(),
        ["rep/"],
        False,
    ),
    "simulate_linear_json": (
        (
            "simulate --rate 0.5 --topology linear --width 8 --rho 0.3 --samples 400 "
            "--epochs 2 --no-report -f json"
        ).split(),
        [],
        False,
    ),
    "simulate_conv_csv": (
        (
            "simulate --rate 0.1 --topology conv --spatial 3x3 --channelwise --framework "
            "tf-keras --samples 200 --epochs 2 --no-report -f csv"
        ).split(),
        [],
        False,
    ),
    "inspect_table": ("inspect stats.csv --framework torch".split(), [], True),
    "correct_table": (
        "correct stats.csv --rate 0.5 --framework torch -o fixed.csv".split(),
        ["fixed.csv", "fixed.csv.report.json"],
        True,
    ),
    "correct_json": (
        (
            "correct stats.csv --layer block1.*=0.2 --layer head.*=0.4 --framework keras "
            "--batch-size 32 -o fixed.json -f json"
        ).split(),
        ["fixed.json", "fixed.json.report.json"],
        False,
    ),
    "sweep_csv": ("sweep --rate 0.1:0.5:0.2 --D 1,16 --rho 0.1 -f csv".split(), [], False),
}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:  # pragma: no cover - hook
    if "case" in metafunc.fixturenames:
        metafunc.parametrize("case", sorted(CASES))


def _run(args: list[str], cwd: Path, terminal: bool) -> tuple[int, bytes, bytes]:
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "FORCE_COLOR")}
    env.update(COLUMNS="200", LINES="50", TERM="dumb", PYTHONHASHSEED="0")
    cmd = [sys.executable, "-m", "varshift", *args]
    if not terminal:
        p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, timeout=120)
        return p.returncode, p.stdout, p.stderr
    leader, follower = pty.openpty()
    try:
        with subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=follower, stderr=subprocess.PIPE
        ) as proc:
            os.close(follower)
            chunks = []
            while True:
                try:
                    data = os.read(leader, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not data:
                    break
                chunks.append(data)
            err = proc.stderr.read() if proc.stderr else b""
            code = proc.wait(timeout=120)
    finally:
        os.close(leader)
    # a pseudo-terminal turns "\n" into "\r\n"
    return code, b"".join(chunks).replace(b"\r\n", b"\n"), err


def test_golden_output(case: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    args, files, terminal = CASES[case]
    (tmp_path / "stats.csv").write_text(STATS_CSV)
    code, out, err = _run(args, tmp_path, terminal)
    assert code == 0, err.decode()
    produced = {"stdout.txt": out}
    for f in files:
        paths = sorted((tmp_path / f).iterdir()) if f.endswith("/") else [tmp_path / f]
        produced |= {str(p.relative_to(tmp_path)): p.read_bytes() for p in paths}
    assert len(produced) > len(files), f"{case}: {files} wrote nothing"
    folder = GOLDEN / case
    if request.config.getoption("--update-golden"):
        for name, data in produced.items():
            target = folder / name.replace("/", "__")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        return
    kept = {p.name for p in folder.iterdir()} if folder.exists() else set()
    assert kept == {n.replace("/", "__") for n in produced}, f"{case}: files differ from {folder}"
    for name, data in produced.items():
        expected = folder / name.replace("/", "__")
        assert expected.exists(), f"no golden file {expected}: run with --update-golden"
        assert data.decode() == expected.read_text(), f"{case}: {name} differs from {expected}"
