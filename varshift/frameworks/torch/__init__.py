"""PyTorch models with data: the path feeding each BatchNorm, diagnosis and recalibration.

``import varshift`` never imports this package, and importing the package does not import
torch: the names below are loaded on first use (PEP 562), from

- :mod:`~varshift.frameworks.torch.graph`: :func:`classify` (each BN's class: direct,
  through-linear, stacked, none, unknown);
- :mod:`~varshift.frameworks.torch.passes`: :func:`diagnose`, :func:`recalibrate`,
  :func:`dropout_off`, :func:`bn_train_only`;
- :mod:`~varshift.frameworks.torch.load`: :func:`load_model`, :func:`load_batches`;
- :mod:`~varshift.frameworks.torch.structure`: :func:`layer_structures` (each BN's path as a
  framework-neutral :class:`varshift.core.structure.LayerStructure`, what ``correct --model``
  corrects with) and :func:`measure_dropout_inputs`.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "classify": "graph",
    "diagnose": "passes",
    "recalibrate": "passes",
    "dropout_off": "passes",
    "bn_train_only": "passes",
    "load_model": "load",
    "load_batches": "load",
    "layer_structures": "structure",
    "measure_dropout_inputs": "structure",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module = importlib.import_module(f"{__name__}.{_EXPORTS[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
