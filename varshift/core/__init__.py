"""The bottom layer: presets, dropout kinds, topologies, closed forms, validation and errors.

One registry per concept, each the only place its names are listed: :data:`presets.PRESETS`
(framework conventions), :data:`dropout.KINDS` (dropout kinds), :data:`topology.TOPOLOGIES`;
one home per formula (:func:`presets.bessel`, :mod:`ema` for the running-average weights,
:func:`theory.gamma_star`). No I/O beyond the one atomic file writer
(:mod:`varshift.core.files`); never imports pandas, typer, rich, matplotlib or a framework.
"""
