"""varshift: measure, simulate and correct the Dropout → BatchNorm variance shift.

The public API is re-exported here; the command line lives in :mod:`varshift.cli`.
"""

from varshift.core.dropout import DROPOUT_KINDS, Dropout, InputMoments, make_dropout
from varshift.core.errors import VarshiftError
from varshift.core.presets import PRESETS, Preset, keep_from_rate, resolve_preset

__version__ = "0.1.0"

__all__ = [
    "DROPOUT_KINDS",
    "PRESETS",
    "Dropout",
    "InputMoments",
    "Preset",
    "VarshiftError",
    "__version__",
    "keep_from_rate",
    "make_dropout",
    "resolve_preset",
]
