"""diagnose and recalibrate on the trained digits nets, against independent hand-written loops.

Tolerances: float64 arithmetic (1e-6 relative) for exact quantities; for a variance measured on
independent samples, the delta-method standard error of a sample variance,
``sd(log s²) ≈ sqrt((k - 1)/n)`` with ``k`` the channel's kurtosis (``Var[s²] ≈ (mu4 -
sigma⁴)/n``, DESIGN §2), measured from the data in the test.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import pytest

pytestmark = pytest.mark.torch
torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

from tests._digits import digits, linear_net, stacked_net, trained  # noqa: E402
from varshift.core.errors import ValidationError  # noqa: E402
from varshift.frameworks.torch.data import as_batches  # noqa: E402
from varshift.frameworks.torch.passes import (  # noqa: E402
    bn_train_only,
    diagnose,
    dropout_off,
    recalibrate,
    update_bn_like,
)

nn = torch.nn
BN_ORDER = {"stacked": ["3", "7"], "linear": ["1", "5"]}
Z = 4.0


def bn_inputs(net: Any, name: str, x: Any) -> np.ndarray:
    """Everything BN ``name`` sees at test time (eval, dropout off), as float64 (N, C)."""
    seen: list[Any] = []
    bn = dict(net.named_modules())[name]
    handle = bn.register_forward_hook(lambda m, args, out: seen.append(args[0].detach()))
    net.eval()
    with torch.no_grad():
        for chunk in x.split(100):
            net(chunk)
    handle.remove()
    return torch.cat(seen).double().numpy()


def hand_recalibrate(net: Any, x: Any, order: list[str], topological: bool) -> Any:
    """The oracle: all inputs concatenated, numpy mean and var(ddof=1), layer by layer."""
    out = copy.deepcopy(net).eval()
    measured = out if topological else copy.deepcopy(net).eval()
    for name in order:
        z = bn_inputs(measured, name, x)
        bn = dict(out.named_modules())[name]
        with torch.no_grad():
            bn.running_mean.copy_(torch.from_numpy(z.mean(axis=0)))
            bn.running_var.copy_(torch.from_numpy(z.var(axis=0, ddof=1)))
    return out


def halves() -> tuple[Any, Any]:
    x, _ = digits()
    order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(2))
    return x[order[:900]], x[order[900:]]


def log_ratio_and_se(net: Any, name: str, stored_var: Any, n_stored: int, b: Any) -> Any:
    """Per live channel: log(stored population variance / variance on ``b``) and its sd."""
    z = bn_inputs(net, name, b)
    var_b = z.var(axis=0)
    stored_pop = np.asarray(stored_var, dtype=np.float64) * (n_stored - 1) / n_stored
    live = (var_b > 0) & (stored_pop > 0)  # a dead channel has no ratio
    z, var_b, stored_pop = z[:, live], var_b[live], stored_pop[live]
    kurt = ((z - z.mean(axis=0)) ** 4).mean(axis=0) / var_b**2
    se = np.sqrt((kurt - 1) / n_stored + (kurt - 1) / z.shape[0])
    return np.log(stored_pop / var_b), se


@pytest.mark.parametrize("name", ["stacked", "linear"])
@pytest.mark.parametrize("method", ["topological", "single-pass"])
def test_recalibrated_statistics_equal_a_hand_written_loop(name: str, method: str) -> None:
    net = trained(name).double()
    x, _ = digits()
    x = x.double()
    result = recalibrate(net, x, method=method)
    oracle = hand_recalibrate(net, x, BN_ORDER[name], topological=method == "topological")
    got, want = result.model.state_dict(), oracle.state_dict()
    for layer in BN_ORDER[name]:
        for key in ("running_mean", "running_var"):
            np.testing.assert_allclose(got[f"{layer}.{key}"], want[f"{layer}.{key}"], rtol=1e-6)
    assert result.passes == (2 if method == "topological" else 1)
    # Only the BN buffers changed, and the result loads strictly into the architecture.
    before = net.state_dict()
    changed = {k for k in got if not torch.equal(got[k], before[k])}
    assert changed == {f"{n}.{k}" for n in BN_ORDER[name] for k in ("running_mean", "running_var")}
    fresh = (stacked_net if name == "stacked" else linear_net)().double()
    fresh.load_state_dict(result.model.state_dict(), strict=True)


def test_single_pass_differs_from_topological_downstream_and_says_so() -> None:
    net = trained("stacked")
    x, _ = digits()
    result = recalibrate(net, x)
    first, second = result.layers
    assert first.single_pass_diff == 0.0  # depth 0: its first-pass estimate is final
    single = recalibrate(net, x, method="single-pass").model.state_dict()["7.running_var"]
    topo = result.model.state_dict()["7.running_var"]
    live = topo > 0
    rel = ((single - topo).abs()[live] / topo[live]).max().item()
    assert second.single_pass_diff == pytest.approx(rel, rel=1e-5)
    assert rel > 0.1  # BN 3's statistics moved a lot, so BN 7's input changed


@pytest.mark.parametrize("name", ["stacked", "linear"])
def test_after_recalibrate_the_ratio_is_one_within_sampling_error(name: str) -> None:
    a, b = halves()
    result = recalibrate(trained(name), a)
    fixed = result.model
    report = diagnose(fixed, b, dropout_on=False)
    for layer, row in zip(report.layers, result.layers, strict=True):
        stored = fixed.state_dict()[f"{row.layer}.running_var"]
        log_ratio, se = log_ratio_and_se(fixed, row.layer, stored, a.shape[0], b)
        assert np.all(np.abs(log_ratio) <= Z * se), (row.layer, np.abs(log_ratio) / se)
        # The reported ratio is the same measurement.
        assert layer.stored_var is not None
        np.testing.assert_allclose(layer.stored_var, stored.double().numpy())


@pytest.mark.parametrize("name", ["stacked", "linear"])
def test_update_bn_with_dropout_on_stays_shifted(name: str) -> None:
    a, b = halves()
    net = trained(name)
    torch.manual_seed(5)
    on = copy.deepcopy(net)
    torch.optim.swa_utils.update_bn(list(a.split(256)), on)
    mirror = update_bn_like(net, as_batches(a), seed=5)  # the same masks: torch seeded with 5
    for key, value in on.state_dict().items():  # our mirror is what update_bn does
        np.testing.assert_allclose(mirror.state_dict()[key], value, rtol=1e-6)
    kinds = {p.layer: p.kind for p in diagnose(net, b, dropout_on=False).graph.layers}
    for layer in BN_ORDER[name]:
        stored = on.eval().state_dict()[f"{layer}.running_var"]
        log_ratio, se = log_ratio_and_se(on, layer, stored, a.shape[0], b)
        z = log_ratio / se
        # The median of n standard normal z-scores has sd sqrt(pi/(2n)).
        band = Z * math.sqrt(math.pi / (2 * z.size))
        if kinds[layer] == "none":
            assert abs(np.median(z)) < band
        else:  # the dropout noise is recorded again
            assert np.median(z) > band, (layer, kinds[layer])


def test_diagnose_rows_against_the_model_and_arithmetic() -> None:
    net = trained("stacked")
    x, y = digits()
    modes = [m.training for m in net.modules()]
    state = {k: v.clone() for k, v in net.state_dict().items()}
    report = diagnose(net, x, y)
    # The model is left as it was (buffers and modes), even after the dropout-on pass.
    assert [m.training for m in net.modules()] == modes
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in state.items())
    direct, stacked = report.layers
    assert (direct.path.kind, stacked.path.kind) == ("direct", "stacked")
    z = bn_inputs(net, "3", x)
    np.testing.assert_allclose(direct.eval_mean, z.mean(axis=0), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(direct.eval_var, z.var(axis=0), rtol=1e-5, atol=1e-9)
    assert direct.stored_var is not None
    np.testing.assert_allclose(direct.stored_var, net[3].running_var.double().numpy())
    # Case (a) for bernoulli at keep q: Var_train / Var_test = ((c² + v)/q - c²) / v.
    q = 0.5
    c, v = direct.eval_mean, direct.eval_var
    live = v > 1e-12
    assert direct.predicted_ratio is not None and stacked.predicted_ratio is None
    np.testing.assert_allclose(
        direct.predicted_ratio[live], ((c**2 + v) / q - c**2)[live] / v[live], rtol=1e-9
    )
    row = direct.row()
    assert "shifted" in row.flags and row.shift_ratio > 1.5
    assert row.num_batches_tracked == float(net[3].num_batches_tracked)
    assert report.samples == x.shape[0] and report.batches == -(-x.shape[0] // 256)
    # Scores of the model as saved, by hand.
    with torch.no_grad():
        logits = net.eval()(x).double()
    assert report.scores is not None
    assert report.scores.accuracy == pytest.approx((logits.argmax(1) == y).double().mean().item())
    nll = torch.nn.functional.cross_entropy(logits, y).item()
    assert report.scores.nll == pytest.approx(nll, rel=1e-6)
    assert 0.0 <= report.scores.ece <= 1.0
    frame = report.to_frame()
    assert list(frame["layer"]) == ["3", "7"] and "shift_ratio" in frame.columns


def test_recalibrate_with_labels_reports_the_four_variants() -> None:
    x, y = digits()
    result = recalibrate(trained("stacked"), x, y)
    variants = [s.variant for s in result.scores]
    assert variants == [
        "as saved",
        "correct (data-free)",
        "recalibrated",
        "recalibrated, dropout on (update_bn)",
    ]
    assert all(s.samples == x.shape[0] for s in result.scores)
    assert list(result.scores_frame().columns) == ["variant", "samples", "accuracy", "nll", "ece"]


def test_context_managers_restore_the_modes() -> None:
    net = stacked_net().train()
    with dropout_off(net):
        assert not net[2].training and net[3].training and net[0].training
    with bn_train_only(net.eval()):
        assert net[3].training and not net[2].training and not net[0].training
    assert not any(m.training for m in net.modules())


def test_mode_audit_flags_a_dropout_left_on_by_eval() -> None:
    class StickyDropout(nn.Dropout):
        def train(self, mode: bool = True) -> Any:
            return self  # ignores eval(): dropout stays on at test time

    net = nn.Sequential(nn.Linear(64, 8), StickyDropout(0.5), nn.BatchNorm1d(8))
    x, _ = digits()
    with torch.no_grad():
        net.train()(x[:64])
    report = diagnose(net, x[:200], dropout_on=False)
    assert report.mode_audit == ("1",)
    assert "mode audit: training in eval()" in report.layers[0].flags


@pytest.mark.parametrize(
    ("batches", "labels", "message"),
    [
        (torch.zeros((0, 64)), None, "no samples"),
        (torch.full((4, 64), float("nan")), None, "non-finite"),
        (torch.zeros((4, 63)), None, "rejects a batch of shape (4, 63)"),
        (torch.zeros((4, 64)), torch.zeros(3, dtype=torch.int64), "3 labels for 4 samples"),
    ],
)
def test_bad_data_is_one_clear_error(batches: Any, labels: Any, message: str) -> None:
    with pytest.raises(ValidationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        diagnose(stacked_net().eval(), batches, labels)


def test_finite_data_whose_sum_overflows_is_accepted() -> None:
    # the quick check sums each batch in its own dtype; finite values past that dtype's range
    # in sum (float32 3e38 × 256; float16 6e4 × 256) must reach the element-wise check and pass
    from varshift.frameworks.torch.data import as_batches

    for x in (torch.full((4, 64), 3e38), torch.full((4, 64), 6e4, dtype=torch.float16)):
        batches = as_batches([x, x])
        assert [tuple(b.shape) for b, _ in batches] == [(4, 64), (4, 64)]
    bad = torch.full((4, 64), 3e38)
    bad[2, 5] = float("inf")
    with pytest.raises(ValidationError, match=r"1 non-finite value\(s\).*index \(2, 5\)"):
        list(as_batches([bad]))


def test_a_model_without_batchnorm_is_refused() -> None:
    with pytest.raises(ValidationError, match="no BatchNorm layer"):
        recalibrate(nn.Sequential(nn.Linear(64, 10)), torch.zeros((4, 64)))


def test_through_linear_prediction_is_the_dropout_term_of_design_5() -> None:
    net = trained("linear")
    x, _ = digits()
    report = diagnose(net, x, dropout_on=False)
    none, through = report.layers
    assert (none.path.kind, none.predicted_ratio) == ("none", None)
    assert through.path.kind == "through-linear" and through.predicted_ratio is not None
    # Var_train = Var_test + (1/q - 1) sum_j W_kj² E[x_j²], x = the dropout's input (eval).
    seen: list[Any] = []
    handle = net[3].register_forward_hook(lambda m, args, out: seen.append(args[0]))
    with torch.no_grad():
        net.eval()(x)
    handle.remove()
    ex2 = (seen[0].double() ** 2).mean(dim=0).numpy()
    w2 = net[4].weight.detach().double().numpy() ** 2
    v = through.eval_var
    want = (v + (1 / 0.5 - 1) * (w2 @ ex2)) / v
    np.testing.assert_allclose(through.predicted_ratio, want, rtol=1e-6)


def test_the_dropout_on_pass_is_seeded_and_leaves_the_global_rng_alone() -> None:
    net = trained("stacked")
    x, y = digits()
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first, second = diagnose(net, x), diagnose(net, x)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG did not move
    for a, b in zip(first.layers, second.layers, strict=True):
        assert a.dropout_on_var is not None and b.dropout_on_var is not None
        assert np.array_equal(a.dropout_on_var, b.dropout_on_var)
    other = diagnose(net, x, seed=1)  # the seed is what fixes the masks
    assert not np.array_equal(other.layers[0].dropout_on_var, first.layers[0].dropout_on_var)
    rows = [recalibrate(net, x, y).scores[-1] for _ in range(2)]
    assert rows[0] == rows[1] and torch.equal(torch.get_rng_state(), state)


def bn_with_ratio(ratio: float, channels: int = 16, var: float = 4.0) -> Any:
    """A lone BatchNorm whose stored variance is ``ratio`` × the variance of N(1, ``var``)."""
    net = nn.Sequential(nn.BatchNorm1d(channels)).double().eval()
    with torch.no_grad():
        net[0].running_mean.fill_(1.0)
        net[0].running_var.fill_(ratio * var)
        net[0].num_batches_tracked.fill_(10_000)
    return net


def gaussian_batches(n_batches: int, size: int = 100, channels: int = 16) -> list[Any]:
    gen = torch.Generator().manual_seed(11)
    return [
        1.0 + 2.0 * torch.randn(size, channels, generator=gen, dtype=torch.float64)
        for _ in range(n_batches)
    ]


def test_flag_threshold_is_four_standard_errors_of_the_measured_variance() -> None:
    # Gaussian data, N samples: se(s²)/σ² = sqrt(2/N); the batch-means estimate of it has
    # relative error ~ 1/sqrt(2(B-1)) (B = 40: 11 %), so allow 4 of those.
    batches = gaussian_batches(40)
    n = 40 * 100
    se = math.sqrt(2.0 / n)
    layer = diagnose(bn_with_ratio(1.0), batches, dropout_on=False).layers[0]
    assert layer.shift_tol == pytest.approx(4 * se, rel=4 / math.sqrt(2 * 39))
    assert "shifted" not in layer.flags  # true ratio 1
    # The median over 16 channels has sd below one channel's se: 8 se away is always outside
    # 4 se, 1.5 se away always inside.
    assert (
        "shifted" in diagnose(bn_with_ratio(1 + 8 * se), batches, dropout_on=False).layers[0].flags
    )
    assert (
        "shifted"
        not in diagnose(bn_with_ratio(1 + 1.5 * se), batches, dropout_on=False).layers[0].flags
    )
    # Fewer than MIN_BATCHES batches: the Gaussian formula over the samples, exactly.
    few = diagnose(bn_with_ratio(1.0), batches[:4], dropout_on=False).layers[0]
    assert few.shift_tol == pytest.approx(4 * math.sqrt(2.0 / (400 - 1)), rel=1e-12)


def test_train_batch_size_adds_the_ema_noise_of_the_stored_variance() -> None:
    batches = gaussian_batches(4)  # Gaussian fall-back: the data term is known exactly
    data = math.sqrt(2.0 / (400 - 1))
    momentum, b = 0.1, 32  # torch's default momentum; EMA variance a/(2-a) * 2/(b-1)
    ema = math.sqrt(momentum / (2 - momentum) * 2.0 / (b - 1))
    net = bn_with_ratio(1.0 + 4.5 * data)  # outside 4 se of the data alone
    alone = diagnose(net, batches, dropout_on=False).layers[0]
    both = diagnose(net, batches, dropout_on=False, train_batch_size=b).layers[0]
    assert both.shift_tol == pytest.approx(4 * math.hypot(data, ema), rel=1e-12)
    assert "shifted" in alone.flags and "shifted" not in both.flags


def test_vectorised_direct_prediction_equals_shift_direct_for_every_torch_kind() -> None:
    from types import SimpleNamespace

    from varshift.core.dropout import Dropout
    from varshift.core.theory import shift_direct
    from varshift.frameworks.torch.passes import _predicted

    mean, var = np.array([0.3, -1.2, 2.0, 0.0]), np.array([0.5, 2.0, 0.01, 1.0])
    for kind in ("bernoulli", "alpha"):
        dropout = Dropout(kind, 0.3)
        path = SimpleNamespace(
            kind="direct", dropout=SimpleNamespace(as_dropout=lambda d=dropout: d)
        )
        want = [shift_direct(c, v, dropout).inverse_ratio for c, v in zip(mean, var, strict=True)]
        np.testing.assert_allclose(_predicted(path, mean, var, None), want, rtol=1e-12)


def test_dead_channels_do_not_move_the_ratio_or_the_flags() -> None:
    # channels 0 and 1 never vary (zero weights): their stored/eval ratio is 0.5/0; channels 2
    # and 3 store exactly their eval-mode variance, so the layer is not shifted
    torch.manual_seed(0)
    lin = nn.Linear(6, 4)
    with torch.no_grad():
        lin.weight[:2] = 0.0
    net = nn.Sequential(lin, nn.BatchNorm1d(4)).eval()
    x = torch.randn(512, 6, dtype=torch.float32)
    with torch.no_grad():
        z = lin(x).double()
        net[1].running_mean.copy_(z.mean(0))
        net[1].running_var.copy_(z.var(0, unbiased=False))
        net[1].running_var[:2] = 0.5  # what a channel that died late in training may keep
    (layer,) = diagnose(net, x, dropout_on=False).layers
    row = layer.row()
    assert row.dead_channels == 2 and "2 dead channel(s)" in layer.flags
    assert "shifted" not in layer.flags, layer.flags
    assert abs(row.shift_ratio - 1.0) < 1e-5 and abs(row.shift_ratio_max - 1.0) < 1e-5
