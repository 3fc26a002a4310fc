"""The varshift error hierarchy.

Library code raises these; :mod:`varshift.cli` maps them to exit codes in exactly one place
(``ValidationError``/``InputFileError``/``OutputFileError`` → 2, ``RegressionFound`` → 1,
``Interrupted`` → 130).
Messages speak the library's language (``pass force=True``); the CLI rewrites ``force=True`` as
``--force`` when it prints them.
"""

from __future__ import annotations


class VarshiftError(Exception):
    """Base class of every error varshift raises on purpose."""

    exit_code = 2


class ValidationError(VarshiftError, ValueError):
    """A parameter is outside its valid range: the message names it, its value and the rule."""


class InputFileError(VarshiftError):
    """An input file is missing, unreadable, malformed or unsafe to load."""


class OutputFileError(VarshiftError):
    """An output cannot be written (exists without ``--force``, unwritable folder, ...)."""


class MissingDependencyError(VarshiftError):
    """An optional extra (torch, h5py, safetensors, matplotlib) is needed but not installed."""


class Interrupted(VarshiftError):
    """The run was interrupted (Ctrl-C) after keeping part of its work; the message says where."""

    exit_code = 130  # 128 + SIGINT, as a shell reports a Ctrl-C


class RegressionFound(VarshiftError):
    """``varshift check`` found a metric that got worse than the baseline allows."""

    exit_code = 1
