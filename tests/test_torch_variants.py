"""``copy_model``: equal to ``copy.deepcopy`` (the oracle), whichever way it copies."""

from __future__ import annotations

import copy
from typing import Any

import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

from varshift.frameworks.torch.variants import _NotPlain, _plain_copy, copy_model  # noqa: E402


class Tied(nn.Module):
    """A user-defined class: tied weights, a shared submodule, a non-persistent buffer, a
    frozen parameter, a padding='same' convolution (whose padding is a list), attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 6, bias=False)
        self.head = nn.Linear(6, 6, bias=False)
        self.head.weight = self.embed.weight
        self.act = nn.ReLU()
        self.blocks = nn.ModuleList([nn.Sequential(nn.BatchNorm1d(6), self.act) for _ in range(2)])
        self.conv = nn.Conv1d(1, 1, 3, padding="same")
        self.scale = nn.Parameter(torch.ones(6), requires_grad=False)
        self.register_buffer("cache", torch.arange(6.0), persistent=False)
        self.width, self.label, self.dtype_ = 6, "tied", torch.float64

    def forward(self, x: Any) -> Any:
        x = self.embed(x)
        for b in self.blocks:
            x = b(x)
        x = self.conv(x[:, None])[:, 0]
        return self.head(x) * self.scale + self.cache


def _small_mlp() -> Any:
    return nn.Sequential(
        nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.3), nn.BatchNorm1d(16), nn.Linear(16, 3)
    )


def _cnn() -> Any:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout2d(0.1),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2),
    )  # fmt: skip


def _trained(model: Any, shape: tuple[int, ...]) -> Any:
    """BN buffers away from their initial values, one module left in training mode."""
    gen = torch.Generator().manual_seed(0)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(shape, generator=gen))
    model.eval()
    next(iter(model.modules())).training = True
    return model


def _tensors(model: Any) -> list[tuple[str, Any]]:
    """Every parameter and buffer with its place, shared ones listed at each place."""
    out = []
    for name, m in model.named_modules(remove_duplicate=False):
        out += [(f"{name}.{k}", t) for k, t in m._parameters.items()]
        out += [(f"{name}.{k}", t) for k, t in m._buffers.items()]
    return out


def _assert_same_as_deepcopy(model: Any, made: Any) -> None:
    oracle = copy.deepcopy(model)
    # structure: the same classes, names, modes and plain attributes at every place
    assert [(n, type(m)) for n, m in made.named_modules(remove_duplicate=False)] == [
        (n, type(m)) for n, m in oracle.named_modules(remove_duplicate=False)
    ]
    for (_, a), (_, b), (_, o) in zip(
        made.named_modules(remove_duplicate=False),
        oracle.named_modules(remove_duplicate=False),
        model.named_modules(remove_duplicate=False),
        strict=True,
    ):
        assert a is not o
        assert a.training == b.training
        assert a.__dict__.keys() == b.__dict__.keys()
        assert a._non_persistent_buffers_set == b._non_persistent_buffers_set
        for key, value in b.__dict__.items():
            if key not in ("_parameters", "_buffers", "_modules"):
                assert a.__dict__[key] == value, key
            if isinstance(value, (dict, set, list)):  # containers are new, as deepcopy's
                assert a.__dict__[key] is not o.__dict__[key], key
    # tensors: equal values, types, dtypes, strides and requires_grad; none shared with the
    # original; the same tensors shared within the copy (tied weights) as in deepcopy's
    mine, theirs, original = _tensors(made), _tensors(oracle), _tensors(model)
    assert [n for n, _ in mine] == [n for n, _ in theirs]
    for (_, a), (_, b), (_, o) in zip(mine, theirs, original, strict=True):
        assert type(a) is type(b)
        if b is None:  # e.g. a Linear without bias
            continue
        assert a.dtype == b.dtype and a.stride() == b.stride() and a.device == b.device
        assert a.requires_grad == b.requires_grad
        assert torch.equal(a, b)
        assert a.data_ptr() != o.data_ptr() or a.numel() == 0
    ids = {id(t): i for i, (_, t) in enumerate(mine) if t is not None}
    ids_oracle = {id(t): i for i, (_, t) in enumerate(theirs) if t is not None}
    assert [ids.get(id(t)) for _, t in mine] == [ids_oracle.get(id(t)) for _, t in theirs]
    shared = {id(m): i for i, m in enumerate(made.modules())}
    assert len(shared) == len({id(m) for m in oracle.modules()})


@pytest.mark.parametrize(
    ("make", "shape"),
    [(_small_mlp, (5, 8)), (_cnn, (5, 3, 6, 6)), (Tied, (5, 6))],
    ids=["mlp", "cnn", "user-class-tied"],
)
def test_plain_models_are_copied_directly_and_equal_deepcopy(make: Any, shape: Any) -> None:
    model = _trained(make(), shape)
    made = _plain_copy(model)  # raises if the direct path does not take it
    _assert_same_as_deepcopy(model, made)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    model.eval()
    made.eval()
    with torch.no_grad():
        assert torch.equal(made(x), model(x))
    # independent: changing the copy leaves the original as it was
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for t in made.state_dict().values():
            t.add_(1)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def _with_hook() -> Any:
    model = _small_mlp()
    model[3].register_forward_pre_hook(lambda m, a: None)
    return model


def _with_list_of_modules_attr() -> Any:
    model = _small_mlp()
    model.extra = [nn.ReLU()]  # a plain list attribute holding a module
    return model


def _with_tensor_attr() -> Any:
    model = _small_mlp()
    model.table = torch.ones(3)  # a tensor that is neither parameter nor buffer
    return model


def _with_view_buffer() -> Any:
    model = _small_mlp()
    model.register_buffer("part", model[3].running_var[:8])  # shares storage with a buffer
    return model


def _with_grad() -> Any:
    model = _small_mlp()
    model(torch.randn(4, 8)).sum().backward()  # parameters' grad: not part of a deepcopy
    model.register_buffer("g", torch.ones(2, requires_grad=True))
    model.g.grad = torch.ones(2)  # a buffer with a gradient: deepcopy copies it
    return model


def _traced() -> Any:
    return torch.fx.symbolic_trace(_small_mlp())


def _lazy() -> Any:
    return nn.Sequential(nn.LazyLinear(4), nn.BatchNorm1d(4))


@pytest.mark.parametrize(
    "make",
    [_with_hook, _with_list_of_modules_attr, _with_tensor_attr, _with_view_buffer, _with_grad,
     _traced, _lazy],
)  # fmt: skip
def test_anything_else_goes_through_deepcopy(make: Any) -> None:
    model = make()
    with pytest.raises(_NotPlain):
        _plain_copy(model)
    made = copy_model(model)
    oracle = copy.deepcopy(model)
    assert type(made).__qualname__ == type(oracle).__qualname__  # fx: a class per instance
    mine, theirs = made.state_dict(), oracle.state_dict()
    assert mine.keys() == theirs.keys()
    assert [type(t) for t in mine.values()] == [type(t) for t in theirs.values()]
    if make is not _lazy:  # uninitialised parameters have no values to compare
        assert all(torch.equal(a, theirs[k]) for k, a in mine.items())
    if make is _with_grad:
        assert made.g.grad is not None  # deepcopy's, kept
    if make is _with_view_buffer:  # deepcopy keeps the view a view of the copied buffer
        assert made.part.untyped_storage().data_ptr() == made[3].running_var.data_ptr()
