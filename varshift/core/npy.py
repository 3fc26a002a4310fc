"""The header of a ``.npy`` array, checked before ``np.load`` allocates what it declares.

``np.load`` allocates the declared shape before reading, so a 200-byte file declaring 10¹²
elements asks for 8 TB; and ``allow_pickle=False`` only refuses an object array once it is
reached. :func:`header_problem` reads the header alone and says what is wrong, if anything.
"""

from __future__ import annotations

import math
from typing import BinaryIO

import numpy as np

__all__ = ["header_problem"]


def header_problem(fh: BinaryIO, size: int, *, max_values: int | None = None) -> str | None:
    """What is wrong with the ``.npy`` array that starts at ``fh``'s position, or None.

    Parameters
    ----------
    fh:
        A binary file positioned at the magic string.
    size:
        The bytes available from that position (the file or archive member size).
    max_values:
        The most values the caller accepts (None: no limit beyond the bytes present).

    Returns
    -------
    str or None
        Why the array is refused: not a ``.npy`` header, not real numbers (object, structured,
        string, complex, date dtypes), more values than ``max_values``, or more data bytes
        declared than present; None if it may be loaded.
    """
    start = fh.tell()
    try:
        version = np.lib.format.read_magic(fh)
        reader = (
            np.lib.format.read_array_header_1_0
            if version == (1, 0)
            else np.lib.format.read_array_header_2_0
        )
        shape, _, dtype = reader(fh)
    except (ValueError, OSError, SyntaxError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return f"is not a valid .npy file ({first})"
    if dtype.hasobject and dtype.fields is None:
        return "holds pickled objects (dtype object), which varshift never loads"
    if dtype.fields is not None or dtype.kind not in "fiub":
        what = "structured" if dtype.fields is not None else str(dtype)
        return f"must hold real numbers (float or int); got dtype {what}"
    count = math.prod(shape)
    if max_values is not None and count > max_values:
        return f"declares shape {shape} ({count:,} values); at most {max_values:,} values"
    declared, present = count * dtype.itemsize, size - (fh.tell() - start)
    if declared > present:
        return (
            f"declares shape {shape} ({declared:,} bytes) but holds {present:,} bytes "
            "(corrupt or forged file)"
        )
    return None
