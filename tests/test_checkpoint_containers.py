"""Checkpoints holding several state dicts (issue 14): timm's ``state_dict`` and
``state_dict_ema``, a Lightning checkpoint's ``state_dict`` and an EMA callback's. Every state
dict with BatchNorm statistics is inspected and corrected (rows ``LABEL:LAYER``), ``--key``
chooses, and everything not corrected stays as it was."""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

pytestmark = pytest.mark.torch
torch = pytest.importorskip("torch")

from varshift.cli import app  # noqa: E402
from varshift.formats import read_stats  # noqa: E402

runner = CliRunner()
RATE = 0.1
FACTORY = "tests.test_checkpoint_containers:net"
LIGHTNING_EMA = "callbacks/EMA{'decay': 0.999}/ema_state_dict"


def run(*args: str | Path) -> tuple[int, str, str]:
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def net() -> Any:
    """Linear → Dropout → BN1d → ReLU → Dropout → BN1d (the BNs are ``2`` and ``5``)."""
    return torch.nn.Sequential(
        torch.nn.Linear(3, 4),
        torch.nn.Dropout(0.5),
        torch.nn.BatchNorm1d(4),
        torch.nn.ReLU(),
        torch.nn.Dropout(0.5),
        torch.nn.BatchNorm1d(4),
    )


def trained_state(seed: int) -> dict[str, Any]:
    """A state dict whose BN statistics come from 50 training batches (dropout on)."""
    torch.manual_seed(seed)
    model = net()
    with torch.no_grad():
        for _ in range(50):
            model(torch.randn(16, 3) + 0.5)
    return model.state_dict()


def timm_style(tmp_path: Path) -> Path:
    """timm's train script: the model and its EMA copy side by side, plus optimizer state."""
    path = tmp_path / "checkpoint.pth.tar"
    torch.save(
        {
            "epoch": 7,
            "arch": "tiny",
            "state_dict": trained_state(0),
            "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]},
            "state_dict_ema": trained_state(1),
            "version": 2,
        },
        path,
    )
    return path


def lightning_style(tmp_path: Path) -> Path:
    """A Lightning checkpoint: state_dict, an EMA callback's state dict, optimizer and
    scheduler states, loop counters (plain torch objects only)."""
    path = tmp_path / "last.ckpt"
    torch.save(
        {
            "epoch": 3,
            "global_step": 120,
            "pytorch-lightning_version": "2.4.0",
            "state_dict": trained_state(2),
            "loops": {"fit_loop": {"epoch_progress": {"current": {"completed": 3}}}},
            "callbacks": {
                "EMA{'decay': 0.999}": {"decay": 0.999, "ema_state_dict": trained_state(3)}
            },
            "optimizer_states": [
                {
                    "state": {0: {"step": torch.tensor(120.0), "exp_avg": torch.ones(4, 3)}},
                    "param_groups": [{"lr": 0.01, "params": [0]}],
                }
            ],
            "lr_schedulers": [{"last_epoch": 3, "_last_lr": [0.01]}],
            "hyper_parameters": {"lr": 0.01},
        },
        path,
    )
    return path


def expected_var(state: dict[str, Any], bn: str) -> Any:
    """Case (a), bernoulli, torch (unbiased stored variance): q (V + mu²) − mu², q = 1 − rate."""
    mu = state[f"{bn}.running_mean"].double().numpy()
    v = state[f"{bn}.running_var"].double().numpy()
    q = 1 - RATE
    return q * (v + mu**2) - mu**2


def containers(obj: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        "state_dict": obj["state_dict"],
        "ema": obj["state_dict_ema"]
        if "state_dict_ema" in obj
        else obj["callbacks"]["EMA{'decay': 0.999}"]["ema_state_dict"],
    }


def assert_same_except(before: dict[str, Any], after: dict[str, Any], changed: set[str]) -> None:
    """Every tensor outside ``changed`` equal in value and dtype; the same keys."""
    assert list(before) == list(after)
    for key, value in before.items():
        if key in changed:
            continue
        assert after[key].dtype == value.dtype and torch.equal(after[key], value), key


def csv_rows(stdout: str) -> pd.DataFrame:
    return pd.read_csv(io.StringIO(stdout))


@pytest.mark.parametrize(
    ("make", "ema"), [(timm_style, "state_dict_ema"), (lightning_style, LIGHTNING_EMA)]
)
def test_every_state_dict_is_corrected(
    tmp_path: Path, make: Callable[[Path], Path], ema: str
) -> None:
    source = make(tmp_path)
    before_digest = digest(source)
    out = tmp_path / ("fixed" + source.suffix)
    code, stdout, err = run("correct", source, "--rate", RATE, "-o", out, "-f", "csv")
    assert code == 0, err
    assert digest(source) == before_digest
    rows = csv_rows(stdout)
    assert list(rows["layer"]) == ["state_dict:2", "state_dict:5", f"{ema}:2", f"{ema}:5"]
    assert set(rows["action"]) == {"corrected"}
    before = torch.load(source, weights_only=True)
    after = torch.load(out, weights_only=True)
    for label in ("state_dict", "ema"):
        old, new = containers(before)[label], containers(after)[label]
        for bn in ("2", "5"):
            np.testing.assert_allclose(
                new[f"{bn}.running_var"].double().numpy(), expected_var(old, bn), rtol=1e-6
            )
        changed = {"2.running_var", "5.running_var"}
        assert_same_except(old, new, changed)
        net().load_state_dict(new, strict=True)
    # everything but the state dicts is as it was
    for key in before:
        if key not in ("state_dict", "state_dict_ema", "callbacks"):
            assert repr(after[key]) == repr(before[key]), key
    report = json.loads(Path(f"{out}.report.json").read_text())
    assert report["metadata"]["parameters"]["containers"] == ["state_dict", ema]


def test_key_selects_one_state_dict(tmp_path: Path) -> None:
    source = timm_style(tmp_path)
    out = tmp_path / "fixed.pth"
    code, stdout, err = run(
        "correct", source, "--rate", RATE, "--key", "state_dict_ema", "-o", out, "-f", "csv"
    )
    assert code == 0, err
    assert list(csv_rows(stdout)["layer"]) == ["state_dict_ema:2", "state_dict_ema:5"]
    before = torch.load(source, weights_only=True)
    after = torch.load(out, weights_only=True)
    assert_same_except(before["state_dict"], after["state_dict"], set())
    np.testing.assert_allclose(
        after["state_dict_ema"]["5.running_var"].double().numpy(),
        expected_var(before["state_dict_ema"], "5"),
        rtol=1e-6,
    )
    report = json.loads(Path(f"{out}.report.json").read_text())
    assert report["metadata"]["parameters"]["key"] == ["state_dict_ema"]


def test_key_takes_a_comma_list_and_the_last_part_of_a_nested_label(tmp_path: Path) -> None:
    source = lightning_style(tmp_path)
    code, stdout, err = run("inspect", source, "--key", "ema_state_dict", "-f", "csv")
    assert code == 0, err
    assert list(csv_rows(stdout)["layer"]) == [f"{LIGHTNING_EMA}:2", f"{LIGHTNING_EMA}:5"]
    code, stdout, err = run("inspect", source, "--key", "state_dict,ema_state_dict", "-f", "csv")
    assert code == 0, err
    assert len(csv_rows(stdout)) == 4


def test_unknown_key_lists_the_state_dicts_found(tmp_path: Path) -> None:
    source = lightning_style(tmp_path)
    for command in (["inspect"], ["correct", "--rate", "0.1", "--dry-run"]):
        code, _, err = run(*command[:1], source, *command[1:], "--key", "ema")
        assert code == 2, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in err, err
        assert "--key 'ema'" in lines[0]
        assert "'state_dict'" in lines[0] and LIGHTNING_EMA in lines[0]


def test_inspect_shows_each_state_dict(tmp_path: Path) -> None:
    source = timm_style(tmp_path)
    code, stdout, err = run("inspect", source, "-f", "json")
    assert code == 0, err
    doc = json.loads(stdout)
    assert [r["layer"] for r in doc["rows"]] == [
        "state_dict:2",
        "state_dict:5",
        "state_dict_ema:2",
        "state_dict_ema:5",
    ]
    assert doc["metadata"]["parameters"]["container"] == "state_dict, state_dict_ema"
    # the values are those of each state dict
    ema = torch.load(source, weights_only=True)["state_dict_ema"]
    row = doc["rows"][3]
    assert row["var_mean"] == pytest.approx(float(ema["5.running_var"].double().mean()), rel=1e-9)


def test_layer_and_exclude_globs_match_the_name_inside_each_state_dict(tmp_path: Path) -> None:
    source = timm_style(tmp_path)
    code, stdout, err = run(
        "correct",
        source,
        "--layer",
        "5=0.1",
        "--exclude",
        "state_dict_ema:*",
        "--dry-run",
        "-f",
        "csv",
    )
    assert code == 0, err
    actions = dict(zip(csv_rows(stdout)["layer"], csv_rows(stdout)["action"], strict=True))
    assert actions == {
        "state_dict:2": "not selected",
        "state_dict:5": "corrected",
        "state_dict_ema:2": "excluded",
        "state_dict_ema:5": "excluded",
    }


def test_a_single_training_checkpoint_keeps_plain_names(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    torch.save({"epoch": 1, "state_dict": trained_state(0)}, path)
    stats = read_stats(path)
    assert list(stats.layers) == ["2", "5"] and stats.container == "state_dict"
    assert not stats.containers


def test_the_same_state_dict_saved_twice_is_read_once(tmp_path: Path) -> None:
    state = trained_state(0)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": state, "state_dict": state}, path)
    assert list(read_stats(path).layers) == ["2", "5"]


def test_a_flat_tensor_export_is_refused(tmp_path: Path) -> None:
    pytest.importorskip("safetensors")
    source = timm_style(tmp_path)
    out = tmp_path / "fixed.safetensors"
    code, _, err = run("correct", source, "--rate", RATE, "-o", out)
    assert code == 2 and "one tensor file cannot keep them apart" in err, err
    assert not out.exists()


def test_correct_with_model_needs_a_key(tmp_path: Path) -> None:
    source = timm_style(tmp_path)
    out = tmp_path / "fixed.pth"
    code, _, err = run("correct", source, "--model", FACTORY, "-o", out)
    assert code == 2 and err.count("\n") == 1, err
    assert "--key" in err and "state_dict, state_dict_ema" in err
    assert not out.exists()
    code, stdout, err = run(
        "correct", source, "--model", FACTORY, "--key", "state_dict_ema", "-o", out, "-f", "csv"
    )
    assert code == 0, err
    rows = csv_rows(stdout)
    assert list(rows["layer"]) == ["state_dict_ema:2", "state_dict_ema:5"]
    assert list(rows["kind"]) == ["direct", "stacked"]  # BN 5 has two dropouts upstream
    before = torch.load(source, weights_only=True)
    after = torch.load(out, weights_only=True)
    assert_same_except(before["state_dict"], after["state_dict"], set())
    assert_same_except(before["state_dict_ema"], after["state_dict_ema"], {"2.running_var"})
    # BN 2 follows Dropout(0.5) directly: case (a) with the model's rate
    mu = before["state_dict_ema"]["2.running_mean"].double().numpy()
    v = before["state_dict_ema"]["2.running_var"].double().numpy()
    np.testing.assert_allclose(
        after["state_dict_ema"]["2.running_var"].double().numpy(),
        0.5 * (v + mu**2) - mu**2,
        rtol=1e-6,
    )
    net().load_state_dict(after["state_dict_ema"], strict=True)
