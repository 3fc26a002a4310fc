"""Readers and writers of BatchNorm running statistics in checkpoint and plain files.

Every reader returns the same structure, a :class:`BNStats`: layer name → :class:`BNLayer`
(running mean, running variance *as stored*, optional scale/bias and update count, the stored
dtype and the original key names). A writer changes only the values a correction changed and
keeps everything else: every other key and tensor, dtypes and shapes, ``num_batches_tracked``,
wrapper entries of training checkpoints, and the file format.

============  ==========================  ==================================================
format        extensions                  where the BatchNorm statistics are found
============  ==========================  ==================================================
csv, tsv      ``.csv``, ``.tsv``          long form, columns ``layer, channel, mean, var``
                                          and optional ``count``, ``scale``, ``bias``
json          ``.json``                   ``{"layers": {name: {"mean": [...], "var": [...],
                                          "count": n}}}``, or a list of csv-like records
npz           ``.npz``                    key pairs ``P.running_mean``/``P.running_var``, also
                                          ``moving_mean``/``moving_variance`` and
                                          ``mean``/``var``, separated by ``.`` or ``/``
safetensors   ``.safetensors``            as npz (optional extra ``safetensors``)
torch         ``.pt``, ``.pth``           a state dict's ``P.running_mean``/``P.running_var``
                                          (also nested under ``state_dict``, ``model``, ...);
                                          optional extra ``torch``
keras         ``.weights.h5``, ``.h5``    Keras 3 ``layers/…/batch_normalization[_k]/vars``:
                                          the last two datasets (optional extra ``keras``)
============  ==========================  ==================================================

Files with another extension (``.ckpt``, ``.bin``, ``.tar``) are recognised by their content.
Layouts follow ``shared/reference/frameworks.md`` §6.

Safety: ``torch.load(weights_only=True)`` and ``np.load(allow_pickle=False)`` only, so a file
cannot run code when it is read; inputs are never modified; outputs go to a temporary file in
the target folder and are renamed into place.
"""

from __future__ import annotations

import copy
import csv
import importlib
import io
import json
import os
import pickle
import re
import shutil
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
from numpy.typing import NDArray

from varshift.core.errors import InputFileError, MissingDependencyError, OutputFileError
from varshift.core.files import atomic_write, replacing

FloatArray = NDArray[np.float64]

#: Every format a reader exists for.
FORMATS: tuple[str, ...] = ("csv", "tsv", "json", "npz", "safetensors", "torch", "keras")

_EXTENSIONS: dict[str, str] = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".json": "json",
    ".npz": "npz",
    ".safetensors": "safetensors",
    ".pt": "torch",
    ".pth": "torch",
    ".h5": "keras",
    ".hdf5": "keras",
}

#: The framework whose conventions a checkpoint format implies (others do not say).
FORMAT_FRAMEWORK: dict[str, str] = {"torch": "torch", "keras": "keras"}

#: ``(mean name, variance name, framework, a lone half is an error)``: last key components.
_PAIRS: tuple[tuple[str, str, str | None, bool], ...] = (
    ("running_mean", "running_var", "torch", True),
    ("moving_mean", "moving_variance", "keras", True),
    ("mean", "var", None, False),
)
_SCALE_NAMES = ("weight", "gamma", "scale")
_BIAS_NAMES = ("bias", "beta")
_COUNT_NAME = "num_batches_tracked"
#: Keys under which training checkpoints keep the model's state dict, in order of preference.
_CONTAINERS = ("state_dict", "model_state_dict", "model", "module", "net", "network")
#: Column aliases of the csv/tsv/json long form.
_COLUMNS: dict[str, tuple[str, ...]] = {
    "layer": ("layer", "name"),
    "channel": ("channel",),
    "mean": ("mean", "running_mean", "moving_mean"),
    "var": ("var", "running_var", "moving_variance", "variance"),
    "count": ("count", "num_batches_tracked"),
    "scale": ("scale", "weight", "gamma"),
    "bias": ("bias", "beta"),
}
_REQUIRED = ("layer", "channel", "mean", "var")
#: Keras 3 names a layer's group after its class: BatchNormalization → batch_normalization[_k].
_KERAS_BN = re.compile(r"^(sync_)?batch_normalization(_\d+)?$")


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
class _Origin:
    """What a writer needs to reproduce the rest of the source file."""

    data: Any
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class BNStats:
    """The BatchNorm statistics of one file, in file order.

    Attributes
    ----------
    layers:
        Layer name → :class:`BNLayer`.
    format:
        One of :data:`FORMATS`: the format it was read from.
    source:
        The file it was read from (``None`` when built in memory).
    framework:
        The framework whose conventions the file implies (``torch`` for ``.pt`` files and
        ``running_*`` keys, ``keras`` for ``.weights.h5`` files and ``moving_*`` keys), or
        ``None`` when the file does not say.
    container:
        Where a training checkpoint keeps its state dict (``state_dict``, ``model``, ...; ``""``
        for the top level); informational.
    """

    layers: Mapping[str, BNLayer]
    format: str
    source: Path | None = None
    framework: str | None = None
    container: str = ""
    origin: _Origin | None = field(default=None, repr=False)

    @property
    def where(self) -> str:
        """How messages name the file."""
        return str(self.source) if self.source is not None else "<statistics>"

    def with_layers(self, layers: Mapping[str, BNLayer]) -> BNStats:
        """The same file with some layers' values replaced (same names, same order)."""
        merged = dict(self.layers)
        for name, layer in layers.items():
            if name not in merged:
                raise KeyError(name)
            merged[name] = layer
        return replace(self, layers=MappingProxyType(merged))


# --- format detection -----------------------------------------------------------------------


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
        sniffed = _sniff(p)
        if sniffed is not None:
            return sniffed
    raise InputFileError(
        f"{p}: cannot tell the format from the extension {p.suffix or '(none)'!r} or the "
        "content; expected .csv, .tsv, .json, .npz, .safetensors, .pt/.pth or .weights.h5"
    )


def format_from_extension(path: str | os.PathLike[str]) -> str | None:
    """The format an extension names (``.weights.h5`` → ``keras``), or ``None``."""
    return _EXTENSIONS.get(Path(path).suffix.lower())


def _sniff(path: Path) -> str | None:
    """Recognise a file by its first bytes (torch zip or legacy pickle, npz, HDF5, safetensors)."""
    with path.open("rb") as fh:
        head = fh.read(16)
    if head.startswith(b"\x89HDF\r\n\x1a\n"):
        return "keras"
    if head.startswith(b"\x80\x02\x8a\n"):  # torch's legacy (pre-1.6) serialisation magic
        return "torch"
    if head.startswith(b"PK"):
        try:
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
        except (zipfile.BadZipFile, OSError):
            return None
        if any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
            return "torch"
        if names and all(n.endswith(".npy") for n in names):
            return "npz"
        return None
    # safetensors: an 8-byte little-endian header length, then a JSON header.
    if len(head) >= 9 and head[8:9] == b"{":
        size = int.from_bytes(head[:8], "little")
        if 0 < size <= path.stat().st_size - 8:
            return "safetensors"
    return None


# --- reading -----------------------------------------------------------------------------


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
        :func:`varshift.jobs.correct.inspect_stats`.

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
    fmt = detect_format(p) if fmt is None else _check_format(fmt)
    return _READERS[fmt](p, fmt)


def _check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise InputFileError(f"format must be one of {', '.join(FORMATS)}; got {fmt!r}")
    return fmt


def _require(module: str, doing: str, package: str, extra: str) -> Any:
    """Import an optional extra or explain how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingDependencyError(
            f"{doing} needs {package}: pip install 'varshift[{extra}]'"
        ) from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


_Converted = tuple[FloatArray, tuple[int, ...], str]


def _numpy_convert(value: Any) -> _Converted:
    arr = np.asarray(value)
    return arr.astype(np.float64).reshape(-1), tuple(arr.shape), str(arr.dtype)


def _split_key(key: str) -> tuple[str, str, str]:
    """``"features.3.running_var"`` → ``("features.3", ".", "running_var")`` (also ``/``)."""
    i = max(key.rfind("."), key.rfind("/"))
    return (key[:i], key[i], key[i + 1 :]) if i >= 0 else ("", "", key)


def _layers_from_tensors(
    tensors: Mapping[str, Any], where: str, convert: Callable[[Any], _Converted]
) -> tuple[dict[str, BNLayer], str | None]:
    """Find BN layers among named tensors by their mean/variance key pairs."""
    layers: dict[str, BNLayer] = {}
    kinds: set[str | None] = set()
    for key in tensors:
        prefix, sep, last = _split_key(key)
        for mean_name, var_name, kind, strict in _PAIRS:
            if last not in (mean_name, var_name):
                continue
            name = prefix or "bn"
            mean_key, var_key = f"{prefix}{sep}{mean_name}", f"{prefix}{sep}{var_name}"
            if name in layers:
                break
            if mean_key not in tensors or var_key not in tensors:
                if not strict:
                    break
                found, missing = (
                    (mean_name, var_name) if mean_key in tensors else (var_name, mean_name)
                )
                raise InputFileError(
                    f"{where}: layer {name!r}: has {found} but no {missing} "
                    f"(key {f'{prefix}{sep}{missing}'!r} is missing)"
                )
            mean, mean_shape, _ = convert(tensors[mean_key])
            var, var_shape, dtype = convert(tensors[var_key])
            if mean_shape != var_shape:
                raise InputFileError(
                    f"{where}: layer {name!r}: {mean_name} has shape {mean_shape} but "
                    f"{var_name} has shape {var_shape}"
                )
            keys = {"mean": mean_key, "var": var_key}
            affine: dict[str, FloatArray] = {}
            for role, names in (("scale", _SCALE_NAMES), ("bias", _BIAS_NAMES)):
                for candidate in names:
                    k = f"{prefix}{sep}{candidate}"
                    if k in tensors:
                        values, shape, _ = convert(tensors[k])
                        if shape == var_shape:
                            affine[role], keys[role] = values, k
                            break
            count = None
            count_key = f"{prefix}{sep}{_COUNT_NAME}"
            if count_key in tensors:
                values, _, _ = convert(tensors[count_key])
                if values.size == 1 and np.isfinite(values[0]):
                    count, keys["count"] = int(values[0]), count_key
            layers[name] = BNLayer(
                name=name,
                mean=mean,
                var=var,
                scale=affine.get("scale"),
                bias=affine.get("bias"),
                count=count,
                dtype=dtype,
                keys=MappingProxyType(keys),
            )
            kinds.add(kind)
            break
    framework = next(iter(kinds)) if len(kinds) == 1 else None
    return layers, framework


def _stats(
    layers: Mapping[str, BNLayer],
    fmt: str,
    path: Path,
    framework: str | None,
    origin: _Origin,
    container: str = "",
) -> BNStats:
    return BNStats(
        layers=MappingProxyType(dict(layers)),
        format=fmt,
        source=path,
        framework=FORMAT_FRAMEWORK.get(fmt, framework),
        container=container,
        origin=origin,
    )


# torch ---------------------------------------------------------------------------------------

_UNSAFE_PICKLE = (
    "refusing to load: the file contains pickled objects other than tensors; varshift only "
    "loads weights_only checkpoints (save the state dict: torch.save(model.state_dict(), path))"
)


def _torch() -> Any:
    return _require("torch", "reading .pt files", "PyTorch", "torch")


def _has_bn_keys(obj: Any) -> bool:
    return isinstance(obj, Mapping) and any(
        isinstance(k, str) and k.endswith(("running_mean", "running_var")) for k in obj
    )


def _find_container(obj: Any) -> tuple[Any, ...]:
    """The key path to the state dict inside a training checkpoint (``()``: the top level)."""
    if not isinstance(obj, Mapping) or _has_bn_keys(obj):
        return ()
    for key in _CONTAINERS:
        if _has_bn_keys(obj.get(key)):
            return (key,)
    for key, value in obj.items():
        if _has_bn_keys(value):
            return (key,)
    for key, value in obj.items():
        if isinstance(value, Mapping):
            for key2, value2 in value.items():
                if _has_bn_keys(value2):
                    return (key, key2)
    return ()


def _get_path(obj: Any, path: tuple[Any, ...]) -> Any:
    for key in path:
        obj = obj[key]
    return obj


def _read_torch(path: Path, fmt: str) -> BNStats:
    torch = _torch()
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise InputFileError(f"{path}: {_UNSAFE_PICKLE}") from None
    except Exception as exc:  # torch reports a damaged archive in many ways
        raise InputFileError(
            f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): {_first_line(exc)}"
        ) from None
    if not isinstance(obj, Mapping):
        raise InputFileError(
            f"{path}: expected a state dict (a mapping of names to tensors); got "
            f"{type(obj).__name__}"
        )
    container = _find_container(obj)
    state = _get_path(obj, container)
    tensors = {k: v for k, v in state.items() if isinstance(k, str) and torch.is_tensor(v)}

    def convert(t: Any) -> _Converted:
        values = t.detach().to(device="cpu", dtype=torch.float64).numpy().reshape(-1)
        return values, tuple(t.shape), str(t.dtype).removeprefix("torch.")

    layers, framework = _layers_from_tensors(tensors, str(path), convert)
    where = "/".join(str(k) for k in container)
    return _stats(layers, fmt, path, framework, _Origin(obj, {"container": container}), where)


# numpy and safetensors ---------------------------------------------------------------------


def _read_npz(path: Path, fmt: str) -> BNStats:
    try:
        with zipfile.ZipFile(path) as zf:
            compressed = any(i.compress_type != zipfile.ZIP_STORED for i in zf.infolist())
        with np.load(path, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise InputFileError(
                f"{path}: refusing to load: the archive holds pickled object arrays; varshift "
                "reads numeric arrays only (np.load(allow_pickle=False))"
            ) from None
        raise InputFileError(f"{path}: not a readable .npz archive: {_first_line(exc)}") from None
    except (zipfile.BadZipFile, EOFError, OSError) as exc:
        raise InputFileError(
            f"{path}: not a readable .npz archive (truncated or corrupt?): {_first_line(exc)}"
        ) from None
    layers, framework = _layers_from_tensors(arrays, str(path), _numpy_convert)
    return _stats(layers, fmt, path, framework, _Origin(arrays, {"compressed": compressed}))


def _read_safetensors(path: Path, fmt: str) -> BNStats:
    safetensors = _require(
        "safetensors", "reading .safetensors files", "safetensors", "safetensors"
    )
    try:
        with safetensors.safe_open(str(path), framework="np") as fh:
            metadata = fh.metadata()
            arrays = {name: fh.get_tensor(name) for name in fh.keys()}
    except Exception as exc:  # SafetensorError, or a dtype numpy lacks (bfloat16)
        raise InputFileError(
            f"{path}: not a readable .safetensors file (truncated or corrupt, or a dtype "
            f"numpy lacks such as bfloat16?): {_first_line(exc)}"
        ) from None
    layers, framework = _layers_from_tensors(arrays, str(path), _numpy_convert)
    origin = _Origin(arrays, {"metadata": dict(metadata) if metadata else None})
    return _stats(layers, fmt, path, framework, origin)


# keras --------------------------------------------------------------------------------------


def _h5py(doing: str) -> Any:
    return _require("h5py", doing, "h5py", "keras")


def _natural_key(text: str) -> list[Any]:
    """``batch_normalization_10`` after ``batch_normalization_2``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _read_keras(path: Path, fmt: str) -> BNStats:
    h5py = _h5py("reading .weights.h5 files")
    try:
        fh = h5py.File(path, "r")
    except OSError as exc:
        raise InputFileError(
            f"{path}: not a readable HDF5 file (truncated or corrupt?): {_first_line(exc)}"
        ) from None
    with fh:
        root = fh.get("layers")
        if root is None:
            root = fh.get("_layer_checkpoint_dependencies")  # Keras 2.13 spelling
        if root is None:
            raise InputFileError(
                f"{path}: no 'layers' group: not a Keras 3 .weights.h5 file (legacy tf.keras "
                "HDF5 weights are not supported)"
            )
        groups: list[str] = []
        root.visititems(
            lambda name, obj: (
                groups.append(name)
                if isinstance(obj, h5py.Group) and _KERAS_BN.match(name.rsplit("/", 1)[-1])
                else None
            )
        )
        count, count_key = _keras_iterations(fh)
        layers: dict[str, BNLayer] = {}
        for rel in sorted(groups, key=_natural_key):
            group = root[rel]
            if "vars" not in group:
                continue
            layer = _keras_layer(group["vars"], str(path), count, count_key)
            name = layer.name if layer.name not in layers else group["vars"].name
            layers[name] = replace(layer, name=name)
    return _stats(layers, fmt, path, "keras", _Origin(None))


def _keras_iterations(fh: Any) -> tuple[int | None, str | None]:
    """The optimizer's iteration count (its first variable), if the file stores one."""
    key = "optimizer/vars/0"
    ds = fh.get(key)
    if ds is None or ds.shape != () or not np.issubdtype(ds.dtype, np.integer):
        return None, None
    return int(ds[()]), "/" + key


def _keras_layer(group: Any, where: str, count: int | None, count_key: str | None) -> BNLayer:
    """A BN ``vars`` group: gamma?, beta?, moving_mean, moving_variance (trainable first)."""
    label = group.attrs.get("name", group.name)
    name = label.decode() if isinstance(label, bytes) else str(label)
    indices = sorted(group.keys(), key=_natural_key)
    if not 2 <= len(indices) <= 4:
        raise InputFileError(
            f"{where}: layer {name!r}: expected 2 to 4 variables (gamma, beta, moving_mean, "
            f"moving_variance) in {group.name}; found {len(indices)}"
        )
    datasets = [group[i] for i in indices]
    for ds in datasets:
        if ds.attrs.get("dtype") == "bfloat16":
            raise InputFileError(
                f"{where}: layer {name!r}: bfloat16 variables ({ds.name}) are not supported"
            )
    mean_ds, var_ds = datasets[-2], datasets[-1]
    if mean_ds.shape != var_ds.shape:
        raise InputFileError(
            f"{where}: layer {name!r}: moving_mean has shape {mean_ds.shape} but "
            f"moving_variance has shape {var_ds.shape}"
        )
    keys = {"mean": mean_ds.name, "var": var_ds.name}
    scale = bias = None
    if len(datasets) == 4:  # with 3 the first is gamma or beta: the file does not say which
        scale, bias = (np.asarray(d[()], dtype=np.float64).reshape(-1) for d in datasets[:2])
        keys["scale"], keys["bias"] = datasets[0].name, datasets[1].name
    if count_key is not None:
        keys["count"] = count_key
    return BNLayer(
        name=name,
        mean=np.asarray(mean_ds[()], dtype=np.float64).reshape(-1),
        var=np.asarray(var_ds[()], dtype=np.float64).reshape(-1),
        scale=scale,
        bias=bias,
        count=count,
        dtype=str(var_ds.dtype),
        keys=MappingProxyType(keys),
    )


# csv, tsv and json ----------------------------------------------------------------------------


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")  # no newline translation: "\r\n" is kept
    except UnicodeDecodeError as exc:
        raise InputFileError(f"{path}: not UTF-8 text: {exc.reason}") from None


def _columns(header: list[str], where: str) -> dict[str, int]:
    """Role → column index; the four required ones must be present."""
    lowered = [h.strip().lower() for h in header]
    found: dict[str, int] = {}
    for role, names in _COLUMNS.items():
        for candidate in names:
            if candidate in lowered:
                found[role] = lowered.index(candidate)
                break
    missing = [r for r in _REQUIRED if r not in found]
    if missing:
        raise InputFileError(
            f"{where}: missing column(s) {', '.join(missing)}; expected a header with layer, "
            f"channel, mean, var (optional count, scale, bias); got {', '.join(header) or '(none)'}"
        )
    return found


def _number(text: Any, where: str, what: str) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        raise InputFileError(f"{where}: {what} {text!r} is not a number") from None


def _integer(text: Any, where: str, what: str) -> int:
    value = _number(text, where, what)
    if not float(value).is_integer():
        raise InputFileError(f"{where}: {what} {text!r} is not an integer")
    return int(value)


#: Long-form rows grouped by layer: ``(channel, record index, numbers by role)``.
_LongRows = dict[str, list[tuple[int, int, dict[str, float]]]]


def _long_column(
    entries: list[tuple[int, int, dict[str, float]]], role: str, where: str
) -> FloatArray | None:
    """One role's values of a layer in channel order; ``None`` if the column is absent."""
    values = [e[2].get(role) for e in entries]
    if all(v is None for v in values):
        return None
    if any(v is None for v in values):
        raise InputFileError(f"{where}: column {role} is empty for some channels")
    return np.asarray(values, dtype=np.float64)


def _layers_from_long(
    rows: _LongRows, where: str, keys: Mapping[str, str]
) -> tuple[dict[str, BNLayer], dict[tuple[str, int], int]]:
    """Build layers from long-form rows; return them and (layer, channel) → record index."""
    layers: dict[str, BNLayer] = {}
    index: dict[tuple[str, int], int] = {}
    role_keys = MappingProxyType({r: k for r, k in keys.items() if r not in ("layer", "channel")})
    for name, unsorted in rows.items():
        here = f"{where}: layer {name!r}"
        entries = sorted(unsorted, key=lambda e: e[0])
        channels = [e[0] for e in entries]
        if channels != list(range(len(entries))):
            raise InputFileError(
                f"{here}: channels must be 0..{len(entries) - 1}, each once; "
                f"got {_short_list(channels)}"
            )
        index.update({(name, channel): record for channel, record, _ in entries})
        mean, var = _long_column(entries, "mean", here), _long_column(entries, "var", here)
        assert mean is not None and var is not None  # required columns
        counts = _long_column(entries, "count", here)
        if counts is not None and np.unique(counts).size != 1:
            raise InputFileError(
                f"{here}: count differs between channels ({_short_list(counts.tolist())})"
            )
        layers[name] = BNLayer(
            name=name,
            mean=mean,
            var=var,
            scale=_long_column(entries, "scale", here),
            bias=_long_column(entries, "bias", here),
            count=None if counts is None else int(counts[0]),
            dtype="float64",
            keys=role_keys,
        )
    return layers, index


def _short_list(values: list[Any], limit: int = 8) -> str:
    shown = ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values[:limit])
    return f"[{shown}{', ...' if len(values) > limit else ''}]"


def _record_values(cells: Mapping[str, Any], where: str) -> dict[str, float]:
    """Numbers of one long-form record, role → raw cell (empty optional cells are left out)."""
    out: dict[str, float] = {}
    for role in ("mean", "var", "count", "scale", "bias"):
        if role not in cells:
            continue
        raw = cells[role]
        if role in ("count", "scale", "bias") and (raw is None or raw == ""):
            continue
        out[role] = float(
            _integer(raw, where, role) if role == "count" else _number(raw, where, role)
        )
    return out


def _read_table(path: Path, fmt: str) -> BNStats:
    text = _read_text(path)
    delimiter = "\t" if fmt == "tsv" else ","
    newline = "\r\n" if "\r\n" in text else "\n"
    records = list(csv.reader(io.StringIO(text, newline=""), delimiter=delimiter))
    if not records or not any(records[0]):
        raise InputFileError(f"{path}: no header line; expected layer, channel, mean, var")
    header = records[0]
    cols = _columns(header, str(path))
    rows: _LongRows = {}
    for i, record in enumerate(records[1:], start=1):
        if not record:
            continue
        line = f"{path}: line {i + 1}"
        if len(record) < len(header):
            raise InputFileError(
                f"{line}: expected {len(header)} fields, got {len(record)} (truncated file?)"
            )
        values = _record_values({r: record[c].strip() for r, c in cols.items()}, line)
        channel = _integer(record[cols["channel"]], line, "channel")
        rows.setdefault(record[cols["layer"]], []).append((channel, i, values))
    keys = {role: header[i] for role, i in cols.items()}
    layers, index = _layers_from_long(rows, str(path), keys)
    origin = _Origin(
        records,
        {"delimiter": delimiter, "newline": newline, "columns": cols, "index": index},
    )
    return _stats(layers, fmt, path, None, origin)


def _read_json(path: Path, fmt: str) -> BNStats:
    try:
        doc = json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise InputFileError(f"{path}: not valid JSON (truncated?): {exc}") from None
    where = str(path)
    if isinstance(doc, list):
        return _read_json_records(doc, path, fmt)
    if not (isinstance(doc, dict) and isinstance(doc.get("layers"), dict)):
        raise InputFileError(
            f'{path}: expected {{"layers": {{name: {{"mean": [...], "var": [...]}}}}}} or a '
            'list of {"layer", "channel", "mean", "var"} records'
        )
    layers: dict[str, BNLayer] = {}
    for name, entry in doc["layers"].items():
        if not isinstance(entry, dict):
            raise InputFileError(f"{where}: layer {name!r}: expected an object with mean and var")
        keys: dict[str, str] = {}
        values: dict[str, FloatArray] = {}
        for role in ("mean", "var", "scale", "bias", "count"):
            key = next((k for k in _COLUMNS[role] if k in entry), None)
            if key is None:
                if role in ("mean", "var"):
                    raise InputFileError(f"{where}: layer {name!r}: no {role} (key {role!r})")
                continue
            keys[role] = key
            raw = entry[key]
            if role == "count":
                values[role] = np.asarray([_integer(raw, f"{where}: layer {name!r}", "count")])
                continue
            items = raw if isinstance(raw, list) else [raw]
            values[role] = np.asarray(
                [_number(v, f"{where}: layer {name!r}", role) for v in items], dtype=np.float64
            )
        if values["mean"].shape != values["var"].shape:
            raise InputFileError(
                f"{where}: layer {name!r}: mean has {values['mean'].size} values but var has "
                f"{values['var'].size}"
            )
        for role in ("scale", "bias"):
            if role in values and values[role].shape != values["var"].shape:
                raise InputFileError(
                    f"{where}: layer {name!r}: {role} has {values[role].size} values but var "
                    f"has {values['var'].size}"
                )
        count = values.get("count")
        layers[name] = BNLayer(
            name=name,
            mean=values["mean"],
            var=values["var"],
            scale=values.get("scale"),
            bias=values.get("bias"),
            count=None if count is None else int(count[0]),
            dtype="float64",
            keys=MappingProxyType(keys),
        )
    return _stats(layers, fmt, path, None, _Origin(doc, {"shape": "layers"}))


def _read_json_records(doc: list[Any], path: Path, fmt: str) -> BNStats:
    rows: _LongRows = {}
    cols: dict[str, str] = {}
    for i, record in enumerate(doc):
        where = f"{path}: record {i}"
        if not isinstance(record, dict):
            raise InputFileError(f"{where}: expected an object with layer, channel, mean, var")
        if not cols:  # the first record names the keys, as a csv header does
            names = list(record)
            cols = {role: names[i] for role, i in _columns(names, str(path)).items()}
        missing = [k for r, k in cols.items() if r in _REQUIRED and k not in record]
        if missing:
            raise InputFileError(f"{where}: missing {', '.join(missing)}")
        values = _record_values({r: record.get(k) for r, k in cols.items()}, where)
        channel = _integer(record[cols["channel"]], where, "channel")
        rows.setdefault(str(record[cols["layer"]]), []).append((channel, i, values))
    layers, index = _layers_from_long(rows, str(path), cols)
    origin = _Origin(doc, {"shape": "records", "columns": cols, "index": index})
    return _stats(layers, fmt, path, None, origin)


_READERS: dict[str, Callable[[Path, str], BNStats]] = {
    "csv": _read_table,
    "tsv": _read_table,
    "json": _read_json,
    "npz": _read_npz,
    "safetensors": _read_safetensors,
    "torch": _read_torch,
    "keras": _read_keras,
}


# --- writing -----------------------------------------------------------------------------


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
    fmt = _check_format(fmt) if fmt is not None else format_from_extension(out) or stats.format
    if out.exists() and not force:
        raise OutputFileError(f"{out}: already exists; pass --force to overwrite it")
    if stats.source is not None and out.exists() and out.samefile(stats.source):
        raise OutputFileError(
            f"{out}: is the input file; varshift never modifies its input, choose another output"
        )
    if out.is_dir():
        raise OutputFileError(f"{out}: is a folder; expected a file name")
    _WRITERS[fmt](stats, out, fmt)
    return out


def _same_source(stats: BNStats, fmt: str) -> bool:
    return stats.origin is not None and (
        stats.format == fmt or {stats.format, fmt} == {"csv", "tsv"}
    )


def _write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, data, force=True)


def _cast(values: FloatArray, dtype: Any, shape: tuple[int, ...]) -> NDArray[Any]:
    return np.asarray(values, dtype=np.float64).reshape(shape).astype(dtype)


def _changed_arrays(stats: BNStats, arrays: Mapping[str, NDArray[Any]]) -> dict[str, NDArray[Any]]:
    """Replacement arrays (stored dtype and shape) for the mean/variance values that changed."""
    out: dict[str, NDArray[Any]] = {}
    for layer in stats.layers.values():
        for role, values in (("mean", layer.mean), ("var", layer.var)):
            key = layer.keys.get(role)
            if key is None or key not in arrays:
                continue
            old = np.asarray(arrays[key])
            new = _cast(values, old.dtype, old.shape)
            if not np.array_equal(new, old, equal_nan=True):
                out[key] = new
    return out


def _plain(values: FloatArray, dtype: str) -> list[float]:
    """Floats that print as the shortest text round-tripping through the stored dtype."""
    try:
        stored = np.dtype(dtype)
    except TypeError:
        stored = np.dtype(np.float32)  # bfloat16 and other dtypes numpy lacks
    if stored.kind != "f":
        stored = np.dtype(np.float64)
    return [float(str(v)) for v in np.asarray(values).astype(stored)]


# torch ---------------------------------------------------------------------------------------


def _write_torch(stats: BNStats, path: Path, fmt: str) -> None:
    torch = _require("torch", "writing .pt files", "PyTorch", "torch")
    if _same_source(stats, fmt):
        assert stats.origin is not None
        container: tuple[Any, ...] = stats.origin.extra["container"]
        obj = _replace_tensors(torch, stats, stats.origin.data, container)
    else:
        obj = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in _tensor_dict(stats).items()}
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    _write_bytes(path, buffer.getvalue())


def _replace_tensors(torch: Any, stats: BNStats, obj: Any, container: tuple[Any, ...]) -> Any:
    """A copy of the checkpoint with the changed tensors replaced (same dtype and shape).

    Only the containers on the path to the state dict are copied (``copy.copy`` keeps their
    type and attributes such as the state dict's ``_metadata``); every other object is shared.
    """
    state = _get_path(obj, container)
    updates: dict[str, Any] = {}
    for layer in stats.layers.values():
        for role, values in (("mean", layer.mean), ("var", layer.var)):
            key = layer.keys.get(role)
            if key is None or not torch.is_tensor(state.get(key)):
                continue
            old = state[key]
            new = torch.from_numpy(np.asarray(values, dtype=np.float64).reshape(tuple(old.shape)))
            new = new.to(dtype=old.dtype)
            if not torch.equal(new, old):
                updates[key] = new
    if not updates:
        return obj

    def rebuild(node: Any, rest: tuple[Any, ...]) -> Any:
        out = copy.copy(node)
        if rest:
            out[rest[0]] = rebuild(node[rest[0]], rest[1:])
        else:
            out.update(updates)
        return out

    return rebuild(obj, container)


# numpy and safetensors ---------------------------------------------------------------------


def _tensor_dict(stats: BNStats) -> dict[str, NDArray[Any]]:
    """Every tensor of a tensor-dict source with the changes applied, else the BN layers alone."""
    if stats.origin is not None and stats.format in ("npz", "safetensors"):
        arrays = dict(stats.origin.data)
    elif stats.origin is not None and stats.format == "torch":
        state = _get_path(stats.origin.data, stats.origin.extra["container"])
        torch = _torch()
        arrays = {}
        for key, t in state.items():
            if isinstance(key, str) and torch.is_tensor(t):
                if t.dtype == torch.bfloat16:
                    raise OutputFileError(
                        f"{key}: bfloat16 tensors cannot be stored without PyTorch; write a .pt"
                    )
                arrays[key] = t.detach().cpu().numpy()
    else:
        return _layer_tensors(stats)
    arrays.update(_changed_arrays(stats, arrays))
    return arrays


def _layer_tensors(stats: BNStats) -> dict[str, NDArray[Any]]:
    """The BN layers alone under PyTorch state-dict names."""
    out: dict[str, NDArray[Any]] = {}
    for layer in stats.layers.values():
        try:
            dtype = np.dtype(layer.dtype)
        except TypeError:
            dtype = np.dtype(np.float32)
        for suffix, values in (
            ("weight", layer.scale),
            ("bias", layer.bias),
            ("running_mean", layer.mean),
            ("running_var", layer.var),
        ):
            if values is not None:
                out[f"{layer.name}.{suffix}"] = np.asarray(values).astype(dtype)
        if layer.count is not None:
            out[f"{layer.name}.{_COUNT_NAME}"] = np.asarray(layer.count, dtype=np.int64)
    return out


def _write_npz(stats: BNStats, path: Path, fmt: str) -> None:
    arrays = _tensor_dict(stats)
    compressed = False
    if stats.origin is not None and _same_source(stats, fmt):
        compressed = bool(stats.origin.extra.get("compressed"))
    buffer = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buffer, **arrays)  # type: ignore[arg-type]
    _write_bytes(path, buffer.getvalue())


def _write_safetensors(stats: BNStats, path: Path, fmt: str) -> None:
    st = _require("safetensors.numpy", "writing .safetensors files", "safetensors", "safetensors")
    arrays = {k: np.ascontiguousarray(v) for k, v in _tensor_dict(stats).items()}
    metadata = None
    if stats.origin is not None and stats.format == "safetensors":
        metadata = stats.origin.extra.get("metadata")
    _write_bytes(path, st.save(arrays, metadata=metadata))


# keras --------------------------------------------------------------------------------------


def _write_keras(stats: BNStats, path: Path, fmt: str) -> None:
    if not _same_source(stats, fmt) or stats.source is None:
        raise OutputFileError(
            f"{path}: a Keras .weights.h5 output needs a Keras .weights.h5 input (varshift "
            "rewrites a copy of it); choose .pt, .npz, .safetensors, .csv or .json"
        )
    h5py = _h5py("writing .weights.h5 files")
    with replacing(path) as tmp:
        shutil.copyfile(stats.source, tmp)
        with h5py.File(tmp, "r+") as fh:
            for layer in stats.layers.values():
                for role, values in (("mean", layer.mean), ("var", layer.var)):
                    ds = fh[layer.keys[role]]
                    new = _cast(values, ds.dtype, ds.shape)
                    if not np.array_equal(new, ds[()], equal_nan=True):
                        ds[...] = new


# csv, tsv and json ----------------------------------------------------------------------------


def _write_table(stats: BNStats, path: Path, fmt: str) -> None:
    delimiter = "\t" if fmt == "tsv" else ","
    if _same_source(stats, fmt) and stats.format in ("csv", "tsv"):
        assert stats.origin is not None
        extra = stats.origin.extra
        records = [list(r) for r in stats.origin.data]
        cols, index = extra["columns"], extra["index"]
        for layer in stats.layers.values():
            for role, values in (("mean", layer.mean), ("var", layer.var)):
                for channel, value in enumerate(values.tolist()):
                    cell = records[index[(layer.name, channel)]]
                    if _number(cell[cols[role]], str(path), role) != value:
                        cell[cols[role]] = repr(value)
        newline = extra["newline"]
    else:
        records = _long_records(stats)
        newline = "\n"
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer, delimiter=delimiter, lineterminator=newline)
    writer.writerows(records)
    _write_bytes(path, buffer.getvalue().encode())


def _long_records(stats: BNStats) -> list[list[Any]]:
    layers = list(stats.layers.values())
    optional = [
        role
        for role in ("count", "scale", "bias")
        if any(getattr(layer, role) is not None for layer in layers)
    ]
    records: list[list[Any]] = [["layer", "channel", "mean", "var", *optional]]
    for layer in layers:
        columns = {
            "mean": _plain(layer.mean, layer.dtype),
            "var": _plain(layer.var, layer.dtype),
        }
        for role in ("scale", "bias"):
            values = getattr(layer, role)
            if values is not None:
                columns[role] = _plain(values, layer.dtype)
        for c in range(layer.channels):
            row: list[Any] = [layer.name, c, repr(columns["mean"][c]), repr(columns["var"][c])]
            for role in optional:
                if role == "count":
                    row.append("" if layer.count is None else layer.count)
                else:
                    row.append(repr(columns[role][c]) if role in columns else "")
            records.append(row)
    return records


def _write_json(stats: BNStats, path: Path, fmt: str) -> None:
    doc = _json_updated(stats, str(path)) if _same_source(stats, fmt) else _json_layers(stats)
    _write_bytes(path, (json.dumps(doc, indent=2) + "\n").encode())


def _json_updated(stats: BNStats, where: str) -> Any:
    """A copy of the source document with the changed values replaced."""
    assert stats.origin is not None
    doc = copy.deepcopy(stats.origin.data)
    extra = stats.origin.extra
    for layer in stats.layers.values():
        for role, values in (("mean", layer.mean), ("var", layer.var)):
            if extra["shape"] == "records":
                key = extra["columns"][role]
                for channel, value in enumerate(values.tolist()):
                    record = doc[extra["index"][(layer.name, channel)]]
                    if _number(record[key], where, role) != value:
                        record[key] = value
            else:
                entry, key = doc["layers"][layer.name], layer.keys[role]
                old = entry[key] if isinstance(entry[key], list) else [entry[key]]
                if [_number(v, where, role) for v in old] != values.tolist():
                    entry[key] = values.tolist()
    return doc


def _json_layers(stats: BNStats) -> dict[str, Any]:
    """``{"layers": {name: {"mean", "var", "scale"?, "bias"?, "count"?}}}``."""
    layers: dict[str, Any] = {}
    for layer in stats.layers.values():
        entry: dict[str, Any] = {
            "mean": _plain(layer.mean, layer.dtype),
            "var": _plain(layer.var, layer.dtype),
        }
        if layer.scale is not None:
            entry["scale"] = _plain(layer.scale, layer.dtype)
        if layer.bias is not None:
            entry["bias"] = _plain(layer.bias, layer.dtype)
        if layer.count is not None:
            entry["count"] = layer.count
        layers[layer.name] = entry
    return {"layers": layers}


_WRITERS: dict[str, Callable[[BNStats, Path, str], None]] = {
    "csv": _write_table,
    "tsv": _write_table,
    "json": _write_json,
    "npz": _write_npz,
    "safetensors": _write_safetensors,
    "torch": _write_torch,
    "keras": _write_keras,
}
