"""Graph-aware data-free correction on nets trained here (issue 10): each BatchNorm's class gets
its formula, checked against the test-time variance measured with plain torch (``eval()``,
hooks on every BN input) — an oracle independent of varshift's code.

Nets (tests/_graph_nets.py): trained 6 epochs, then BN statistics settled (dropout on, weights
frozen, cumulative average over 280 batches). Dead channels (test-time variance 0: a ReLU that
never fires) have no ratio and are left out of the per-channel ratios.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytestmark = pytest.mark.torch
torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

from tests._digits import digits  # noqa: E402
from tests._graph_nets import eval_variance, trained  # noqa: E402
from varshift.jobs.checkpoint import CorrectJob, CorrectResult, correct_file  # noqa: E402

SEEDS = (0, 1, 2)
RATES = (0.2, 0.5)
FACTORY = {
    "stacked": "tests._digits:stacked_net",
    "linear": "tests._digits:linear_net",
    "conv": "tests._graph_nets:conv_net",
    "head": "tests._graph_nets:head_net",
}
#: Channels whose test-time variance is below this are dead (no ratio).
DEAD = 1e-10


def run(
    tmp_path: Path, name: str, rate: float, seed: int, channelwise: bool = False, **job: Any
) -> tuple[CorrectResult, dict[str, np.ndarray], Any]:
    """Train (cached), save the state dict, correct it with the model's structure; the result,
    the measured test-time variances, and the net."""
    net = trained(name, rate, seed, channelwise)
    checkpoint = tmp_path / f"{name}-{rate}-{seed}.pt"
    torch.save(net.state_dict(), checkpoint)
    args = (f"rate={rate}",) + (("channelwise=true",) if channelwise else ())
    result = correct_file(CorrectJob(checkpoint, model=FACTORY[name], model_args=args, **job))
    return result, eval_variance(net), net


def ratios(result: CorrectResult, true: dict[str, np.ndarray], layer: str) -> np.ndarray:
    """Corrected stored variance / measured test-time variance, live channels only."""
    after, want = result.correction.stats.layers[layer].var, true[layer]
    live = want > DEAD
    return np.asarray(after[live] / want[live])


def row(result: CorrectResult, layer: str) -> Any:
    return next(r for r in result.rows if r.layer == layer)


def within_target(r: np.ndarray, low: float, high: float) -> bool:
    """Median in [low, high] and at least 90% of channels within ±10%."""
    return bool(low <= np.median(r) <= high and np.mean(np.abs(r - 1.0) <= 0.10) >= 0.90)


def direct_standard_error(net: Any, layer: str, rate: float) -> tuple[np.ndarray, np.ndarray]:
    """Per live channel: the relative standard error of the corrected variance.

    The stored variance is the mean of B = 280 unbiased batch variances (n = 64) of the
    dropout output ``y = x·m/q``, whose raw moments are ``E[x^k]/q^(k−1)``; the sd of one
    unbiased sample variance is ``sqrt((mu4 − s⁴ (n−3)/(n−1))/n)`` (i.i.d. draws: an upper
    bound here, each epoch nearly covers the data). The correction ``q (V + mu²) − mu²``
    scales it by ``q``; the mean's noise enters through ``2 mu (1 − q)``.
    """
    x, _ = digits()
    seen: dict[str, Any] = {}
    module = dict(net.named_modules())[layer]
    hook = module.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0]))
    with torch.no_grad():
        net.eval()(x)
    hook.remove()
    v = seen["x"].double().numpy()
    q, n, batches = 1.0 - rate, 64, 280
    m = [np.mean(v**k, axis=0) / q ** (k - 1) for k in range(1, 5)]
    mu, s2 = m[0], m[1] - m[0] ** 2
    mu4 = m[3] - 4 * mu * m[2] + 6 * mu**2 * m[1] - 3 * mu**4
    se_var = np.sqrt((mu4 - s2**2 * (n - 3) / (n - 1)) / n / batches)
    se_mean = np.sqrt(s2 / (n * batches))
    se = np.sqrt((q * se_var) ** 2 + (2 * mu * (1 - q) * se_mean) ** 2)
    true = v.var(axis=0, ddof=1)
    live = true > DEAD
    return se[live] / true[live], live


# --- MLPs: direct, stacked, none, through-linear -------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("rate", RATES)
def test_direct_exact_and_stacked_left(tmp_path: Path, rate: float, seed: int) -> None:
    result, true, net = run(tmp_path, "stacked", rate, seed)
    direct, stacked = row(result, "3"), row(result, "7")
    assert (direct.kind, direct.action, direct.rate) == ("direct", "corrected", rate)
    assert direct.assumption.startswith("exact")
    se, _ = direct_standard_error(net, "3", rate)
    r = ratios(result, true, "3")
    assert np.all(np.abs(r - 1.0) <= 4 * se), (r, se)  # each live channel within 4 se
    assert (stacked.kind, stacked.action, stacked.formula) == ("stacked", "not corrected", "")
    assert "recalibrate" in stacked.assumption and "2" in stacked.assumption  # names drop 2
    before = net.state_dict()["7.running_var"].double().numpy()
    np.testing.assert_array_equal(result.correction.stats.layers["7"].var, before)
    assert stacked.var_after == stacked.var_before


def _through_linear(tmp_path: Path, rate: float, seed: int, **job: Any) -> np.ndarray:
    result, true, net = run(tmp_path, "linear", rate, seed, **job)
    none, lin = row(result, "1"), row(result, "5")
    assert (none.kind, none.action) == ("none", "untouched")
    np.testing.assert_array_equal(
        result.correction.stats.layers["1"].var, net.state_dict()["1.running_var"].numpy()
    )
    assert (lin.kind, lin.action) == ("through-linear", "corrected")
    assert lin.formula.startswith("through-linear") and lin.dropout_term > 0
    np.testing.assert_array_equal(  # the mean does not change
        result.correction.stats.layers["5"].mean, net.state_dict()["5.running_mean"].numpy()
    )
    return ratios(result, true, "5")


@pytest.mark.parametrize("seed", SEEDS)
def test_through_linear_data_free_rate_02(tmp_path: Path, seed: int) -> None:
    r = _through_linear(tmp_path, 0.2, seed)
    assert within_target(r, 0.97, 1.05), (np.median(r), np.mean(np.abs(r - 1) <= 0.1))


@pytest.mark.xfail(
    strict=True,
    reason="measured: median corrected/true 1.050, 1.049, 1.063 (seeds 0-2), all channels "
    "within ±10% but 98% for seed 1; with --data 1.003-1.012. Cause: the Gaussian E[relu(z)²] is "
    "12-14% short at the median channel (the feeding BN's output has skewness 0.3-0.9 with "
    "negative excess kurtosis) and the term is 51-59% of the test variance at the worst channel. "
    "Tried data-free: E[x] from the next BN's running mean (least squares, within ±3% of the "
    "measured E[x]) fitted by a skew-normal per channel: 56-71% of channels hit the family's "
    "skewness limit (E[x] fixes E|z|, a kurtosis-like moment; E[x²] needs E[z|z|], a skew-like "
    "one), so not used",
)
def test_through_linear_data_free_rate_05(tmp_path: Path) -> None:
    results = [_through_linear(tmp_path, 0.5, seed) for seed in SEEDS]
    assert all(within_target(r, 0.97, 1.05) for r in results), [np.median(r) for r in results]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("rate", RATES)
def test_through_linear_with_data(tmp_path: Path, rate: float, seed: int) -> None:
    data = tmp_path / "x.npy"
    np.save(data, digits()[0].numpy())
    r = _through_linear(tmp_path, rate, seed, data=str(data))
    assert within_target(r, 0.97, 1.05), np.median(r)


# --- conv net on 8×8 images ---------------------------------------------------------------------


def _conv(tmp_path: Path, rate: float, seed: int, **job: Any) -> tuple[np.ndarray, Any]:
    result, true, _ = run(tmp_path, "conv", rate, seed, **job)
    assert (row(result, "2").kind, row(result, "2").action) == ("none", "untouched")
    lin = row(result, "6")
    assert (lin.kind, lin.action) == ("through-linear", "corrected"), lin.assumption
    assert lin.formula.startswith("through-linear (conv)")
    return ratios(result, true, "6"), lin


@pytest.mark.parametrize("seed", SEEDS)
def test_conv_data_free_rate_02(tmp_path: Path, seed: int) -> None:
    r, lin = _conv(tmp_path, 0.2, seed, input_shape=(64,))
    assert "padding ignored" not in lin.assumption
    assert within_target(r, 0.95, 1.05), np.median(r)


@pytest.mark.xfail(
    strict=True,
    reason="measured: seed 0 median 0.921 with 58% of channels within ±10% (seeds 1, 2: 0.980 "
    "and 1.012, all within ±10%); with --data 0.999-1.004. Cause: not the padding nor E[x²] "
    "varying over the image (the measured E[x²] pooled per channel gives 1.001 on seed 0) but "
    "the Gaussian E[relu(z)²] per channel, off by ×0.77-1.9 on seed 0 (a channel's values pooled "
    "over the 8×8 image are far from one Gaussian), with 8 input channels too few to average "
    "out; the term is up to 94% of the test variance. Tried: E[x] from the next BN's running "
    "mean is off by ×0.5-1.5 here (E[x] varies over positions), a skew-normal fit on it made "
    "seed 1 worse (1.049, 83% within ±10%)",
)
def test_conv_data_free_rate_05(tmp_path: Path) -> None:
    results = [_conv(tmp_path, 0.5, seed, input_shape=(64,))[0] for seed in SEEDS]
    assert all(within_target(r, 0.95, 1.05) for r in results), [np.median(r) for r in results]


@pytest.mark.parametrize("seed", SEEDS)
def test_conv_rate_05_miss_is_flagged(tmp_path: Path, seed: int) -> None:
    """The data-free rate-0.5 conv correction cannot be trusted to ±10% (xfail above): the row
    quotes its sensitivity and one warning line says so and points to --data / recalibrate."""
    result, _, _ = run(tmp_path, "conv", 0.5, seed, input_shape=(64,))
    assert "sensitivity: ±15% in E[x²]" in row(result, "6").assumption
    (warning,) = result.correction.warnings
    assert "'6'" in warning and "--data" in warning and "recalibrate" in warning


@pytest.mark.parametrize("name", ["linear", "conv"])
def test_rate_02_has_no_sensitivity_warning(tmp_path: Path, name: str) -> None:
    job = {"input_shape": (64,)} if name == "conv" else {}
    for seed in SEEDS:
        result, _, _ = run(tmp_path, name, 0.2, seed, **job)
        assert result.correction.warnings == (), result.correction.warnings


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("rate", RATES)
def test_conv_with_data(tmp_path: Path, rate: float, seed: int) -> None:
    data = tmp_path / "x.npy"
    np.save(data, digits()[0].numpy())
    r, lin = _conv(tmp_path, rate, seed, data=str(data))
    assert "measured" in lin.assumption
    assert within_target(r, 0.98, 1.02), np.median(r)


def test_conv_without_input_size_says_padding_ignored(tmp_path: Path) -> None:
    _, lin = _conv(tmp_path, 0.2, 0)
    assert "padding ignored" in lin.assumption and "--input-shape" in lin.assumption


@pytest.mark.parametrize("rate", RATES)
def test_channelwise_dropout_needs_data(tmp_path: Path, rate: float) -> None:
    result, true, _ = run(tmp_path, "conv", rate, 0, channelwise=True, input_shape=(64,))
    lin = row(result, "6")
    assert (lin.kind, lin.action) == ("through-linear", "not corrected")
    assert "channel-wise" in lin.assumption and "--data" in lin.assumption
    data = tmp_path / "x.npy"
    np.save(data, digits()[0].numpy())
    result, true, _ = run(
        tmp_path, "conv", rate, 0, channelwise=True, data=str(data), input_shape=(64,)
    )
    assert row(result, "6").action == "corrected"
    assert within_target(ratios(result, true, "6"), 0.98, 1.02)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("rate", RATES)
def test_dropout_flatten_linear_head(tmp_path: Path, rate: float, seed: int) -> None:
    """Conv→BN2d→ReLU→Dropout→Flatten→Linear→BN1d: exact with measured E[x²] per position.
    Data-free each channel's E[x²] stands for all its positions (stated in the report; measured
    median 0.970-0.982 at rate 0.2 and 0.861-0.917 at rate 0.5 on these nets: no target)."""
    data = tmp_path / "x.npy"
    np.save(data, digits()[0].numpy())
    free, _, _ = run(tmp_path, "head", rate, seed)
    assert row(free, "7").action == "corrected"
    assert "flattened image" in row(free, "7").assumption
    result, true, _ = run(tmp_path, "head", rate, seed, data=str(data))
    lin = row(result, "7")
    assert (lin.kind, lin.action) == ("through-linear", "corrected")
    assert within_target(ratios(result, true, "7"), 0.98, 1.02)


@pytest.mark.parametrize("name", ["linear", "stacked"])
def test_recalibrate_comparison_row_is_what_correct_model_writes(tmp_path: Path, name: str) -> None:
    # recalibrate's "correct (data-free)" score row must score the model `correct --model`
    # writes (each BN by its class), not the direct formula on every layer.
    from varshift.frameworks.torch.graph import classify
    from varshift.frameworks.torch.passes import correct_data_free

    result, _, net = run(tmp_path, name, 0.2, 0)
    fixed, _ = correct_data_free(net, classify(net))
    state = fixed.state_dict()
    for layer, stats in result.correction.stats.layers.items():
        np.testing.assert_allclose(
            state[f"{layer}.running_var"].double().numpy(), stats.var, rtol=1e-6
        )
        np.testing.assert_allclose(
            state[f"{layer}.running_mean"].double().numpy(), stats.mean, rtol=1e-6, atol=1e-7
        )
    kinds = {r.layer: r.action for r in result.rows}
    assert "corrected" in kinds.values() and len(set(kinds.values())) > 1  # some layers left
