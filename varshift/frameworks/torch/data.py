"""Data for the passes: files (npy, npz, safetensors, csv) or an import path, validated once.

Files are read without unpickling (``np.load(allow_pickle=False)``, ``safetensors``); only
``data="pkg.mod:fn"`` runs user code. Every problem is a one-line
:class:`~varshift.core.errors.ValidationError` or :class:`~varshift.core.errors.InputFileError`
naming the file (and batch), the value and what was expected.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from varshift.core.errors import InputFileError, ValidationError
from varshift.core.npy import header_problem
from varshift.core.validate import check_int
from varshift.frameworks.torch.imports import first_line, resolve_import_path, short

#: Default names of the input and label arrays in npz/safetensors files and dict batches.
INPUT_KEYS: tuple[str, ...] = ("x", "X", "input", "inputs", "data", "features", "images")
LABEL_KEYS: tuple[str, ...] = ("y", "Y", "label", "labels", "target", "targets")
DEFAULT_BATCH_SIZE = 256


@dataclass(frozen=True, eq=False)
class Batches:
    """A re-iterable source of ``(inputs, labels or None)`` batches (every pass reads it again).

    Build it with :func:`load_batches` (files or an import path) or :func:`as_batches` (tensors,
    lists, a ``DataLoader``).
    """

    source: str
    inputs: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    batch_size: int = DEFAULT_BATCH_SIZE
    max_batches: int | None = None
    factory: Callable[[], Iterable[Any]] | None = None
    input_key: str | None = None
    label_key: str | None = None
    _counted: list[int] = field(default_factory=list, repr=False, compare=False)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        if self.inputs is not None:
            n = self.inputs.shape[0]
            for i, start in enumerate(range(0, n, self.batch_size)):
                if self.max_batches is not None and i >= self.max_batches:
                    return
                stop = start + self.batch_size
                y = None if self.labels is None else self.labels[start:stop]
                yield self.inputs[start:stop], y
            return
        assert self.factory is not None
        count = 0
        for i, item in enumerate(self.factory()):
            if self.max_batches is not None and i >= self.max_batches:
                break
            x, y = _split_batch(item, self.input_key, self.label_key, f"{self.source}: batch {i}")
            _check_array(x, f"{self.source}: batch {i}")
            if y is not None:
                y = _check_labels(y, x.shape[0], f"{self.source}: batch {i} labels")
            count += 1
            yield x, y
        if count == 0:
            raise ValidationError(f"{self.source}: the data source gave no batches")
        if not self._counted:
            self._counted.append(count)

    @property
    def total(self) -> int | None:
        """Batches per pass when known before the pass (``None`` otherwise): for file or tensor
        data the count of slices; for an iterable, the count a complete earlier pass read,
        else ``max_batches`` (an upper bound)."""
        if self.inputs is not None:
            n = -(-int(self.inputs.shape[0]) // int(self.batch_size))
            return n if self.max_batches is None else min(n, self.max_batches)
        return self._counted[0] if self._counted else self.max_batches

    @property
    def has_labels(self) -> bool | None:
        """True/False for file data; ``None`` when only the batches can tell."""
        return None if self.inputs is None else self.labels is not None


def _split_batch(
    item: Any, input_key: str | None, label_key: str | None, where: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(item, Mapping):
        x = _pick(item, input_key, INPUT_KEYS, where, "input")
        ykey = label_key or next((k for k in LABEL_KEYS if k in item), None)
        y = item[ykey] if ykey is not None and ykey in item else None
    elif isinstance(item, list | tuple):
        if not item:
            raise ValidationError(f"{where}: an empty batch")
        x, y = item[0], (item[1] if len(item) > 1 else None)
    else:
        x, y = item, None
    return _tensor(x, where), (None if y is None else _tensor(y, where))


def _tensor(value: Any, where: str) -> torch.Tensor:
    if torch.is_tensor(value):
        return value.detach()
    try:
        arr = np.asarray(value)
    except Exception as exc:
        raise ValidationError(f"{where}: not an array: {first_line(exc)}") from None
    if arr.dtype.kind not in "biuf":
        raise ValidationError(f"{where}: dtype {arr.dtype} is not a number; expected a real array")
    return torch.from_numpy(np.ascontiguousarray(arr))


def _check_array(x: torch.Tensor, where: str) -> None:
    """Reject empty, non-real or non-finite inputs with a one-line message."""
    if x.dtype in (torch.complex64, torch.complex128) or x.dtype == torch.bool:
        raise ValidationError(
            f"{where}: dtype {str(x.dtype).removeprefix('torch.')} is not supported; "
            "expected real numbers"
        )
    if x.dim() == 0 or x.shape[0] == 0:
        raise ValidationError(f"{where}: no samples (shape {tuple(x.shape)})")
    # A sum is finite when every value is (NaN and inf propagate); only a sum that overflowed
    # or a real NaN/inf needs the element-wise check, which is ~10x slower.
    if x.is_floating_point() and not math.isfinite(float(x.sum())):
        bad = ~torch.isfinite(x)
        if bool(bad.any()):
            first = tuple(int(i) for i in bad.nonzero()[0])
            raise ValidationError(
                f"{where}: {int(bad.sum())} non-finite value(s) (NaN or inf), "
                f"first at index {first}"
            )


def _check_labels(y: torch.Tensor, n: int, where: str) -> torch.Tensor:
    """Class indices: 1-D, integral, non-negative, ``n`` of them."""
    if y.dim() == 2 and y.shape[1] == 1:
        y = y.reshape(-1)
    if y.dim() != 1:
        raise ValidationError(
            f"{where}: expected one class index per sample (1-D); got shape {tuple(y.shape)}"
        )
    if y.shape[0] != n:
        raise ValidationError(f"{where}: {y.shape[0]} labels for {n} samples")
    if y.is_floating_point():
        if not bool(torch.isfinite(y).all()) or not bool((y == y.round()).all()):
            raise ValidationError(f"{where}: labels must be integer class indices")
    elif y.dtype == torch.bool or y.is_complex():
        raise ValidationError(f"{where}: labels must be integer class indices")
    y = y.to(torch.int64)
    if n and int(y.min()) < 0:
        raise ValidationError(f"{where}: labels must be >= 0; got {int(y.min())}")
    return y


def _pick(
    arrays: Mapping[str, Any], key: str | None, defaults: Sequence[str], where: str, role: str
) -> Any:
    option = "--input-key" if role == "input" else "--label-key"
    if key is not None:
        if key not in arrays:
            raise ValidationError(
                f"{where}: {option} {key!r} not found; keys: {short(list(arrays))}"
            )
        return arrays[key]
    if role == "input" and len(arrays) == 1:
        return next(iter(arrays.values()))
    for name in defaults:
        if name in arrays:
            return arrays[name]
    raise ValidationError(
        f"{where}: which array is the {role}? give {option}; keys: {short(list(arrays))}"
    )


def _check_headers(path: Path) -> None:
    """Check the header of a ``.npy`` file or of each ``.npy`` member of a ``.npz`` before
    ``np.load`` allocates the shape it declares (:func:`varshift.core.npy.header_problem`)."""
    import zipfile

    if path.suffix.lower() == ".npy":
        with path.open("rb") as fh:
            problem = header_problem(fh, path.stat().st_size)
        if problem:
            raise InputFileError(f"{path}: {problem}")
        return
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if info.filename.endswith(".npy"):
                    with zf.open(info) as fh:
                        problem = header_problem(fh, info.file_size)  # type: ignore[arg-type]
                    if problem:
                        raise InputFileError(f"{path}: {info.filename}: {problem}")
    except (zipfile.BadZipFile, OSError) as exc:
        raise InputFileError(f"{path}: not a readable .npz file: {first_line(exc)}") from None


def _read_arrays(path: Path) -> dict[str, np.ndarray[Any, Any]]:
    """Every array of a npy/npz/safetensors/csv file (csv: ``{"columns": ..., names...}``)."""
    if not path.is_file():
        raise InputFileError(f"{path}: no such file")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            _check_headers(path)
            return {"": np.load(path, allow_pickle=False)}
        if suffix == ".npz":
            _check_headers(path)
            with np.load(path, allow_pickle=False) as npz:
                return {k: npz[k] for k in npz.files}
        if suffix == ".safetensors":
            from safetensors.numpy import load_file

            return dict(load_file(str(path)))
        if suffix in (".csv", ".txt", ".tsv"):
            return _read_csv(path)
    except (InputFileError, ValidationError):
        raise
    except ImportError:
        raise InputFileError(
            f"{path}: reading .safetensors needs pip install safetensors"
        ) from None
    except Exception as exc:  # numpy/safetensors report damage in many ways
        raise InputFileError(f"{path}: not a readable {suffix} file: {first_line(exc)}") from None
    raise InputFileError(
        f"{path}: unknown data format {suffix!r}; expected .npy, .npz, .safetensors or .csv"
    )


def _read_csv(path: Path) -> dict[str, np.ndarray[Any, Any]]:
    text = path.read_text().splitlines()
    rows = [line for line in text if line.strip()]
    if not rows:
        return {"": np.zeros((0, 0))}
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    first = [c.strip() for c in rows[0].split(delimiter)]
    header = not all(_is_number(c) for c in first)
    body = rows[1:] if header else rows
    try:
        table = np.array([[float(c) for c in r.split(delimiter)] for r in body], dtype=np.float64)
    except ValueError as exc:
        raise InputFileError(f"{path}: not a numeric table: {first_line(exc)}") from None
    if table.ndim != 2 or (body and table.shape[1] != len(first)):
        raise InputFileError(f"{path}: rows have different numbers of columns")
    names = first if header else [str(i) for i in range(len(first))]
    table = table.reshape(len(body), len(names))
    out = {"": table}
    out.update({name: table[:, i] for i, name in enumerate(names)})
    out["__columns__"] = np.array(names)
    return out


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _file_inputs(
    path: Path, input_key: str | None, label_key: str | None
) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any] | None]:
    arrays = _read_arrays(path)
    if "__columns__" in arrays:  # csv: the label column (if named) is taken out of the inputs
        names = [str(n) for n in arrays.pop("__columns__")]
        table = arrays.pop("")
        y = None
        if label_key is not None:
            if label_key not in names:
                raise ValidationError(
                    f"{path}: --label-key {label_key!r} is not a column; columns: {short(names)}"
                )
            y = table[:, names.index(label_key)]
            table = np.delete(table, names.index(label_key), axis=1)
        return table, y
    if "" in arrays:
        return arrays[""], None
    x = _pick(arrays, input_key, INPUT_KEYS, str(path), "input")
    y = None
    if label_key is not None:
        y = _pick(arrays, label_key, LABEL_KEYS, str(path), "label")
    else:
        y = next((arrays[k] for k in LABEL_KEYS if k in arrays), None)
    return np.asarray(x), (None if y is None else np.asarray(y))


def load_batches(
    data: str | Path,
    *,
    input_key: str | None = None,
    label_key: str | None = None,
    labels: str | Path | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_batches: int | None = None,
) -> Batches:
    """Read the data a model will be run on.

    Parameters
    ----------
    data:
        A ``.npy``, ``.npz``, ``.safetensors`` or ``.csv`` file (read without unpickling), or
        ``"pkg.mod:fn"``: a function returning an iterable of batches (tensors, ``(x, y)``
        pairs or dicts) such as a ``DataLoader``; that runs user code.
    input_key, label_key:
        The input and label arrays of a multi-array file (npz, safetensors: array names; csv:
        the label column). Defaults: a single array, or ``x``/``input``/... and ``y``/``label``/...
    labels:
        A file of class indices, one per sample (npy, npz, csv, txt), when ``data`` has none.
    batch_size, max_batches:
        Samples per batch of file data, and a cap on the batches of every pass.

    Raises
    ------
    ValidationError, InputFileError
        Empty data, non-finite values, a non-numeric dtype, labels of the wrong length or kind,
        a missing key, a failing import path.
    """
    batch_size = check_int("batch_size", batch_size, 1)
    if max_batches is not None:
        max_batches = check_int("max_batches", max_batches, 1)
    text = str(data)
    if ":" in text and not Path(text).exists() and not text[1:3] == ":\\":
        fn = resolve_import_path(text, "--data")
        if labels is not None:
            raise ValidationError(
                "--labels goes with a data file; an import path gives its own labels"
            )

        def factory() -> Iterable[Any]:
            try:
                out = fn()
                iter(out)
            except Exception as exc:  # the user's function may raise anything
                raise ValidationError(f"--data {text!r} raised {first_line(exc)}") from None
            return out  # type: ignore[no-any-return]

        return Batches(
            text, max_batches=max_batches, factory=factory, input_key=input_key, label_key=label_key
        )
    path = Path(text)
    x, y = _file_inputs(path, input_key, label_key)
    if labels is not None:
        lpath = Path(labels)
        larrays = _read_arrays(lpath)
        larrays.pop("__columns__", None)
        y = (
            larrays[""]
            if "" in larrays
            else _pick(larrays, label_key, LABEL_KEYS, str(lpath), "label")
        )
    xt = _tensor(x, str(path))
    _check_array(xt, str(path))
    yt = (
        None
        if y is None
        else _check_labels(
            _tensor(y, f"{labels or path}"), xt.shape[0], f"{labels or path}: labels"
        )
    )
    return Batches(path.name, xt, yt, batch_size, max_batches)


def as_batches(
    batches: Any, labels: Any = None, *, batch_size: int = DEFAULT_BATCH_SIZE
) -> Batches:
    """Batches from what a notebook has: a :class:`Batches`, a tensor or array of inputs (split
    into ``batch_size`` rows), or an iterable of batches (a ``DataLoader``, a list of tensors
    or ``(x, y)`` pairs). ``labels``: class indices aligned with a tensor/array of inputs."""
    if isinstance(batches, Batches):
        return batches
    if torch.is_tensor(batches) or isinstance(batches, np.ndarray):
        x = _tensor(batches, "batches")
        _check_array(x, "batches")
        y = (
            None
            if labels is None
            else _check_labels(_tensor(labels, "labels"), x.shape[0], "labels")
        )
        return Batches("batches", x, y, check_int("batch_size", batch_size, 1))
    if labels is not None:
        raise ValidationError(
            "labels go with a tensor of inputs; batches from an iterable carry their own"
        )
    if not isinstance(batches, Iterable):
        raise ValidationError(
            "batches must be a tensor, an array or an iterable of batches; "
            f"got {type(batches).__name__}"
        )
    if iter(batches) is batches:  # a one-shot iterator: every pass must read it again
        batches = list(batches)
    source = batches
    return Batches("batches", factory=lambda: source)
