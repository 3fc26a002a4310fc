"""Shared test set-up. Keras 3 runs on the torch backend here (no TensorFlow needed)."""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "torch")
