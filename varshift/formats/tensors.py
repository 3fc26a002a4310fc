"""Named-tensor formats (torch state dicts, npz, safetensors): BN layers from key pairs.

A layer is a key prefix ``P`` with ``P.running_mean``/``P.running_var`` (PyTorch),
``P.moving_mean``/``P.moving_variance`` (Keras) or ``P.mean``/``P.var`` (Flax-like exports),
separated by ``.`` or ``/``; ``P.weight``/``gamma``/``scale``, ``P.bias``/``beta`` and
``P.num_batches_tracked`` are picked up when present.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import numpy as np
from numpy.typing import NDArray

from varshift.core.errors import InputFileError
from varshift.formats.base import BNLayer, BNStats, FloatArray, cast

#: ``(mean name, variance name, framework, a lone half is an error)``: last key components.
_PAIRS: tuple[tuple[str, str, str | None, bool], ...] = (
    ("running_mean", "running_var", "torch", True),
    ("moving_mean", "moving_variance", "keras", True),
    ("mean", "var", None, False),
)
_AFFINE_NAMES = (("scale", ("weight", "gamma", "scale")), ("bias", ("bias", "beta")))
COUNT_NAME = "num_batches_tracked"

#: ``(float64 values flattened, stored shape, stored dtype name)`` of one tensor.
Converted = tuple[FloatArray, tuple[int, ...], str]


def numpy_convert(value: Any) -> Converted:
    """:data:`Converted` of a NumPy array (or anything ``np.asarray`` takes).

    Raises
    ------
    InputFileError
        For a complex, string, structured or object array (``where`` is added by the caller).
    """
    arr = np.asarray(value)
    if arr.dtype.kind not in "biuf":
        raise InputFileError(f"holds {arr.dtype} values; expected real numbers")
    return arr.astype(np.float64).reshape(-1), tuple(arr.shape), str(arr.dtype)


def _is_float(dtype: str) -> bool:
    """Whether a stored dtype name (``float32``, ``bfloat16``, ``<f4``) is a floating type."""
    return "float" in dtype or dtype.lstrip("<>=|").startswith("f")


def _converted(
    convert: Callable[[Any], Converted], tensors: Mapping[str, Any], key: str, where: str
) -> Converted:
    """``convert(tensors[key])`` with the layer and key named in a refusal."""
    try:
        return convert(tensors[key])
    except InputFileError as exc:
        raise InputFileError(f"{where}: {key!r} {exc}") from None


def split_key(key: str) -> tuple[str, str, str]:
    """``"features.3.running_var"`` → ``("features.3", ".", "running_var")`` (also ``/``)."""
    i = max(key.rfind("."), key.rfind("/"))
    return (key[:i], key[i], key[i + 1 :]) if i >= 0 else ("", "", key)


def layers_from_tensors(
    tensors: Mapping[str, Any], where: str, convert: Callable[[Any], Converted]
) -> tuple[dict[str, BNLayer], str | None]:
    """Find BN layers among named tensors by their mean/variance key pairs.

    Returns the layers in key order and the framework the pair names imply (``None`` when
    they disagree or do not say).
    """
    layers: dict[str, BNLayer] = {}
    kinds: set[str | None] = set()
    for key in tensors:
        prefix, sep, last = split_key(key)
        for mean_name, var_name, kind, strict in _PAIRS:
            if last not in (mean_name, var_name):
                continue
            name = prefix or "bn"
            if name not in layers:
                layer = _layer(tensors, where, convert, prefix, sep, mean_name, var_name, strict)
                if layer is None:
                    break
                layers[name] = layer
                kinds.add(kind)
            break
    framework = next(iter(kinds)) if len(kinds) == 1 else None
    return layers, framework


def _layer(
    tensors: Mapping[str, Any],
    where: str,
    convert: Callable[[Any], Converted],
    prefix: str,
    sep: str,
    mean_name: str,
    var_name: str,
    strict: bool,
) -> BNLayer | None:
    """The layer at ``prefix``; ``None`` for a lone non-strict half (``mean`` alone)."""
    name = prefix or "bn"
    mean_key, var_key = f"{prefix}{sep}{mean_name}", f"{prefix}{sep}{var_name}"
    if mean_key not in tensors or var_key not in tensors:
        if not strict:
            return None
        found, missing = (mean_name, var_name) if mean_key in tensors else (var_name, mean_name)
        raise InputFileError(
            f"{where}: layer {name!r}: has {found} but no {missing} "
            f"(key {f'{prefix}{sep}{missing}'!r} is missing)"
        )
    mean, mean_shape, mean_dtype = _converted(convert, tensors, mean_key, where)
    var, var_shape, dtype = _converted(convert, tensors, var_key, where)
    for key, stored in ((mean_key, mean_dtype), (var_key, dtype)):
        if not _is_float(stored):
            raise InputFileError(
                f"{where}: {key!r} is stored as {stored}; BatchNorm statistics are floating "
                "point, and a corrected value could not be written back without truncating it"
            )
    if mean_shape != var_shape:
        raise InputFileError(
            f"{where}: layer {name!r}: {mean_name} has shape {mean_shape} but "
            f"{var_name} has shape {var_shape}"
        )
    keys = {"mean": mean_key, "var": var_key}
    affine: dict[str, FloatArray] = {}
    for role, candidates in _AFFINE_NAMES:
        for candidate in candidates:
            k = f"{prefix}{sep}{candidate}"
            if k in tensors:
                values, shape, _ = _converted(convert, tensors, k, where)
                if shape == var_shape:
                    affine[role], keys[role] = values, k
                    break
    count = None
    count_key = f"{prefix}{sep}{COUNT_NAME}"
    if count_key in tensors:
        values, _, _ = _converted(convert, tensors, count_key, where)
        if values.size == 1 and np.isfinite(values[0]):
            count, keys["count"] = int(values[0]), count_key
    return BNLayer(
        name=name,
        mean=mean,
        var=var,
        scale=affine.get("scale"),
        bias=affine.get("bias"),
        count=count,
        dtype=dtype,
        keys=MappingProxyType(keys),
    )


# --- writing ----------------------------------------------------------------------------------


def tensor_dict(stats: BNStats) -> dict[str, NDArray[Any]]:
    """Every tensor of a tensor-dict source with the changes applied, else the BN layers alone."""
    if stats.origin is None or stats.origin.tensors is None:
        return layer_tensors(stats)
    arrays = stats.origin.tensors()
    arrays.update(_changed_arrays(stats, arrays))
    return arrays


def _changed_arrays(stats: BNStats, arrays: Mapping[str, NDArray[Any]]) -> dict[str, NDArray[Any]]:
    """Replacement arrays (stored dtype and shape) for the mean/variance values that changed."""
    out: dict[str, NDArray[Any]] = {}
    for layer in stats.layers.values():
        for role, values in (("mean", layer.mean), ("var", layer.var)):
            key = layer.keys.get(role)
            if key is None or key not in arrays:
                continue
            old = np.asarray(arrays[key])
            new = cast(values, old.dtype, old.shape)
            if not np.array_equal(new, old, equal_nan=True):
                out[key] = new
    return out


def layer_tensors(stats: BNStats) -> dict[str, NDArray[Any]]:
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
            out[f"{layer.name}.{COUNT_NAME}"] = np.asarray(layer.count, dtype=np.int64)
    return out
