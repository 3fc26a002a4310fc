"""Headless chromium for the tests of the HTML pages (tests/test_html_browser*.py).

Needs Debian's chromium (`make browser` installs it); the tests that use it are skipped when it
is not on PATH.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

#: `pytestmark = needs_chromium` in a test module skips it where chromium is not installed.
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (make browser installs it)"
)


def chromium(profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run headless chromium with a fresh profile and no network; return what it printed."""
    assert CHROMIUM is not None
    return subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            # Any attempt to reach the network fails: the page must need none.
            "--host-resolver-rules=MAP * ~NOTFOUND",
            f"--user-data-dir={profile}",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
