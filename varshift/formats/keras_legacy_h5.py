"""Legacy Keras HDF5 files: ``model.save("x.h5")`` of tf.keras, multi-backend Keras 2.x and
Keras 3's legacy writer (also ``save_weights("x.h5")`` of Keras 2).

Layout (tf-keras ``tf_keras/src/saving/legacy/hdf5_format.py``, Keras 3
``keras/src/legacy/saving/legacy_h5_format.py``): the weights live in the ``model_weights``
group (the root for a weights-only file), whose attribute ``layer_names`` (chunked into
``layer_names0``, ``layer_names1``, … when large) lists one group per layer; each layer group
has an attribute ``weight_names`` and one dataset per name, ``bn/moving_variance:0`` (TF
variable names; Keras 3 writes ``bn/moving_variance``). A BatchNormalization layer is one whose
weights end in ``moving_mean`` and ``moving_variance``. The root attributes ``keras_version``
and ``backend`` tell which Keras wrote the file, hence its stored-variance convention.

Only h5py reads the file: no model is built and nothing in ``model_config`` is executed. A
corrected file is a copy whose changed datasets are rewritten in place. Optional extra
``keras`` (h5py).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from varshift.core.errors import InputFileError
from varshift.formats.base import (
    BNLayer,
    BNStats,
    Format,
    Origin,
    make_stats,
)
from varshift.formats.keras_h5 import (
    EXTRA,
    hdf5_signature,
    is_legacy,
    legacy_root,
    open_hdf5,
    rewrite_copy,
)

_ROLES = ("gamma", "beta", "moving_mean", "moving_variance")


def sniff(head: bytes, path: Path) -> bool:
    """An HDF5 file with a ``layer_names`` attribute at the root or in ``model_weights``."""
    return hdf5_signature(head) and is_legacy(path)


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _attr_list(group: Any, name: str) -> list[str]:
    """An attribute list of names, joined from its chunks ``name0``, ``name1``, … if split."""
    if name in group.attrs:
        values: Iterable[Any] = group.attrs[name]
    else:
        values = []
        k = 0
        while f"{name}{k}" in group.attrs:
            values = [*values, *group.attrs[f"{name}{k}"]]
            k += 1
    return [_text(v) for v in values]


def _role(weight_name: str) -> str:
    """``bn1/moving_variance:0`` → ``moving_variance``."""
    return weight_name.rsplit("/", 1)[-1].split(":", 1)[0]


def version_tuple(text: str) -> tuple[int, ...]:
    """``"2.2.4"`` → ``(2, 2, 4)``; ``"2.2.4-tf"`` → ``(2, 2, 4)`` (digits only)."""
    return tuple(int(part) for part in re.findall(r"\d+", text.split("-", 1)[0])[:3])


def framework_of(
    keras_version: str, backend: str, bn_configs: Iterable[Mapping[str, Any]]
) -> str | None:
    """The preset whose convention a Keras file's BatchNormalization layers stored.

    * Keras 3 (``keras_version`` 3.x): ``keras`` (biased).
    * Multi-backend Keras 2.1.4–2.3.1 (no ``-tf`` suffix; not CNTK): ``keras2``
      (``n/(n-1-eps)``; its fused 4-D path under TensorFlow 1.x also Bessel-corrected, which no
      preset models); 2.0.0–2.1.3: ``keras`` (biased).
    * tf.keras (``-tf`` suffix, or 2.4 and later): the fused path (``tf-keras``, unbiased) when
      every BN layer normalises axis 3 or 4 (4-D/5-D channels-last inputs), the non-fused one
      (``keras``, biased) when every BN layer normalises axis 1 and says nothing that forces a
      path; ``None`` when the layers differ (the file cannot be read with one preset).
      Axis 1 is taken as a 2-D input: a 4-D channels-first input also has axis 1 and is fused.
    """
    version = version_tuple(keras_version)
    if not version:
        return None
    if version[0] >= 3:
        return "keras"
    tf_keras = keras_version.endswith("-tf") or version >= (2, 4)
    if not tf_keras:
        if backend == "cntk" or version < (2, 1, 4):
            return "keras"
        return "keras2"
    paths = {_fused(cfg) for cfg in bn_configs}
    if paths == {True}:
        return "tf-keras"
    if paths == {False}:
        return "keras"
    return None


def _fused(cfg: Mapping[str, Any]) -> bool | None:
    """Whether tf.keras ran a BN layer of this config on its fused path (``None``: unknown)."""
    if cfg.get("fused") is False or cfg.get("renorm") or cfg.get("virtual_batch_size"):
        return False
    axis = cfg.get("axis")
    axes = axis if isinstance(axis, list) else [axis]
    if len(axes) != 1 or not isinstance(axes[0], int):
        return None
    return axes[0] >= 3  # tf.keras stores the axis as a positive index: rank - 1 for NHWC


def bn_configs(model_config: Any) -> dict[str, Mapping[str, Any]]:
    """Layer name → config of every BatchNormalization layer in a model config (any depth)."""
    found: dict[str, Mapping[str, Any]] = {}

    def visit(node: Any) -> None:
        if isinstance(node, dict):
            cls = node.get("class_name")
            cfg = node.get("config")
            if (
                isinstance(cls, str)
                and cls.endswith("BatchNormalization")
                and isinstance(cfg, dict)
            ):
                found[str(cfg.get("name", len(found)))] = cfg
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)

    visit(model_config)
    return found


def _model_config(fh: Any, where: str) -> Any:
    raw = fh.attrs.get("model_config")
    if raw is None:
        return None
    try:
        return json.loads(_text(raw))
    except ValueError:
        raise InputFileError(f"{where}: the model_config attribute is not valid JSON") from None


def _iterations(fh: Any) -> tuple[int | None, str | None]:
    """The optimizer's iteration count (``iteration:0``, ``adam/iteration``, ``iterations``)."""
    group = fh.get("optimizer_weights")
    if group is None:
        return None, None
    for name in _attr_list(group, "weight_names"):
        if _role(name) in ("iteration", "iterations", "iter") and name in group:
            ds = group[name]
            if ds.shape == () and np.issubdtype(ds.dtype, np.integer):
                return int(ds[()]), ds.name
    return None, None


def _layer(group: Any, name: str, where: str, count: tuple[int | None, str | None]) -> BNLayer:
    by_role: dict[str, Any] = {}
    for weight in _attr_list(group, "weight_names"):
        if weight not in group:
            raise InputFileError(
                f"{where}: layer {name!r}: weight {weight!r} is listed but not stored"
            )
        by_role[_role(weight)] = group[weight]
    mean_ds, var_ds = by_role["moving_mean"], by_role["moving_variance"]
    if mean_ds.shape != var_ds.shape:
        raise InputFileError(
            f"{where}: layer {name!r}: moving_mean has shape {mean_ds.shape} but "
            f"moving_variance has shape {var_ds.shape}"
        )
    keys = {"mean": mean_ds.name, "var": var_ds.name}
    scale = bias = None
    if "gamma" in by_role:
        scale = np.asarray(by_role["gamma"][()], dtype=np.float64).reshape(-1)
        keys["scale"] = by_role["gamma"].name
    if "beta" in by_role:
        bias = np.asarray(by_role["beta"][()], dtype=np.float64).reshape(-1)
        keys["bias"] = by_role["beta"].name
    if count[1] is not None:
        keys["count"] = count[1]
    return BNLayer(
        name=name,
        mean=np.asarray(mean_ds[()], dtype=np.float64).reshape(-1),
        var=np.asarray(var_ds[()], dtype=np.float64).reshape(-1),
        scale=scale,
        bias=bias,
        count=count[0],
        dtype=str(var_ds.dtype),
        keys=MappingProxyType(keys),
    )


def read(path: Path, fmt: str) -> BNStats:
    """The BatchNormalization layers of a legacy Keras HDF5 file, in ``layer_names`` order."""
    with open_hdf5(path, "reading legacy Keras .h5 files") as fh:
        root = legacy_root(fh)
        if root is None:
            raise InputFileError(
                f"{path}: no 'layer_names' attribute: not a legacy Keras HDF5 file"
            )
        count = _iterations(fh)
        layers: dict[str, BNLayer] = {}
        for name in _attr_list(root, "layer_names"):
            group = root.get(name)
            roles = {_role(w) for w in _attr_list(group, "weight_names")} if group else set()
            if {"moving_mean", "moving_variance"} <= roles:
                layers[name] = _layer(group, name, str(path), count)
        config = _model_config(fh, str(path))
        framework = framework_of(
            _text(root.attrs.get("keras_version", fh.attrs.get("keras_version", ""))),
            _text(root.attrs.get("backend", fh.attrs.get("backend", ""))),
            [cfg for name, cfg in bn_configs(config).items() if name in layers],
        )
    return make_stats(layers, fmt, path, framework, Origin(None))


def write(stats: BNStats, path: Path, fmt: str) -> None:
    """A copy of the legacy source file with the changed statistics datasets rewritten."""
    rewrite_copy(stats, path, fmt, "legacy Keras .h5", "writing legacy Keras .h5 files")


FORMAT = Format(
    name="keras-legacy",
    extensions=(),
    shown="legacy Keras .h5",
    read=read,
    write=write,
    sniff=sniff,
    framework=None,  # from keras_version, backend and the BN layers' axes (framework_of)
    extra=EXTRA,
    claims=(".h5", ".hdf5"),
)
