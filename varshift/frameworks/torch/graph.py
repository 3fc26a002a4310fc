"""Which path feeds each BatchNorm of a PyTorch model, and which formula holds there (DESIGN §5).

The graph comes from ``torch.fx.symbolic_trace`` (or from a ``torch.export`` archive turned into
modules by :func:`varshift.frameworks.torch.load.module_from_export`). Each BatchNorm gets one
class:

==============  ================================================================================
direct          the first dropout on its path feeds it directly (shape-only ops such as
                ``flatten``/``view`` may sit between); no other noise further up
through-linear  dropout → Linear/Conv → BN, no noise further up
stacked         noise further up the path (a second dropout), or a dropout reaching the BN in a
                way no closed form covers (through an activation, a residual sum, ...)
none            no dropout upstream (a dropout with rate 0 is no noise)
unknown         the model cannot be traced: structure unknown
==============  ================================================================================

Dropout kinds and rates are read from the modules: ``Dropout`` (bernoulli, element-wise),
``Dropout1d/2d/3d`` (bernoulli, one draw per sample and channel), ``AlphaDropout`` and
``FeatureAlphaDropout`` (alpha), and the functional forms (``F.dropout`` and friends).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from varshift.core.dropout import Dropout

CLASSES: tuple[str, ...] = ("direct", "through-linear", "stacked", "none", "unknown")

#: The fall-back path label of a model ``torch.fx`` cannot trace.
UNTRACEABLE = "untraceable: structure unknown"

#: Module class → (varshift dropout kind, channel-wise mask); subclasses match too.
_DROPOUT_MODULES: tuple[tuple[type[nn.Module], str, bool], ...] = (
    (nn.FeatureAlphaDropout, "alpha", True),
    (nn.AlphaDropout, "alpha", False),
    (nn.Dropout1d, "bernoulli", True),
    (nn.Dropout2d, "bernoulli", True),
    (nn.Dropout3d, "bernoulli", True),
    (nn.Dropout, "bernoulli", False),
)
#: Functional dropout (``F.dropout``, ``aten.dropout``, ...) by operator name.
_DROPOUT_FUNCTIONS: dict[str, tuple[str, bool]] = {
    "dropout": ("bernoulli", False),
    "dropout1d": ("bernoulli", True),
    "dropout2d": ("bernoulli", True),
    "dropout3d": ("bernoulli", True),
    "feature_dropout": ("bernoulli", True),
    "alpha_dropout": ("alpha", False),
    "feature_alpha_dropout": ("alpha", True),
}
_LINEAR_MODULES = (nn.Linear, nn.Bilinear, nn.modules.conv._ConvNd)
_LINEAR_FUNCTIONS = frozenset({"linear", "conv1d", "conv2d", "conv3d", "convolution", "addmm"})
#: Ops that move or reshape elements without mixing them: transparent for the classes.
_SHAPE_OPS = frozenset(
    {"flatten", "view", "reshape", "contiguous", "squeeze", "unsqueeze", "identity", "clone"}
    | {"unflatten", "_unsafe_view", "alias", "detach", "to", "float", "double", "type_as"}
)
_ACTIVATIONS = frozenset(
    {"relu", "relu6", "gelu", "silu", "tanh", "sigmoid", "elu", "leaky_relu", "leakyrelu"}
    | {"selu", "celu", "softplus", "mish", "hardswish", "hardtanh", "hardsigmoid", "prelu"}
)


#: The base class of every BatchNorm module (BatchNorm1d/2d/3d, SyncBatchNorm, lazy variants).
BatchNorm = nn.modules.batchnorm._BatchNorm


def is_batchnorm(module: nn.Module) -> bool:
    """True for BatchNorm1d/2d/3d, SyncBatchNorm and their lazy and custom subclasses."""
    return isinstance(module, BatchNorm)


def batchnorm_layers(model: nn.Module) -> dict[str, BatchNorm]:
    """Name → module of every BatchNorm in ``model``, in registration order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, BatchNorm)}


@dataclass(frozen=True)
class DropoutInfo:
    """A dropout read from the model.

    Attributes
    ----------
    name, cls:
        Module name (or graph node name of a functional dropout) and class name.
    kind:
        The varshift dropout kind: ``bernoulli`` or ``alpha``.
    rate:
        Probability of dropping (PyTorch's ``p``).
    channelwise:
        True when one draw is shared by all positions of a (sample, channel).
    """

    name: str
    cls: str
    kind: str
    rate: float
    channelwise: bool

    def as_dropout(self) -> Dropout:
        """The :class:`varshift.core.dropout.Dropout` this layer applies per element."""
        return Dropout(self.kind, self.rate)


@dataclass(frozen=True)
class ModuleRef:
    """A module (or graph op) by name and class, e.g. the Linear between a dropout and a BN."""

    name: str
    cls: str


@dataclass(frozen=True)
class BNPath:
    """The path feeding one BatchNorm and its class.

    Attributes
    ----------
    layer, cls:
        The BN's module name and class (``BatchNorm1d``, ...).
    kind:
        ``direct``, ``through-linear``, ``stacked``, ``none`` or ``unknown`` (module docstring).
    dropout:
        The nearest dropout upstream (``None`` for ``none``/``unknown``).
    linear:
        ``through-linear``: the Linear/Conv between that dropout and the BN.
    feeder_bn, activation:
        ``direct``/``through-linear``: the BN feeding the dropout (through at most one
        activation, whose op name is ``activation``), when there is one; what a data-free
        ``E[x²]`` of the dropout input needs (issue 10).
    further_noise:
        Names of the dropouts further up the path (``stacked``).
    depth:
        BatchNorms on the longest chain upstream (0: none): recalibration pass of this layer.
    path:
        A readable summary, e.g. ``fc1 → relu → drop1 → bn1``, or :data:`UNTRACEABLE`.
    """

    layer: str
    cls: str
    kind: str
    dropout: DropoutInfo | None
    linear: ModuleRef | None
    feeder_bn: str | None
    activation: str | None
    further_noise: tuple[str, ...]
    depth: int
    path: str


@dataclass(frozen=True)
class ModelGraph:
    """Every BatchNorm's :class:`BNPath`; ``traced`` False when the model could not be traced.

    ``single_call`` is True when each BN runs once per forward pass (so a data pass may stop
    after the last BN it measures); ``note`` says why tracing failed.
    """

    layers: tuple[BNPath, ...]
    traced: bool
    single_call: bool
    note: str = ""

    def by_name(self) -> dict[str, BNPath]:
        """Layer name → its path."""
        return {p.layer: p for p in self.layers}


# --- reading nodes -----------------------------------------------------------------------------


def _op_name(node: fx.Node, modules: Mapping[str, nn.Module]) -> str:
    """``relu``, ``view``, ``linear``, ``Linear`` ... of a node, lower-cased."""
    if node.op == "call_module":
        return type(modules[str(node.target)]).__name__.lower()
    if node.op == "call_method":
        return str(node.target).lower()
    if node.op == "call_function":
        target: Any = node.target
        name = getattr(target, "__name__", None) or str(target)
        if isinstance(target, torch._ops.OpOverload):
            name = target._schema.name.split("::")[-1]  # aten.relu.default → relu
        return str(name).lower().rstrip("_")
    return node.op


def _dropout_of(node: fx.Node, modules: Mapping[str, nn.Module]) -> DropoutInfo | None:
    """The dropout a node applies, or ``None`` (also for rate 0: no noise)."""
    if node.op == "call_module":
        module = modules[str(node.target)]
        for cls, kind, channelwise in _DROPOUT_MODULES:
            if isinstance(module, cls):
                rate = float(getattr(module, "p", 0.0))
                if rate <= 0.0:
                    return None
                return DropoutInfo(str(node.target), type(module).__name__, kind, rate, channelwise)
        return None
    if node.op != "call_function":
        return None
    name = _op_name(node, modules)
    if name not in _DROPOUT_FUNCTIONS:
        return None
    kind, channelwise = _DROPOUT_FUNCTIONS[name]
    p = node.kwargs.get("p", node.args[1] if len(node.args) > 1 else 0.5)
    training = node.kwargs.get("training", node.args[2] if len(node.args) > 2 else True)
    if not isinstance(p, int | float) or p <= 0.0 or training is False:
        return None
    return DropoutInfo(node.name, name, kind, float(p), channelwise)


def _main_input(node: fx.Node) -> fx.Node | None:
    """The first tensor argument of a node (the data path)."""
    for arg in node.args:
        if isinstance(arg, fx.Node):
            return arg
    return None


def _skip_shape(node: fx.Node | None, modules: Mapping[str, nn.Module]) -> fx.Node | None:
    while node is not None and _op_name(node, modules) in _SHAPE_OPS:
        node = _main_input(node)
    return node


def _is_linear(node: fx.Node, modules: Mapping[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules[str(node.target)], _LINEAR_MODULES)
    return node.op == "call_function" and _op_name(node, modules) in _LINEAR_FUNCTIONS


def _ref(node: fx.Node, modules: Mapping[str, nn.Module]) -> ModuleRef:
    if node.op == "call_module":
        return ModuleRef(str(node.target), type(modules[str(node.target)]).__name__)
    return ModuleRef(node.name, _op_name(node, modules))


def _bn_name(node: fx.Node, modules: Mapping[str, nn.Module]) -> str | None:
    if node.op == "call_module" and is_batchnorm(modules[str(node.target)]):
        return str(node.target)
    return None


def _label(node: fx.Node, modules: Mapping[str, nn.Module]) -> str:
    if node.op == "call_module":
        return f"{node.target}:{type(modules[str(node.target)]).__name__}"
    return _op_name(node, modules)


# --- classification ----------------------------------------------------------------------------


@contextmanager
def _training_mode(model: nn.Module) -> Iterator[None]:
    """Trace as in training, so functional dropout guarded by ``self.training`` shows up."""
    modes = {m: m.training for m in model.modules()}
    try:
        for m in modes:
            m.training = True
        yield
    finally:
        for m, mode in modes.items():
            m.training = mode


class _Tracer(fx.Tracer):
    """fx's tracer, keeping BatchNorm, dropout and Linear/Conv subclasses (a user's own
    ``class MyBN(nn.BatchNorm2d)``) as modules instead of tracing into them."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if is_batchnorm(m) or isinstance(m, (nn.modules.dropout._DropoutNd, *_LINEAR_MODULES)):
            return True
        return bool(super().is_leaf_module(m, module_qualified_name))


def _sequential_graph(model: nn.Module) -> fx.Graph | None:
    """The graph fx traces for a plain ``nn.Sequential`` whose children (through nested plain
    Sequentials) are all leaf modules, built directly: the input, one ``call_module`` per leaf
    in order (its target the module's first name, as fx's ``path_of_module`` gives), the
    output. ``None`` for anything else, which fx then traces. Same graph, without the trace's
    fixed cost (several ms, which a short data pass notices)."""
    if type(model) is not nn.Sequential:
        return None
    tracer = _Tracer()
    first = {id(m): name for name, m in model.named_modules()}
    leaves: list[str] = []

    def walk(seq: nn.Module) -> bool:
        for child in seq._modules.values():
            if child is None:
                continue
            if type(child) is nn.Sequential:
                if not walk(child):
                    return False
            elif tracer.is_leaf_module(child, first[id(child)]):
                leaves.append(first[id(child)])
            else:
                return False
        return True

    if not walk(model):
        return None
    graph = fx.Graph()
    x = graph.placeholder("input")
    for target in leaves:
        x = graph.call_module(target, (x,))
    graph.output(x)
    return graph


def trace_graph(model: nn.Module) -> tuple[fx.Graph | None, str]:
    """The model's fx graph (a ``GraphModule``'s own, a plain ``nn.Sequential``'s chain, else a
    symbolic trace) or the reason not."""
    if isinstance(model, fx.GraphModule):
        return model.graph, ""
    chain = _sequential_graph(model)
    if chain is not None:
        return chain, ""
    try:
        with _training_mode(model):
            return _Tracer().trace(model), ""
    except Exception as exc:  # fx raises many kinds (TraceError, TypeError, NotImplemented...)
        text = str(exc).strip().splitlines()
        return None, f"{type(exc).__name__}: {text[0] if text else ''}".strip()


def classify(model: nn.Module) -> ModelGraph:
    """Every BatchNorm of ``model`` with the path that feeds it and its class.

    Parameters
    ----------
    model:
        The module; traced with ``torch.fx.symbolic_trace`` unless it is a ``GraphModule``.

    Returns
    -------
    ModelGraph
        One :class:`BNPath` per BN module, in execution order when traced. An untraceable
        model gives class ``unknown`` and the path :data:`UNTRACEABLE` for every BN, and
        ``depth`` = registration order (one recalibration pass per BN: safe, not minimal).
    """
    modules = dict(model.named_modules())
    graph, note = trace_graph(model)
    if graph is None:
        bns = batchnorm_layers(model)
        layers = tuple(
            BNPath(name, type(m).__name__, "unknown", None, None, None, None, (), i, UNTRACEABLE)
            for i, (name, m) in enumerate(bns.items())
        )
        return ModelGraph(layers, traced=False, single_call=False, note=note)
    level: dict[fx.Node, int] = {}
    noise: dict[fx.Node, frozenset[fx.Node]] = {}  # dropout nodes among each node's ancestors
    found: dict[str, BNPath] = {}
    calls: dict[str, int] = {}
    for node in graph.nodes:
        inputs = node.all_input_nodes
        depth = max((level[n] for n in inputs), default=0)
        upstream = frozenset().union(*(noise[n] for n in inputs)) if inputs else frozenset()
        name = _bn_name(node, modules)
        level[node] = depth + (name is not None)
        noise[node] = upstream | ({node} if _dropout_of(node, modules) else set())
        if name is None:
            continue
        calls[name] = calls.get(name, 0) + 1
        if name not in found:
            found[name] = _classify_bn(node, name, depth, upstream, modules)
    # BNs defined but never called in forward keep their place at the end, class none.
    for name, m in batchnorm_layers(model).items():
        if name not in found:
            found[name] = BNPath(
                name, type(m).__name__, "none", None, None, None, None, (), 0, "not in the graph"
            )
    single = all(n == 1 for n in calls.values())
    return ModelGraph(tuple(found.values()), traced=True, single_call=single)


def _classify_bn(
    node: fx.Node,
    name: str,
    depth: int,
    upstream: frozenset[fx.Node],
    modules: Mapping[str, nn.Module],
) -> BNPath:
    cls = type(modules[name]).__name__
    x = _skip_shape(_main_input(node), modules)
    if not upstream or x is None:
        return BNPath(name, cls, "none", None, None, None, None, (), depth, _path(node, modules))
    linear = None
    source = x
    if _dropout_of(x, modules) is None and _is_linear(x, modules):
        linear = _ref(x, modules)
        source = _skip_shape(_main_input(x), modules) or x
    info = _dropout_of(source, modules)
    if info is not None:
        further = tuple(
            _dropout_name(n, modules) for n in _ordered(upstream - {source}, node.graph)
        )
        kind = "stacked" if further else ("through-linear" if linear else "direct")
        feeder, act = _feeder(source, modules)
        return BNPath(
            name, cls, kind, info, linear, feeder, act, further, depth, _path(node, modules)
        )
    # Noise reaches this BN, but not through a position a closed form covers.
    ordered = _ordered(upstream, node.graph)
    nearest = _dropout_of(ordered[-1], modules)
    rest = tuple(_dropout_name(n, modules) for n in ordered[:-1])
    return BNPath(
        name, cls, "stacked", nearest, None, None, None, rest, depth, _path(node, modules)
    )


def _ordered(nodes: frozenset[fx.Node], graph: fx.Graph) -> list[fx.Node]:
    return [n for n in graph.nodes if n in nodes]


def _dropout_name(node: fx.Node, modules: Mapping[str, nn.Module]) -> str:
    info = _dropout_of(node, modules)
    return info.name if info else node.name


def _feeder(dropout: fx.Node, modules: Mapping[str, nn.Module]) -> tuple[str | None, str | None]:
    """The BN feeding a dropout, through at most one activation: ``(bn, activation)``."""
    x = _skip_shape(_main_input(dropout), modules)
    act = None
    if x is not None and _op_name(x, modules) in _ACTIVATIONS:
        act = _op_name(x, modules)
        x = _skip_shape(_main_input(x), modules)
    bn = _bn_name(x, modules) if x is not None else None
    return bn, act


def _path(node: fx.Node, modules: Mapping[str, nn.Module], limit: int = 5) -> str:
    """``fc1:Linear → relu → drop1:Dropout → bn1:BatchNorm1d``: the data path into a BN (first
    inputs), back to the model input or ``limit`` steps."""
    chain = [_label(node, modules)]
    x = _main_input(node)
    while x is not None and x.op not in ("placeholder", "get_attr") and len(chain) < limit:
        chain.append(_label(x, modules))
        x = _main_input(x)
    else:
        if x is not None and x.op == "placeholder":
            chain.append("input")
        elif x is not None:
            chain.append("…")
    return " → ".join(reversed(chain))
