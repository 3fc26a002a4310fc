"""Saved Keras models as plain data: the layer graph and the chain feeding each BatchNorm.

Read from the architecture JSON with ``zipfile``, ``json`` and h5py only (no Keras needed,
nothing deserialised): :func:`~varshift.frameworks.keras.graph.read_model_config`,
:func:`~varshift.frameworks.keras.graph.layer_graph`,
:func:`~varshift.frameworks.keras.graph.bn_feeds`.
"""

from __future__ import annotations

from varshift.frameworks.keras.graph import (
    BNFeed,
    LayerNode,
    bn_feeds,
    layer_graph,
    read_model_config,
)

__all__ = ["BNFeed", "LayerNode", "bn_feeds", "layer_graph", "read_model_config"]
