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
    mixes:
        True if a linear layer maps ``width`` dropout outputs to each BN feature (``width``,
        ``rho``, ``cos2``/``D`` and weights apply; a 2-D data file's columns are the width).
    spatial:
        True if a row is a ``(C, H, W)`` image and BN reduces each channel over ``N·H·W``
        (``spatial`` and channel-wise masks apply).
    fit:
        True if the fit demo (``simulate --fit``) runs on it.
    """

    name: str
    description: str
    theory: bool
    engine: bool
    mixes: bool = False
    spatial: bool = False
    fit: bool = False

    @property
    def reduce_axes(self) -> tuple[int, ...]:
        """Axes of a batch that BN reduces over per feature: ``(0,)``, or ``(0, 2, 3)``."""
        return (0, 2, 3) if self.spatial else (0,)


TOPOLOGIES: dict[str, Topology] = {
    t.name: t
    for t in (
        Topology(
            "direct", "dropout directly before BN (case (a))", theory=True, engine=True, fit=True
        ),
        Topology(
            "linear", "dropout → linear layer → BN (case (b))", theory=True, engine=True, mixes=True
        ),
        Topology(
            "conv",
            "dropout → convolution → BN per channel",
            theory=False,
            engine=True,
            spatial=True,
        ),
    )
}

#: The default ``--topology``: dropout directly before BN.
DEFAULT_TOPOLOGY: str = next(iter(TOPOLOGIES))

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


def with_field(attr: str) -> tuple[str, ...]:
    """Names of the topologies whose boolean field ``attr`` is true (for messages)."""
    return tuple(t.name for t in TOPOLOGIES.values() if getattr(t, attr))
