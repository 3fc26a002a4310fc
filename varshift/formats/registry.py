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
   A format whose checkpoints are folders (Orbax) has no extensions and a ``folder``
   recogniser instead; its writer builds the folder in
   :func:`varshift.core.files.replacing_folder`.
3. Add the extra to ``[project.optional-dependencies]`` in ``pyproject.toml`` if it needs one.
   ``tests/test_formats_registry.py`` then round-trips the new format automatically (a format
   that cannot write a file from in-memory statistics gives that test a sample file).
"""

from __future__ import annotations

import os
import stat
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType

from varshift.core.errors import InputFileError
from varshift.core.files import OutputPlan
from varshift.formats import (
    flax_msgpack,
    flax_orbax,
    json_stats,
    keras_archive,
    keras_h5,
    keras_legacy_h5,
    npz,
    safetensors_file,
    table,
    torch_pt,
)
from varshift.formats.base import BNStats, Format

_RECORDS: tuple[Format, ...] = (
    table.CSV,
    table.TSV,
    json_stats.FORMAT,
    npz.FORMAT,
    safetensors_file.FORMAT,
    torch_pt.FORMAT,
    keras_h5.FORMAT,
    keras_archive.FORMAT,
    keras_legacy_h5.FORMAT,
    flax_msgpack.FORMAT,
    flax_orbax.FORMAT,
)

#: Format name → its record, in registry order.
REGISTRY: MappingProxyType[str, Format] = MappingProxyType({f.name: f for f in _RECORDS})

#: Every format a reader exists for.
FORMATS: tuple[str, ...] = tuple(REGISTRY)

#: The formats whose checkpoints are folders (:attr:`Format.folder`).
FOLDER_FORMATS: tuple[str, ...] = tuple(f.name for f in _RECORDS if f.folder is not None)

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


def output_format(path: str | os.PathLike[str], source_format: str) -> str:
    """The format an output file gets: the source's when that format claims the extension (a
    legacy Keras ``.h5`` in, ``.h5`` out), else the extension's, else the source's.

    Examples
    --------
    >>> output_format("fixed.h5", "keras-legacy"), output_format("fixed.h5", "torch")
    ('keras-legacy', 'keras')
    """
    suffix = Path(path).suffix.lower()
    if source_format in REGISTRY and suffix in REGISTRY[source_format].claims:
        return source_format
    return format_from_extension(path) or source_format


def detect_format(path: str | os.PathLike[str]) -> str:
    """The format of an existing file: from its extension (unless a format that claims the
    extension recognises the content), else from its first bytes.

    A folder is a checkpoint of the format whose :attr:`Format.folder` recognises it (an Orbax
    checkpoint folder).

    Raises
    ------
    InputFileError
        If neither the extension nor the content identifies one of :data:`FORMATS`; a folder
        no format recognises.

    Examples
    --------
    >>> detect_format("runs/model.weights.h5")
    'keras'
    """
    p = Path(path)
    if p.is_dir():
        record = folder_format(p)
        if record is None:
            raise InputFileError(f"{p}: is a folder; expected a file")
        return record.name
    fmt = format_from_extension(p)
    head = b""
    if p.is_file():
        with p.open("rb") as fh:
            head = fh.read(16)
    if fmt is not None:
        # A format that claims this extension takes the file when it recognises the content.
        for record in _RECORDS:
            claims = p.suffix.lower() in record.claims
            if claims and head and record.sniff is not None and record.sniff(head, p):
                return record.name
        return fmt
    if p.is_file():
        for record in _RECORDS:
            if record.sniff is not None and record.sniff(head, p):
                return record.name
    shown = [f.shown for f in _RECORDS]
    raise InputFileError(
        f"{p}: cannot tell the format from the extension {p.suffix or '(none)'!r} or the "
        f"content; expected {', '.join(shown[:-1])} or {shown[-1]}"
    )


#: The largest statistics file varshift reads (bytes); BN statistics of real models are far
#: smaller (a ResNet-50 checkpoint is ~100 MB), so a larger file is refused before it is read.
MAX_INPUT_BYTES = 4 * 2**30


def folder_format(path: Path) -> Format | None:
    """The record of the folder format that recognises the folder ``path``, else ``None``."""
    if not path.is_dir():
        return None
    return next((f for f in _RECORDS if f.folder is not None and f.folder(path)), None)


def check_input_folder(path: Path, *, limit: int = MAX_INPUT_BYTES) -> None:
    """Refuse a checkpoint folder whose regular files hold more than ``limit`` bytes in all.

    Raises
    ------
    InputFileError
        A file in it cannot be read, or the folder is larger than ``limit``.
    """
    total = 0
    try:
        for root, _, files in os.walk(path):
            for name in files:
                info = os.lstat(os.path.join(root, name))
                total += info.st_size if stat.S_ISREG(info.st_mode) else 0
    except OSError as exc:
        raise InputFileError(f"{path}: cannot read it ({exc.strerror})") from None
    if total > limit:
        raise InputFileError(
            f"{path}: {total:,} bytes is larger than the {limit:,}-byte limit for a "
            "checkpoint folder"
        )


def check_input_file(path: Path, *, limit: int = MAX_INPUT_BYTES) -> None:
    """Refuse what is not a readable, non-empty regular file of at most ``limit`` bytes.

    A FIFO would block and a device (``/dev/urandom``, also through a symbolic link) would be
    read forever, so only regular files are read.

    Raises
    ------
    InputFileError
        Missing, a folder, not a regular file, empty or larger than ``limit``.
    """
    try:
        info = path.stat()
    except FileNotFoundError:
        raise InputFileError(f"{path}: no such file") from None
    except OSError as exc:
        raise InputFileError(f"{path}: cannot read it ({exc.strerror})") from None
    if stat.S_ISDIR(info.st_mode):
        raise InputFileError(f"{path}: is a folder; expected a file")
    if not stat.S_ISREG(info.st_mode):
        raise InputFileError(
            f"{path}: is not a regular file (a pipe, socket or device); varshift reads files only"
        )
    if info.st_size == 0:
        raise InputFileError(f"{path}: the file is empty")
    if info.st_size > limit:
        raise InputFileError(
            f"{path}: {info.st_size:,} bytes is larger than the {limit:,}-byte limit for a "
            "statistics file"
        )


def read_stats(path: str | os.PathLike[str], fmt: str | None = None) -> BNStats:
    """Read the BatchNorm statistics of a file.

    Parameters
    ----------
    path:
        The file, or a checkpoint folder (Orbax); it is only read, never modified.
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
    record = folder_format(p)
    if record is not None and fmt in (None, record.name):
        check_input_folder(p)
    else:
        check_input_file(p)
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
        The output; written to a temporary file in its folder, then renamed into place (a
        folder format's output: a temporary folder, :func:`varshift.core.files.replacing_folder`).
    fmt:
        One of :data:`FORMATS`; ``None`` takes it from the extension (the input's format when
        that format claims the extension: a legacy Keras ``.h5``), else the input's format.
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
    name = get_format(fmt).name if fmt is not None else output_format(out, stats.format)
    # The one output check (core.files): not the input (also through a link), not inside an
    # input folder, not a folder (a file, for a folder format), no overwrite without force.
    OutputPlan([stats.source], force=force).add(out, folder=name in FOLDER_FORMATS)
    REGISTRY[name].write(stats, out, name)
    return out
