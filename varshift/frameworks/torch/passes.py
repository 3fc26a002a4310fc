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

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from varshift.core.dropout import Dropout
from varshift.core.errors import ValidationError
from varshift.frameworks.torch.data import as_batches
from varshift.frameworks.torch.flags import (
    Tolerances,
    layer_flags,
    stored_rel_se,
    tolerances,
)
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
    mode_audit,
)
from varshift.frameworks.torch.variants import (
    DEFAULT_SEED,
    copy_model,
    correct_data_free,
    first_inputs,
    seeded,
    update_bn_like,
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
#: Accumulator key prefix of a dropout whose input a through-linear prediction needs.
_PROBE = "dropout input of "

FloatArray = np.ndarray[Any, np.dtype[np.float64]]

# --- diagnose ----------------------------------------------------------------------------------


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
    model: nn.Module,
    batches: Any,
    bns: Mapping[str, BatchNorm],
    progress: Progress | None,
    seed: int,
) -> dict[str, BatchVarMean]:
    """Training mode, dropout on: what training records. BN buffers are restored afterwards;
    the masks are drawn from ``seed`` (:func:`seeded`), the global RNG is left as it was."""
    saved = _buffers(bns)
    try:
        with all_train(model), seeded(seed, model):
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
    v = np.maximum(var, 0.0)
    # shift_direct's train/test variances, evaluated on whole arrays (the same arithmetic)
    _, train_var = dropout.train_mean_var(mean, v)
    test_var = dropout.test_scale**2 * v
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.asarray(np.asarray(train_var, dtype=np.float64) / test_var, dtype=np.float64)


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


def diagnose(
    model: nn.Module,
    batches: Any,
    labels: Any = None,
    *,
    dropout_on: bool = True,
    seed: int = DEFAULT_SEED,
    train_batch_size: int | None = None,
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
    seed:
        Seed of that pass's dropout masks (so two runs agree); the caller's global RNG state is
        left as it was.
    train_batch_size:
        The batch size the model was trained with: adds the noise of the stored running
        variance (an EMA of batch variances) to the flag thresholds; without it only the data
        passes' sampling error is counted (:mod:`varshift.frameworks.torch.flags`).

    Returns
    -------
    DiagnoseResult
        One row per BN with stored, eval-mode and dropout-on statistics, the stored/eval shift
        ratio, the closed-form prediction for direct layers, and flags (``shifted``: the
        ratio lies more than ``FLAG_SE`` standard errors from 1).

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
    on = _dropout_on_pass(model, data, bns, progress, seed) if dropout_on else {}
    n_batches = next((a.batches for a in acc.values() if a.batches), 0)
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
        m = bns[name]
        tol = tolerances(
            _np(acc[name].var_rel_se()),
            _np(on[name].rel_se()) if name in on else None,
            samples,
            n_batches if name in on else 0,
            stored_rel_se(m.momentum, train_batch_size, _tracked(m)),
        )
        on_var = _np(on[name].value()) if name in on else None
        layers.append(_layer(path, m, acc[name], on_var, extra, audit, tol))
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
    tol: Tolerances,
) -> LayerDiagnosis:
    mean, var = _np(moments.mean), _np(moments.population_var())
    assert mean is not None and var is not None
    tracked = m.track_running_stats and m.running_var is not None
    stored_var = _np(m.running_var) if tracked else None
    stored_mean = _np(m.running_mean) if tracked else None
    count = m.num_batches_tracked
    return LayerDiagnosis(
        path=path,
        channels=int(mean.size),
        eps=float(m.eps),
        momentum=m.momentum,
        num_batches_tracked=None if count is None else int(count),
        stored_mean=stored_mean,
        stored_var=stored_var,
        eval_mean=mean,
        eval_var=var,
        count=moments.count,
        dropout_on_var=on_var,
        predicted_ratio=_predicted(path, mean, var, extra),
        flags=layer_flags(path, m, stored_var, var, on_var, audit, tol, stored_mean),
        shift_tol=tol.shift,
        rebake_tol=tol.rebake,
    )


def _tracked(m: Any) -> int | None:
    count = getattr(m, "num_batches_tracked", None)
    return None if count is None else int(count)


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
    seed: int = DEFAULT_SEED,
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
    seed:
        Seed of the ``update_bn`` variant's dropout masks (the global RNG is left as it was).

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
    out = copy_model(model)
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
            fixed, notes = correct_data_free(model, graph, first_inputs(data))
            warnings += notes
            scores.append(_evaluate(fixed, data, "correct (data-free)", progress))
        scores.append(_evaluate(out, data, "recalibrated", progress))
        if compare:
            scores.append(
                _evaluate(
                    update_bn_like(model, data, seed),
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
    assert after is not None and mean1 is not None
    live = after > 0  # dead channels (zero variance) have no relative difference
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = var0[live] / after[live]
    diff = 0.0  # the single-pass estimate is the final one
    if first is not final[name]:
        single = _np(first.unbiased_var())
        assert single is not None
        with np.errstate(divide="ignore", invalid="ignore"):
            rel = np.abs(single - after)[live] / after[live]
        diff = float(rel.max()) if rel.size else math.nan
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
        single_pass_diff=diff,
    )


def _has_labels(data: Any) -> bool:
    known = getattr(data, "has_labels", None)
    if known is not None:
        return bool(known)
    for _, y in data:
        return y is not None
    return False
