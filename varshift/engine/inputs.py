"""What enters the dropout layer: synthetic input distributions and recorded activation files."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
from numpy.typing import NDArray

from varshift.core.dropout import InputMoments
from varshift.core.errors import InputFileError
from varshift.core.npy import header_problem
from varshift.core.validate import MAX_ELEMENTS

FloatArray = NDArray[np.float64]


# --- synthetic inputs ---------------------------------------------------------------------------


def _draw_normal(
    mean: float, std: float, shape: tuple[int, ...], rng: np.random.Generator
) -> FloatArray:
    return mean + std * rng.standard_normal(shape)


def _draw_uniform(
    mean: float, std: float, shape: tuple[int, ...], rng: np.random.Generator
) -> FloatArray:
    return mean + std * math.sqrt(3.0) * (2.0 * rng.random(shape) - 1.0)


def _draw_relu(
    mean: float, std: float, shape: tuple[int, ...], rng: np.random.Generator
) -> FloatArray:
    return np.maximum(_draw_normal(mean, std, shape, rng), 0.0)


class InputDist(NamedTuple):
    """One synthetic input distribution, parametrised by a mean and a standard deviation.

    ``moments(mean, var)`` gives the raw moments of one element; ``draw(mean, std, shape, rng)``
    draws i.i.d. elements. For ``relu`` both parameters are the pre-activation's.
    """

    name: str
    moments: Callable[[float, float], InputMoments]
    draw: Callable[[float, float, tuple[int, ...], np.random.Generator], FloatArray]


#: The synthetic input distributions, by name: ``normal`` ``N(mean, std²)``, ``uniform`` with that
#: mean and standard deviation, ``relu`` ``max(0, z)`` with ``z ~ N(mean, std²)``.
INPUT_DIST_REGISTRY: dict[str, InputDist] = {
    "normal": InputDist("normal", InputMoments.normal, _draw_normal),
    "uniform": InputDist("uniform", InputMoments.uniform, _draw_uniform),
    "relu": InputDist("relu", InputMoments.relu_normal, _draw_relu),
}
INPUT_DISTS: tuple[str, ...] = tuple(INPUT_DIST_REGISTRY)


# --- recorded activations -----------------------------------------------------------------------


def load_activations(path: str | Path) -> FloatArray:
    """Read recorded activations from a ``.npy`` or ``.csv`` file (never unpickles).

    A ``.csv`` file is comma-separated numbers, one row per sample, with an optional header
    line. The result is float64 and finite.

    Parameters
    ----------
    path:
        The ``.npy``, ``.csv`` or ``.txt`` file.

    Returns
    -------
    numpy.ndarray
        The values as float64, in the file's shape.

    Raises
    ------
    InputFileError
        If the file is missing, empty, not numeric, holds NaN/infinite values, or is not a
        ``.npy``/``.csv`` file.

    Examples
    --------
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     p = Path(tmp) / "x.csv"
    ...     _ = p.write_text("a,b\\n1,2\\n3,4\\n")
    ...     load_activations(p).tolist()
    [[1.0, 2.0], [3.0, 4.0]]
    """
    p = Path(path)
    if not p.exists():
        raise InputFileError(f"{p}: no such file")
    if not p.is_file():
        raise InputFileError(f"{p}: not a regular file")
    suffix = p.suffix.lower()
    if suffix == ".npy":
        arr = _read_npy(p)
    elif suffix in (".csv", ".txt"):
        arr = _read_csv(p)
    else:
        raise InputFileError(f"{p}: must be a .npy or .csv file; got {suffix or 'no suffix'}")
    out = np.asarray(arr, dtype=np.float64)
    if out.size == 0:
        raise InputFileError(f"{p}: holds no values (shape {out.shape})")
    bad = int(np.count_nonzero(~np.isfinite(out)))
    if bad:
        raise InputFileError(f"{p}: holds {bad} NaN or infinite value(s); values must be finite")
    return out


def _read_npy(p: Path) -> NDArray[np.generic]:
    """A numeric ``.npy`` array, read without unpickling, its header checked first."""
    try:
        with p.open("rb") as fh:
            magic = fh.read(6)
        if magic != b"\x93NUMPY":
            raise InputFileError(f"{p}: is not a valid .npy file")
        with p.open("rb") as fh:  # before np.load allocates what the header declares
            problem = header_problem(fh, p.stat().st_size, max_values=MAX_ELEMENTS)
        if problem:
            raise InputFileError(f"{p}: {problem}")
        arr = np.load(p, allow_pickle=False)
    except ValueError as exc:
        why = "holds pickled objects" if "pickle" in str(exc) else "is not a valid .npy file"
        raise InputFileError(f"{p}: {why}") from None
    except OSError as exc:
        raise InputFileError(f"{p}: cannot read ({exc.strerror or exc})") from None
    if not isinstance(arr, np.ndarray) or arr.dtype.kind not in "fiub":
        kind = getattr(arr, "dtype", type(arr))
        raise InputFileError(f"{p}: must hold numbers; got dtype {kind}")
    return arr


def _read_csv(path: Path) -> FloatArray:
    """Comma-separated numbers with an optional header line."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputFileError(f"{path}: cannot read as text ({exc})") from None
    rows = [(i + 1, line) for i, line in enumerate(lines) if line.strip()]
    if not rows:
        raise InputFileError(f"{path}: is empty")

    def parse(line: str) -> list[float] | None:
        try:
            return [float(tok) for tok in line.split(",")]
        except ValueError:
            return None

    if parse(rows[0][1]) is None:  # a header line
        rows = rows[1:]
        if not rows:
            raise InputFileError(f"{path}: has a header but no data rows")
    values: list[list[float]] = []
    for lineno, line in rows:
        parsed = parse(line)
        if parsed is None:
            raise InputFileError(f"{path}: line {lineno} is not comma-separated numbers")
        if values and len(parsed) != len(values[0]):
            raise InputFileError(
                f"{path}: line {lineno} has {len(parsed)} values; expected {len(values[0])}"
            )
        values.append(parsed)
    return np.asarray(values, dtype=np.float64)
