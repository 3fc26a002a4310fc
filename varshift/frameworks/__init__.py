"""Code that runs a framework's models (torch, Keras, Flax): graphs and data passes.

Apart from :mod:`varshift.formats`, which only reads and writes files.
"""
