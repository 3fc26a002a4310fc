"""The Monte-Carlo engine: the Dropout → BatchNorm pipeline run as a framework runs it.

One job per module:

==============  ==================================================================================
``config``      :class:`SimConfig` and its validated, resolved plan (``make_plan``)
``inputs``      synthetic input distributions and recorded activation files
``sampling``    the random streams, dataset and weights draws, the streamed chunk schedule
``bn``          BatchNorm running statistics (:class:`BNState`, :func:`bn_running_stats`)
``band``        expected running statistics and their exact noise band
``fit``         the ``fit`` demonstration (Adam on BN's ``gamma, beta``)
``trace``       the running variance recorded along a run
``results``     the result dataclasses
``assemble``    a finished run beside theory: z-scores, corrections, the result
``run``         :func:`simulate`: the training loop, chunk by chunk
==============  ==================================================================================

Examples
--------
>>> from varshift.engine import SimConfig, simulate
>>> res = simulate(SimConfig(rate=0.2, samples=1000, features=2, epochs=1), rng=0)
>>> res.summary.steps, round(res.features[0].shift_ratio_theory, 3)
(32, 0.8)
"""

from varshift.engine.bn import BNState, bn_running_stats
from varshift.engine.config import (
    DEFAULT_FEATURES,
    DEFAULT_SAMPLES,
    DEFAULT_SPATIAL,
    DEFAULT_WIDTH,
    TOPOLOGIES,
    SimConfig,
)
from varshift.engine.fit import ADAM_BETA_1, ADAM_BETA_2, ADAM_EPSILON
from varshift.engine.inputs import INPUT_DISTS, load_activations
from varshift.engine.results import (
    Chunk,
    FeatureRow,
    FitResult,
    FitRow,
    RunningTrace,
    SimResult,
    SimSummary,
)
from varshift.engine.run import ChunkObserver, ProgressCallback, simulate

__all__ = [
    "ADAM_BETA_1",
    "ADAM_BETA_2",
    "ADAM_EPSILON",
    "DEFAULT_FEATURES",
    "DEFAULT_SAMPLES",
    "DEFAULT_SPATIAL",
    "DEFAULT_WIDTH",
    "INPUT_DISTS",
    "TOPOLOGIES",
    "BNState",
    "Chunk",
    "ChunkObserver",
    "FeatureRow",
    "FitResult",
    "FitRow",
    "ProgressCallback",
    "RunningTrace",
    "SimConfig",
    "SimResult",
    "SimSummary",
    "bn_running_stats",
    "load_activations",
    "simulate",
]
