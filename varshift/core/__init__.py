"""The bottom layer: presets, dropout kinds, closed forms, validation and errors.

No I/O beyond the one atomic file writer (:mod:`varshift.core.files`); never imports pandas,
typer, rich, matplotlib or a framework.
"""
