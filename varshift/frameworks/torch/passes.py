"""Data passes over a PyTorch model: measure what each BatchNorm sees, and recalibrate it.

Statistics are streamed (:mod:`varshift.frameworks.torch.stream`): memory does not grow with
the number of samples, and batches are weighted by their size (the population estimator of
fvcore's PreciseBN, here without its average-of-batch-variances approximation: the
between-batch spread of the means is included).

Recalibration "done right" (DESIGN §5): dropout off, every BatchNorm in ``eval()``, layers
estimated in topological order, each with the already recalibrated layers upstream; stored as
torch stores it: ``running_mean`` = the mean, ``running_var`` = the unbiased variance
``M2/(n - 1)`` with ``n`` the total count of elements per channel.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from varshift.core.dropout import Dropout
from varshift.core.errors import ValidationError
from varshift.core.presets import resolve_preset
from varshift.core.theory import corrected_variance, shift_direct, updates_to_forget
from varshift.frameworks.torch.data import as_batches
from varshift.frameworks.torch.graph import BatchNorm, ModelGraph, batchnorm_layers, classify
from varshift.frameworks.torch.results import (
    DiagnoseResult,
    LayerDiagnosis,
    RecalibratedLayer,
    RecalibrateResult,
    Scores,
)
from varshift.frameworks.torch.stream import (
    BatchVarMean,
    ChannelMoments,
    Progress,
    ScoreSums,
    all_eval,
    all_train,
    bn_train_only,
    data_pass,
    dropout_off,
    forward,
    mode_audit,
    placement,
)

__all__ = [
    "METHODS",
    "BatchVarMean",
    "ChannelMoments",
    "bn_train_only",
    "correct_data_free",
    "diagnose",
    "dropout_off",
    "recalibrate",
    "update_bn_like",
]

METHODS: tuple[str, ...] = ("topological", "single-pass")
#: Flag thresholds (what the table marks, not a test): a median stored/eval ratio further than
#: SHIFT_TOL from 1 is ``shifted``; stored within REBAKE_TOL of the dropout-on value then is
#: ``shift re-baked`` (what training, update_bn and PreciseBN hooks leave).
SHIFT_TOL = 0.05
REBAKE_TOL = 0.05
#: Accumulator key prefix of a dropout whose input a through-linear prediction needs.
_PROBE = "dropout input of "

FloatArray = np.ndarray[Any, np.dtype[np.float64]]

# --- diagnose ----------------------------------------------------------------------------------


def _copy(model: nn.Module) -> nn.Module:
    """A deep copy; torch's own deprecation warning from copying an exported GraphModule's
    tree specs (``LeafSpec``) is not the user's concern."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        return copy.deepcopy(model)


def _check_has_bn(model: nn.Module) -> dict[str, BatchNorm]:
    bns = batchnorm_layers(model)
    if not bns:
        raise ValidationError(
            "model has no BatchNorm layer (BatchNorm1d/2d/3d, SyncBatchNorm): nothing to diagnose"
        )
    return bns


def _np(t: torch.Tensor | None) -> np.ndarray[Any, np.dtype[np.float64]] | None:
    return None if t is None else t.detach().to(device="cpu", dtype=torch.float64).numpy().copy()


def _buffers(bns: Mapping[str, BatchNorm]) -> dict[str, dict[str, torch.Tensor]]:
    return {
        name: {k: t.detach().clone() for k, t in m.named_buffers(recurse=False) if t is not None}
        for name, m in bns.items()
    }


def _restore(bns: Mapping[str, BatchNorm], saved: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
    with torch.no_grad():
        for name, m in bns.items():
            for key, t in m.named_buffers(recurse=False):
                if t is not None:
                    t.copy_(saved[name][key])


def _dropout_on_pass(
    model: nn.Module, batches: Any, bns: Mapping[str, BatchNorm], progress: Progress | None
) -> dict[str, BatchVarMean]:
    """Training mode, dropout on: what training records. BN buffers are restored afterwards."""
    saved = _buffers(bns)
    try:
        with all_train(model):
            acc, _, _ = data_pass(
                model, batches, bns, BatchVarMean, progress=progress, label="dropout on"
            )
    finally:
        _restore(bns, saved)
    return acc


def _predicted(
    path: Any, mean: FloatArray, var: FloatArray, extra: FloatArray | None
) -> FloatArray | None:
    """Closed-form stored/eval variance ratio per channel where one exists.

    Direct: case (a) (Li et al. eq. 4–6), ``Var_train / Var_test`` of :func:`shift_direct`
    with the measured eval-mode mean and variance of the dropout output, which the BN sees.
    Through-linear (element-wise dropout → ``nn.Linear``): ``(v + extra) / v`` with the
    dropout term ``extra_k = (kappa - 1) sum_j W_kj² E[x_j²]`` (DESIGN §5), ``E[x²]`` of the
    dropout input measured in the same pass.
    """
    if path.kind == "through-linear" and extra is not None:
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.asarray((var + extra) / var, dtype=np.float64)
    if path.kind != "direct" or path.dropout is None:
        return None
    dropout = path.dropout.as_dropout()
    return np.array(
        [
            shift_direct(float(c), max(float(v), 0.0), dropout).inverse_ratio
            for c, v in zip(mean, var, strict=True)
        ]
    )


def _linear_probes(model: nn.Module, graph: ModelGraph) -> dict[str, tuple[nn.Module, Any]]:
    """Through-linear layers with an element-wise bernoulli dropout and an ``nn.Linear``:
    BN name → (the dropout module, whose input is measured, and the Linear)."""
    modules = dict(model.named_modules())
    out = {}
    for path in graph.layers:
        d, lin = path.dropout, path.linear
        if path.kind != "through-linear" or d is None or lin is None:
            continue
        dropout, linear = modules.get(d.name), modules.get(lin.name)
        if d.kind == "bernoulli" and not d.channelwise and isinstance(linear, nn.Linear):
            assert dropout is not None
            out[path.layer] = (dropout, linear)
    return out


def _dropout_term(probe: tuple[nn.Module, Any], moments: ChannelMoments, rate: float) -> Any:
    """``(kappa - 1) W² E[x²]`` per output of the Linear, or ``None`` if shapes disagree."""
    _, linear = probe
    if moments.mean is None or moments.mean.numel() != linear.in_features:
        return None
    ex2 = moments.population_var() + moments.mean**2
    weight = linear.weight.detach().to(device=ex2.device, dtype=torch.float64)
    kappa = Dropout("bernoulli", rate).kappa
    return _np((kappa - 1.0) * (weight**2 @ ex2))


def _flags(
    path: Any, m: Any, stored_var: Any, eval_var: Any, on_var: Any, audit: tuple[str, ...]
) -> tuple[str, ...]:
    flags: list[str] = []
    if not m.track_running_stats:
        return ("track_running_stats=False: batch statistics at test time",)
    tracked = m.num_batches_tracked
    count = None if tracked is None else int(tracked)
    if bool((m.running_mean == 0).all()) and bool((m.running_var == 1).all()):
        flags.append("initial values")
    elif count is not None and m.momentum is not None:
        needed = updates_to_forget(resolve_preset("torch", float(m.momentum)))
        if needed is not None and count < needed:
            flags.append(f"unconverged ({count} < {needed} updates)")
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = float(np.nanmedian(stored_var / eval_var))
        if abs(ratio - 1.0) > SHIFT_TOL:
            flags.append("shifted")
            if on_var is not None and path.dropout is not None:
                rebaked = float(np.nanmedian(stored_var / on_var))
                if abs(rebaked - 1.0) <= REBAKE_TOL:
                    flags.append("shift re-baked")
    dead = int(np.sum(eval_var < m.eps))
    if dead:
        flags.append(f"{dead} dead channel(s)")
    if path.layer in audit or (path.dropout is not None and path.dropout.name in audit):
        flags.append("mode audit: training in eval()")
    return tuple(flags)


def diagnose(
    model: nn.Module,
    batches: Any,
    labels: Any = None,
    *,
    dropout_on: bool = True,
    progress: Progress | None = None,
) -> DiagnoseResult:
    """Measure what every BatchNorm of ``model`` sees at test time, beside what it stored.

    Parameters
    ----------
    model:
        The model; its parameters, buffers and modes are left as they were.
    batches:
        A :class:`~varshift.frameworks.torch.load.Batches`, a tensor of inputs, or an iterable
        of batches (tensors or ``(x, y)`` pairs, e.g. a ``DataLoader``); read once per pass.
    labels:
        Class indices for a tensor of inputs (batches may carry their own): adds accuracy,
        NLL and ECE of the model as saved (the model must return logits).
    dropout_on:
        Also run the training-mode pass (dropout on, BN on batch statistics; running buffers
        restored afterwards) that gives ``dropout_on_var``; False halves the cost.

    Returns
    -------
    DiagnoseResult
        One row per BN with stored, eval-mode and dropout-on statistics, the stored/eval shift
        ratio, the closed-form prediction for direct layers, and flags.

    Raises
    ------
    ValidationError
        No BatchNorm, empty or malformed data, or a batch the model rejects.
    """
    bns = _check_has_bn(model)
    data = as_batches(batches, labels)
    graph = classify(model)
    audit = mode_audit(model)
    probes = _linear_probes(model, graph)
    measure: dict[str, nn.Module] = {**bns, **{f"{_PROBE}{n}": p[0] for n, p in probes.items()}}
    sums = ScoreSums()
    with all_eval(model):
        acc, order, samples = data_pass(
            model, data, measure, ChannelMoments, scores=sums, progress=progress, label="eval"
        )
    on = _dropout_on_pass(model, data, bns, progress) if dropout_on else {}
    paths = graph.by_name()
    names = [n for n in order if n in bns] + [n for n in bns if n not in order]
    if graph.traced:
        names = [p.layer for p in graph.layers if p.layer in bns]
    layers = []
    for name in names:
        if acc[name].mean is None:
            continue  # never called in forward
        path = paths[name]
        extra = None
        if name in probes and path.dropout is not None:
            extra = _dropout_term(probes[name], acc[f"{_PROBE}{name}"], path.dropout.rate)
        on_var = _np(on[name].value()) if name in on else None
        layers.append(_layer(path, bns[name], acc[name], on_var, extra, audit))
    warnings = _graph_warnings(graph) + tuple(
        f"{n}: still in training mode after model.eval()" for n in audit
    )
    scored = sums.scores("as saved") if sums.n else None
    return DiagnoseResult(
        tuple(layers), scored, graph, audit, samples, _count_batches(data), warnings
    )


def _layer(
    path: Any,
    m: Any,
    moments: ChannelMoments,
    on_var: FloatArray | None,
    extra: FloatArray | None,
    audit: tuple[str, ...],
) -> LayerDiagnosis:
    mean, var = _np(moments.mean), _np(moments.population_var())
    assert mean is not None and var is not None
    tracked = m.track_running_stats and m.running_var is not None
    stored_var = _np(m.running_var) if tracked else None
    count = m.num_batches_tracked
    return LayerDiagnosis(
        path=path,
        channels=int(mean.size),
        eps=float(m.eps),
        momentum=m.momentum,
        num_batches_tracked=None if count is None else int(count),
        stored_mean=_np(m.running_mean) if tracked else None,
        stored_var=stored_var,
        eval_mean=mean,
        eval_var=var,
        count=moments.count,
        dropout_on_var=on_var,
        predicted_ratio=_predicted(path, mean, var, extra),
        flags=_flags(path, m, stored_var, var, on_var, audit),
    )


def _count_batches(data: Any) -> int:
    if getattr(data, "inputs", None) is not None:
        n = -(-int(data.inputs.shape[0]) // int(data.batch_size))
        return n if data.max_batches is None else min(n, int(data.max_batches))
    return -1


def _graph_warnings(graph: ModelGraph) -> tuple[str, ...]:
    if graph.traced:
        return ()
    return (
        f"model cannot be traced ({graph.note}): structure unknown, every layer reported as "
        "'unknown'",
    )


# --- recalibrate -------------------------------------------------------------------------------


def _store(m: Any, moments: ChannelMoments) -> None:
    """Write the population mean and the unbiased variance as torch stores them."""
    assert moments.mean is not None
    with torch.no_grad():
        m.running_mean.copy_(moments.mean.to(m.running_mean))
        m.running_var.copy_(moments.unbiased_var().to(m.running_var))


def _estimate(
    model: nn.Module,
    data: Any,
    bns: Mapping[str, BatchNorm],
    graph: ModelGraph,
    method: str,
    progress: Progress | None,
) -> tuple[dict[str, ChannelMoments], dict[str, ChannelMoments], dict[str, int], int]:
    """``(final moments, single-pass moments, depth by layer, passes)``; stores as it goes.

    The first pass measures every layer with the stored statistics upstream: the single-pass
    estimate, and already exact for depth-0 layers. Each further depth gets one pass (which
    stops at its last layer when every BN runs once per forward).
    """
    with all_eval(model):
        first, order, _ = data_pass(
            model, data, bns, ChannelMoments, progress=progress, label="pass 1"
        )
        missing = [n for n in bns if first[n].mean is None]
        if missing:
            raise ValidationError(
                f"BatchNorm layer(s) {', '.join(missing)} never run in forward: "
                "cannot recalibrate them"
            )
        if graph.traced:
            depth = {p.layer: p.depth for p in graph.layers if p.layer in bns}
        else:  # call order is a topological order; one pass per layer is safe
            depth = {name: i for i, name in enumerate(order)}
        final = dict(first)
        levels = sorted(set(depth.values()))
        if method == "single-pass":
            for name, m in bns.items():
                _store(m, first[name])
            return final, first, depth, 1
        for name in (n for n in bns if depth[n] == levels[0]):
            _store(bns[name], first[name])
        for k, level in enumerate(levels[1:], start=2):
            targets = {n: bns[n] for n in bns if depth[n] == level}
            acc, _, _ = data_pass(
                model,
                data,
                targets,
                ChannelMoments,
                stop_early=graph.traced and graph.single_call,
                progress=progress,
                label=f"pass {k}",
            )
            for name, m in targets.items():
                _store(m, acc[name])
                final[name] = acc[name]
    return final, first, depth, len(levels)


def correct_data_free(
    model: nn.Module, graph: ModelGraph, example: torch.Tensor | None = None
) -> tuple[nn.Module, tuple[str, ...]]:
    """A copy corrected as ``varshift correct --model`` would, data-free, by BN class: direct
    layers get the debiased direct formula, element-wise through-linear layers lose the
    dropout term with the Gaussian ``E[x²]`` of the feeding BN, every other layer (stacked,
    channel-wise, none) is left. ``example`` (a batch) gives the convolutions' input sizes.
    Channels that come out ≤ 0 are set to the layer's eps, with a note."""
    from varshift.core.structure import dropout_term, gaussian_second_moment
    from varshift.frameworks.torch.structure import layer_structures

    out = _copy(model)
    bns = batchnorm_layers(out)
    buffers = [m.running_mean for m in bns.values() if m.running_mean is not None]
    if example is not None and buffers:
        example = example.to(buffers[0].device)
    structures = layer_structures(out, graph, example)
    preset = resolve_preset("torch")
    notes = []
    for path in graph.layers:
        m: Any = bns.get(path.layer)
        s = structures.get(path.layer)
        if m is None or path.dropout is None or s is None or not m.track_running_stats:
            continue
        stored_mean, stored_var = _np(m.running_mean), _np(m.running_var)
        assert stored_mean is not None and stored_var is not None
        if s.kind == "direct":
            dropout = Dropout(path.dropout.kind, path.dropout.rate)
            mean, var = corrected_variance(stored_mean, stored_var, dropout, preset)
        elif (
            s.kind == "through-linear"
            and s.dropout_kind == "bernoulli"
            and not s.channelwise
            and s.weight is not None
            and s.feeder is not None
            and s.rate is not None
        ):
            try:
                ex2 = gaussian_second_moment(s.activation, *s.feeder.output_moments())
                term = dropout_term(s.weight, ex2, s.rate, s.conv, s.layout)
            except (ValueError, ValidationError):
                continue
            if term.shape != stored_var.shape:
                continue
            mean, var = stored_mean, stored_var - term
        else:
            continue
        bad = ~(var > 0)
        if bad.any():
            notes.append(f"correct: {path.layer}: {int(bad.sum())} channel(s) ≤ 0 set to eps")
        var = np.where(bad, m.eps, var)
        with torch.no_grad():
            m.running_mean.copy_(torch.from_numpy(np.asarray(mean)).to(m.running_mean))
            m.running_var.copy_(torch.from_numpy(np.asarray(var)).to(m.running_var))
    return out, tuple(notes)


def _first_inputs(data: Any) -> torch.Tensor | None:
    """The first batch's inputs (two samples), for the convolutions' input sizes."""
    for x, _ in data:
        return x[:2] if isinstance(x, torch.Tensor) else None
    return None


def update_bn_like(model: nn.Module, batches: Any) -> nn.Module:
    """A copy recalibrated as ``torch.optim.swa_utils.update_bn`` does: statistics reset,
    ``momentum=None`` (cumulative average of unbiased batch variances), every module in
    training mode — dropout **on**, so the shift is recorded again."""
    out = _copy(model)
    bns = batchnorm_layers(out)
    momenta = {}
    for name, m in bns.items():
        if m.track_running_stats:
            m.reset_running_stats()
            momenta[name] = m.momentum
            m.momentum = None
    with all_train(out), torch.no_grad():
        place = placement(out)
        for x, _ in batches:
            forward(out, x, place)
    for name, momentum in momenta.items():
        bns[name].momentum = momentum
    return out


def _evaluate(model: nn.Module, data: Any, variant: str, progress: Progress | None) -> Scores:
    sums = ScoreSums()
    with all_eval(model):
        data_pass(model, data, {}, ChannelMoments, scores=sums, progress=progress, label=variant)
    return sums.scores(variant)


def recalibrate(
    model: nn.Module,
    batches: Any,
    labels: Any = None,
    *,
    method: str = "topological",
    compare: bool = True,
    progress: Progress | None = None,
) -> RecalibrateResult:
    """Re-estimate every BatchNorm's running statistics from data with dropout off.

    Parameters
    ----------
    model:
        The model; left unchanged (a copy is recalibrated and returned in the result).
    batches, labels:
        As for :func:`diagnose`.
    method:
        ``topological`` (exact: one pass per BN depth, each with the recalibrated layers
        upstream) or ``single-pass`` (every layer from one pass with the stored statistics
        upstream, PreciseBN-style; the largest difference to the topological estimate is
        only known when ``topological`` runs, whose first pass is this one).
    compare:
        With labels, also score the data-free ``correct`` and the ``update_bn`` variants.

    Returns
    -------
    RecalibrateResult
        Per-layer before/after, the before/after scores with labels, the recalibrated copy.

    Notes
    -----
    Only ``running_mean`` and ``running_var`` change (``num_batches_tracked`` is kept), so the
    copy's state dict loads into the original architecture with ``strict=True``. The stored
    variance is unbiased, ``M2/(n-1)`` over all ``n`` elements of a channel in the pass.
    """
    if method not in METHODS:
        raise ValidationError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    _check_has_bn(model)
    data = as_batches(batches, labels)
    graph = classify(model)
    out = _copy(model)
    bns_all = batchnorm_layers(out)
    bns = {n: m for n, m in bns_all.items() if m.track_running_stats and m.running_var is not None}
    if not bns:
        raise ValidationError(
            "model has no BatchNorm layer with running statistics "
            "(track_running_stats=False everywhere)"
        )
    before = {n: (_np(m.running_mean), _np(m.running_var)) for n, m in bns.items()}
    final, first, depth, passes = _estimate(out, data, bns, graph, method, progress)
    paths = graph.by_name()
    layers = [
        _recalibrated_row(name, m, paths[name], before.get(name), first.get(name), final, depth)
        for name, m in bns_all.items()
    ]
    scores: list[Scores] = []
    warnings = list(_graph_warnings(graph))
    if _has_labels(data):
        scores.append(_evaluate(model, data, "as saved", progress))
        if compare:
            fixed, notes = correct_data_free(model, graph, _first_inputs(data))
            warnings += notes
            scores.append(_evaluate(fixed, data, "correct (data-free)", progress))
        scores.append(_evaluate(out, data, "recalibrated", progress))
        if compare:
            scores.append(
                _evaluate(
                    update_bn_like(model, data),
                    data,
                    "recalibrated, dropout on (update_bn)",
                    progress,
                )
            )
    return RecalibrateResult(
        tuple(layers), tuple(scores), out, graph, method, passes, tuple(warnings)
    )


def _recalibrated_row(
    name: str,
    m: BatchNorm,
    path: Any,
    before: tuple[Any, Any] | None,
    first: ChannelMoments | None,
    final: Mapping[str, ChannelMoments],
    depth: Mapping[str, int],
) -> RecalibratedLayer:
    if before is None or first is None:
        nan = math.nan
        action = "batch statistics: nothing stored"
        channels = int(m.num_features)
        return RecalibratedLayer(name, path.kind, path.depth, channels, 0, action, *[nan] * 6)
    mean0, var0 = before
    after = _np(m.running_var)
    mean1 = _np(m.running_mean)
    single = _np(first.unbiased_var())
    assert after is not None and mean1 is not None and single is not None
    live = after > 0  # dead channels (zero variance) have no relative difference
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.abs(single - after)[live] / after[live]
        ratio = var0[live] / after[live]
    same = first is final[name]
    return RecalibratedLayer(
        layer=name,
        kind=path.kind,
        depth=depth[name],
        channels=int(after.size),
        count=final[name].count,
        action="recalibrated",
        mean_before=float(mean0.mean()),
        mean_after=float(mean1.mean()),
        var_before=float(var0.mean()),
        var_after=float(after.mean()),
        ratio_before=float(np.median(ratio)) if ratio.size else math.nan,
        single_pass_diff=0.0 if same else (float(rel.max()) if rel.size else math.nan),
    )


def _has_labels(data: Any) -> bool:
    known = getattr(data, "has_labels", None)
    if known is not None:
        return bool(known)
    for _, y in data:
        return y is not None
    return False
