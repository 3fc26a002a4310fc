"""The registry of file formats: one :class:`~varshift.formats.base.Format` record each.

Everything that depends on the format (the names in :data:`FORMATS`, extensions, content
sniffing, the reader and writer, the framework a file implies, the optional extra it needs) is
read from the records of :data:`REGISTRY`; nothing else lists formats.

How to add a format
-------------------
1. Write ``varshift/formats/<name>.py`` (a name that shadows no installed module, e.g.
   ``onnx_file.py``) with ``read(path, fmt) -> BNStats`` and ``write(stats, path, fmt)``
   built on the helpers of :mod:`varshift.formats.base` (and :mod:`~varshift.formats.tensors`
   for named tensors, :mod:`~varshift.formats.longform` for tables), an optional
   ``sniff(head, path)``, and a ``FORMAT = Format(...)`` record naming its extensions, how
   messages show them, the framework its files imply and its :class:`Extra` (import optional
   packages inside ``read``/``write`` through ``EXTRA.load``, never at module level).
2. Add its ``FORMAT`` to ``_RECORDS`` below (the order is the order of :data:`FORMATS`, of
   sniffing and of the extensions listed in messages).
3. Add the extra to ``[project.optional-dependencies]`` in ``pyproject.toml`` if it needs one.
   ``tests/test_formats_registry.py`` then round-trips the new format automatically (a format
   that cannot write a file from in-memory statistics gives that test a sample file).
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType

from varshift.core.errors import InputFileError, OutputFileError
from varshift.formats import json_stats, keras_h5, npz, safetensors_file, table, torch_pt
from varshift.formats.base import BNStats, Format

_RECORDS: tuple[Format, ...] = (
    table.CSV,
    table.TSV,
    json_stats.FORMAT,
    npz.FORMAT,
    safetensors_file.FORMAT,
    torch_pt.FORMAT,
    keras_h5.FORMAT,
)

#: Format name → its record, in registry order.
REGISTRY: MappingProxyType[str, Format] = MappingProxyType({f.name: f for f in _RECORDS})

#: Every format a reader exists for.
FORMATS: tuple[str, ...] = tuple(REGISTRY)

_EXTENSIONS: dict[str, str] = {ext: f.name for f in _RECORDS for ext in f.extensions}


def get_format(name: str) -> Format:
    """The record of a format name.

    Raises
    ------
    InputFileError
        ``format must be one of csv, tsv, ...; got 'x'``.
    """
    if name not in REGISTRY:
        raise InputFileError(f"format must be one of {', '.join(FORMATS)}; got {name!r}")
    return REGISTRY[name]


def format_from_extension(path: str | os.PathLike[str]) -> str | None:
    """The format an extension names (``.weights.h5`` → ``keras``), or ``None``.

    Examples
    --------
    >>> format_from_extension("model.PTH"), format_from_extension("model.ckpt")
    ('torch', None)
    """
    return _EXTENSIONS.get(Path(path).suffix.lower())


def detect_format(path: str | os.PathLike[str]) -> str:
    """The format of an existing file: from its extension, else from its first bytes.

    Raises
    ------
    InputFileError
        If neither the extension nor the content identifies one of :data:`FORMATS`.

    Examples
    --------
    >>> detect_format("runs/model.weights.h5")
    'keras'
    """
    p = Path(path)
    fmt = format_from_extension(p)
    if fmt is not None:
        return fmt
    if p.is_file():
        with p.open("rb") as fh:
            head = fh.read(16)
        for record in _RECORDS:
            if record.sniff is not None and record.sniff(head, p):
                return record.name
    shown = [f.shown for f in _RECORDS]
    raise InputFileError(
        f"{p}: cannot tell the format from the extension {p.suffix or '(none)'!r} or the "
        f"content; expected {', '.join(shown[:-1])} or {shown[-1]}"
    )


def read_stats(path: str | os.PathLike[str], fmt: str | None = None) -> BNStats:
    """Read the BatchNorm statistics of a file.

    Parameters
    ----------
    path:
        The file; it is only read, never modified.
    fmt:
        One of :data:`FORMATS`; ``None`` detects it (:func:`detect_format`).

    Returns
    -------
    BNStats
        Possibly with no layers (a file without BatchNorm statistics); values are not
        validated here, so NaN or negative variances reach
        :func:`varshift.jobs.correct.inspect_stats`. Its ``framework`` is the one the format
        implies, else the one its keys imply (``running_*`` → torch, ``moving_*`` → keras).

    Raises
    ------
    InputFileError
        Missing, empty, truncated or malformed file; a pickle that is not a plain
        ``weights_only`` checkpoint; a running mean without its variance or with another shape.
    MissingDependencyError
        The optional extra the format needs is not installed.
    """
    p = Path(path)
    if not p.exists():
        raise InputFileError(f"{p}: no such file")
    if p.is_dir():
        raise InputFileError(f"{p}: is a folder; expected a file")
    if p.stat().st_size == 0:
        raise InputFileError(f"{p}: the file is empty")
    record = get_format(detect_format(p) if fmt is None else fmt)
    stats = record.read(p, record.name)
    if record.framework is not None:
        stats = replace(stats, framework=record.framework)
    return stats


def write_stats(
    stats: BNStats,
    path: str | os.PathLike[str],
    fmt: str | None = None,
    *,
    force: bool = False,
) -> Path:
    """Write ``stats`` to ``path``, keeping everything of the source it did not change.

    Parameters
    ----------
    stats:
        Usually a :class:`BNStats` from :func:`read_stats` whose layers were replaced
        (:meth:`BNStats.with_layers`).
    path:
        The output; written to a temporary file in its folder, then renamed into place.
    fmt:
        One of :data:`FORMATS`; ``None`` takes it from the extension, else the input's format.
    force:
        Replace an existing file.

    Notes
    -----
    Same format as the source: every other key, tensor, dtype, shape, ``num_batches_tracked``,
    wrapper entry (``epoch``, ``optimizer``, ...), csv column and json key is kept; a value is
    rewritten only where it differs after casting to its stored dtype. Another format: csv, tsv
    and json get the long form of the BN layers; npz, safetensors and torch get every tensor of
    a tensor-dict source (else the BN layers under PyTorch names, ``P.running_mean`` ...); a
    Keras ``.weights.h5`` output needs a Keras source (it rewrites a copy of it).

    Raises
    ------
    OutputFileError
        The output exists and ``force`` is False; it is the input file; the folder cannot be
        written; the target format cannot hold the data.
    """
    out = Path(path)
    name = get_format(fmt).name if fmt is not None else format_from_extension(out) or stats.format
    if out.exists() and not force:
        raise OutputFileError(f"{out}: already exists; pass force=True to overwrite it")
    if stats.source is not None and out.exists() and out.samefile(stats.source):
        raise OutputFileError(
            f"{out}: is the input file; varshift never modifies its input, choose another output"
        )
    if out.is_dir():
        raise OutputFileError(f"{out}: is a folder; expected a file name")
    REGISTRY[name].write(stats, out, name)
    return out
