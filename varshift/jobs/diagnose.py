"""``diagnose`` and ``recalibrate`` a PyTorch model on data: config in, result out.

The work is in :mod:`varshift.frameworks.torch` (imported here only when a job runs, so
importing this module never imports torch); this module loads the model and the data from
their specs, picks the device, checks the output before any work, and writes the recalibrated
checkpoint atomically (:func:`varshift.core.files.atomic_write`). The input is never touched.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from varshift.core.errors import MissingDependencyError, ValidationError
from varshift.core.files import OutputPlan, atomic_write
from varshift.core.validate import check_choice, check_int

if TYPE_CHECKING:
    from varshift.frameworks.torch.load import LoadedModel
    from varshift.frameworks.torch.results import DiagnoseResult, RecalibrateResult

METHODS: tuple[str, ...] = ("topological", "single-pass")
DEVICES: tuple[str, ...] = ("cpu", "cuda")

#: ``progress(label, batches done, batches per pass or None)``, as the library calls it.
Progress = Callable[[str, int, int | None], None]


@dataclass(frozen=True)
class ModelSpec:
    """Where the model comes from.

    Attributes
    ----------
    model:
        ``package.module:factory`` (imported and called: runs user code) or a ``.pt2``
        ``torch.export`` archive (no user code).
    model_args:
        ``KEY=VALUE`` keyword arguments of the factory.
    checkpoint:
        A state dict or training checkpoint (``torch.load(weights_only=True)``, strict).
    """

    model: str
    model_args: tuple[str, ...] = ()
    checkpoint: Path | None = None


@dataclass(frozen=True)
class DataSpec:
    """Where the data comes from (:func:`varshift.frameworks.torch.load.load_batches`)."""

    data: str
    input_key: str | None = None
    label_key: str | None = None
    labels: Path | None = None
    batch_size: int = 256
    max_batches: int | None = None

    def __post_init__(self) -> None:
        check_int("batch_size", self.batch_size, 1)
        if self.max_batches is not None:
            check_int("max_batches", self.max_batches, 1)


@dataclass(frozen=True)
class DiagnoseConfig:
    """What :func:`run_diagnose` measures; ``device`` ``None`` picks cuda when present."""

    model: ModelSpec
    data: DataSpec
    device: str | None = None
    dropout_on: bool = True
    seed: int = 0
    train_batch_size: int | None = None

    def __post_init__(self) -> None:
        check_int("seed", self.seed, 0)
        if self.train_batch_size is not None:
            check_int("train_batch_size", self.train_batch_size, 2)
        if self.device is not None:
            object.__setattr__(self, "device", check_choice("device", self.device, DEVICES))


@dataclass(frozen=True)
class RecalibrateConfig:
    """What :func:`run_recalibrate` does and where it writes the new checkpoint."""

    model: ModelSpec
    data: DataSpec
    output: Path
    method: str = "topological"
    device: str | None = None
    force: bool = False
    compare: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        check_int("seed", self.seed, 0)
        object.__setattr__(self, "method", check_choice("method", self.method, METHODS))
        if self.device is not None:
            object.__setattr__(self, "device", check_choice("device", self.device, DEVICES))


@dataclass(frozen=True, eq=False)
class RecalibrateJob:
    """The recalibration and the file it wrote."""

    result: RecalibrateResult
    output: Path
    source: str


def _torch() -> Any:
    try:
        import torch
    except ImportError:
        raise MissingDependencyError(
            "diagnose and recalibrate need PyTorch: pip install 'varshift[torch]'"
        ) from None
    return torch


def _device(name: str | None) -> str:
    torch = _torch()
    available = bool(torch.cuda.is_available())
    if name is None:
        return "cuda" if available else "cpu"
    if name == "cuda" and not available:
        raise ValidationError("device 'cuda' requested but CUDA is not available; use --device cpu")
    return name


def _load(spec: ModelSpec, device: str) -> LoadedModel:
    from varshift.frameworks.torch.load import load_model, parse_model_args

    loaded = load_model(spec.model, parse_model_args(spec.model_args), spec.checkpoint)
    loaded.module.to(device)
    return loaded


def _batches(spec: DataSpec) -> Any:
    from varshift.frameworks.torch.load import load_batches

    return load_batches(
        spec.data,
        input_key=spec.input_key,
        label_key=spec.label_key,
        labels=spec.labels,
        batch_size=spec.batch_size,
        max_batches=spec.max_batches,
    )


def run_diagnose(config: DiagnoseConfig, progress: Progress | None = None) -> DiagnoseResult:
    """Load the model and the data, and :func:`~varshift.frameworks.torch.passes.diagnose`."""
    from varshift.frameworks.torch.passes import diagnose

    device = _device(config.device)
    loaded = _load(config.model, device)
    batches = _batches(config.data)
    return diagnose(
        loaded.module,
        batches,
        dropout_on=config.dropout_on,
        seed=config.seed,
        train_batch_size=config.train_batch_size,
        progress=progress,
    )


def _check_output(config: RecalibrateConfig) -> None:
    out = Path(config.output)
    inputs = [Path(config.model.model)] if config.model.model.lower().endswith(".pt2") else []
    if config.model.checkpoint is not None:
        inputs.append(Path(config.model.checkpoint))
    files = [Path(config.data.data)] if Path(config.data.data).exists() else []
    files += [Path(config.data.labels)] if config.data.labels is not None else []
    # The one output check (core.files): not an input (also through a link), not a folder, no
    # overwrite without force.
    OutputPlan([*inputs, *files], force=config.force).add(out, "--output")
    exported = (
        bool(inputs) and inputs[0].suffix.lower() == ".pt2" and config.model.checkpoint is None
    )
    if exported and out.suffix.lower() != ".pt2":
        raise ValidationError(f"--output {out}: a torch.export archive is written as .pt2")


def run_recalibrate(config: RecalibrateConfig, progress: Progress | None = None) -> RecalibrateJob:
    """Recalibrate and write the checkpoint (only BatchNorm buffers changed) atomically.

    Raises
    ------
    OutputFileError
        The output exists without ``force`` (checked before any work).
    ValidationError, InputFileError
        Bad model, checkpoint or data (see :func:`varshift.frameworks.torch.load.load_model`).
    """
    from varshift.frameworks.torch.load import checkpoint_bytes
    from varshift.frameworks.torch.passes import recalibrate

    _check_output(config)
    device = _device(config.device)
    loaded = _load(config.model, device)
    batches = _batches(config.data)
    result = recalibrate(
        loaded.module,
        batches,
        method=config.method,
        compare=config.compare,
        seed=config.seed,
        progress=progress,
    )
    data = checkpoint_bytes(loaded, result.model)
    out = atomic_write(Path(config.output), data, force=True)  # planned by _check_output
    return RecalibrateJob(result, out, loaded.source)


def diagnose_metadata(config: DiagnoseConfig, result: DiagnoseResult) -> dict[str, Any]:
    """Run metadata of a diagnose report: parameters (file names, not absolute paths), data
    size, warnings, and the per-layer table (classes, flags, paths) beside the metric rows."""
    from varshift import __version__
    from varshift.frameworks.torch.flags import FLAG_SE

    spec, data = config.model, config.data
    return {
        "varshift": __version__,
        "command": "diagnose",
        "parameters": {
            "model": Path(spec.model).name if spec.model.endswith(".pt2") else spec.model,
            "model_args": list(spec.model_args),
            "checkpoint": None if spec.checkpoint is None else Path(spec.checkpoint).name,
            "data": data.data if ":" in data.data else Path(data.data).name,
            "batch_size": data.batch_size,
            "max_batches": data.max_batches,
            "dropout_on": config.dropout_on,
            "seed": config.seed,
            "train_batch_size": config.train_batch_size,
        },
        "flag_rule": (
            f"shifted: median stored/eval variance ratio more than {FLAG_SE:g} standard errors "
            "from 1 "
            "(flag_tol); counted: the data pass's sampling error"
            + ("" if config.train_batch_size is None else " and the stored statistics' EMA noise")
        ),
        "samples": result.samples,
        "warnings": list(result.warnings),
    }
