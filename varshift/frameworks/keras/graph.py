"""The layer graph of a saved Keras model, and the chain feeding each BatchNormalization.

Read from the architecture JSON only: a ``.keras`` archive's ``config.json`` or a legacy
``.h5`` file's ``model_config`` attribute (``zipfile``, ``json``, h5py). Nothing is
deserialised: no layer is built, no Lambda or custom-object code runs, and Keras need not be
installed. Functional and Sequential models of Keras 3, tf.keras and Keras 2 are understood
(Keras 3 ``inbound_nodes`` hold ``__keras_tensor__`` arguments with a ``keras_history``;
Keras 2 ones are ``[[name, node_index, tensor_index, kwargs], ...]`` lists). A nested model
is one node (its inner layers are not expanded); a subclassed model has no layer list.

The result is plain data (:class:`LayerNode`, :class:`BNFeed`, ``to_dict()``) for the
graph-aware correction to use; the path classes are the torch graph's
(:mod:`varshift.frameworks.torch.graph`): ``direct``, ``through-linear``, ``stacked``, ``none``.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from varshift.core.errors import InputFileError

#: Keras dropout layer class → (varshift dropout kind, channel-wise mask).
DROPOUT_LAYERS: Mapping[str, tuple[str, bool]] = MappingProxyType(
    {
        "Dropout": ("bernoulli", False),
        "SpatialDropout1D": ("bernoulli", True),
        "SpatialDropout2D": ("bernoulli", True),
        "SpatialDropout3D": ("bernoulli", True),
        "GaussianDropout": ("gaussian", False),
        "AlphaDropout": ("alpha", False),
    }
)
#: Layers that mix features linearly through a kernel (``<name>/kernel``).
LINEAR_LAYERS = frozenset({"Dense", "EinsumDense", "Conv1D", "Conv2D", "Conv3D"})
#: Layers that move elements without mixing them: transparent for the path classes.
SHAPE_LAYERS = frozenset({"Flatten", "Reshape", "Permute", "Identity", "Cropping1D", "Cropping2D"})


@dataclass(frozen=True)
class LayerNode:
    """One layer of the saved model: its name, class, config (as saved) and inputs."""

    name: str
    class_name: str
    config: Mapping[str, Any]
    inbound: tuple[str, ...]


@dataclass(frozen=True)
class BNFeed:
    """What feeds one BatchNormalization layer, walking up its single-input chain.

    Attributes
    ----------
    bn:
        The BatchNormalization layer's name.
    path:
        ``direct`` (dropout → [shape layers] → BN), ``through-linear`` (dropout → Dense/Conv
        without activation → BN), ``stacked`` (another dropout further up, or something else
        between: an activation, a normalisation, ...), ``none`` (no dropout up to a model
        input or a merge).
    chain:
        The layers walked, nearest first, up to and including the dropout (or where it stopped).
    dropout, dropout_class, kind, channelwise, rate, noise_shape:
        The nearest dropout layer: name, Keras class, varshift kind, whether its mask is one
        draw per channel, its rate and ``noise_shape``; ``None`` without one.
    dense, dense_class, kernel, activation:
        The linear layer between dropout and BN (name, class, kernel variable path
        ``<name>/kernel``, its ``activation``); ``None`` without one.
    stop:
        Why the walk stopped: ``dropout``, ``input`` (a model input), ``merge`` (several
        inputs), ``linear`` (a second Dense/Conv: no dropout on the chain).
    """

    bn: str
    path: str
    chain: tuple[str, ...]
    dropout: str | None = None
    dropout_class: str | None = None
    kind: str | None = None
    channelwise: bool | None = None
    rate: float | None = None
    noise_shape: Any = None
    dense: str | None = None
    dense_class: str | None = None
    kernel: str | None = None
    activation: str | None = None
    stop: str = "input"

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data."""
        return asdict(self)


def read_model_config(path: str | Path) -> dict[str, Any]:
    """The architecture JSON of a ``.keras`` archive or a legacy Keras ``.h5`` file.

    Raises
    ------
    InputFileError
        Neither a zip with ``config.json`` nor an HDF5 file with ``model_config`` (a
        ``.weights.h5`` file has no architecture), or invalid JSON.
    """
    p = Path(path)
    text: Any = None
    if zipfile.is_zipfile(p):
        with zipfile.ZipFile(p) as zf:
            if "config.json" in zf.namelist():
                text = zf.read("config.json")
    else:
        try:
            import h5py
        except ImportError:
            raise InputFileError(f"{p}: reading .h5 files needs h5py") from None
        try:
            with h5py.File(p, "r") as fh:
                text = fh.attrs.get("model_config")
        except OSError:
            text = None
    if text is None:
        raise InputFileError(
            f"{p}: no model architecture (config.json of a .keras archive or the model_config "
            "of a model.save('x.h5') file); weights-only files have none"
        )
    try:
        config = json.loads(text.decode("utf-8") if isinstance(text, bytes) else str(text))
    except (ValueError, UnicodeDecodeError):
        raise InputFileError(f"{p}: the model architecture is not valid JSON") from None
    if not isinstance(config, dict):
        raise InputFileError(f"{p}: the model architecture is not a JSON object")
    return config


def _keras_histories(node: Any) -> Iterator[str]:
    """Layer names of Keras 3 ``__keras_tensor__`` arguments anywhere in a node."""
    if isinstance(node, dict):
        if node.get("class_name") == "__keras_tensor__":
            history = node.get("config", {}).get("keras_history")
            if isinstance(history, list) and history and isinstance(history[0], str):
                yield history[0]
            return
        for value in node.values():
            yield from _keras_histories(value)
    elif isinstance(node, list):
        if len(node) >= 3 and isinstance(node[0], str) and isinstance(node[1], int):
            yield node[0]  # Keras 2: [name, node_index, tensor_index, kwargs]
            return
        for value in node:
            yield from _keras_histories(value)


def layer_graph(model_config: Mapping[str, Any]) -> tuple[LayerNode, ...]:
    """The layers of a Functional or Sequential model config, in saved order.

    Raises
    ------
    InputFileError
        The config has no layer list (a subclassed model: structure unknown).
    """
    config = model_config.get("config", {})
    layers = config.get("layers") if isinstance(config, dict) else None
    if not isinstance(layers, list):
        cls = model_config.get("class_name", "?")
        raise InputFileError(
            f"model config of class {cls!r} has no layer list (a subclassed model?): "
            "structure unknown"
        )
    sequential = model_config.get("class_name") == "Sequential"
    nodes: list[LayerNode] = []
    for layer in layers:
        cfg = layer.get("config", {}) if isinstance(layer, dict) else {}
        name = str(layer.get("name") or cfg.get("name"))
        if sequential:
            inbound: tuple[str, ...] = (nodes[-1].name,) if nodes else ()
        else:
            inbound = tuple(dict.fromkeys(_keras_histories(layer.get("inbound_nodes", []))))
        nodes.append(
            LayerNode(name, str(layer.get("class_name")), MappingProxyType(dict(cfg)), inbound)
        )
    return tuple(nodes)


def bn_feeds(graph: tuple[LayerNode, ...]) -> tuple[BNFeed, ...]:
    """For every BatchNormalization of ``graph`` (in order), the chain feeding it."""
    by_name = {node.name: node for node in graph}
    return tuple(
        _feed(node, by_name) for node in graph if node.class_name.endswith("BatchNormalization")
    )


def _feed(bn: LayerNode, by_name: Mapping[str, LayerNode]) -> BNFeed:
    chain: list[str] = []
    found: dict[str, Any] = {}
    other = False
    node, stop = bn, "input"
    while True:
        if len(node.inbound) != 1 or node.inbound[0] not in by_name:
            stop = "merge" if len(node.inbound) > 1 else "input"
            break
        node = by_name[node.inbound[0]]
        if node.class_name == "InputLayer" or node.name in chain or node.name == bn.name:
            break  # a model input (or a malformed, cyclic config)
        chain.append(node.name)
        if node.class_name in DROPOUT_LAYERS and not node.config.get("rate"):
            continue  # a dropout of rate 0 is no noise
        if node.class_name in DROPOUT_LAYERS:
            kind, channelwise = DROPOUT_LAYERS[node.class_name]
            found.update(
                dropout=node.name,
                dropout_class=node.class_name,
                kind=kind,
                channelwise=channelwise,
                rate=node.config.get("rate"),
                noise_shape=node.config.get("noise_shape"),
            )
            stop = "dropout"
            break
        if node.class_name in LINEAR_LAYERS:
            if "dense" in found:
                stop = "linear"
                break
            found.update(
                dense=node.name,
                dense_class=node.class_name,
                kernel=f"{node.name}/kernel",
                activation=node.config.get("activation"),
            )
        elif node.class_name not in SHAPE_LAYERS:
            other = True
    path = _path(found, other, stop == "dropout" and _more_dropout(node, by_name))
    return BNFeed(bn=bn.name, path=path, chain=tuple(chain), stop=stop, **found)


def _path(found: Mapping[str, Any], other: bool, stacked_above: bool) -> str:
    if "dropout" not in found:
        return "none"
    if other or stacked_above or found.get("activation") not in (None, "linear"):
        return "stacked"
    return "through-linear" if "dense" in found else "direct"


def _more_dropout(node: LayerNode, by_name: Mapping[str, LayerNode]) -> bool:
    """Whether another dropout lies further up the single-input chain above ``node``."""
    seen = set()
    while len(node.inbound) == 1 and node.inbound[0] in by_name and node.name not in seen:
        seen.add(node.name)
        node = by_name[node.inbound[0]]
        if node.class_name in DROPOUT_LAYERS and node.config.get("rate"):
            return True
    return False
