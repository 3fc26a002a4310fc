"""The data-free correction's per-layer records (:class:`~varshift.core.structure.LayerStructure`)
for a saved Keras model, from its architecture JSON and its weights file.

The path classes come from :func:`varshift.frameworks.keras.graph.bn_feeds`. For a
through-linear BN the Dense (or Conv) kernel is read from the weights and turned into the
torch layout the formulas use (Dense ``(in, out)`` → ``(out, in)``; Conv ``(*kernel, in/groups,
out)`` → ``(out, in/groups, *kernel)``); the BatchNormalization feeding the dropout (through at
most one activation) gives ``E[x²]`` of the dropout input. Read with ``zipfile``, ``json`` and
h5py only: no layer is built and no saved code runs.

Weights are found by the layer's name: in a Keras 3 weights file (also the ``.keras`` member)
each layer's ``vars`` group carries a ``name`` attribute; in a legacy ``model.save("x.h5")``
file they sit under ``model_weights/<name>`` in the order of its ``weight_names`` attribute.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from varshift.core.errors import InputFileError
from varshift.core.structure import ConvGeometry, FeederBN, LayerStructure
from varshift.frameworks.keras.graph import (
    DROPOUT_LAYERS,
    SHAPE_LAYERS,
    BNFeed,
    LayerNode,
    bn_feeds,
    layer_graph,
    read_model_config,
)

#: Keras activation names whose element-wise form matches :data:`varshift.core.structure.
#: ACTIVATIONS` (Keras' ``leaky_relu`` slope 0.2 and Keras 2's ``hard_sigmoid`` differ from
#: torch's, so they are not mapped: such a layer is refused, not guessed).
KERAS_ACTIVATIONS: Mapping[str, str] = {
    "linear": "identity",
    "relu": "relu",
    "relu6": "relu6",
    "elu": "elu",
    "selu": "selu",
    "gelu": "gelu",
    "silu": "silu",
    "swish": "silu",
    "sigmoid": "sigmoid",
    "tanh": "tanh",
    "softplus": "softplus",
}
_CONV = {"Conv1D": 1, "Conv2D": 2, "Conv3D": 3}
_RELU_OPTIONS = ("max_value", "threshold", "negative_slope")

Weights = Callable[[str], list[np.ndarray]]


def has_architecture(path: Path) -> bool:
    """Whether ``path`` holds a model architecture (a ``.keras`` archive or legacy ``.h5``)."""
    try:
        read_model_config(path)
    except (InputFileError, OSError):
        return False
    return True


@contextmanager
def _weights(path: Path) -> Iterator[Weights]:
    """A function: layer name → its variables in saved order (empty if none)."""
    import h5py

    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            data = zf.read("model.weights.h5")
        fh = h5py.File(io.BytesIO(data), "r")
    else:
        fh = h5py.File(path, "r")
    with fh:
        groups: dict[str, Any] = {}
        if "model_weights" in fh:
            root = fh["model_weights"]
            for name in root:
                g = root[name]
                names = g.attrs.get("weight_names", [])
                groups[name] = [g[n.decode() if isinstance(n, bytes) else str(n)] for n in names]
        else:

            def visit(_: str, obj: Any) -> None:
                if isinstance(obj, h5py.Group) and "name" in obj.attrs:
                    label = obj.attrs["name"]
                    label = label.decode() if isinstance(label, bytes) else str(label)
                    keys = sorted(obj.keys(), key=lambda k: (len(k), k))
                    groups.setdefault(label, [obj[k] for k in keys])

            fh.visititems(visit)

        def read(name: str) -> list[np.ndarray]:
            return [np.asarray(ds[()], dtype=np.float64) for ds in groups.get(name, [])]

        yield read


def _feeder(
    dropout: LayerNode, by_name: Mapping[str, LayerNode], weights: Weights
) -> tuple[FeederBN | None, str | None, str]:
    """The BN feeding ``dropout`` (through shape layers and at most one activation), the
    activation's varshift name, and why there is none."""
    activation: str | None = None
    node = dropout
    while len(node.inbound) == 1 and node.inbound[0] in by_name:
        node = by_name[node.inbound[0]]
        if node.class_name in SHAPE_LAYERS:
            continue
        if node.class_name in ("Activation", "ReLU") and activation is None:
            if node.class_name == "ReLU":
                if any(node.config.get(k) not in (None, 0, 0.0) for k in _RELU_OPTIONS):
                    return None, None, f"{node.name}: a ReLU with a slope, cap or threshold"
                act = "relu"
            else:
                act = str(node.config.get("activation"))
            if act not in KERAS_ACTIVATIONS:
                return None, None, f"{node.name}: activation {act!r} not mapped"
            activation = KERAS_ACTIVATIONS[act]
            continue
        if node.class_name.endswith("BatchNormalization"):
            return _bn(node, weights), activation, ""
        return None, None, f"{node.name} ({node.class_name}) feeds the dropout, not a BatchNorm"
    return None, None, "no BatchNorm feeds the dropout"


def _bn(node: LayerNode, weights: Weights) -> FeederBN | None:
    values = weights(node.name)
    scale, center = node.config.get("scale", True), node.config.get("center", True)
    if len(values) != 2 + bool(scale) + bool(center):
        return None
    mean, var = values[-2], values[-1]
    gamma = values[0] if scale else np.ones_like(var)
    beta = values[int(bool(scale))] if center else np.zeros_like(var)
    eps = float(node.config.get("epsilon", 1e-3))
    return FeederBN(gamma, beta, mean, var, eps, node.name)


def _conv(node: LayerNode, kernel: np.ndarray) -> tuple[np.ndarray, ConvGeometry] | None:
    dims = _CONV[node.class_name]
    cfg = node.config
    if cfg.get("data_format", "channels_last") != "channels_last":
        return None
    size = kernel.shape[:dims]
    stride = tuple(np.broadcast_to(cfg.get("strides", 1), (dims,)).tolist())
    dilation = tuple(np.broadcast_to(cfg.get("dilation_rate", 1), (dims,)).tolist())
    if cfg.get("padding", "valid") == "valid":
        pad = tuple((0, 0) for _ in range(dims))
    elif cfg.get("padding") == "same" and all(s == 1 for s in stride):
        total = [(k - 1) * d for k, d in zip(size, dilation, strict=True)]
        pad = tuple((t // 2, t - t // 2) for t in total)
    else:
        return None
    weight = np.moveaxis(kernel, (-1, -2), (0, 1))  # (*k, in, out) → (out, in, *k)
    return weight, ConvGeometry(stride, dilation, pad, int(cfg.get("groups", 1)))


def _through_linear(
    feed: BNFeed, by_name: Mapping[str, LayerNode], weights: Weights, base: dict[str, Any]
) -> LayerStructure:
    dense = by_name[str(feed.dense)]
    values = weights(dense.name)
    kernel = values[0] if values else None
    weight: np.ndarray | None = None
    conv: ConvGeometry | None = None
    if kernel is not None and dense.class_name == "Dense" and kernel.ndim == 2:
        weight = kernel.T
    elif kernel is not None and dense.class_name in _CONV:
        found = _conv(dense, kernel)
        if found is not None:
            weight, conv = found
    feeder, activation, _why = _feeder(by_name[str(feed.dropout)], by_name, weights)
    return LayerStructure(
        **base,
        weight=weight,
        conv=conv,
        feeder=feeder,
        activation=activation,
        layout="channels_last",
    )


def _structure(feed: BNFeed, by_name: Mapping[str, LayerNode], weights: Weights) -> LayerStructure:
    path = " → ".join([*reversed(feed.chain), feed.bn])
    if feed.path == "none":
        return LayerStructure(feed.bn, "none", path=path)
    base: dict[str, Any] = {
        "layer": feed.bn,
        "kind": feed.path,
        "dropout_kind": feed.kind,
        "rate": None if feed.rate is None else float(feed.rate),
        "channelwise": bool(feed.channelwise) or feed.noise_shape is not None,
        "path": path,
    }
    if feed.path == "stacked":
        noise = [n for n in feed.chain if by_name[n].class_name in DROPOUT_LAYERS]
        return LayerStructure(**base, further_noise=tuple(noise))
    if feed.path == "through-linear":
        return _through_linear(feed, by_name, weights, base)
    return LayerStructure(**base)


def layer_structures(path: str | Path) -> dict[str, LayerStructure]:
    """BN layer name → its :class:`LayerStructure`, from a ``.keras`` or legacy ``.h5`` file.

    Raises
    ------
    InputFileError
        No architecture in the file (a ``.weights.h5``), or a subclassed model.
    """
    p = Path(path)
    graph = layer_graph(read_model_config(p))
    by_name = {node.name: node for node in graph}
    with _weights(p) as weights:
        return {feed.bn: _structure(feed, by_name, weights) for feed in bn_feeds(graph)}
