"""`varshift diagnose` and `varshift recalibrate` through the command line: exit codes, one-line
messages, files written (and not written), checked through the library and `varshift check`."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

pytestmark = pytest.mark.torch
torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

from tests._digits import digits, stacked_net, trained  # noqa: E402
from varshift.cli import app  # noqa: E402
from varshift.jobs.check import load_report  # noqa: E402

runner = CliRunner()
BATCH = ({0: torch.export.Dim("batch")},)  # export with a free batch size
MODULE = "vs_cli_nets"
NETS = """
import torch
from torch import nn
from tests._digits import digits, linear_net, stacked_net


def no_bn():
    return nn.Sequential(nn.Linear(64, 10))


def broken():
    raise RuntimeError("boom")


def loader():
    x, y = digits()
    dataset = torch.utils.data.TensorDataset(x, y)
    return torch.utils.data.DataLoader(dataset, batch_size=200)


def slow():
    import time

    x, y = digits()
    for start in range(0, 1200, 200):  # 6 batches, 0.3 s each: a pass of ~1.8 s
        time.sleep(0.3)
        yield x[start:start + 200], y[start:start + 200]
"""


def run(*args: str | Path) -> tuple[int, str, str]:
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """The nets module on sys.path, the trained stacked net's checkpoint and the data."""
    import sys

    root = tmp_path_factory.mktemp("cli")
    (root / f"{MODULE}.py").write_text(NETS)
    sys.path.insert(0, str(root))
    x, y = digits()
    torch.save(trained("stacked").state_dict(), root / "stacked.pt")
    np.savez(root / "digits.npz", x=x.numpy(), y=y.numpy())
    yield {"root": root, "checkpoint": root / "stacked.pt", "data": root / "digits.npz"}
    sys.path.remove(str(root))


def model_args(files: dict[str, Path]) -> list[Any]:
    return [files["checkpoint"], "--model", f"{MODULE}:stacked_net", "--data", files["data"]]


def test_diagnose_table_names_the_classes(files: dict[str, Path]) -> None:
    code, out, err = run("diagnose", *model_args(files), "--quiet")
    assert code == 0, err
    assert "| direct" in out and "| stacked" in out and "as saved" in out


def test_diagnose_output_goes_through_the_one_output_check(
    files: dict[str, Path], tmp_path: Path
) -> None:
    # core.files.OutputPlan: never the input (checkpoint or data), never over a file without
    # --force; refused before the model runs, inputs untouched.
    for target in (files["checkpoint"], files["data"]):
        before = digest(target)
        code, _, err = run("diagnose", *model_args(files), "-o", target, "--force", "--quiet")
        assert code == 2 and f"--output {target}: is the input file" in err, err
        assert digest(target) == before
    taken = tmp_path / "taken.md"
    taken.write_text("keep")
    code, _, err = run("diagnose", *model_args(files), "-o", taken, "--quiet")
    assert code == 2 and f"--output {taken}: already exists; pass --force" in err
    assert taken.read_text() == "keep"


def test_diagnose_json_is_a_report_check_gates(files: dict[str, Path], tmp_path: Path) -> None:
    report = tmp_path / "diag.json"
    code, _, err = run("diagnose", *model_args(files), "-f", "json", "-o", report)
    assert code == 0, err
    meta, metrics = load_report(report)
    assert metrics[("3", "shift_ratio")].value > 1.5 and ("model", "accuracy") in metrics
    assert [row["kind"] for row in meta["layers"]] == ["direct", "stacked"]
    assert str(tmp_path) not in report.read_text()  # no absolute paths in the report
    code, _, err = run("check", report, "--baseline", report, "--fail-if", "shift_ratio > 1.1")
    assert code == 1 and "check failed" in err
    # Recalibrated on the same data, the ratio is n/(n-1): the gate passes.
    fixed = tmp_path / "fixed.pt"
    code, _, err = run("recalibrate", *model_args(files), "-o", fixed, "--quiet")
    assert code == 0, err
    again = tmp_path / "fixed.json"
    args = [fixed, "--model", f"{MODULE}:stacked_net", "--data", files["data"]]
    assert run("diagnose", *args, "-f", "json", "-o", again)[0] == 0
    code, _, err = run("check", again, "--baseline", again, "--fail-if", "shift_ratio > 1.1")
    assert code == 0, err


def test_recalibrate_writes_only_bn_buffers_and_keeps_the_input(
    files: dict[str, Path], tmp_path: Path
) -> None:
    from varshift.frameworks.torch.passes import recalibrate

    before = digest(files["checkpoint"])
    out = tmp_path / "fixed.pt"
    code, stdout, err = run("recalibrate", *model_args(files), "-o", out)
    assert code == 0, err
    assert f"wrote {out}" in err and "before/after" in stdout
    assert digest(files["checkpoint"]) == before
    state = torch.load(out, weights_only=True)
    stacked_net().load_state_dict(state, strict=True)
    x, _ = digits()
    want = recalibrate(trained("stacked"), x).model.state_dict()
    for key, value in state.items():
        np.testing.assert_allclose(value, want[key], rtol=1e-6)
    # A rerun finds identical bytes: 'unchanged', exit 0. Another result needs --force; the
    # file is left as it was.
    written = digest(out)
    code, _, err = run("recalibrate", *model_args(files), "-o", out)
    assert code == 0 and f"unchanged {out}" in err and digest(out) == written, err
    code, _, err = run("recalibrate", *model_args(files), "-o", out, "--max-batches", "1")
    assert code == 2 and "already exists" in err and digest(out) == written


def test_a_training_checkpoint_keeps_its_other_entries(
    files: dict[str, Path], tmp_path: Path
) -> None:
    source = tmp_path / "train.pt"
    torch.save({"epoch": 7, "model_state_dict": trained("stacked").state_dict()}, source)
    out = tmp_path / "fixed.pt"
    args = [source, "--model", f"{MODULE}:stacked_net", "--data", files["data"], "-o", out]
    assert run("recalibrate", *args, "-q")[0] == 0
    saved = torch.load(out, weights_only=True)
    assert saved["epoch"] == 7
    stacked_net().load_state_dict(saved["model_state_dict"], strict=True)


def test_export_archive_and_data_import_path(files: dict[str, Path], tmp_path: Path) -> None:
    net = trained("stacked")
    archive = tmp_path / "net.pt2"
    torch.export.save(
        torch.export.export(net, (torch.randn(8, 64),), dynamic_shapes=BATCH), archive
    )
    out = tmp_path / "fixed.pt2"
    args = ["--model", archive, "--data", f"{MODULE}:loader", "-o", out, "-q"]
    code, stdout, err = run("recalibrate", *args)
    assert code == 0, err
    assert "recalibrated, dropout on (update_bn)" in stdout  # the loader gives labels
    fixed = torch.export.load(out).state_dict
    x, _ = digits()
    from varshift.frameworks.torch.passes import recalibrate

    want = recalibrate(net, x).model.state_dict()
    for key in ("3.running_var", "7.running_var", "7.running_mean"):
        np.testing.assert_allclose(fixed[key], want[key], rtol=1e-5)
    code, _, err = run("recalibrate", "--model", archive, "--data", files["data"], "-o", "x.pt")
    assert code == 2 and "written as .pt2" in err


def write_npz(path: Path, x: Any, y: Any = None) -> Path:
    arrays = {"x": x} if y is None else {"x": x, "y": y}
    np.savez(path, **arrays)
    return path


BAD = [
    ("mismatch", ["--model-arg", "width=32"], "does not match the model"),
    ("shape", ["DATA", lambda x, y: write_npz(Path("d.npz"), x[:, :63])], "rejects a batch"),
    ("dtype", ["DATA", lambda x, y: write_npz(Path("d.npz"), x + 1j)], "got dtype complex"),
    ("nan", ["DATA", lambda x, y: write_npz(Path("d.npz"), x * np.nan)], "non-finite"),
    ("empty", ["DATA", lambda x, y: write_npz(Path("d.npz"), x[:0])], "no samples"),
    ("labels", ["DATA", lambda x, y: write_npz(Path("d.npz"), x, y[:-1])], "labels for"),
    ("no-bn", ["MODEL", f"{MODULE}:no_bn"], "no BatchNorm layer"),
    ("import", ["MODEL", "no_such_package.nets:build"], "cannot import"),
    ("factory", ["MODEL", f"{MODULE}:broken"], "the factory raised RuntimeError: boom"),
    ("unsafe", ["UNSAFE"], "refusing to load"),
]


@pytest.mark.parametrize(("case", "change", "message"), BAD, ids=[b[0] for b in BAD])
@pytest.mark.parametrize("command", ["diagnose", "recalibrate"])
def test_bad_input_is_one_line_exit_2_and_no_file(
    files: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    command: str,
    case: str,
    change: list[Any],
    message: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    checkpoint, model, data = files["checkpoint"], f"{MODULE}:stacked_net", files["data"]
    extra: list[Any] = []
    if change[0] == "DATA":
        x, y = digits()
        data = change[1](x.numpy(), y.numpy())
    elif change[0] == "MODEL":
        model, checkpoint = change[1], None
    elif change[0] == "UNSAFE":
        checkpoint = tmp_path / "unsafe.pt"
        torch.save(
            {"state_dict": trained("stacked").state_dict(), "net": stacked_net()}, checkpoint
        )
    else:
        extra = change
    out = tmp_path / "out.pt"
    args = [*([checkpoint] if checkpoint else []), "--model", model, "--data", data, *extra]
    code, stdout, err = run(command, *args, "-o", out)
    assert code == 2, (err, stdout)
    assert err.startswith("varshift: error: ") and err.strip().count("\n") == 0, err
    assert message in err
    assert not out.exists()


def test_help_has_examples_and_says_what_runs_code() -> None:
    for command in ("diagnose", "recalibrate"):
        result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "300"})
        out = result.stdout
        assert result.exit_code == 0 and f"varshift {command}" in out and "Examples" in out
        assert "runs no user code" in out and "(imports and runs that code)" in out


def test_json_metrics_are_long_rows_with_orientations(files: dict[str, Path]) -> None:
    code, out, err = run("diagnose", *model_args(files), "-f", "json", "-q", "--no-dropout-on")
    assert code == 0, err
    doc = json.loads(out)
    rows = {(r["scenario"], r["metric"]): r for r in doc["rows"]}
    assert rows[("3", "shift_ratio")]["better"] == "none"
    assert rows[("model", "nll")]["better"] == "lower"
    assert rows[("3", "dropout_on_ratio")]["value"] is None  # that pass was skipped


def test_npy_with_labels_file_and_csv_with_label_column(
    files: dict[str, Path], tmp_path: Path
) -> None:
    x, y = digits()
    np.save(tmp_path / "x.npy", x.numpy())
    np.save(tmp_path / "y.npy", y.numpy())
    header = ",".join([f"p{i}" for i in range(64)] + ["digit"])
    rows = [",".join(map(str, [*r, int(c)])) for r, c in zip(x.numpy(), y.numpy(), strict=True)]
    (tmp_path / "d.csv").write_text(header + "\n" + "\n".join(rows) + "\n")
    base = [files["checkpoint"], "--model", f"{MODULE}:stacked_net", "-f", "json", "-q"]
    reports = []
    for extra in (
        ["--data", tmp_path / "x.npy", "--labels", tmp_path / "y.npy"],
        ["--data", tmp_path / "d.csv", "--label-key", "digit"],
        ["--data", files["data"]],
    ):
        code, out, err = run("diagnose", *base, *extra, "--no-dropout-on")
        assert code == 0, err
        reports.append({(r["scenario"], r["metric"]): r["value"] for r in json.loads(out)["rows"]})
    # The same samples and labels however they are stored (csv holds them as decimal text).
    for key in (("model", "accuracy"), ("3", "shift_ratio"), ("7", "eval_var")):
        assert reports[0][key] == pytest.approx(reports[2][key], rel=1e-6)
        assert reports[1][key] == pytest.approx(reports[2][key], rel=1e-6)


def slow_args(files: dict[str, Path]) -> list[Any]:
    model = [files["checkpoint"], "--model", f"{MODULE}:stacked_net"]
    return ["diagnose", *model, "--data", f"{MODULE}:slow", "--no-dropout-on"]


def test_progress_bar_on_a_terminal_for_a_slow_pass(
    files: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FORCE_COLOR", "1")  # stderr counts as a terminal for Rich
    code, out, err = run(*slow_args(files), "--max-batches", "6")
    assert code == 0, err
    assert "eval" in err and "/6 batches" in err  # label, done/total (known: --max-batches)
    assert "eval" not in out.split("varshift diagnose")[0]  # nothing of it on stdout
    code, _, err = run(*slow_args(files))  # total unknown on the first pass: a count only
    assert code == 0 and "batches" in err and "/6 batches" not in err
    code, _, err = run(*slow_args(files), "--quiet")
    assert code == 0 and "batches" not in err


def test_no_progress_when_stderr_is_piped(
    files: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):
        monkeypatch.delenv(name, raising=False)
    code, _, err = run(*slow_args(files))  # CliRunner's stderr is not a tty
    assert code == 0, err
    assert "batches" not in err and "\r" not in err and "\x1b" not in err


def test_two_diagnose_runs_write_identical_json(files: dict[str, Path], tmp_path: Path) -> None:
    reports = [tmp_path / "a.json", tmp_path / "b.json"]
    for report in reports:
        code, _, err = run("diagnose", *model_args(files), "-f", "json", "-o", report, "-q")
        assert code == 0, err
    assert reports[0].read_bytes() == reports[1].read_bytes()
    meta, metrics = load_report(reports[0])
    assert meta["parameters"]["seed"] == 0 and "4 standard errors" in meta["flag_rule"]
    code, _, err = run(
        "diagnose",
        *model_args(files),
        "-f",
        "json",
        "-o",
        reports[1],
        "--force",
        "-q",
        "--seed",
        "1",
    )
    assert code == 0, err
    assert (
        load_report(reports[1])[1][("3", "dropout_on_ratio")].value
        != metrics[("3", "dropout_on_ratio")].value
    )
