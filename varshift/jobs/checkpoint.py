"""Jobs on checkpoint files: :func:`inspect_file` and :func:`correct_file` (read → correct →
write), each returning a frozen result with its run metadata.

The corrected file is written through the one writer after every output of the job was
planned (:class:`~varshift.core.files.OutputPlan`): never over the input (also through a link),
never over an existing file without ``force``. The report file is planned here and rendered by
the presentation layer (:mod:`varshift.present.checkpoint`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from varshift.core.dropout import DEFAULT_KIND, KINDS
from varshift.core.errors import InputFileError, ValidationError
from varshift.core.files import OutputPlan
from varshift.core.frames import TableResult
from varshift.core.presets import DEFAULT_FRAMEWORK, Preset, resolve_preset
from varshift.formats import FOLDER_FORMATS, BNStats, output_format, read_stats, write_stats
from varshift.jobs._meta import run_metadata
from varshift.jobs.correct import (
    UNKNOWN_WARNING,
    CorrectionConfig,
    CorrectionResult,
    LayerCorrection,
    LayerInspection,
    correct_stats,
    inspect_stats,
    parse_layer_rule,
)

__all__ = [
    "CorrectJob",
    "CorrectResult",
    "InspectResult",
    "correct_file",
    "inspect_file",
    "select_containers",
]

#: Formats of the correct report, by file extension.
REPORT_FORMATS: tuple[str, ...] = ("json", "csv", "md")


def _require_layers(stats: BNStats) -> None:
    if not stats.layers:
        raise InputFileError(
            f"{stats.where}: no BatchNorm statistics found (looked for running_mean/running_var, "
            "moving_mean/moving_variance or mean/var keys, or Keras batch_normalization layers)"
        )


def _framework(stats: BNStats, option: str | None) -> tuple[str, tuple[str, ...]]:
    """The framework given, else what the file implies, else torch with a note."""
    if option is not None:
        return option, ()
    if stats.framework is not None:
        return stats.framework, ()
    note = (
        f"note: {stats.where} does not say which framework wrote it; assuming torch "
        "conventions (unbiased stored variance, momentum 0.1); pass --framework to change"
    )
    return DEFAULT_FRAMEWORK, (note,)


def select_containers(stats: BNStats, keys: Sequence[str]) -> BNStats:
    """The layers of the state dicts named by ``--key`` (every one when ``keys`` is empty).

    A key names a state dict by its label (``state_dict_ema``, ``callbacks/EMA/state_dict``)
    or, when that is unambiguous, by the label's last part (``state_dict`` for
    ``callbacks/EMA/state_dict`` if no other label ends so). Comma lists are split.

    Raises
    ------
    ValidationError
        A key that names no state dict of the file (the message lists those found).
    """
    wanted = [k.strip() for text in keys for k in text.split(",") if k.strip()]
    if not wanted:
        return stats
    labels = stats.labels
    chosen: list[str] = []
    for key in wanted:
        hits = [lab for lab in labels if lab == key] or [
            lab for lab in labels if lab.rsplit("/", 1)[-1] == key
        ]
        if len(hits) != 1:
            found = ", ".join(repr(lab) if lab else "'' (the top level)" for lab in labels)
            rule = "names several" if hits else "names no state dict"
            raise ValidationError(
                f"--key {key!r} {rule} with BatchNorm statistics in {stats.where}; found: {found}"
            )
        chosen.append(hits[0])
    return stats.only(chosen)


def _containers(stats: BNStats, keys: Sequence[str]) -> dict[str, object]:
    """Metadata parameters of the state dicts read, only when the file holds several or
    ``--key`` was given (so single-container reports keep their bytes)."""
    out: dict[str, object] = {}
    if keys:
        out["key"] = list(keys)
    if stats.containers:
        out["containers"] = list(stats.labels)
    return out


@dataclass(frozen=True)
class InspectResult(TableResult):
    """One row per BatchNorm layer of a file, the convention used, notes and metadata
    (``to_frame()``: the rows, the columns of :class:`~varshift.jobs.correct.LayerInspection`)."""

    file: Path
    format: str
    preset: Preset
    rows: tuple[LayerInspection, ...]
    notes: tuple[str, ...]
    metadata: Mapping[str, Any]

    row_type: ClassVar[type] = LayerInspection

    def table_rows(self) -> tuple[LayerInspection, ...]:
        """One row per BatchNorm layer."""
        return self.rows

    def table_caption(self) -> str:
        """What the table shows."""
        return f"BatchNorm statistics in {self.file.name} ({self.preset.name} conventions)"

    @property
    def flagged(self) -> int:
        """Layers with at least one flag."""
        return sum(bool(r.flags) for r in self.rows)


def inspect_file(
    path: Path,
    framework: str | None = None,
    momentum: float | str | None = "default",
    keys: Sequence[str] = (),
) -> InspectResult:
    """Read a checkpoint's BatchNorm statistics and summarise each layer.

    ``framework``: the convention that stored them (default: what the file implies, else
    torch, with a note); ``momentum`` in that framework's own meaning. A checkpoint holding
    several state dicts (``state_dict`` and ``state_dict_ema``) gives rows for each, named
    ``LABEL:LAYER``; ``keys`` chooses some (:func:`select_containers`).

    Raises
    ------
    InputFileError
        The file cannot be read or holds no BatchNorm statistics.
    ValidationError
        A key names no state dict of the file.
    """
    path = Path(path)
    stats = select_containers(read_stats(path), keys)
    _require_layers(stats)
    name, notes = _framework(stats, framework)
    preset = resolve_preset(name, momentum)
    rows = inspect_stats(stats, preset)
    params = {
        "file": path.name,
        "format": stats.format,
        "container": stats.container,
        "framework": preset.name,
        "momentum": preset.momentum,
        **_containers(stats, keys),
    }
    return InspectResult(path, stats.format, preset, rows, notes, run_metadata("inspect", params))


@dataclass(frozen=True)
class CorrectJob:
    """One ``correct`` run.

    Attributes
    ----------
    file:
        The checkpoint or statistics file; never modified.
    output:
        The corrected file (its format follows the extension, else the input's); ``None`` for
        a dry run, which writes nothing.
    rate, layers, exclude:
        The rate for every layer, ``PATTERN=RATE`` rules (texts), globs of layers to leave.
    dropout, beta, framework, batch_size, method, target:
        See :class:`varshift.jobs.correct.CorrectionConfig`; ``framework`` ``None``: what the
        file implies, else torch.
    report:
        The report file (``.json``, ``.csv`` or ``.md``): planned with the output, written by
        the presentation layer; ``None``: no report.
    force:
        Replace existing outputs.
    model, model_args:
        The model's structure (:mod:`varshift.jobs.model_correct`): ``package.module:factory``
        (runs that code) with ``KEY=VALUE`` arguments, or a ``.pt2`` archive (no user code);
        a ``.pt2`` ``file`` is its own structure. ``None``: structure unknown, every layer
        assumed directly after dropout.
    data, input_key, data_batch_size, max_batches:
        Optional data to measure ``E[x²]`` of the dropout inputs (through-linear layers).
    input_shape:
        Shape of one input sample; one forward pass on zeros gives each convolution's input
        size, so its zero padding is counted.
    keys:
        ``--key``: the state dicts to correct in a checkpoint holding several (labels, or
        comma lists of them; :func:`select_containers`); empty: every one.
    """

    file: Path
    output: Path | None = None
    rate: float | None = None
    layers: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    dropout: str = DEFAULT_KIND
    beta: float = 0.1
    framework: str | None = None
    batch_size: int | None = None
    method: str = "debiased"
    target: str = "framework"
    report: Path | None = None
    force: bool = False
    model: str | None = None
    model_args: tuple[str, ...] = ()
    data: str | None = None
    input_key: str | None = None
    data_batch_size: int = 256
    max_batches: int | None = None
    input_shape: tuple[int, ...] | None = None
    keys: tuple[str, ...] = ()

    @property
    def structured(self) -> bool:
        """True when the model's structure is known: ``--model``, a ``.pt2`` file, or a Keras
        file holding its architecture (a ``.keras`` archive, a legacy ``model.save`` ``.h5``)."""
        return self.model is not None or self.file.suffix.lower() == ".pt2" or self.keras_model

    @property
    def keras_model(self) -> bool:
        """True for a Keras file holding its architecture (read as JSON, nothing runs)."""
        if self.model is not None or self.file.suffix.lower() not in (".keras", ".h5"):
            return False
        from varshift.frameworks.keras.structure import has_architecture

        return has_architecture(self.file)


@dataclass(frozen=True, eq=False)
class CorrectResult(TableResult):
    """The correction of one file: per-layer rows, corrected statistics, what was written
    (``to_frame()``: the rows, the columns of :class:`~varshift.jobs.correct.LayerCorrection`)."""

    job: CorrectJob
    config: CorrectionConfig
    correction: CorrectionResult
    format: str
    written: tuple[Path, ...]
    notes: tuple[str, ...]
    metadata: Mapping[str, Any]

    row_type: ClassVar[type] = LayerCorrection

    @property
    def rows(self) -> tuple[LayerCorrection, ...]:
        """One :class:`~varshift.jobs.correct.LayerCorrection` per layer."""
        return self.correction.rows

    def table_rows(self) -> tuple[LayerCorrection, ...]:
        """One row per BatchNorm layer."""
        return self.rows

    def table_caption(self) -> str:
        """What the table shows."""
        return f"{self.correction.table_caption()} in {self.job.file.name}"


def default_report(output: Path) -> Path:
    """``OUTPUT.report.json``."""
    return output.with_name(output.name + ".report.json")


def correct_file(job: CorrectJob, plan: OutputPlan | None = None) -> CorrectResult:
    """Read ``job.file``, correct its statistics, and write the corrected file.

    ``plan`` holds the outputs the caller planned already (figures, a page); the job's output
    and report are checked against them and against the input before anything is written.

    Raises
    ------
    InputFileError, ValidationError, OutputFileError
        Unreadable input or inconsistent statistics; invalid parameters; an output that is the
        input, exists without ``force``, or cannot be written.
    """
    if job.structured:
        from varshift.jobs.model_correct import correct_model_file

        return correct_model_file(job, plan)
    if job.data is not None or job.input_shape is not None:
        raise ValidationError("--data and --input-shape need the model's structure: give --model")
    stats = select_containers(read_stats(job.file), job.keys)
    _require_layers(stats)
    name, notes = _framework(stats, job.framework)
    config = CorrectionConfig(
        rate=job.rate,
        rules=tuple(parse_layer_rule(text) for text in job.layers),
        exclude=job.exclude,
        dropout=job.dropout,
        beta=job.beta,
        preset=resolve_preset(name),
        batch_size=job.batch_size,
        method=job.method,
        target=job.target,
    )
    fmt = stats.format
    if job.output is not None:
        fmt = output_format(job.output, stats.format)
        plan_outputs(job, plan or OutputPlan([job.file], force=job.force), fmt)
    correction = correct_stats(stats, config)
    written: tuple[Path, ...] = ()
    if job.output is not None:
        written = (write_stats(correction.stats, job.output, fmt, force=True),)
    unknown = f"{stats.where}: {UNKNOWN_WARNING}"
    warnings = [unknown, *correction.warnings]
    meta = run_metadata("correct", parameters(job, stats, config), warnings=warnings)
    notes = (*notes, f"warning: {unknown}")
    return CorrectResult(job, config, correction, fmt, written, notes, meta)


def plan_outputs(job: CorrectJob, plan: OutputPlan, fmt: str | None = None) -> None:
    """Check the output and the report against the input and existing files; ``fmt``: the
    output's format (a folder format's output is planned as a folder)."""
    assert job.output is not None
    report = job.report
    if report is not None and report.suffix.lower().lstrip(".") not in REPORT_FORMATS:
        raise ValidationError(f"--report must end in .json, .csv or .md; got {report.name!r}")
    plan.add(job.output, folder=fmt in FOLDER_FORMATS)
    if report is not None:
        plan.add(report)


def parameters(job: CorrectJob, stats: BNStats, config: CorrectionConfig) -> dict[str, object]:
    """The run parameters recorded in the report's metadata."""
    return {
        "file": job.file.name,
        "format": stats.format,
        "output": job.output.name if job.output is not None else None,
        "rate": job.rate,
        "layer": list(job.layers),
        "exclude": list(job.exclude),
        "dropout": config.dropout,
        "beta": job.beta if KINDS[config.dropout].uses_beta else None,
        "framework": config.preset.name,
        "batch_size": job.batch_size,
        "method": config.method,
        "target": config.target,
        **_containers(stats, job.keys),
    }
