"""Tests of :mod:`varshift.simulate` (and the small noise.py fix it needed)."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from varshift.noise import InputMoments


@pytest.mark.parametrize(("mu", "var"), [(0.0, 1.0), (1.5, 4.0), (-3.0, 0.25), (-6.0, 1.0)])
def test_relu_normal_moments_without_scipy_stats(mu: float, var: float) -> None:
    # noise.py computes the normal pdf/tail with math.erfc instead of importing scipy.stats
    # (0.8 s of start-up); the moments still agree with scipy's truncated normal.
    stats = pytest.importorskip("scipy.stats")
    m = InputMoments.relu_normal(mu, var)
    sd = math.sqrt(var)
    mass = stats.norm.sf(-mu / sd)
    for k, got in enumerate([m.m1, m.m2, m.m3, m.m4], start=1):
        ref = stats.truncnorm.moment(k, -mu / sd, math.inf, loc=mu, scale=sd) * mass
        assert got == pytest.approx(ref, rel=1e-6)


def test_importing_the_numerics_does_not_import_scipy_stats() -> None:
    code = (
        "import sys, varshift.noise, varshift.theory\n"
        "assert 'scipy.stats' not in sys.modules, 'scipy.stats imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
