"""The run metadata every job result carries, built in one place from its config."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any


def run_metadata(command: str, parameters: Mapping[str, Any], **extra: Any) -> dict[str, Any]:
    """``{"varshift": version, "command": ..., "parameters": ..., **extra}`` (key order fixed).

    Examples
    --------
    >>> list(run_metadata("theory", {"rate": 0.2}))
    ['varshift', 'command', 'parameters']
    """
    from varshift import __version__

    return {"varshift": __version__, "command": command, "parameters": dict(parameters), **extra}


def file_digest(path: Path) -> str:
    """The SHA-256 of a file's bytes, in hex."""
    import hashlib  # lazily: loading OpenSSL costs ~13 ms of start-up

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
