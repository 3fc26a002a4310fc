"""The CLI contract under hostile input (issue 15).

Every command on bad input exits 2 with one line on stderr, never 3 (a traceback), never hangs;
inputs stay byte-identical; nothing is written after a non-zero exit; an empty comparison fails
``check``. Regression tests name each case of the issue; a hypothesis property test then runs
random option/value/file combinations over every reader and command.

Profiles: ``fast`` (default, a few seconds, in ``make test``) and ``fuzz`` (``make fuzz``, set by
``VARSHIFT_HYPOTHESIS_PROFILE=fuzz``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from _hostile_corpus import STATS_CSV, make_corpus, snapshot
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from varshift.cli import app

# make test: the same 40 examples every run (a gate must not flip on a new random draw);
# make fuzz: 1,500 fresh ones each run, to find new cases.
settings.register_profile(
    "fast",
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)
settings.register_profile(
    "fuzz", max_examples=1500, deadline=None, suppress_health_check=list(HealthCheck)
)
PROFILE = os.environ.get("VARSHIFT_HYPOTHESIS_PROFILE", "fast")

runner = CliRunner()


def run(*args: object) -> Any:
    return runner.invoke(app, [str(a) for a in args])


def assert_refused(result: Any, *parts: str) -> None:
    """Exit 2, one line on stderr naming ``parts``, no traceback."""
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == 2, (result.exit_code, result.stderr)
    err = result.stderr
    assert err.startswith("varshift: error: ") and err.count("\n") == 1, err
    for part in parts:
        assert part in err, (part, err)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_corpus(tmp_path_factory.mktemp("corpus"))


# --- regression tests, one per case of the issue ------------------------------------------


@pytest.mark.parametrize(
    ("name", "rule"),
    [
        ("deep.json", "nested"),
        ("digits5000.json", "digits"),
        ("digits400.json", "too large"),
        ("huge_field.csv", "field larger than field limit"),
        ("huge_header.npz", "declares shape (1000000000000,)"),
        ("string.npz", "expected real numbers"),
        ("structured.npz", "expected real numbers"),
        ("complex.npz", "expected real numbers"),
        ("int_var.pt", "stored as int64"),
        ("complex_var.pt", "complex64"),
        ("meta_var.pt", "meta tensor"),
        ("sparse_var.pt", "sparse_coo tensor"),
        ("string.weights.h5", "expected floating-point"),
        ("compound.weights.h5", "expected floating-point"),
        ("soft.weights.h5", "SoftLink"),
        ("external.weights.h5", "ExternalLink"),
        ("fifo.csv", "not a regular file"),
        ("urandom.json", "not a regular file"),
    ],
)
def test_hostile_files_are_one_line_refusals(corpus: dict[str, Path], name: str, rule: str) -> None:
    if name not in corpus:
        pytest.skip(f"{name} cannot be made here")
    before = snapshot(corpus)
    for command in ("inspect", "check"):
        extra = ["--baseline", corpus["good.csv"]] if command == "check" else []
        assert_refused(run(command, corpus[name], *extra), name, rule)
    assert snapshot(corpus) == before


@pytest.mark.parametrize(
    ("name", "rule"),
    [
        ("object.npy", "holds pickled objects (dtype object)"),
        ("structured.npy", "got dtype structured"),
        ("string.npy", "got dtype <U1"),
        ("complex.npy", "got dtype complex128"),
        ("huge_header.npy", "declares shape (1000000000000,) (1,000,000,000,000 values); at most"),
        ("short.npy", "declares shape (1000, 4) (32,000 bytes) but holds 64 bytes"),
    ],
)
def test_npy_headers_are_checked_before_loading(
    corpus: dict[str, Path], name: str, rule: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import numpy as np

    def no_load(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("np.load reached: the header was not checked first")

    monkeypatch.setattr(np, "load", no_load)
    before = snapshot(corpus)
    result = run("simulate", "--input", corpus[name], "--epochs", "1", "--no-report")
    assert_refused(result, name, rule)
    assert snapshot(corpus) == before


@pytest.mark.parametrize("name", ["huge_header.npy", "huge_header.npz", "object.npy"])
def test_model_data_headers_are_checked_before_loading(
    corpus: dict[str, Path], torch_files: dict[str, Path], name: str
) -> None:
    if not torch_files:
        pytest.skip("needs torch and scikit-learn")
    args = [torch_files["net.pt"], "--model", "tests._digits:stacked_net", "--data", corpus[name]]
    rule = "holds pickled objects" if name == "object.npy" else "declares shape (1000000000000,)"
    assert_refused(run("diagnose", *args), name, rule)


def test_good_npy_activations_still_load(corpus: dict[str, Path]) -> None:
    args = ["simulate", "--input", corpus["activations.npy"], "--batch-size", "16"]
    result = run(*args, "--epochs", "1", "--no-report", "-f", "csv")
    assert result.exit_code == 0, result.stderr


def test_a_wide_header_is_not_echoed(corpus: dict[str, Path]) -> None:
    result = run("inspect", corpus["wide_header.csv"])
    assert_refused(result, "missing column", "30,000 columns")
    assert len(result.stderr) < 600


@pytest.mark.parametrize("name", ["no_layers.json", "header_only.csv", "no_bn.pt"])
def test_an_empty_comparison_fails_the_gate(corpus: dict[str, Path], name: str) -> None:
    assert_refused(run("check", corpus[name], "--baseline", corpus[name]), "nothing to compare")


def test_a_zero_length_layer_under_check_is_refused(corpus: dict[str, Path]) -> None:
    path = corpus["zero_length.json"]
    assert_refused(run("check", path, "--baseline", path), "no channels")


def test_int_variance_is_refused_not_truncated(corpus: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "o.pt"
    assert_refused(run("correct", corpus["int_var.pt"], "--rate", "0.2", "-o", out), "int64")
    assert not out.exists()


def test_batch_size_one_is_refused_not_clipped(corpus: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "o.weights.h5"
    good = corpus["good.weights.h5"]
    result = run("correct", good, "--rate", "0.2", "--batch-size", "1", "-o", out)
    assert_refused(result, "batch_size", "got 1")
    assert not out.exists()


@pytest.mark.parametrize(
    ("args", "parts"),
    [
        (["simulate", "--mean", "1e308"], ["mean", "1e+308"]),
        (["simulate", "--std", "1e308"], ["std", "1e+308"]),
        (["theory", "--var", "1e308"], ["var", "1e+308"]),
        (["theory", "--mean", "1e308"], ["mean", "1e+308"]),
        (
            ["theory", "--std", "1e308"],
            ["std", "1e+308"],
        ),  # std**2 overflowed (found by the property test)
        (["simulate", "--seed", "-1"], ["seed", "-1"]),
        (["simulate", "--momentum", "1.0000001"], ["momentum", "1.0000001"]),
        (["simulate", "--rate", "abc"], ["--rate"]),
        (["simulate", "--no-such-option"], ["--no-such-option"]),
        (["sweep", "--rate", "0:1e300:1e-10"], ["--rate", "0:1e300:1e-10"]),
        (["simulate", "--samples", "1000000000"], ["samples", "at most"]),
        (["simulate", "--topology", "conv", "--spatial", "99999x99999"], ["--spatial"]),
        (["simulate", "--topology", "linear", "--width", "1000000"], ["--width"]),
        (["simulate", "--epochs", "1000000000"], ["--epochs", "at most"]),
        (["simulate", "--steps", "1000000000"], ["--steps", "at most"]),
        (["simulate", "-o", "."], ["."]),
        (["simulate", "-o", ""], ["not a file name"]),
        (["suite", "--stem", "../escape"], ["--stem", "../escape"]),
        (["sweep", "--seed", "-1"], ["seed", "got -1"]),
        (["sweep", "--simulate", "--seed", "-1"], ["seed", "got -1"]),
        # 9 points × 100,000 steps × batch 256 × 1,000 reps = 2.304e11 values of work
        (
            [
                *["sweep", "--rate", "0.1:0.9:0.1", "--simulate", "--steps", "100000"],
                *["--reps", "1000", "--batch-size", "256"],
            ],
            ["2.3e+11", "at most 1e+11", "--force"],
        ),
    ],
)
def test_bad_values_are_one_line_refusals_before_any_work(
    args: list[str], parts: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert_refused(run(*args), *parts)
    assert list(tmp_path.iterdir()) == []  # nothing written, not even a report folder


def test_outputs_checked_against_inputs_and_each_other(tmp_path: Path) -> None:
    stats = tmp_path / "s.csv"
    stats.write_text(STATS_CSV)
    same = tmp_path / "same.json"
    cases = [
        (["correct", stats, "--rate", "0.2", "--html", stats, "--dry-run"], "is the input"),
        (["correct", stats, "--rate", "0.2", "-o", same, "--report", same], "is also"),
        (["check", stats, "--baseline", stats, "--junit", same, "--markdown", same], "is also"),
    ]
    for args, rule in cases:
        for force in ([], ["--force"]):
            assert_refused(run(*args, *force), rule)
            assert stats.read_text() == STATS_CSV
            assert not same.exists()


def test_an_unwritable_report_folder_writes_nothing(tmp_path: Path) -> None:
    stats = tmp_path / "s.csv"
    stats.write_text(STATS_CSV)
    out = tmp_path / "o.csv"
    result = run("correct", stats, "--rate", "0.2", "-o", out, "--report", stats / "r.json")
    assert_refused(result, "not a folder")
    assert not out.exists()


def test_a_full_disk_names_the_path_and_the_free_space(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    from varshift.core import files

    def full(_: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", full)
    stats = tmp_path / "s.csv"
    stats.write_text(STATS_CSV)
    out = tmp_path / "o.csv"
    result = run("correct", stats, "--rate", "0.2", "-o", out, "--no-report")
    assert_refused(result, str(out), "disk is full", "bytes free")
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["s.csv"]  # no temporary file left


def _unshare_tmpfs() -> list[str] | None:
    """The ``unshare`` prefix that gives a private mount namespace in which this user may mount
    a tmpfs (a user namespace when not root), or None where the system does not allow it."""
    import shutil
    import subprocess

    if shutil.which("unshare") is None or not hasattr(os, "geteuid"):
        return None
    prefix = ["unshare", "--mount"] if os.geteuid() == 0 else ["unshare", "--user"]
    prefix += [] if os.geteuid() == 0 else ["--map-root-user", "--mount"]
    probe = subprocess.run(
        [*prefix, "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt 2>/dev/null && echo ok"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return prefix if probe.stdout.strip() == "ok" else None


def test_a_real_full_disk_writes_nothing(tmp_path: Path) -> None:
    """A real ENOSPC: the outputs go to a 1 MiB tmpfs mounted in a private mount namespace
    (``unshare``; no root needed where user namespaces are enabled), the corrected file is
    ~1.5 MB. One line naming the path and the free space, exit 2, the tmpfs left empty."""
    import subprocess
    import sys

    prefix = _unshare_tmpfs()
    if prefix is None:
        pytest.skip("no private mount namespace with tmpfs here (unshare or user namespaces)")
    stats = tmp_path / "s.csv"
    rows = "".join(f"bn,{i},0.5,2.5,500\n" for i in range(60_000))
    stats.write_text("layer,channel,mean,var,count\n" + rows)
    small = tmp_path / "small"
    small.mkdir()
    err = tmp_path / "err.txt"
    script = (
        'mount -t tmpfs -o size=1m tmpfs "$1" || exit 99; '
        '"$2" -m varshift correct "$3" --rate 0.2 -o "$1/o.csv" 2>"$4"; echo "rc=$?"; ls -A "$1"'
    )
    done = subprocess.run(
        [*prefix, "sh", "-c", script, "sh", small, sys.executable, stats, err],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    lines = done.stdout.split()
    assert lines and lines[0] == "rc=2", (done.stdout, done.stderr, err.read_text())
    assert lines[1:] == []  # nothing on the full disk: no output, no report, no temporary file
    text = err.read_text()
    assert text.startswith("varshift: error: ") and text.count("\n") == 1, text
    assert f"{small}/o.csv: the disk is full (" in text and "bytes free in" in text, text
    assert stats.read_text().count("\n") == 60_001


def test_stale_temporary_files_are_removed_by_the_next_run(tmp_path: Path) -> None:
    from varshift.core.files import temp_name

    stats = tmp_path / "s.csv"
    stats.write_text(STATS_CSV)
    out = tmp_path / "o.csv"
    dead = 2**22 + 12345  # above the default pid_max: no such process
    stale = temp_name(out, dead)
    stale.write_text("partial")
    result = run("correct", stats, "--rate", "0.2", "-o", out, "--no-report")
    assert result.exit_code == 0, result.stderr
    assert not stale.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.csv", "s.csv"]


def test_a_file_created_meanwhile_is_not_replaced_without_force(tmp_path: Path) -> None:
    from varshift.core.files import OutputPlan, replacing

    out = tmp_path / "o.txt"
    OutputPlan().add(out)
    out.write_text("the other process")  # another writer wins the race
    with pytest.raises(Exception, match="another process"), replacing(out) as tmp:
        tmp.write_text("mine")
    assert out.read_text() == "the other process"
    assert [p.name for p in tmp_path.iterdir()] == ["o.txt"]


# --- the property test ----------------------------------------------------------------------

NUMBERS = ["0", "-1", "1", "0.2", "1.0000001", "1e308", "-1e308", "nan", "inf", "abc", "", "1e9"]
NUMBERS += ["999999999999999999999999", "2", "0.999", "-0"]
OPTIONS: dict[str, list[str]] = {
    "inspect": ["--format", "--layer"],
    "correct": ["--rate", "--batch-size", "--beta", "--dropout", "--framework", "--method"],
    "check": ["--z", "--rtol", "--atol", "--fail-if"],
    "theory": ["--rate", "--mean", "--var", "--std", "--momentum", "--beta"],
    "simulate": ["--rate", "--mean", "--std", "--momentum", "--seed", "--batch-size", "--beta"],
}
OUTPUTS = {"inspect": ["-o"], "correct": ["-o", "--report", "--html"]}
OUTPUTS["check"] = ["--markdown", "--junit"]
OUTPUTS["theory"] = ["-o"]
OUTPUTS["simulate"] = ["-o"]


@st.composite
def command_lines(draw: st.DrawFn, names: list[str]) -> tuple[list[str], list[str]]:
    """``(args, output names)``: a command, its input files, options, outputs."""
    command = draw(st.sampled_from(sorted(OPTIONS)))
    args: list[str] = [command]
    if command in ("inspect", "correct", "check"):
        args.append(draw(st.sampled_from(names)))
    if command == "check":
        args += ["--baseline", draw(st.sampled_from(names))]
    if command == "correct":
        args += ["--rate", draw(st.sampled_from(["0.2", *NUMBERS]))]
    if command == "simulate":
        args += ["--samples", "64", "--epochs", "1", "--features", "2", "--no-report"]
    for option in draw(st.lists(st.sampled_from(OPTIONS[command]), max_size=3)):
        args += [option, draw(st.sampled_from(NUMBERS))]
    inputs = [a for a in args if a in names]  # an output may only collide with these
    outputs: list[str] = []
    for option in draw(st.lists(st.sampled_from(OUTPUTS[command]), max_size=2)):
        target = draw(st.sampled_from(["@new.json", "@new.csv", "@new.md", *inputs]))
        args += [option, target]
        outputs.append(target)
    if draw(st.booleans()):
        args.append("--force")
    return args, outputs


@settings(settings.get_profile(PROFILE))
@given(data=st.data())
def test_property_no_traceback_no_modified_input_no_output_after_failure(
    corpus: dict[str, Path], tmp_path_factory: pytest.TempPathFactory, data: st.DataObject
) -> None:
    names = sorted(corpus)
    args, _ = data.draw(command_lines(names))
    out_dir = tmp_path_factory.mktemp("out")
    argv = [
        str(corpus[a]) if a in corpus else (str(out_dir / a[1:]) if a.startswith("@") else a)
        for a in args
    ]
    before = snapshot(corpus)
    result = runner.invoke(app, argv)
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        argv,
        repr(result.exception),
    )
    assert result.exit_code in (0, 1, 2), (argv, result.exit_code, result.stderr)
    if result.exit_code == 2:
        assert result.stderr.count("\n") == 1 and result.stderr.startswith("varshift"), (
            argv,
            result.stderr,
        )
    assert snapshot(corpus) == before, argv
    if result.exit_code == 2 or (result.exit_code == 1 and args[0] != "check"):
        assert list(out_dir.iterdir()) == [], (argv, result.stderr)
    assert not [p for p in out_dir.iterdir() if "varshift-tmp" in p.name]


def test_diagnose_and_recalibrate_refuse_their_inputs_as_output(tmp_path: Path) -> None:
    data = tmp_path / "x.npz"
    data.write_bytes(b"not read: the output check comes first")
    model = tmp_path / "m.pt2"
    model.write_bytes(b"not read either")
    for command in ("diagnose", "recalibrate"):
        for target in (data, model):
            result = run(command, "--model", model, "--data", data, "-o", target, "--force")
            assert_refused(result, "is the input")
    assert data.read_bytes().startswith(b"not read")


def test_clipping_is_reported_even_with_quiet(tmp_path: Path) -> None:
    # v = q (V + mu²) - mu² = 0.8 · 1.25 - 1 = 0 for channel 0: clipped to eps, loudly
    stats = tmp_path / "clip.csv"
    stats.write_text("layer,channel,mean,var,count\nbn,0,1,0.25,500\nbn,1,0,1,500\n")
    out = tmp_path / "o.csv"
    result = run("correct", stats, "--rate", "0.2", "-o", out, "--quiet", "--no-report")
    assert result.exit_code == 0, result.stderr
    assert "warning" in result.stderr and "clipped" in result.stderr, result.stderr


# --- the property test, continued: sweep, suite, diagnose, recalibrate ---------------------

MORE_VALUES = [*NUMBERS, "x", "../escape", "single-pass", "topological", "0.1:0.9:0.4"]
MORE_OPTIONS: dict[str, list[str]] = {
    "sweep": ["--rate", "--mean", "--var", "--batch-size", "--seed", "--steps", "--reps"],
    "suite": ["--seed"],  # --stem: a regression case above; --workers spawns processes
    "diagnose": ["--batch-size", "--input-key", "--label-key", "--device"],
    "recalibrate": ["--batch-size", "--input-key", "--method", "--device"],
}
MORE_OPTIONS["sweep"] += ["--momentum", "--seeds"]


def _natural(text: str) -> bool:
    """Whether ``text`` is a valid seed (an integer >= 0, "-0" included)."""
    return text.lstrip("-").isdigit() and int(text) >= 0


@pytest.fixture(scope="module")
def torch_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An (untrained, seeded) stacked net's checkpoint and the digits data, or nothing."""
    try:
        import numpy as np
        import torch

        from tests._digits import digits, stacked_net
    except ImportError:  # pragma: no cover - torch or sklearn missing
        return {}
    root = tmp_path_factory.mktemp("nets")
    torch.manual_seed(0)
    torch.save(stacked_net().state_dict(), root / "net.pt")
    x, y = digits()
    np.savez(root / "digits.npz", x=x.numpy(), y=y.numpy())
    return {"net.pt": root / "net.pt", "digits.npz": root / "digits.npz"}


@st.composite
def more_command_lines(
    draw: st.DrawFn, names: list[str], torch_names: list[str]
) -> tuple[list[str], list[str]]:
    """``(args, output names)`` for sweep, suite, diagnose and recalibrate."""
    commands = ["sweep", "suite", *(["diagnose", "recalibrate"] if torch_names else [])]
    command = draw(st.sampled_from(commands))
    args: list[str] = [command]
    inputs: list[str] = []
    if command in ("diagnose", "recalibrate"):
        # the good files half of the time, else any file of the corpus
        good = draw(st.booleans())
        checkpoint = draw(st.just("net.pt") if good else st.sampled_from(names))
        data = draw(st.just("digits.npz") if draw(st.booleans()) else st.sampled_from(names))
        args += [checkpoint, "--model", "tests._digits:stacked_net", "--data", data]
        args += ["--max-batches", "2", *(["--no-dropout-on"] if command == "diagnose" else [])]
        inputs = [checkpoint, data]
    if command == "suite":
        args += ["--quick", "--report-dir", "@reports"]
    if command == "sweep" and draw(st.booleans()):
        args += ["--simulate", "--steps", "20", "--reps", "4"]
    # suite gets a bad --seed: a whole valid suite run takes seconds (tests/test_suite.py runs it)
    least = 1 if command == "suite" else 0
    values = [v for v in MORE_VALUES if command != "suite" or not _natural(v)]
    options = [o for o in MORE_OPTIONS[command] if o not in args]  # each given once
    drawn = st.lists(st.sampled_from(options), min_size=least, max_size=3, unique=True)
    for option in draw(drawn):
        args += [option, draw(st.sampled_from(values))]
    outputs: list[str] = []
    if command != "suite" and (command == "recalibrate" or draw(st.booleans())):
        target = draw(st.sampled_from(["@new.pt", "@new.json", "@new.csv", *inputs]))
        args += ["-o", target]
        outputs.append(target)
    if draw(st.booleans()):
        args.append("--force")
    return args, outputs


@settings(settings.get_profile(PROFILE), max_examples=24 if PROFILE == "fast" else 600)
@given(data=st.data())
def test_property_sweep_suite_diagnose_recalibrate(
    corpus: dict[str, Path],
    torch_files: dict[str, Path],
    tmp_path_factory: pytest.TempPathFactory,
    data: st.DataObject,
) -> None:
    files = {**corpus, **torch_files}
    args, _ = data.draw(more_command_lines(sorted(corpus), sorted(torch_files)))
    out_dir = tmp_path_factory.mktemp("out")
    argv = [
        str(files[a]) if a in files else (str(out_dir / a[1:]) if a.startswith("@") else a)
        for a in args
    ]
    before = snapshot(files)
    result = runner.invoke(app, argv)
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        argv,
        repr(result.exception),
    )
    assert result.exit_code in (0, 2), (argv, result.exit_code, result.stderr)
    if result.exit_code == 2:
        assert result.stderr.count("\n") == 1 and result.stderr.startswith("varshift"), (
            argv,
            result.stderr,
        )
        assert list(out_dir.iterdir()) == [], (argv, result.stderr)
    assert snapshot(files) == before, argv
    assert not [p for p in out_dir.rglob("*") if "varshift-tmp" in p.name]
