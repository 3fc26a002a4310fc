"""Nets of the graph-aware correction tests (issue 10), trained and settled once per session.

Factories: ``tests._digits.stacked_net`` (direct + stacked), ``tests._digits.linear_net``
(none + through-linear) and :func:`conv_net` here (Conv→BN→ReLU→Dropout→Conv→BN on the 8×8
digits images: none + through-linear through a padded convolution). :func:`trained` trains
one with a seed (Adam, 6 epochs of batch 64), then *settles* its BatchNorm statistics: weights
frozen, statistics reset and re-recorded in training mode (dropout on) as a cumulative average
over 10 epochs. What is stored is then exactly what training records for these weights, with
little noise (280 batches instead of an EMA's ~19), so the tests see the formulas, not the
drift of the weights during training.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from tests._digits import digits, linear_net, stacked_net  # noqa: E402

nn = torch.nn
SETTLE_EPOCHS = 10


def conv_net(rate: float = 0.5, channelwise: bool = False, c1: int = 8, c2: int = 12) -> Any:
    """Factory: (64 pixels → 1×8×8) Conv3×3(pad 1)→BN→ReLU→Dropout→Conv3×3(pad 1)→BN→ReLU→
    Linear; ``channelwise`` uses ``Dropout2d``."""
    drop = nn.Dropout2d if channelwise else nn.Dropout
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, c1, 3, padding=1),
        nn.BatchNorm2d(c1),
        nn.ReLU(),
        drop(rate),
        nn.Conv2d(c1, c2, 3, padding=1),
        nn.BatchNorm2d(c2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(c2 * 64, 10),
    )


def head_net(rate: float = 0.5, c1: int = 8, width: int = 32) -> Any:
    """Factory: (1×8×8) Conv3×3(pad 1)→BN2d→ReLU→Dropout→Flatten→Linear→BN1d→ReLU→Linear."""
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, c1, 3, padding=1),
        nn.BatchNorm2d(c1),
        nn.ReLU(),
        nn.Dropout(rate),
        nn.Flatten(),
        nn.Linear(c1 * 64, width),
        nn.BatchNorm1d(width),
        nn.ReLU(),
        nn.Linear(width, 10),
    )


class _Branchy(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.drop, self.bn = nn.Linear(64, 8), nn.Dropout(0.5), nn.BatchNorm1d(8)

    def forward(self, x: Any) -> Any:
        h = self.drop(self.fc(x))
        return self.bn(h) if h.sum() > 0 else self.bn(-h)


def untraceable_net() -> Any:
    """Factory: Linear → Dropout → BN behind an ``if`` on the data."""
    return _Branchy()


FACTORIES = {"stacked": stacked_net, "linear": linear_net, "conv": conv_net, "head": head_net}


def _settle(net: Any, seed: int) -> None:
    bns = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    x, _ = digits()
    gen = torch.Generator().manual_seed(seed + 200)
    net.train()
    with torch.no_grad():
        for _ in range(SETTLE_EPOCHS):
            order = torch.randperm(x.shape[0], generator=gen)
            for start in range(0, x.shape[0] - 63, 64):
                net(x[order[start : start + 64]])
    for m in bns:
        m.momentum = 0.1


@functools.cache
def _trained(name: str, rate: float, seed: int, channelwise: bool) -> Any:
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    kwargs = {"channelwise": True} if channelwise else {}
    net = FACTORIES[name](rate, **kwargs)
    x, y = digits()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(seed + 100)
    net.train()
    for _ in range(6):
        order = torch.randperm(x.shape[0], generator=gen)
        for start in range(0, x.shape[0], 64):
            idx = order[start : start + 64]
            loss = nn.functional.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    _settle(net, seed)
    return net.eval()


def trained(name: str, rate: float, seed: int, channelwise: bool = False) -> Any:
    """A fresh copy of a trained, settled net (eval mode)."""
    return copy.deepcopy(_trained(name, rate, seed, channelwise))


def eval_variance(net: Any) -> dict[str, Any]:
    """Plain torch: every BN's input over all digits with ``net.eval()`` (dropout off), and
    its per-channel variance (unbiased, as torch stores it), as NumPy float64."""
    x, _ = digits()
    seen: dict[str, Any] = {}
    hooks = [
        m.register_forward_pre_hook(lambda m, a, n=n: seen.__setitem__(n, a[0]))
        for n, m in net.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    ]
    net.eval()
    with torch.no_grad():
        net(x)
    for h in hooks:
        h.remove()
    out = {}
    for name, t in seen.items():
        t = t.double()
        if t.ndim > 2:  # (N, C, H, W) → (N·H·W, C)
            t = t.transpose(0, 1).flatten(1).T
        out[name] = t.var(dim=0).numpy()
    return out
