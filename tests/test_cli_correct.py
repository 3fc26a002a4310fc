"""`varshift inspect` and `varshift correct` through the command line: exit codes, one-line
messages naming the file and layer, files written (and not written), checked via the library."""

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

from varshift.cli import app
from varshift.formats import read_stats

runner = CliRunner()


def run(*args: str | Path) -> tuple[int, str, str]:
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def model() -> Any:
    """Linear → Dropout → BN1d → ReLU → Dropout → BN1d with statistics from 50 batches."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(3, 4),
        torch.nn.Dropout(0.5),
        torch.nn.BatchNorm1d(4),
        torch.nn.ReLU(),
        torch.nn.Dropout(0.5),
        torch.nn.BatchNorm1d(4),
    )
    with torch.no_grad():
        for _ in range(50):
            net(torch.randn(16, 3))
    return net


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    torch = pytest.importorskip("torch")
    path = tmp_path / "model.pt"
    torch.save(model().state_dict(), path)
    return path


def one_line_error(code: int, err: str, *parts: str) -> None:
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("varshift: error: "), err
    for part in parts:
        assert part in err, (part, err)


# --- inspect ---------------------------------------------------------------------------------


@pytest.mark.torch
def test_inspect_shows_one_row_per_layer_with_flags(tmp_path: Path, checkpoint: Path) -> None:
    code, out, err = run("inspect", checkpoint, "-f", "csv")
    assert code == 0, err
    df = pd.read_csv(io.StringIO(out))
    assert list(df["layer"]) == [2, 5] and list(df["channels"]) == [4, 4]
    assert list(df["count"]) == [50, 50]
    stats = read_stats(checkpoint)
    assert df["var_mean"][0] == pytest.approx(float(np.mean(stats.layers["2"].var)), rel=1e-9)
    assert df["flags"].isna().all()  # 50 updates ≥ 44 for momentum 0.1
    assert "2 BatchNorm layer(s), 0 flagged" in err

    torch = pytest.importorskip("torch")
    fresh = tmp_path / "fresh.pt"
    torch.save({"epoch": 0, "model": torch.nn.BatchNorm1d(3).state_dict()}, fresh)
    code, out, _ = run("inspect", fresh, "-f", "json")
    (row,) = json.loads(out)["rows"]
    assert row["initial"] and row["few_updates"] and row["count"] == 0
    code, out, _ = run("inspect", fresh)  # markdown when stdout is not a terminal
    assert code == 0 and "initial values (mean 0, var 1); few updates (0 < 44)" in out
    code, out, _ = run("inspect", checkpoint, "--momentum", "0.01", "-f", "csv")
    assert "few updates (50 < 459)" in out


def test_inspect_plain_file_assumes_torch_with_a_note(tmp_path: Path) -> None:
    path = tmp_path / "s.csv"
    path.write_text("layer,channel,mean,var\nbn,0,0,0\nbn,1,0,nan\n")
    code, out, err = run("inspect", path)
    assert code == 0
    assert "does not say which framework wrote it; assuming torch" in err
    assert "non-finite (1 ch); var ≤ 0 (1 ch)" in out
    code, _, err = run("inspect", path, "--framework", "keras", "--quiet")
    assert code == 0 and err == ""


def test_inspect_a_file_without_batchnorm(tmp_path: Path) -> None:
    path = tmp_path / "w.npz"
    np.savez(path, w=np.ones(3))
    one_line_error(*run("inspect", path)[::2], "w.npz: no BatchNorm statistics found")


# --- correct ---------------------------------------------------------------------------------


@pytest.mark.torch
def test_correct_writes_the_checkpoint_and_a_report(tmp_path: Path, checkpoint: Path) -> None:
    torch = pytest.importorskip("torch")
    before = digest(checkpoint)
    out = tmp_path / "fixed.pt"
    code, stdout, err = run("correct", checkpoint, "--rate", "0.5", "-o", out)
    assert code == 0, err
    assert digest(checkpoint) == before
    assert (
        "| 2       | unknown | corrected" in stdout
        and "2 of 2 BatchNorm layer(s) corrected" in stdout
    )
    assert f"wrote {out} and {out}.report.json" in err
    old, new = read_stats(checkpoint), read_stats(out)
    for name in ("2", "5"):
        mu, v = old.layers[name].mean, old.layers[name].var
        expected = (0.5 * (v + mu * mu) - mu * mu).astype(np.float32)
        np.testing.assert_array_equal(new.layers[name].var, expected)
        np.testing.assert_array_equal(new.layers[name].mean, mu)
    net = model()
    net.load_state_dict(torch.load(out, weights_only=True), strict=True)
    report = json.loads(Path(f"{out}.report.json").read_text())
    assert report["metadata"]["parameters"]["file"] == "model.pt"
    assert [r["layer"] for r in report["rows"]] == ["2", "5"]
    assert report["rows"][0]["var_after"] == pytest.approx(float(np.mean(new.layers["2"].var)))

    code, _, err = run("correct", checkpoint, "--rate", "0.5", "-o", out)  # a rerun
    assert code == 0 and f"unchanged {out} and {out}.report.json" in err, err
    code, _, err = run("correct", checkpoint, "--rate", "0.2", "-o", out)
    one_line_error(code, err, f"{out}: already exists; pass --force to overwrite it")
    code, _, err = run("correct", checkpoint, "--rate", "0.2", "-o", out, "--force", "-q")
    assert code == 0 and err == ""
    assert read_stats(out).layers["2"].var[0] > new.layers["2"].var[0]


@pytest.mark.torch
def test_dry_run_writes_nothing(tmp_path: Path, checkpoint: Path) -> None:
    code, out, err = run(
        "correct", checkpoint, "--rate", "0.5", "--dry-run", "-o", tmp_path / "x.pt"
    )
    assert code == 0 and "dry run: nothing written" in err and "corrected" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


@pytest.mark.torch
def test_layer_rules_and_excludes(tmp_path: Path, checkpoint: Path) -> None:
    code, out, err = run(
        "correct", checkpoint, "--layer", "*=0.3", "--layer", "5=0.5", "--exclude", "2",
        "-o", tmp_path / "f.pt", "-f", "csv", "--no-report",
    )  # fmt: skip
    assert code == 0, err
    df = pd.read_csv(io.StringIO(out))
    assert list(df["action"]) == ["excluded", "corrected"] and df["rate"][1] == 0.5
    assert not (tmp_path / "f.pt.report.json").exists()
    old, new = read_stats(checkpoint), read_stats(tmp_path / "f.pt")
    np.testing.assert_array_equal(old.layers["2"].var, new.layers["2"].var)
    code, _, err = run("correct", checkpoint, "--layer", "features.*=0.3", "--dry-run")
    one_line_error(
        code, err, "model.pt: --layer pattern 'features.*' matches no layer; layers: 2, 5"
    )
    code, _, err = run("correct", checkpoint, "--rate", "0.3", "--exclude", "bn", "--dry-run")
    one_line_error(code, err, "--exclude pattern 'bn' matches no layer")


@pytest.mark.torch
def test_safetensors_output_follows_the_extension(tmp_path: Path, checkpoint: Path) -> None:
    pytest.importorskip("safetensors")
    code, _, _ = run("correct", checkpoint, "--rate", "0.5", "-o", tmp_path / "f.safetensors")
    assert code == 0 and read_stats(tmp_path / "f.safetensors").format == "safetensors"


@pytest.mark.torch
def test_output_format_follows_the_extension_else_the_input(
    tmp_path: Path, checkpoint: Path
) -> None:
    code, _, _ = run("correct", checkpoint, "--rate", "0.5", "-o", tmp_path / "f.ckpt")
    assert code == 0 and read_stats(tmp_path / "f.ckpt").format == "torch"
    code, _, _ = run(
        "correct",
        checkpoint,
        "--rate",
        "0.5",
        "-o",
        tmp_path / "f.csv",
        "--report",
        tmp_path / "r.md",
    )
    assert code == 0 and "varshift correct" in (tmp_path / "r.md").read_text()
    code, _, err = run(
        "correct", checkpoint, "--rate", "0.5", "-o", tmp_path / "g.pt", "--report", "r.txt"
    )
    one_line_error(code, err, "--report must end in .json, .csv or .md")


@pytest.mark.torch
def test_nothing_is_written_when_one_target_is_refused(tmp_path: Path, checkpoint: Path) -> None:
    (tmp_path / "f.pt.report.json").write_text("{}")
    code, _, err = run("correct", checkpoint, "--rate", "0.5", "-o", tmp_path / "f.pt")
    one_line_error(code, err, "f.pt.report.json: already exists")
    assert not (tmp_path / "f.pt").exists()
    code, _, err = run("correct", checkpoint, "--rate", "0.5", "-o", checkpoint, "--force")
    one_line_error(code, err, "model.pt: is the input file; varshift never modifies its input")
    code, _, err = run("correct", checkpoint, "--rate", "0.5")
    one_line_error(code, err, "--output/-o is required")
    code, _, err = run("correct", checkpoint, "-o", tmp_path / "z.pt")
    one_line_error(code, err, "give the dropout rate")


def test_keras_statistics_without_batch_size_warn(tmp_path: Path) -> None:
    path = tmp_path / "s.npz"
    np.savez(path, **{"bn.moving_mean": np.zeros(2), "bn.moving_variance": np.full(2, 2.0)})  # type: ignore[arg-type]
    code, _, err = run("correct", path, "--rate", "0.5", "-o", tmp_path / "o.npz")
    assert code == 0
    assert "warning: keras stores the biased batch variance" in err  # framework from key names
    code, _, err = run("correct", path, "--rate", "0.5", "--batch-size", "16", "--dry-run")
    assert code == 0 and "biased" not in err
    (unknown,) = [line for line in err.splitlines() if "warning" in line]  # one warning line
    assert "s.npz: model structure unknown: every layer assumed directly after dropout" in unknown


# --- bad input: one line, the file, the layer, the problem, exit 2 --------------------------


def state_dict_file(tmp_path: Path, edit: Callable[[dict[str, Any]], None]) -> Path:
    torch = pytest.importorskip("torch")
    sd = dict(torch.nn.BatchNorm1d(3).state_dict())
    sd = {f"bn.{k}": v for k, v in sd.items()}
    edit(sd)
    path = tmp_path / "bad.pt"
    torch.save(sd, path)
    return path


def _set(key: str, value: list[float]) -> Callable[[dict[str, Any]], None]:
    def edit(sd: dict[str, Any]) -> None:
        import torch

        sd[key] = torch.tensor(value, dtype=torch.float32)

    return edit


@pytest.mark.torch
@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_set("bn.running_var", [1, float("nan"), 1]), "running variance has 1 non-finite"),
        (_set("bn.running_var", [1, float("inf"), 1]), "running variance has 1 non-finite"),
        (_set("bn.running_var", [1, -2, 1]), "running variance is negative at 1 channel(s) 1 (-2)"),
        (lambda sd: sd.pop("bn.running_var"), "has running_mean but no running_var"),
        (
            _set("bn.running_var", [1, 1]),
            "running_mean has shape (3,) but running_var has shape (2,)",
        ),
    ],
)
def test_bad_statistics(
    tmp_path: Path, edit: Callable[[dict[str, Any]], None], message: str
) -> None:
    path = state_dict_file(tmp_path, edit)
    code, _, err = run("correct", path, "--rate", "0.5", "-o", tmp_path / "o.pt")
    one_line_error(code, err, f"{path}: layer 'bn': {message}")
    assert not (tmp_path / "o.pt").exists()


@pytest.mark.torch
def test_empty_truncated_and_unknown_files(tmp_path: Path, checkpoint: Path) -> None:
    empty = tmp_path / "empty.pt"
    empty.touch()
    one_line_error(*run("inspect", empty)[::2], "empty.pt: the file is empty")
    cut = tmp_path / "cut.pt"
    cut.write_bytes(checkpoint.read_bytes()[:300])
    one_line_error(
        *run("correct", cut, "--rate", "0.5", "-o", tmp_path / "o.pt")[::2],
        "cut.pt: not a readable PyTorch checkpoint (truncated or corrupt?)",
    )
    unknown = tmp_path / "model.xyz"
    unknown.write_bytes(b"\x00" * 64)
    one_line_error(*run("inspect", unknown)[::2], "model.xyz: cannot tell the format")
    one_line_error(*run("inspect", tmp_path / "nope.pt")[::2], "nope.pt: no such file")


@pytest.mark.torch
def test_a_malicious_pickle_is_refused_and_never_runs(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    marker = tmp_path / "marker"

    class Payload:
        def __reduce__(self) -> tuple[Any, tuple[str]]:
            import os

            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pt"
    torch.save({"bn.running_mean": torch.zeros(2), "x": Payload()}, path)
    for command in (["inspect", path], ["correct", path, "--rate", "0.5", "-o", tmp_path / "o.pt"]):
        code, _, err = run(*command)
        one_line_error(code, err, "evil.pt: refusing to load", "weights_only")
    assert not marker.exists()
