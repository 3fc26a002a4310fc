"""Packaging: the sdist carries what the tests need, the package is marked typed, and the
user-facing torch extra is a range (the exact pin lives only in the test group)."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_the_sdist_ships_the_baseline_tests_and_py_typed(tmp_path: Path) -> None:
    code = f"from setuptools import build_meta as b; print(b.build_sdist(r'{tmp_path}'))"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env, check=True
    )
    name = out.stdout.strip().splitlines()[-1]
    with tarfile.open(tmp_path / name) as tar:
        files = {m.name.split("/", 1)[1] for m in tar.getmembers() if "/" in m.name}
    for needed in (
        "reports/baseline.json",
        "varshift/py.typed",
        "tests/conftest.py",
        "tests/test_golden.py",
        ".pre-commit-hooks.yaml",
        "docs/examples/varshift-check.yml",
        "README.md",
        ".ci/run",
    ):
        assert needed in files, needed


def test_metadata_has_classifiers_urls_and_typed_marker() -> None:
    project = PROJECT["project"]
    assert "Typing :: Typed" in project["classifiers"]
    assert {"Homepage", "Source", "Issues"} <= set(project["urls"])
    assert (ROOT / "varshift" / "py.typed").exists()
    assert "py.typed" in PROJECT["tool"]["setuptools"]["package-data"]["varshift"]


def test_torch_is_pinned_only_in_the_test_group() -> None:
    extras = PROJECT["project"]["optional-dependencies"]
    assert not any("==" in r for reqs in extras.values() for r in reqs)
    assert extras["torch"] == ["torch>=2.6,<3"]
    assert "torch==2.13.0" in PROJECT["dependency-groups"]["test"]
    # every core dependency declares a minimum (make test-min installs exactly those)
    assert all(">=" in r for r in PROJECT["project"]["dependencies"])
