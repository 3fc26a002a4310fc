"""The path feeding each BatchNorm and its class (DESIGN §5), against the architecture."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.torch
torch = pytest.importorskip("torch")

from varshift.frameworks.torch.graph import UNTRACEABLE, ModuleRef, classify  # noqa: E402

nn = torch.nn
BATCH = ({0: torch.export.Dim("batch")},)  # export with a free batch size
F = torch.nn.functional


def kinds(model: Any) -> dict[str, str]:
    return {p.layer: p.kind for p in classify(model).layers}


def test_stacked_net_direct_then_stacked() -> None:
    from tests._digits import stacked_net

    graph = classify(stacked_net(0.3))
    first, second = graph.layers
    assert graph.traced and graph.single_call
    assert (first.layer, first.kind, first.depth) == ("3", "direct", 0)
    assert first.dropout is not None and first.dropout.name == "2"
    assert (first.dropout.cls, first.dropout.kind, first.dropout.rate) == (
        "Dropout",
        "bernoulli",
        0.3,
    )
    assert first.activation == "relu" and first.feeder_bn is None
    assert (second.layer, second.kind, second.depth) == ("7", "stacked", 1)
    assert second.dropout is not None and second.dropout.name == "6"
    assert second.further_noise == ("2",)
    assert second.path.endswith("5:ReLU → 6:Dropout → 7:BatchNorm1d")


def test_linear_net_none_then_through_linear() -> None:
    from tests._digits import linear_net

    first, second = classify(linear_net()).layers
    assert (first.layer, first.kind, first.dropout) == ("1", "none", None)
    assert (second.layer, second.kind, second.depth) == ("5", "through-linear", 1)
    assert second.linear == ModuleRef("4", "Linear")
    assert second.dropout is not None and second.dropout.name == "3"
    # What a data-free E[x²] of the dropout input needs (issue 10): the BN and activation.
    assert (second.feeder_bn, second.activation) == ("1", "relu")


def test_conv_net_with_channel_dropout_is_through_linear() -> None:
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Dropout2d(0.2),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.BatchNorm2d(4),
    )
    first, second = classify(net).layers
    assert first.kind == "none"
    assert second.kind == "through-linear" and second.linear == ModuleRef("4", "Conv2d")
    assert second.dropout is not None and second.dropout.channelwise
    assert second.dropout.cls == "Dropout2d"


@pytest.mark.parametrize(
    ("dropout", "kind", "channelwise"),
    [
        (nn.Dropout(0.2), "bernoulli", False),
        (nn.Dropout1d(0.2), "bernoulli", True),
        (nn.Dropout3d(0.2), "bernoulli", True),
        (nn.AlphaDropout(0.2), "alpha", False),
        (nn.FeatureAlphaDropout(0.2), "alpha", True),
    ],
)
def test_dropout_kinds_are_read_from_the_modules(
    dropout: Any, kind: str, channelwise: bool
) -> None:
    (path,) = classify(nn.Sequential(nn.Linear(3, 4), dropout, nn.BatchNorm1d(4))).layers
    assert path.kind == "direct" and path.dropout is not None
    assert (path.dropout.kind, path.dropout.rate, path.dropout.channelwise) == (
        kind,
        0.2,
        channelwise,
    )
    assert path.dropout.cls == type(dropout).__name__


def test_rate_zero_is_no_noise() -> None:
    assert kinds(nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.0), nn.BatchNorm1d(4))) == {
        "2": "none"
    }


def test_dropout_through_an_activation_or_a_residual_sum_is_stacked() -> None:
    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.drop = nn.Dropout(0.5)
            self.bn = nn.BatchNorm1d(4)
            self.bn2 = nn.BatchNorm1d(4)

        def forward(self, x: Any) -> Any:
            y = self.bn(self.drop(self.fc(x)) + x)
            return self.bn2(torch.relu(self.drop(y)))

    paths = classify(Residual()).by_name()
    assert paths["bn"].kind == "stacked" and paths["bn"].further_noise == ()
    assert paths["bn"].dropout is not None and paths["bn"].dropout.name == "drop"
    assert paths["bn2"].kind == "stacked"  # dropout → relu → BN: no closed form


def test_functional_dropout_behind_a_view_is_direct() -> None:
    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm1d(4)

        def forward(self, x: Any) -> Any:
            return self.bn(F.dropout(x, 0.25, self.training).view(-1, 4))

    (path,) = classify(Functional().eval()).layers
    assert path.kind == "direct" and path.dropout is not None and path.dropout.rate == 0.25


def test_untraceable_model_gets_the_fallback_label() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.drop = nn.Dropout(0.5)
            self.bn = nn.BatchNorm1d(4)

        def forward(self, x: Any) -> Any:
            if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
                x = 2 * x
            return self.bn(self.drop(x))

    graph = classify(Branchy())
    assert not graph.traced and "TraceError" in graph.note
    (path,) = graph.layers
    assert (path.kind, path.path) == ("unknown", UNTRACEABLE)


def test_sync_batchnorm_is_a_batchnorm() -> None:
    net = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.1), nn.SyncBatchNorm(4))
    assert kinds(net) == {"2": "direct"}


def test_exported_archive_gives_the_same_classes(tmp_path: Path) -> None:
    from tests._digits import linear_net, stacked_net
    from varshift.frameworks.torch.load import load_model

    for factory in (stacked_net, linear_net):
        net = factory().eval()
        program = torch.export.export(net, (torch.randn(8, 64),), dynamic_shapes=BATCH)
        torch.export.save(program, tmp_path / "net.pt2")
        loaded = load_model(tmp_path / "net.pt2")
        assert not loaded.runs_code
        assert kinds(loaded.module) == kinds(net)
        assert sorted(loaded.module.state_dict()) == sorted(net.state_dict())


def _sequentials() -> list[Any]:
    """Plain nn.Sequential nets: the test nets, nested containers, a module used twice."""
    from tests._digits import linear_net, stacked_net
    from tests._graph_nets import conv_net, head_net

    shared = nn.Dropout(0.2)
    return [
        stacked_net(0.3),
        linear_net(0.5),
        conv_net(0.5),
        conv_net(0.2, channelwise=True),
        head_net(0.5),
        nn.Sequential(
            nn.Linear(4, 4), nn.Sequential(nn.ReLU(), nn.Dropout(0.1)), nn.BatchNorm1d(4)
        ),
        nn.Sequential(nn.Linear(4, 4), shared, nn.BatchNorm1d(4), shared, nn.BatchNorm1d(4)),
    ]


@pytest.mark.parametrize("index", range(7))
def test_sequential_chain_is_the_graph_fx_traces(
    index: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the direct chain of a plain Sequential against fx's own trace of the same net: the same
    # nodes (op, target, name, arguments) and the same classification
    from varshift.frameworks.torch import graph as g

    net = _sequentials()[index]
    chain = g._sequential_graph(net)
    assert chain is not None
    with g._training_mode(net):
        traced = g._Tracer().trace(net)

    def nodes(graph: Any) -> list[tuple[str, str, str, tuple[str, ...]]]:
        return [(n.op, str(n.target), n.name, tuple(map(str, n.args))) for n in graph.nodes]

    assert nodes(chain) == nodes(traced)
    fast = classify(net)
    monkeypatch.setattr(g, "_sequential_graph", lambda model: None)  # fx traces it
    assert classify(net) == fast


def test_other_containers_are_traced_by_fx() -> None:
    from varshift.frameworks.torch import graph as g

    class Block(nn.Module):  # a user's module: fx traces into it
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: Any) -> Any:
            return F.relu(self.fc(x)) + x

    class MySequential(nn.Sequential):
        pass

    assert g._sequential_graph(nn.Sequential(Block(), nn.BatchNorm1d(4))) is None
    assert g._sequential_graph(MySequential(nn.Linear(4, 4), nn.BatchNorm1d(4))) is None
    assert classify(nn.Sequential(Block(), nn.Dropout(0.2), nn.BatchNorm1d(4))).traced
