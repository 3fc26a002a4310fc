"""Where the dropout sits relative to the BatchNorm: the topologies, as data.

==========  ===================================================================  ======  ======
topology    what lies between dropout and BN                                      theory  engine
==========  ===================================================================  ======  ======
direct      nothing: BN normalises the dropout output (Li et al. case (a))       yes     yes
linear      a linear layer (case (b); the closed form in its equicorrelated form) yes     yes
conv        a convolution on images, BN per channel over N·H·W                     no      yes
==========  ===================================================================  ======  ======
"""

from __future__ import annotations

from dataclasses import dataclass

from varshift.core.errors import ValidationError


@dataclass(frozen=True)
class Topology:
    """One topology and which parts of varshift support it.

    Attributes
    ----------
    name:
        The ``--topology`` name.
    description:
        One line for help and docs.
    theory:
        True if the closed forms cover it (``varshift theory``, ``sweep``,
        :func:`varshift.core.theory.theory_table`).
    engine:
        True if the simulation engine runs it (``varshift simulate``).
    """

    name: str
    description: str
    theory: bool
    engine: bool


TOPOLOGIES: dict[str, Topology] = {
    t.name: t
    for t in (
        Topology("direct", "dropout directly before BN (case (a))", theory=True, engine=True),
        Topology("linear", "dropout → linear layer → BN (case (b))", theory=True, engine=True),
        Topology("conv", "dropout → convolution → BN per channel", theory=False, engine=True),
    )
}

#: Topologies the closed forms cover, in registry order.
THEORY_TOPOLOGIES: tuple[str, ...] = tuple(t.name for t in TOPOLOGIES.values() if t.theory)
#: Topologies the simulation engine runs, in registry order.
ENGINE_TOPOLOGIES: tuple[str, ...] = tuple(t.name for t in TOPOLOGIES.values() if t.engine)


def check_topology(value: str, supported: tuple[str, ...], name: str = "topology") -> str:
    """Return ``value`` if it is one of ``supported``; otherwise raise naming the choices.

    Examples
    --------
    >>> check_topology("linear", THEORY_TOPOLOGIES)
    'linear'
    """
    if value not in supported:
        raise ValidationError(f"{name} must be one of {', '.join(supported)}; got {value!r}")
    return value
