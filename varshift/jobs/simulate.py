"""``run_simulate``: read the input files, run the engine, and build the run's metadata.

The job wraps :func:`varshift.engine.simulate.simulate`: it reads ``--input``/``--weights``
(recording their SHA-256 in the metadata), runs the engine with the seed, and names the reports
after the key parameters and a hash of all of them (:func:`report_stem`), so that rerunning the
same job reproduces the same file names and bytes. Rendering and writing the reports is the
presentation layer's part (:mod:`varshift.present.simulate`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

from varshift.core.errors import ValidationError
from varshift.core.frames import TableResult
from varshift.core.topology import ENGINE_TOPOLOGIES, TOPOLOGIES, check_topology, with_field
from varshift.core.validate import check_seed
from varshift.engine import SimConfig, SimResult, load_activations, simulate
from varshift.engine.results import FeatureRow
from varshift.jobs._meta import file_digest, run_metadata

__all__ = [
    "SimulateJob",
    "SimulateResult",
    "check_applicable",
    "notes",
    "parse_spatial",
    "report_stem",
    "run_simulate",
    "simulate_parameters",
]

#: The running variance is recorded at up to this many steps when a trace is asked for.
TRACE_POINTS = 2000


@dataclass(frozen=True)
class SimulateJob:
    """One ``simulate`` run: the engine's config (without arrays), the seed and the files.

    Attributes
    ----------
    config:
        The run; its ``data`` and ``weights`` are read from ``input_file``/``weights_file``.
    seed:
        Seed of the run (same seed ⇒ same result and reports).
    input_file, weights_file:
        Recorded dropout inputs and linear weights (``.npy`` or ``.csv``), or ``None``.
    trace:
        Record the running variance at up to this many steps (for figures); 0: none.
    """

    config: SimConfig = field(default_factory=SimConfig)
    seed: int = 0
    input_file: Path | None = None
    weights_file: Path | None = None
    trace: int = 0


@dataclass(frozen=True)
class SimulateResult(TableResult):
    """The engine's result with the job's metadata and report file stem (``to_frame()``: the
    engine result's, one row per feature)."""

    job: SimulateJob
    sim: SimResult
    metadata: Mapping[str, Any]
    report_stem: str

    row_type: ClassVar[type] = FeatureRow

    def table_rows(self) -> tuple[FeatureRow, ...]:
        """One row per BN feature."""
        return self.sim.features

    def table_caption(self) -> str:
        """What the table shows."""
        return self.sim.table_caption()


def simulate_parameters(job: SimulateJob) -> dict[str, object]:
    """Every parameter that determines the result (the metadata's ``parameters`` block)."""
    config, input_file, weights_file = job.config, job.input_file, job.weights_file
    preset = config.preset
    synthetic = input_file is None
    return {
        "rate": config.rate,
        "dropout": config.dropout,
        "beta": config.beta,
        "framework": preset.name,
        "momentum": preset.momentum,
        "alpha": preset.alpha,
        "stored_variance": preset.estimator.name,
        "eps": preset.eps,
        "batch_size": config.batch_size,
        "samples": config.samples,
        "epochs": config.epochs if config.steps is None else None,
        "steps": config.steps,
        "drop_last": config.drop_last,
        "features": config.features,
        "topology": config.topology,
        "input_dist": config.input_dist if synthetic else None,
        "mean": config.mean if synthetic else None,
        "std": config.std if synthetic else None,
        "input": str(input_file) if input_file else None,
        "input_sha256": file_digest(input_file) if input_file else None,
        "width": config.width,
        "rho": config.rho,
        "cos2": config.cos2,
        "weights": str(weights_file) if weights_file else None,
        "weights_sha256": file_digest(weights_file) if weights_file else None,
        "spatial": list(config.spatial) if config.spatial else None,
        "channelwise": config.channelwise,
        "fit": config.fit,
        "lr": config.lr if config.fit else None,
        "probe": config.probe if config.fit else None,
        "seed": job.seed,
    }


def report_stem(params: Mapping[str, object], version: str | None = None) -> str:
    """``simulate_<topology>_<dropout>_rate<r>_<framework>_seed<s>_<hash>``.

    The hash covers every parameter and the varshift version, so different runs (or releases)
    never share a name, and rerunning the same job reproduces the same (byte-identical) files.
    """
    import hashlib  # lazily: loading OpenSSL costs ~13 ms of start-up

    if version is None:
        from varshift import __version__ as version
    key = json.dumps({"params": dict(params), "varshift": version}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:8]
    return (
        f"simulate_{params['topology']}_{params['dropout']}_rate{params['rate']:g}_"
        f"{params['framework']}_seed{params['seed']}_{digest}"
    )


def notes(job: SimulateJob) -> tuple[str, ...]:
    """Remarks on how the run relates to the framework it imitates (printed, not errors)."""
    note = job.config.preset.spatial_only_note
    record = TOPOLOGIES.get(job.config.topology)
    if note and record is not None and not record.spatial:
        return (note,)
    return ()


def run_simulate(
    job: SimulateJob, *, progress: Callable[[int, int], None] | None = None
) -> SimulateResult:
    """Read the job's files, run the engine with its seed, and attach the metadata.

    Raises
    ------
    InputFileError
        An input or weights file cannot be read.
    ValidationError
        An invalid parameter (see :func:`varshift.engine.simulate.simulate`).

    Examples
    --------
    >>> res = run_simulate(SimulateJob(SimConfig(samples=200, epochs=1, features=2)))
    >>> res.metadata["command"], res.report_stem.startswith("simulate_direct_bernoulli_rate0.2")
    ('simulate', True)
    """
    check_seed(job.seed)
    config = job.config
    if job.input_file is not None:
        config = replace(config, data=load_activations(job.input_file))
    if job.weights_file is not None:
        config = replace(config, weights=load_activations(job.weights_file))
    sim = simulate(config, rng=job.seed, progress=progress, trace=job.trace)
    params = simulate_parameters(job)
    summary: dict[str, object] = {
        k: getattr(sim.summary, k) for k in sim.summary.__dataclass_fields__ if k != "mean"
    }
    if sim.fit is not None:
        summary["fit_optimizer"] = sim.fit.optimizer
    meta = run_metadata("simulate", params, summary=summary)
    return SimulateResult(job, sim, meta, report_stem(params))


# --- which options apply (checked before any work) -------------------------------------------


def _given(options: Mapping[str, object]) -> list[str]:
    """The option names that were given (not None, not an unset flag)."""
    return [
        "--" + k.replace("_", "-") for k, v in options.items() if v is not None and v is not False
    ]


def check_applicable(
    topology: str, has_input: bool, fit: bool, options: Mapping[str, object]
) -> None:
    """Reject options that do not apply to the topology or mode (one-line errors).

    ``options`` maps option names (``width``, ``spatial``, ...) to the values given, ``None``
    or ``False`` when not given.
    """

    def given(*names: str) -> list[str]:
        return _given({k: options.get(k) for k in names})

    synthetic = given("input_dist", "mean", "std")
    if has_input and synthetic:
        raise ValidationError(f"{synthetic[0]} describes synthetic inputs; --input replaces them")
    record = TOPOLOGIES[check_topology(topology, ENGINE_TOPOLOGIES)]
    for field_name, names in (
        ("mixes", ("width", "rho", "cos2", "weights")),
        ("spatial", ("spatial", "channelwise")),
    ):
        hits = given(*names)
        if hits and not getattr(record, field_name):
            owners = " or ".join(with_field(field_name))
            raise ValidationError(f"{hits[0]} applies to --topology {owners} only; got {topology}")
    fitting = given("lr", "probe")
    if not fit and fitting:
        raise ValidationError(f"{fitting[0]} applies with --fit only")
    if options.get("steps") is not None and options.get("epochs") is not None:
        raise ValidationError("give either --epochs or --steps, not both")


def parse_spatial(text: str | None) -> tuple[int, int] | None:
    """``HxW`` → ``(H, W)``.

    Examples
    --------
    >>> parse_spatial("3x4")
    (3, 4)
    """
    if text is None:
        return None
    parts = text.lower().replace("×", "x").split("x")
    rule = f"spatial must be HxW with positive integers, e.g. 4x4; got {text!r}"
    try:
        h, w = (int(p) for p in parts)
    except ValueError:
        raise ValidationError(rule) from None
    if h < 1 or w < 1:
        raise ValidationError(rule)
    return h, w
