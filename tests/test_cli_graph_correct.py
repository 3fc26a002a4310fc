"""`varshift correct --model` through the command line (issue 10): the per-layer classes and
formulas in the table, the report and the page; the written file; a .pt2 archive as its own
structure; one-line errors."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

pytestmark = pytest.mark.torch
torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

from tests._digits import linear_net  # noqa: E402
from tests._graph_nets import eval_variance, trained  # noqa: E402
from varshift.cli import app  # noqa: E402
from varshift.formats import read_stats  # noqa: E402

runner = CliRunner()
BATCH = ({0: torch.export.Dim("batch")},)
LINEAR = "tests._digits:linear_net"


def run(*args: str | Path) -> tuple[int, str, str]:
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def one_line_error(code: int, err: str, text: str) -> None:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and text in lines[0], err
    assert "Traceback" not in err


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    path = tmp_path / "model.pt"
    torch.save(trained("linear", 0.5, 0).state_dict(), path)
    return path


def test_correct_with_model_table_report_and_file(tmp_path: Path, checkpoint: Path) -> None:
    before = digest(checkpoint)
    out, page = tmp_path / "fixed.pt", tmp_path / "page.html"
    code, stdout, err = run("correct", checkpoint, "--model", LINEAR, "-o", out, "--html", page)
    assert code == 0, err
    assert digest(checkpoint) == before
    assert "structure unknown" not in err and "warning" not in err
    assert "through-linear" in stdout and "untouched" in stdout
    assert "1 of 2 BatchNorm layer(s) corrected" in stdout
    report = json.loads(Path(f"{out}.report.json").read_text())
    rows = {r["layer"]: r for r in report["rows"]}
    assert rows["1"]["kind"] == "none" and rows["1"]["assumption"] == "no dropout upstream"
    five = rows["5"]
    assert five["kind"] == "through-linear" and five["formula"].startswith("through-linear")
    assert five["dropout_term"] > 0 and "Gaussian" in five["assumption"]
    assert report["metadata"]["parameters"]["model"] == LINEAR
    # the fixed file loads strictly and its through-linear BN is what the library computed
    net = linear_net(0.5)
    net.load_state_dict(torch.load(out, weights_only=True), strict=True)
    stored = net.state_dict()["5.running_var"].double().numpy()
    assert stored.mean() == pytest.approx(five["var_after"], rel=1e-6)
    ratio = stored / eval_variance(net)["5"]
    assert 0.9 < np.median(ratio) < 1.1  # the targets are in test_graph_correct.py
    html = page.read_text()
    assert "through-linear" in html and "dropout_term" in html and "assumption" in html


def test_stacked_layers_are_reported_not_changed(tmp_path: Path) -> None:
    path = tmp_path / "stacked.pt"
    torch.save(trained("stacked", 0.5, 0).state_dict(), path)
    out = tmp_path / "fixed.pt"
    code, stdout, err = run("correct", path, "-m", "tests._digits:stacked_net", "-o", out, "-q")
    assert code == 0, err
    assert "stacked" in stdout and "not corrected" in stdout
    old, new = read_stats(path), read_stats(out)
    np.testing.assert_array_equal(old.layers["7"].var, new.layers["7"].var)
    assert not np.array_equal(old.layers["3"].var, new.layers["3"].var)
    report = json.loads(Path(f"{out}.report.json").read_text())
    seven = next(r for r in report["rows"] if r["layer"] == "7")
    assert seven["action"] == "not corrected" and "varshift recalibrate" in seven["assumption"]


def export(net: Any, path: Path, example: Any) -> Path:
    torch.export.save(torch.export.export(net, (example,), dynamic_shapes=BATCH), path)
    return path


def test_export_archive_is_its_own_structure(tmp_path: Path, checkpoint: Path) -> None:
    archive = export(trained("linear", 0.5, 0), tmp_path / "net.pt2", torch.randn(8, 64))
    before = digest(archive)
    out = tmp_path / "fixed.pt2"
    code, _, err = run("correct", archive, "-o", out, "--report", tmp_path / "r.json", "-q")
    assert code == 0, err
    assert digest(archive) == before
    code, _, err = run("correct", checkpoint, "-m", LINEAR, "-o", tmp_path / "f.pt", "-q")
    assert code == 0, err
    from_archive = {r["layer"]: r for r in json.loads((tmp_path / "r.json").read_text())["rows"]}
    from_factory = {
        r["layer"]: r
        for r in json.loads(Path(f"{tmp_path / 'f.pt'}.report.json").read_text())["rows"]
    }
    for layer in ("1", "5"):
        assert from_archive[layer]["kind"] == from_factory[layer]["kind"]
        assert from_archive[layer]["var_after"] == pytest.approx(
            from_factory[layer]["var_after"], rel=1e-9
        )
    program = torch.export.load(out)
    fixed = program.state_dict["5.running_var"].double().numpy()
    assert fixed.mean() == pytest.approx(from_factory["5"]["var_after"], rel=1e-6)
    code, _, err = run("correct", archive, "-o", tmp_path / "x.pt")
    one_line_error(code, err, "a torch.export archive is written as .pt2")


def test_exported_conv_counts_its_padding(tmp_path: Path) -> None:
    """The exported graph records the conv's input size: no --input-shape needed."""
    archive = export(trained("conv", 0.2, 0), tmp_path / "conv.pt2", torch.rand(8, 64))
    code, stdout, err = run("correct", archive, "--dry-run", "-f", "json")
    assert code == 0, err
    six = next(r for r in json.loads(stdout)["rows"] if r["layer"] == "6")
    assert six["action"] == "corrected" and "padding ignored" not in six["assumption"]
    assert six["formula"].startswith("through-linear (conv)")


@pytest.mark.parametrize(
    ("extra", "text"),
    [
        (["--rate", "0.5"], "--rate and --layer cannot be combined with --model"),
        (["--layer", "5=0.5"], "--layer cannot be combined with --model"),
        (["--dropout", "alpha"], "--dropout alpha cannot be combined with --model"),
        (["--input-shape", "a,b"], "--input-shape must be positive integers"),
        (["--model-arg", "width=32"], "does not match the model"),
    ],
)
def test_bad_input_with_model(
    tmp_path: Path, checkpoint: Path, extra: list[str], text: str
) -> None:
    out = tmp_path / "fixed.pt"
    code, _, err = run("correct", checkpoint, "-m", LINEAR, "-o", out, *extra)
    one_line_error(code, err, text)
    assert not out.exists()


def test_input_shape_the_model_rejects(tmp_path: Path) -> None:
    path = tmp_path / "conv.pt"
    torch.save(trained("conv", 0.2, 0).state_dict(), path)
    args = ["correct", path, "-m", "tests._graph_nets:conv_net", "--dry-run"]
    one_line_error(*run(*args, "--input-shape", "9")[::2], "--input-shape 9: data: the model")
    code, stdout, err = run(*args, "--input-shape", "64", "-f", "json")
    assert code == 0, err
    six = next(r for r in json.loads(stdout)["rows"] if r["layer"] == "6")
    assert six["action"] == "corrected" and "padding ignored" not in six["assumption"]


def test_untraceable_model_is_not_corrected(tmp_path: Path) -> None:
    from tests._graph_nets import untraceable_net

    path = tmp_path / "b.pt"
    torch.save(untraceable_net().state_dict(), path)
    code, _, err = run(
        "correct", path, "-m", "tests._graph_nets:untraceable_net", "-o", tmp_path / "o.pt"
    )
    assert code == 0, err
    assert "the model could not be traced" in err
    report = json.loads((tmp_path / "o.pt.report.json").read_text())
    (bn,) = report["rows"]
    assert (bn["kind"], bn["action"]) == ("unknown", "not corrected")
    assert "could not be traced" in bn["assumption"]
    np.testing.assert_array_equal(
        read_stats(path).layers["bn"].var, read_stats(tmp_path / "o.pt").layers["bn"].var
    )


def test_data_needs_the_model(tmp_path: Path, checkpoint: Path) -> None:
    code, _, err = run("correct", checkpoint, "--rate", "0.5", "--data", "x.npy", "--dry-run")
    one_line_error(code, err, "--data and --input-shape need the model's structure")
