"""The sweep page in a real headless browser: it loads offline, shows its figures, screenshots.

Needs Debian's chromium (`make browser` installs it); skipped when it is not on PATH.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from _browser import chromium, needs_chromium
from typer.testing import CliRunner

from varshift.cli import app

pytest.importorskip("matplotlib")

pytestmark = needs_chromium


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("browser") / "sweep.html"
    result = CliRunner().invoke(
        app,
        ["sweep", "--rate", "0.1:0.9:0.1", "--D", "1,4,16,64", "--rho", "0.1",
         "--html", str(out), "-q", "-f", "csv"],
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    return out


def test_the_page_renders_its_figure_in_chromium(page: Path, tmp_path: Path) -> None:
    shot = tmp_path / "shot.png"
    done = chromium(
        tmp_path / "profile",
        f"--screenshot={shot}",
        "--window-size=1200,1600",
        page.resolve().as_uri(),
    )
    assert shot.exists(), done.stderr[-2000:]
    from matplotlib.image import imread

    pixels = np.asarray(imread(shot))
    assert pixels.shape[:2] == (1600, 1200)
    rgb = pixels[..., :3].reshape(-1, 3)
    colours = np.unique((rgb * 255).round().astype(np.uint8), axis=0)
    # Text, table rules and the coloured curves: far from a blank or one-colour page.
    assert len(colours) > 50
    white = np.all(rgb > 0.97, axis=1).mean()
    assert 0.3 < white < 0.99
    # The curves use matplotlib's C0..C3 colours: at least red (D = 64) is on screen.
    red = np.all(np.abs(rgb - np.array([0xD6, 0x27, 0x28]) / 255) < 0.08, axis=1).sum()
    assert red > 200


def test_the_dom_holds_the_inline_svg(page: Path, tmp_path: Path) -> None:
    done = chromium(tmp_path / "profile", "--dump-dom", page.resolve().as_uri())
    dom = done.stdout
    assert "<h1>varshift sweep</h1>" in dom, done.stderr[-2000:]
    assert dom.count("<svg") == 1 and "</svg>" in dom
    assert "<table>" in dom
