"""The simulate, correct and check pages in a real headless browser: each loads offline, shows
its figures, and a screenshot is taken (as tests/test_html_browser.py does for sweep).

Needs Debian's chromium (`make browser` installs it); skipped when it is not on PATH.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from _browser import chromium, needs_chromium
from typer.testing import CliRunner

from varshift.cli import app

pytest.importorskip("matplotlib")

pytestmark = needs_chromium

#: matplotlib's C1 (orange: the simulated running variance and values) and C3 (red: the
#: stored variance before the correction, and a regression).
ORANGE = (0xFF, 0x7F, 0x0E)
RED = (0xD6, 0x27, 0x28)


def _invoke(*args: str | Path, code: int = 0) -> None:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == code, result.stderr


@pytest.fixture(scope="module")
def pages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("pages")
    out = {name: folder / f"{name}.html" for name in ("simulate", "correct", "check")}
    _invoke(
        "simulate", "--rate", "0.5", "--mean", "1", "--samples", "2000", "--steps", "400",
        "--no-report", "-q", "-f", "csv", "--html", out["simulate"],
    )  # fmt: skip
    stats = folder / "stats.csv"
    rng = np.random.default_rng(0)
    lines = ["layer,channel,mean,var"]
    for layer in ("stem.bn", "block1.bn1", "block1.bn2", "head.bn"):
        lines += [
            f"{layer},{c},{rng.uniform(-0.5, 0.5):.5f},{rng.uniform(1, 4):.5f}" for c in range(8)
        ]
    stats.write_text("\n".join(lines) + "\n")
    _invoke("correct", stats, "--rate", "0.5", "--dry-run", "-q", "--html", out["correct"])
    rows = [
        {"scenario": "classic", "metric": "shift_ratio", "value": 0.36, "sd": 0.01},
        {"scenario": "wide", "metric": "shift_ratio", "value": 0.9, "sd": 0.01},
        {"scenario": "theory", "metric": "train_var", "value": 11.25, "sd": 0.0},
    ]
    base = folder / "base.json"
    base.write_text(json.dumps({"metadata": {}, "rows": rows}))
    rows[1] = {**rows[1], "value": 0.78}  # 8.5 combined sd lower: a regression
    cur = folder / "cur.json"
    cur.write_text(json.dumps({"metadata": {}, "rows": rows}))
    _invoke("check", cur, "--baseline", base, "-q", "--html", out["check"], code=1)
    return out


def _pixels(shot: Path) -> np.ndarray:
    from matplotlib.image import imread

    rgb = np.asarray(imread(shot))[..., :3]
    return rgb.reshape(-1, 3)


def _count(rgb: np.ndarray, colour: tuple[int, int, int]) -> int:
    return int(np.all(np.abs(rgb - np.array(colour) / 255) < 0.08, axis=1).sum())


@pytest.mark.parametrize(
    ("name", "colour"), [("simulate", ORANGE), ("correct", RED), ("check", RED)]
)
def test_the_page_renders_its_figures_in_chromium(
    pages: dict[str, Path], tmp_path: Path, name: str, colour: tuple[int, int, int]
) -> None:
    shot = tmp_path / f"{name}.png"
    done = chromium(
        tmp_path / "profile",
        f"--screenshot={shot}",
        "--window-size=1200,1600",
        pages[name].resolve().as_uri(),
    )
    assert shot.exists(), done.stderr[-2000:]
    rgb = _pixels(shot)
    assert rgb.shape[0] == 1200 * 1600
    colours = np.unique((rgb * 255).round().astype(np.uint8), axis=0)
    assert len(colours) > 50  # text, rules and coloured figures: not a blank page
    white = np.all(rgb > 0.97, axis=1).mean()
    assert 0.3 < white < 0.99
    # The figure is drawn: its characteristic colour covers a visible area.
    assert _count(rgb, colour) > 200


@pytest.mark.parametrize(
    ("name", "svgs", "tables", "text"),
    [
        ("simulate", 2, 2, "Running variance over training"),
        ("correct", 1, 1, "Per-layer running variance"),
        ("check", 1, 2, "REGRESSION: 3 metrics"),
    ],
)
def test_the_dom_holds_the_inline_svgs_and_tables(
    pages: dict[str, Path], tmp_path: Path, name: str, svgs: int, tables: int, text: str
) -> None:
    done = chromium(tmp_path / "profile", "--dump-dom", pages[name].resolve().as_uri())
    dom = done.stdout
    assert f"<h1>varshift {name}</h1>" in dom, done.stderr[-2000:]
    assert dom.count("<svg") == svgs and dom.count("</svg>") == svgs
    assert dom.count("<table>") == tables and text in dom
