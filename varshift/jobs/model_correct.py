"""``varshift correct`` with the model's structure: each BatchNorm gets its class's formula.

The structure comes from ``--model package.module:factory`` (imports and runs that code, then
loads the checkpoint ``file`` into it strictly) or from a ``torch.export`` archive (``--model
net.pt2``, or a ``.pt2`` file on its own: graph and weights, no user code runs). The graph is
classified (:func:`varshift.frameworks.torch.graph.classify`), turned into framework-neutral
records (:mod:`varshift.frameworks.torch.structure`) and corrected by
:func:`varshift.jobs.graph_correct.correct_with_structure`. With ``--data`` the ``E[x²]`` of
each through-linear dropout's input is measured (dropout off, BNs in ``eval()``).

A checkpoint file is written back through the format writers (any output format, as without
``--model``); a ``.pt2`` file is written back as a ``.pt2`` archive with new BN buffers.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from varshift.core.dropout import DEFAULT_KIND
from varshift.core.errors import MissingDependencyError, ValidationError
from varshift.core.files import OutputPlan, atomic_write
from varshift.core.presets import resolve_preset
from varshift.core.structure import LayerStructure
from varshift.formats import (
    BNLayer,
    BNStats,
    format_from_extension,
    output_format,
    read_stats,
    write_stats,
)
from varshift.jobs._meta import run_metadata
from varshift.jobs.checkpoint import (
    CorrectJob,
    CorrectResult,
    parameters,
    plan_outputs,
    select_containers,
)
from varshift.jobs.correct import CorrectionConfig, CorrectionResult
from varshift.jobs.graph_correct import correct_with_structure

if TYPE_CHECKING:
    from varshift.frameworks.torch.load import LoadedModel


def _torch() -> Any:
    try:
        import torch
    except ImportError:
        raise MissingDependencyError(
            "correct --model needs PyTorch: pip install 'varshift[torch]'"
        ) from None
    return torch


def _load(job: CorrectJob, container: tuple[str, ...] | None = None) -> LoadedModel:
    from varshift.frameworks.torch.load import load_model, parse_model_args

    is_archive = job.file.suffix.lower() == ".pt2"
    if is_archive and job.model is not None:
        raise ValidationError(
            f"{job.file} is a torch.export archive and holds its own structure; drop --model"
        )
    source = str(job.file) if is_archive else str(job.model)
    checkpoint = None if is_archive else job.file
    return load_model(source, parse_model_args(job.model_args), checkpoint, container)


def _one_container(job: CorrectJob) -> tuple[BNStats, tuple[str, ...] | None]:
    """The checkpoint's statistics (``--key`` applied) and the key path of the one state dict
    the model is loaded from (``None``: found by the loader).

    Raises
    ------
    ValidationError
        The file holds several state dicts with BatchNorm statistics and ``--key`` does not
        choose one: the structure-aware path loads one state dict into the model at a time.
    """
    stats = select_containers(read_stats(job.file), job.keys)
    labels = stats.labels
    if len(labels) > 1:
        shown = ", ".join(labels)
        raise ValidationError(
            f"{job.file} holds {len(labels)} state dicts with BatchNorm statistics ({shown}); "
            "correct --model loads one into the model at a time: choose it with --key NAME "
            "(and run again with the other key, on the first run's output)"
        )
    paths = stats.origin.extra.get("paths", {}) if stats.origin is not None else {}
    return stats, paths.get(labels[0]) if stats.containers else None


def _module_stats(loaded: LoadedModel, path: Path) -> BNStats:
    """The BN buffers of a model loaded from a ``.pt2`` archive, as statistics."""
    from varshift.frameworks.torch.graph import batchnorm_layers

    layers = {}
    for name, m in batchnorm_layers(loaded.module).items():
        if m.running_mean is None or m.running_var is None:
            continue
        count = None if m.num_batches_tracked is None else int(m.num_batches_tracked)
        layers[name] = BNLayer(
            name,
            m.running_mean.detach().double().cpu().numpy().copy(),
            m.running_var.detach().double().cpu().numpy().copy(),
            count=count,
            dtype=str(m.running_var.dtype).removeprefix("torch."),
        )
    return BNStats(MappingProxyType(layers), "pt2", path, "torch")


def _by_stats_name(
    stats: BNStats, structure: dict[str, LayerStructure]
) -> dict[str, LayerStructure]:
    """Structure keyed by the statistics' layer names (``module.`` prefixes of DataParallel)."""
    out = {}
    for name in stats.layers:
        local = stats.local_name(name)
        s = structure.get(local) or structure.get(local.removeprefix("module."))
        if s is not None:
            out[name] = replace(s, layer=name)
    return out


def _config(job: CorrectJob) -> CorrectionConfig:
    if job.dropout != DEFAULT_KIND:
        raise ValidationError(
            f"--dropout {job.dropout} cannot be combined with --model: the dropout kinds are "
            "read from the model"
        )
    if job.layers:
        raise ValidationError(
            "--layer cannot be combined with --model: the dropout rates are read from the model"
        )
    return CorrectionConfig(
        rate=job.rate,
        exclude=job.exclude,
        preset=resolve_preset(job.framework or "torch"),
        batch_size=job.batch_size,
        method=job.method,
        target=job.target,
        from_model=True,
    )


def _params(job: CorrectJob, stats: BNStats, config: CorrectionConfig) -> dict[str, object]:
    model = job.model
    data = job.data
    return {
        **parameters(job, stats, config),
        "model": Path(model).name if model and model.endswith(".pt2") else model,
        "model_args": list(job.model_args),
        "data": None if data is None else (data if ":" in data else Path(data).name),
        "input_shape": None if job.input_shape is None else list(job.input_shape),
    }


def _structures(
    loaded: LoadedModel, graph: Any, job: CorrectJob, batches: Any
) -> dict[str, LayerStructure]:
    """The torch reader's records; the example batch (first data batch, else zeros of
    ``--input-shape``) gives the convolutions' input sizes."""
    from varshift.frameworks.torch.structure import layer_structures

    torch = _torch()
    if batches is not None:
        example = next(iter(batches))[0][:2]
    elif job.input_shape is not None:
        example = torch.zeros((2, *job.input_shape))
    else:
        return layer_structures(loaded.module, graph)
    try:
        return layer_structures(loaded.module, graph, example)
    except ValidationError as exc:
        if batches is not None:
            raise
        shape = ",".join(map(str, job.input_shape or ()))
        raise ValidationError(f"--input-shape {shape}: {exc}") from None


def _batches(job: CorrectJob) -> Any:
    if job.data is None:
        return None
    from varshift.frameworks.torch.load import load_batches

    return load_batches(
        job.data,
        input_key=job.input_key,
        batch_size=job.data_batch_size,
        max_batches=job.max_batches,
    )


def _measured(
    loaded: LoadedModel,
    graph: Any,
    structure: dict[str, LayerStructure],
    first: CorrectionResult,
    batches: Any,
) -> dict[str, LayerStructure]:
    """Structures with the through-linear inputs measured, on a copy of the model whose direct
    layers already carry their corrected statistics (what the fixed model will run with)."""
    from varshift.frameworks.torch.structure import measure_dropout_inputs, with_statistics

    direct = {
        row.layer: (first.stats.layers[row.layer].mean, first.stats.layers[row.layer].var)
        for row in first.rows
        if row.kind == "direct" and row.action == "corrected"
    }
    return measure_dropout_inputs(with_statistics(loaded.module, direct), batches, structure, graph)


def correct_model_file(job: CorrectJob, plan: OutputPlan | None = None) -> CorrectResult:
    """:func:`varshift.jobs.checkpoint.correct_file` when the model's structure is known.

    Raises
    ------
    ValidationError, InputFileError, OutputFileError, MissingDependencyError
        As ``correct_file``; also a failing factory, a checkpoint that does not match the
        model, bad data, and a ``.pt2`` input written to anything but ``.pt2``.
    """
    if job.keras_model:
        return correct_keras_file(job, plan)
    from varshift.frameworks.torch.graph import classify

    _torch()
    config = _config(job)
    archive = job.file.suffix.lower() == ".pt2"
    fmt = "pt2" if archive else None
    if job.output is not None:
        if archive and job.output.suffix.lower() != ".pt2":
            raise ValidationError(
                f"--output {job.output}: a torch.export archive is written as .pt2"
            )
        plan_outputs(job, plan or OutputPlan([job.file], force=job.force))
    if archive:
        loaded = _load(job)
        stats = _module_stats(loaded, job.file)
    else:
        stats, container = _one_container(job)
        loaded = _load(job, container)
    if fmt is None:
        fmt = format_from_extension(job.output) if job.output else None
        fmt = fmt or stats.format
    graph = classify(loaded.module)
    batches = _batches(job)
    structure = _by_stats_name(stats, _structures(loaded, graph, job, batches))
    correction = correct_with_structure(stats, config, structure)
    if batches is not None:
        measured = _measured(loaded, graph, structure, correction, batches)
        correction = correct_with_structure(stats, config, _by_stats_name(stats, measured))
    notes = () if graph.traced else (f"note: the model could not be traced: {graph.note}",)
    written: tuple[Path, ...] = ()
    if job.output is not None:
        written = (_write(loaded, correction, job, archive, fmt),)
    meta = run_metadata("correct", _params(job, stats, config), warnings=list(correction.warnings))
    return CorrectResult(job, config, correction, fmt, written, notes, meta)


def correct_keras_file(job: CorrectJob, plan: OutputPlan | None = None) -> CorrectResult:
    """``correct`` of a ``.keras`` archive or legacy ``.h5`` model: the structure comes from
    the file's architecture JSON (:mod:`varshift.frameworks.keras.structure`; nothing runs),
    ``E[x²]`` from the BN feeding each through-linear dropout (no data path for Keras yet)."""
    from varshift.frameworks.keras.structure import layer_structures

    if job.data is not None or job.input_shape is not None:
        raise ValidationError(
            f"{job.file}: --data and --input-shape are for torch models; a Keras file is "
            "corrected from its architecture alone"
        )
    if job.rate is not None or job.layers:
        raise ValidationError(
            f"{job.file}: --rate and --layer do not apply: the dropout rates are read from the "
            "model's architecture in the file (use --exclude to leave layers alone)"
        )
    stats = select_containers(read_stats(job.file), job.keys)
    config = replace(
        _config(job), preset=resolve_preset(job.framework or stats.framework or "keras")
    )
    fmt = output_format(job.output, stats.format) if job.output else stats.format
    if job.output is not None:
        plan_outputs(job, plan or OutputPlan([job.file], force=job.force))
    structure = _by_stats_name(stats, layer_structures(job.file))
    correction = correct_with_structure(stats, config, structure)
    written: tuple[Path, ...] = ()
    if job.output is not None:
        written = (write_stats(correction.stats, job.output, fmt, force=True),)
    params = {**parameters(job, stats, config), "model": job.file.name}
    meta = run_metadata("correct", params, warnings=list(correction.warnings))
    return CorrectResult(job, config, correction, fmt, written, (), meta)


def _write(
    loaded: LoadedModel, correction: CorrectionResult, job: CorrectJob, archive: bool, fmt: str
) -> Path:
    assert job.output is not None
    if not archive:
        return write_stats(correction.stats, job.output, fmt, force=True)
    from varshift.frameworks.torch.load import checkpoint_bytes
    from varshift.frameworks.torch.structure import with_statistics

    new = {name: (layer.mean, layer.var) for name, layer in correction.stats.layers.items()}
    model = with_statistics(loaded.module, new)
    return atomic_write(job.output, checkpoint_bytes(loaded, model), force=True)
