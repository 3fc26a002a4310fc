"""Checkpoint and statistics files: one module per format, one registry.

Every reader returns the same structure, a :class:`BNStats`: layer name → :class:`BNLayer`
(running mean, running variance *as stored*, optional scale/bias and update count, the stored
dtype and the original key names). A writer changes only the values a correction changed and
keeps everything else: every other key and tensor, dtypes and shapes, ``num_batches_tracked``,
wrapper entries of training checkpoints, and the file format.

============  ==========================  ==============================================
format        extensions                  module (where the BN statistics are found)
============  ==========================  ==============================================
csv, tsv      ``.csv``, ``.tsv``          :mod:`varshift.formats.table`
json          ``.json``                   :mod:`varshift.formats.json_stats`
npz           ``.npz``                    :mod:`varshift.formats.npz`
safetensors   ``.safetensors``            :mod:`varshift.formats.safetensors_file`
torch         ``.pt``, ``.pth``           :mod:`varshift.formats.torch_pt`
keras         ``.weights.h5``, ``.h5``    :mod:`varshift.formats.keras_h5`
flax          ``.msgpack``                :mod:`varshift.formats.flax_msgpack`
orbax         a folder with ``_METADATA``  :mod:`varshift.formats.flax_orbax`
============  ==========================  ==============================================

Files with another extension (``.ckpt``, ``.bin``, ``.tar``) are recognised by their content.
Layouts follow ``shared/reference/frameworks.md`` §6. :mod:`varshift.formats.registry` says
how to add a format.

Safety: ``torch.load(weights_only=True)``, ``np.load(allow_pickle=False)`` and plain msgpack
only, so a file cannot run code when it is read (an Orbax folder: JSON, msgpack and
TensorStore data through orbax-checkpoint, no pickle); inputs are never modified; outputs go
to a temporary file (or folder) in the target folder and are renamed into place. Optional
packages (torch, h5py, safetensors, msgpack, orbax-checkpoint with jax) are imported only when
a file that needs them is read or written.
"""

from __future__ import annotations

from varshift.formats.base import BNLayer, BNStats, Extra, FloatArray, Format
from varshift.formats.registry import (
    FOLDER_FORMATS,
    FORMATS,
    MAX_INPUT_BYTES,
    REGISTRY,
    check_input_file,
    detect_format,
    format_from_extension,
    get_format,
    output_format,
    read_stats,
    write_stats,
)

__all__ = [
    "FOLDER_FORMATS",
    "FORMATS",
    "MAX_INPUT_BYTES",
    "REGISTRY",
    "BNLayer",
    "BNStats",
    "Extra",
    "FloatArray",
    "Format",
    "check_input_file",
    "detect_format",
    "format_from_extension",
    "get_format",
    "output_format",
    "read_stats",
    "write_stats",
]
