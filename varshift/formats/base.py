"""What every format shares: the statistics model, the format record and small helpers.

A reader returns a :class:`BNStats` (layer name → :class:`BNLayer`, values *as stored*) with an
:class:`Origin`: what its writer needs to reproduce the rest of the source file. A
:class:`Format` record says everything varshift knows about one format; the records are
collected in :mod:`varshift.formats.registry`.
"""

from __future__ import annotations

import importlib
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
from numpy.typing import NDArray

from varshift.core.errors import InputFileError, MissingDependencyError
from varshift.core.files import atomic_write

FloatArray = NDArray[np.float64]


@dataclass(frozen=True, eq=False)
class BNLayer:
    """One BatchNorm layer's statistics exactly as a file stores them.

    Attributes
    ----------
    name:
        The layer's name: the state-dict prefix (``features.3``), the Keras layer name, or the
        ``layer`` column.
    mean:
        Running mean, float64 copy of the stored values, shape ``(C,)``.
    var:
        Running variance as stored, float64, shape ``(C,)``: an EMA of *unbiased* batch
        variances for PyTorch, of *biased* ones for Keras 3 and Flax (DESIGN §2).
    scale, bias:
        The affine parameters (gamma, beta) when the file has them, else ``None``.
    count:
        Training-mode updates when stored: PyTorch's ``num_batches_tracked``; for Keras the
        optimizer's iteration count (one BN update per training step; a proxy); else ``None``.
    dtype:
        Stored dtype of the running variance (``float32``, ``float16``, ``bfloat16``, ...).
    keys:
        Role (``mean``, ``var``, ``scale``, ``bias``, ``count``) → the key, dataset path or
        column name it was read from.
    """

    name: str
    mean: FloatArray
    var: FloatArray
    scale: FloatArray | None = None
    bias: FloatArray | None = None
    count: int | None = None
    dtype: str = "float64"
    keys: Mapping[str, str] = field(default_factory=dict)

    @property
    def channels(self) -> int:
        """Number of channels ``C``."""
        return int(self.var.size)


@dataclass(frozen=True, eq=False)
class Origin:
    """What a writer needs to reproduce the rest of the source file.

    Attributes
    ----------
    data:
        The parsed source (a checkpoint object, arrays, csv records, a json document).
    extra:
        Format-specific details (container path, compression, newline, column index, ...).
    tensors:
        For tensor-dict sources, every tensor of the source as NumPy arrays (a fresh dict), so
        that an export to another tensor format keeps them; ``None`` otherwise.
    """

    data: Any
    extra: Mapping[str, Any] = field(default_factory=dict)
    tensors: Callable[[], dict[str, NDArray[Any]]] | None = None


@dataclass(frozen=True, eq=False)
class BNStats:
    """The BatchNorm statistics of one file, in file order.

    Attributes
    ----------
    layers:
        Layer name → :class:`BNLayer`.
    format:
        One of :data:`varshift.formats.FORMATS`: the format it was read from.
    source:
        The file it was read from (``None`` when built in memory).
    framework:
        The framework whose conventions the file implies (``torch`` for ``.pt`` files and
        ``running_*`` keys, ``keras`` for ``.weights.h5`` files and ``moving_*`` keys), or
        ``None`` when the file does not say.
    container:
        Where a training checkpoint keeps its state dict (``state_dict``, ``model``, ...; ``""``
        for the top level; a nested one as ``callbacks/EMA/state_dict``); for a file with
        several, their labels joined by ``", "``. Informational.
    containers:
        Layer name → the label of the state dict it was read from, when the file holds several
        with BatchNorm statistics (a ``state_dict`` and a ``state_dict_ema``); the layer names
        are then ``LABEL:NAME`` (``state_dict_ema:bn1``). Empty for one state dict.
    """

    layers: Mapping[str, BNLayer]
    format: str
    source: Path | None = None
    framework: str | None = None
    container: str = ""
    origin: Origin | None = field(default=None, repr=False)
    containers: Mapping[str, str] = field(default_factory=dict)

    @property
    def where(self) -> str:
        """How messages name the file."""
        return str(self.source) if self.source is not None else "<statistics>"

    @property
    def labels(self) -> tuple[str, ...]:
        """The labels of the state dicts read, in file order (one: :attr:`container`)."""
        if not self.containers:
            return (self.container,)
        return tuple(dict.fromkeys(self.containers.values()))

    def local_name(self, name: str) -> str:
        """A layer's name inside its state dict (``state_dict_ema:bn1`` → ``bn1``)."""
        label = self.containers.get(name)
        return name.removeprefix(f"{label}:") if label is not None else name

    def only(self, labels: Sequence[str]) -> BNStats:
        """The layers of the state dicts labelled ``labels`` (the file itself is unchanged)."""
        if not self.containers:
            return self
        keep = {n: layer for n, layer in self.layers.items() if self.containers[n] in labels}
        return replace(
            self,
            layers=MappingProxyType(keep),
            container=", ".join(label for label in self.labels if label in labels),
            containers=MappingProxyType({n: self.containers[n] for n in keep}),
        )

    def with_layers(self, layers: Mapping[str, BNLayer]) -> BNStats:
        """The same file with some layers' values replaced (same names, same order)."""
        merged = dict(self.layers)
        for name, layer in layers.items():
            if name not in merged:
                raise KeyError(name)
            merged[name] = layer
        return replace(self, layers=MappingProxyType(merged))


@dataclass(frozen=True)
class Extra:
    """An optional dependency a format needs, imported only when a file is read or written.

    Attributes
    ----------
    name:
        The pip extra that installs it (``pip install 'varshift[name]'``).
    module:
        The top-level module to import.
    package:
        How messages name it (``PyTorch``).
    """

    name: str
    module: str
    package: str

    def load(self, doing: str, module: str | None = None) -> Any:
        """Import ``module`` (default :attr:`module`) or explain how to install the extra.

        Raises
        ------
        MissingDependencyError
            ``"{doing} needs {package}: pip install 'varshift[{name}]'"``.
        """
        try:
            return importlib.import_module(module or self.module)
        except ImportError:
            raise MissingDependencyError(
                f"{doing} needs {self.package}: pip install 'varshift[{self.name}]'"
            ) from None


#: ``reader(path, format name)``: the file's statistics (the name tells csv from tsv).
Reader = Callable[[Path, str], BNStats]
#: ``writer(stats, path, format name)``: writes ``path`` (the registry checks it first).
Writer = Callable[[BNStats, Path, str], None]
#: ``sniff(first 16 bytes, path)``: whether the content is this format.
Sniffer = Callable[[bytes, Path], bool]
#: ``folder(path)``: whether an existing folder is a checkpoint of this format.
FolderSniffer = Callable[[Path], bool]


@dataclass(frozen=True)
class Format:
    """Everything varshift knows about one file format (collected in the registry).

    Attributes
    ----------
    name:
        The format's name, as ``--format``-like options and :attr:`BNStats.format` spell it.
    extensions:
        Lower-case final suffixes that name it (``.h5`` for ``model.weights.h5``).
    shown:
        How messages name its files (``.pt/.pth``, ``.weights.h5``).
    read, write:
        The reader and writer (:data:`Reader`, :data:`Writer`).
    sniff:
        Recognises the content of a file with another extension, or ``None``.
    framework:
        The framework a file of this format implies (``torch`` for ``.pt``), or ``None`` when
        only its keys can tell.
    extra:
        The optional dependency it needs, or ``None``.
    claims:
        Extensions of *another* format that this one takes over when its :attr:`sniff`
        recognises the content (a legacy Keras ``model.h5`` among Keras 3 ``.h5`` files).
    folder:
        For a format whose checkpoints are folders (Orbax): recognises one; its writer
        writes a folder. ``None`` for file formats.
    """

    name: str
    extensions: tuple[str, ...]
    shown: str
    read: Reader
    write: Writer
    sniff: Sniffer | None = None
    framework: str | None = None
    extra: Extra | None = None
    claims: tuple[str, ...] = ()
    folder: FolderSniffer | None = None


# --- helpers shared by the readers and writers ----------------------------------------------


def make_stats(
    layers: Mapping[str, BNLayer],
    fmt: str,
    path: Path,
    framework: str | None,
    origin: Origin,
    container: str = "",
    containers: Mapping[str, str] | None = None,
) -> BNStats:
    """A :class:`BNStats` read from ``path`` (the registry adds the format's framework hint)."""
    return BNStats(
        layers=MappingProxyType(dict(layers)),
        format=fmt,
        source=path,
        framework=framework,
        container=container,
        origin=origin,
        containers=MappingProxyType(dict(containers or {})),
    )


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when empty)."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def zip_names(path: Path) -> list[str] | None:
    """The member names of a zip archive, or ``None`` when it is not a readable one."""
    try:
        with zipfile.ZipFile(path) as zf:
            return zf.namelist()
    except (zipfile.BadZipFile, OSError):
        return None


def number(text: Any, where: str, what: str) -> float:
    """``float(text)`` or an :class:`InputFileError` naming ``what`` and the text."""
    try:
        return float(text)
    except OverflowError:
        raise InputFileError(
            f"{where}: {what} {_short(text)} is too large for a 64-bit float (max ~1.8e308)"
        ) from None
    except (TypeError, ValueError):
        raise InputFileError(f"{where}: {what} {_short(text)} is not a number") from None


def _short(value: Any, limit: int = 40) -> str:
    """``repr(value)`` cut to ``limit`` characters (a 5,000-digit integer is not echoed)."""
    text = repr(value) if not isinstance(value, int) else str(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def integer(text: Any, where: str, what: str) -> int:
    """An integral number (``"3"``, ``3.0``) or an :class:`InputFileError`."""
    value = number(text, where, what)
    if not float(value).is_integer():
        raise InputFileError(f"{where}: {what} {_short(text)} is not an integer")
    return int(value)


def same_source(stats: BNStats, fmt: str) -> bool:
    """Whether ``stats`` was read from a file of format ``fmt`` (so its writer can keep it)."""
    return stats.origin is not None and stats.format == fmt


def write_bytes(path: Path, data: bytes) -> None:
    """Write through a temporary file and a rename (the registry checked ``force``)."""
    atomic_write(path, data, force=True)


def cast(values: FloatArray, dtype: Any, shape: tuple[int, ...]) -> NDArray[Any]:
    """``values`` in a stored dtype and shape."""
    return np.asarray(values, dtype=np.float64).reshape(shape).astype(dtype)


def plain(values: FloatArray, dtype: str) -> list[float]:
    """Floats that print as the shortest text round-tripping through the stored dtype."""
    try:
        stored = np.dtype(dtype)
    except TypeError:
        stored = np.dtype(np.float32)  # bfloat16 and other dtypes numpy lacks
    if stored.kind != "f":
        stored = np.dtype(np.float64)
    return [float(str(v)) for v in np.asarray(values).astype(stored)]
