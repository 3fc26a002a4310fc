"""The two small digits nets of the diagnose/recalibrate tests, trained once per session.

``stacked_net``: Linear → ReLU → Dropout → BN, twice, then a classifier (BN classes: direct,
stacked). ``linear_net``: Linear → BN → ReLU → Dropout → Linear → BN → ReLU → classifier (none,
through-linear). Fixed seeds; one thread (the machine is shared), a few seconds each.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

import pytest

torch = pytest.importorskip("torch")
datasets = pytest.importorskip("sklearn.datasets")

nn = torch.nn
RATE = 0.5
WIDTH = 48


def stacked_net(rate: float = RATE, width: int = WIDTH) -> Any:
    """Factory: Linear→ReLU→Dropout→BN ×2 → classifier."""
    return nn.Sequential(
        nn.Linear(64, width),
        nn.ReLU(),
        nn.Dropout(rate),
        nn.BatchNorm1d(width),
        nn.Linear(width, width),
        nn.ReLU(),
        nn.Dropout(rate),
        nn.BatchNorm1d(width),
        nn.Linear(width, 10),
    )


def linear_net(rate: float = RATE, width: int = WIDTH) -> Any:
    """Factory: Linear→BN→ReLU→Dropout→Linear→BN→ReLU → classifier."""
    return nn.Sequential(
        nn.Linear(64, width),
        nn.BatchNorm1d(width),
        nn.ReLU(),
        nn.Dropout(rate),
        nn.Linear(width, width),
        nn.BatchNorm1d(width),
        nn.ReLU(),
        nn.Linear(width, 10),
    )


@functools.cache
def digits() -> tuple[Any, Any]:
    """All 1797 digits: inputs scaled to [0, 1] (float32) and labels (int64)."""
    x, y = datasets.load_digits(return_X_y=True)
    return torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y, dtype=torch.int64)


@functools.cache
def _trained(name: str) -> Any:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = {"stacked": stacked_net, "linear": linear_net}[name]()
    x, y = digits()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    net.train()
    for _ in range(6):
        order = torch.randperm(x.shape[0], generator=gen)
        for start in range(0, x.shape[0], 64):
            idx = order[start : start + 64]
            loss = nn.functional.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


def trained(name: str) -> Any:
    """A fresh copy of the trained ``stacked`` or ``linear`` net (in eval mode)."""
    return copy.deepcopy(_trained(name))
