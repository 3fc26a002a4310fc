"""A PyTorch model's BatchNorm paths as framework-neutral records (issue 10).

:func:`layer_structures` turns a :class:`~varshift.frameworks.torch.graph.ModelGraph` into one
:class:`~varshift.core.structure.LayerStructure` per BatchNorm: the class, the nearest dropout,
the Linear/Conv weight and geometry between it and the BN, and the BN feeding the dropout
(γ, β, running statistics, eps), all as NumPy arrays. :func:`measure_dropout_inputs` adds what
a data pass measures: ``E[x²]`` of each such dropout's input per position, with dropout off
and every BN in ``eval()``, and for a channel-wise dropout the position-averaged
``Σ_c E[(W_kc ⋆ x_c)²]`` (the noise term's cross terms within a channel included).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import fx, nn
from torch.nn import functional as F

from varshift.core.structure import ConvGeometry, FeederBN, LayerStructure
from varshift.frameworks.torch.graph import BNPath, ModelGraph, batchnorm_layers
from varshift.frameworks.torch.stream import all_eval, data_pass, forward, placement

FloatArray = np.ndarray[Any, np.dtype[np.float64]]


def _np(t: torch.Tensor) -> FloatArray:
    return t.detach().to(device="cpu", dtype=torch.float64).numpy().copy()


def _padding(conv: nn.modules.conv._ConvNd) -> tuple[tuple[int, int], ...]:
    """``(before, after)`` per spatial dim, for int, tuple, ``'same'`` and ``'valid'``."""
    pad: Any = conv.padding
    dims = len(conv.kernel_size)
    if pad == "valid":
        return ((0, 0),) * dims
    if pad == "same":
        totals = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size, strict=True)]
        return tuple((t // 2, t - t // 2) for t in totals)
    return tuple((int(p), int(p)) for p in pad)


def _node(model: nn.Module, name: str) -> fx.Node | None:
    if not isinstance(model, fx.GraphModule):
        return None
    return next((n for n in model.graph.nodes if n.name == name), None)


def _attr(model: nn.Module, node: Any) -> torch.Tensor | None:
    if isinstance(node, fx.Node) and node.op == "get_attr":
        value: Any = model
        for part in str(node.target).split("."):
            value = getattr(value, part)
        return value if isinstance(value, torch.Tensor) else None
    return None


def _ints(value: Any, dims: int, default: int) -> tuple[int, ...]:
    if value is None:
        return (default,) * dims
    if isinstance(value, int):
        return (value,) * dims
    return tuple(int(v) for v in value) if len(value) == dims else (int(value[0]),) * dims


def _functional_linear(
    model: nn.Module, name: str
) -> tuple[FloatArray | None, ConvGeometry | None, fx.Node | None]:
    """Weight and geometry of an ``aten.linear``/``aten.conv*d`` node of an exported graph."""
    node = _node(model, name)
    if node is None or len(node.args) < 2:
        return None, None, None
    weight = _attr(model, node.args[1])
    if weight is None:
        return None, None, None
    if weight.ndim == 2:
        return _np(weight), None, node
    dims = weight.ndim - 2
    args: list[Any] = list(node.args) + [None] * 7
    pad = _ints(args[4], dims, 0)
    geometry = ConvGeometry(
        stride=_ints(args[3], dims, 1),
        dilation=_ints(args[5], dims, 1),
        padding=tuple((p, p) for p in pad),
        groups=int(args[6] or 1),
    )
    return _np(weight), geometry, node


def _linear_of(
    model: nn.Module, modules: Mapping[str, nn.Module], path: BNPath
) -> tuple[FloatArray | None, ConvGeometry | None, Any]:
    """The through-linear layer's weight, conv geometry (``None`` for a Linear) and handle (the
    module, or the graph node of a functional op); ``(None, None, None)`` when not covered."""
    assert path.linear is not None
    module = modules.get(path.linear.name)
    if isinstance(module, nn.Linear):
        return _np(module.weight), None, module
    if isinstance(module, nn.modules.conv._ConvNd) and not module.transposed:
        geometry = ConvGeometry(
            stride=tuple(module.stride),
            dilation=tuple(module.dilation),
            padding=_padding(module),
            groups=int(module.groups),
            padding_mode=str(module.padding_mode),
        )
        return _np(module.weight), geometry, module
    if module is None:
        return _functional_linear(model, path.linear.name)
    return None, None, None


def _feeder(bns: Mapping[str, Any], name: str | None) -> FeederBN | None:
    m = bns.get(name) if name is not None else None
    if m is None or not m.track_running_stats or m.running_var is None:
        return None
    ones = torch.ones_like(m.running_var)
    gamma = m.weight if m.weight is not None else ones
    beta = m.bias if m.bias is not None else torch.zeros_like(ones)
    return FeederBN(
        _np(gamma), _np(beta), _np(m.running_mean), _np(m.running_var), float(m.eps), str(name)
    )


def _conv_input_size(handle: Any) -> tuple[int, ...] | None:
    """Spatial input size of a functional conv, from an exported graph's recorded shapes (the
    dropout and BN modules put in by ``module_from_export`` keep shapes and record none: the
    walk goes back through them)."""
    node = handle.args[0] if isinstance(handle, fx.Node) else None
    while isinstance(node, fx.Node) and "val" not in node.meta and node.op == "call_module":
        node = node.args[0] if node.args else None
    if not isinstance(node, fx.Node):
        return None
    shape = getattr(node.meta.get("val"), "shape", None)
    try:
        return None if shape is None else tuple(int(s) for s in shape[2:])
    except TypeError:  # a symbolic size
        return None


def layer_structures(
    model: nn.Module, graph: ModelGraph, example: torch.Tensor | None = None
) -> dict[str, LayerStructure]:
    """BN name → its :class:`~varshift.core.structure.LayerStructure` (arrays copied out).

    Parameters
    ----------
    model, graph:
        The module and :func:`~varshift.frameworks.torch.graph.classify` of it.
    example:
        A batch of inputs: one forward pass in ``eval()`` records each through-linear
        convolution's input size (so its zero padding is counted); ``None``: only an exported
        graph's recorded shapes are used.
    """
    modules = dict(model.named_modules())
    bns = batchnorm_layers(model)
    linears = {
        p.layer: _linear_of(model, modules, p)
        for p in graph.layers
        if p.kind == "through-linear" and p.linear is not None
    }
    sizes = _input_sizes(model, [h for _, _, h in linears.values()], example)
    out = {}
    for p in graph.layers:
        d = p.dropout
        weight, conv = linears.get(p.layer, (None, None, None))[:2]
        if conv is not None:
            handle = linears[p.layer][2]
            conv = replace(conv, input_size=sizes.get(id(handle)) or _conv_input_size(handle))
        out[p.layer] = LayerStructure(
            layer=p.layer,
            kind=p.kind,
            dropout_kind=d.kind if d else None,
            rate=d.rate if d else None,
            channelwise=d.channelwise if d else False,
            weight=weight,
            conv=conv,
            feeder=_feeder(bns, p.feeder_bn),
            activation=p.activation,
            further_noise=p.further_noise,
            path=p.path,
        )
    return out


def _input_sizes(
    model: nn.Module, handles: Sequence[Any], example: torch.Tensor | None
) -> dict[int, tuple[int, ...]]:
    """``id(conv module)`` → spatial size of its input in one eval-mode pass of ``example``."""
    convs = [h for h in handles if isinstance(h, nn.modules.conv._ConvNd)]
    if example is None or not convs:
        return {}
    sizes: dict[int, tuple[int, ...]] = {}

    def record(module: nn.Module, args: tuple[Any, ...]) -> None:
        sizes[id(module)] = tuple(int(s) for s in args[0].shape[2:])

    hooks = [m.register_forward_pre_hook(record) for m in convs]
    try:
        with all_eval(model), torch.no_grad():
            forward(model, example, placement(model))
    finally:
        for h in hooks:
            h.remove()
    return sizes


# --- measured inputs ---------------------------------------------------------------------------


class SquareSums:
    """Streaming ``E[x²]`` over the batch dim, per channel and position: ``(C, *spatial)``."""

    def __init__(self) -> None:
        self.total: torch.Tensor | None = None
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        s = (x.detach().to(torch.float64) ** 2).sum(dim=0)
        self.total = s if self.total is None else self.total + s
        self.count += int(x.shape[0])

    def value(self) -> FloatArray | None:
        return None if self.total is None else _np(self.total / self.count)


class ChannelNoiseSums:
    """Streaming position-averaged ``Σ_c E[(W_kc ⋆ x_c)²]`` per output channel ``k``."""

    def __init__(self, conv: nn.modules.conv._ConvNd) -> None:
        self.conv = conv
        self.total: torch.Tensor | None = None
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        c = self.conv
        fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[x.ndim - 2]
        pad: Any = c.padding
        w = c.weight.detach()
        total = torch.zeros(w.shape[0], dtype=torch.float64, device=x.device)
        for i in range(x.shape[1]):
            y = fn(x[:, i : i + 1], w[:, i : i + 1], None, c.stride, pad, c.dilation)
            total += (y.to(torch.float64) ** 2).flatten(2).mean(dim=2).sum(dim=0)
        self.total = total if self.total is None else self.total + total
        self.count += int(x.shape[0])

    def value(self) -> FloatArray | None:
        return None if self.total is None else _np(self.total / self.count)


def measure_dropout_inputs(
    model: nn.Module, batches: Any, structures: Mapping[str, LayerStructure], graph: ModelGraph
) -> dict[str, LayerStructure]:
    """``structures`` with ``ex2`` (element-wise) or ``noise_sum`` (channel-wise, conv with
    ``groups=1``) measured for every through-linear layer whose dropout is a module; the
    model runs in ``eval()`` (dropout off, BN on its stored statistics)."""
    modules = dict(model.named_modules())
    probes: dict[str, nn.Module] = {}
    makers: dict[str, Any] = {}
    for p in graph.layers:
        s = structures[p.layer]
        drop = modules.get(p.dropout.name) if p.dropout else None
        lin = modules.get(p.linear.name) if p.linear else None
        if s.kind != "through-linear" or drop is None:
            continue
        if not s.channelwise:
            probes[p.layer], makers[p.layer] = drop, SquareSums
        elif isinstance(lin, nn.modules.conv._ConvNd) and lin.groups == 1 and not lin.transposed:
            probes[p.layer] = drop
            makers[p.layer] = lambda lin=lin: ChannelNoiseSums(lin)
    if not probes:
        return dict(structures)
    out = dict(structures)
    for name, probe in probes.items():  # one pass per layer keeps the accumulators apart
        with all_eval(model):
            acc, _, _ = data_pass(model, batches, {name: probe}, makers[name], stop_early=True)
        value = acc[name].value()
        field = "noise_sum" if structures[name].channelwise else "ex2"
        out[name] = replace(structures[name], **{field: value})
    return out


def with_statistics(
    model: nn.Module, stats: Mapping[str, tuple[FloatArray, FloatArray]]
) -> nn.Module:
    """A copy of ``model`` whose BatchNorms named in ``stats`` get ``(running_mean,
    running_var)``; a ``module.`` prefix (DataParallel) is ignored."""
    from varshift.frameworks.torch.variants import copy_model

    out = copy_model(model)
    bns = batchnorm_layers(out)
    with torch.no_grad():
        for name, (mean, var) in stats.items():
            m: Any = bns.get(name) or bns.get(name.removeprefix("module."))
            if m is None:
                continue
            m.running_mean.copy_(torch.from_numpy(np.asarray(mean)).to(m.running_mean))
            m.running_var.copy_(torch.from_numpy(np.asarray(var)).to(m.running_var))
    return out
