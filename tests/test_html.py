"""`varshift.present.html`: one self-contained, escaped page with inline SVG figures."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from varshift.cli import app
from varshift.core.errors import OutputFileError, ValidationError
from varshift.present.html import Figure, Section, Table, html_page, table_html, write_html

SVG = '<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect width="5"/></svg>'
NAMESPACES = {"http://www.w3.org/2000/svg", "http://www.w3.org/1999/xlink"}


def assert_self_contained(page: str) -> None:
    """No URL but the SVG namespace declarations; nothing loaded from anywhere."""
    urls = set(re.findall(r"https?://[^\s\"'<>)]*", page))
    assert urls <= NAMESPACES, urls - NAMESPACES
    for pattern in (
        r"<script",
        r"<link\b",
        r"<img\b",
        r"<iframe",
        r"@import",
        r"url\((?!#)",
        r"src=",
    ):
        assert not re.search(pattern, page, re.IGNORECASE), pattern
    for m in re.finditer(r"(?:href|xlink:href)=\"([^\"]*)\"", page):
        assert m.group(1).startswith("#"), m.group(0)  # only references inside the page


def test_page_escapes_text_and_tables() -> None:
    df = pd.DataFrame({"name": ["<b>bn1</b>", "a & b"], "ratio": [0.5, 1 / 3], "n": [32, 64]})
    page = html_page(
        "title <x>",
        [Section("sec & more", ("a <p> paragraph",), (Figure(SVG, "cap <i>"),), (Table(df),))],
        {"command": "sweep", "note": "</pre><script>"},
    )
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert "<title>title &lt;x&gt;</title>" in page
    assert "&lt;b&gt;bn1&lt;/b&gt;" in page and "a &amp; b" in page
    assert "<td>0.3333333333</td>" in page and "<td>32</td>" in page
    assert "cap &lt;i&gt;" in page and "a &lt;p&gt; paragraph" in page
    assert "&lt;/pre&gt;&lt;script&gt;" in page
    assert page.count("<svg") == 1
    assert_self_contained(page)


def test_figures_must_be_plain_svg() -> None:
    for bad in ("<img src='x.png'>", "<svg><script>alert(1)</script></svg>"):
        with pytest.raises(ValidationError):
            html_page("t", [Section("s", figures=(Figure(bad),))])


def test_long_tables_are_cut_with_a_note() -> None:
    df = pd.DataFrame({"i": range(30)})
    text = table_html(df, "rows", max_rows=10)
    assert text.count("<tr>") == 11 and "rows (first 10 of 30 rows)" in text


def test_write_html_is_atomic_and_refuses_to_overwrite(tmp_path: Path) -> None:
    target = tmp_path / "r.html"
    write_html(target, "t", [Section("s")])
    with pytest.raises(OutputFileError, match="already exists; pass force=True"):
        write_html(target, "t", [Section("s")])
    write_html(target, "u", [Section("s")], force=True)
    assert "<title>u</title>" in target.read_text()


def test_the_sweep_page_is_self_contained_with_its_figure(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    page = tmp_path / "sweep.html"
    result = CliRunner().invoke(
        app,
        ["sweep", "--rate", "0.1:0.9:0.2", "--D", "1,4,16,64", "--rho", "0,0.1",
         "--html", str(page), "-q", "-f", "csv"],
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    text = page.read_text()
    assert text.count("<svg") == 1 and "ρ = 0.1" in text
    assert "Run metadata" in text and '"command": "sweep"' in text
    assert_self_contained(text)
