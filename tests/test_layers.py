"""The layers import downwards only: core, engine, formats, frameworks and jobs never import
the presentation layer, the command line, pandas, matplotlib, Rich or Typer — not even inside a
function — and the presentation layer never imports the command line."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "varshift"

BELOW_PRESENT = ("core", "engine", "formats", "frameworks", "jobs")
FORBIDDEN_BELOW = ("varshift.present", "varshift.cli", "pandas", "matplotlib", "rich", "typer")


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _modules(*layers: str) -> list[Path]:
    return sorted(p for layer in layers for p in (PACKAGE / layer).rglob("*.py"))


def _hits(path: Path, forbidden: tuple[str, ...]) -> list[str]:
    return sorted(
        n for n in _imports(path) if any(n == f or n.startswith(f + ".") for f in forbidden)
    )


@pytest.mark.parametrize("path", _modules(*BELOW_PRESENT), ids=lambda p: p.stem)
def test_lower_layers_never_import_upwards(path: Path) -> None:
    forbidden = FORBIDDEN_BELOW
    if "frameworks" in path.parts or path == PACKAGE / "core" / "frames.py":
        # a result's to_frame() (for notebooks) imports pandas inside the method, not at import
        # time (core/frames.py is the helper every result uses); tests/test_docs.py checks that
        # importing the numerics loads neither pandas nor torch
        forbidden = tuple(f for f in FORBIDDEN_BELOW if f != "pandas")
    assert _hits(path, forbidden) == [], path


@pytest.mark.parametrize("path", _modules("present"), ids=lambda p: p.stem)
def test_presentation_never_imports_the_command_line(path: Path) -> None:
    assert _hits(path, ("varshift.cli", "typer")) == [], path


# --- one home per fact ------------------------------------------------------------------------

#: The registry modules: the only places that spell these names as values.
REGISTRIES = ("core/presets.py", "core/dropout.py", "core/topology.py")

#: Literals allowed outside the registries, with the reason. Each entry must still be needed
#: (the test fails on a stale one), so the list cannot grow silently out of date.
ALLOWED: dict[str, tuple[frozenset[str], str]] = {
    "core/structure.py": (
        frozenset({"direct"}),
        "a layer-structure class (core.structure.CLASSES), not the topology",
    ),
    "frameworks/torch/graph.py": (
        frozenset({"direct", "bernoulli", "alpha", "linear"}),
        "torch's dropout classes mapped to kinds; torch function names; structure classes",
    ),
    "frameworks/torch/passes.py": (
        frozenset({"direct", "bernoulli"}),
        "runs torch models: nn.Dropout's kind; a structure class",
    ),
    "frameworks/torch/variants.py": (
        frozenset({"direct", "bernoulli", "torch"}),
        "the data-free correction of a torch model: torch's own preset, nn.Dropout's kind, "
        "a structure class",
    ),
    "frameworks/torch/flags.py": (
        frozenset({"torch"}),
        "the convergence flag of a torch BatchNorm: torch's own preset",
    ),
    "frameworks/keras/graph.py": (
        frozenset({"direct", "bernoulli", "gaussian", "alpha", "linear"}),
        "Keras' dropout classes mapped to kinds; Keras' 'linear' activation; a structure class",
    ),
    "formats/keras_archive.py": (frozenset({"keras"}), "the framework whose files it reads"),
    "formats/keras_h5.py": (frozenset({"keras"}), "the framework whose files it reads"),
    "formats/keras_legacy_h5.py": (
        frozenset({"keras", "keras2", "tf-keras"}),
        "the preset a file's keras_version implies: a fact of the file format",
    ),
    "formats/tensors.py": (
        frozenset({"torch", "keras"}),
        "the framework a tensor file's key names reveal",
    ),
    "formats/torch_pt.py": (frozenset({"torch"}), "the framework whose files it reads"),
    "jobs/correct.py": (
        frozenset({"bernoulli", "vanilla", "gaussian", "uout", "alpha"}),
        "DIRECT_FORMULA, the direct formula's text per kind: to become a KindSpec field once "
        "the graph-correction edits to correct.py have merged",
    ),
    "jobs/graph_correct.py": (
        frozenset({"bernoulli", "direct"}),
        "the through-linear closed form is written for Bernoulli masks; a structure class",
    ),
    "jobs/model_correct.py": (
        frozenset({"torch", "keras", "direct"}),
        "wires the torch and Keras model readers (their statistics' conventions when the file "
        "does not say); a structure class",
    ),
    "formats/flax_msgpack.py": (
        frozenset({"flax"}),
        "the format record's name and extra, and the framework a Flax state file implies",
    ),
    "formats/flax_orbax.py": (
        frozenset({"flax"}),
        "the framework an Orbax checkpoint of a Flax state implies",
    ),
    "frameworks/keras/structure.py": (
        frozenset({"linear"}),
        "Keras' activation name 'linear' (the identity), mapped to the structure's names",
    ),
    "jobs/simulate.py": (frozenset({"alpha"}), "the metadata key of the EMA decay α"),
    "jobs/suite.py": (
        frozenset({"torch", "keras", "tf-keras", "flax", "keras2"}),
        "the committed baseline's scenario order and the classic experiment's two presets",
    ),
}


def _registry_names() -> frozenset[str]:
    from varshift.core.dropout import KINDS
    from varshift.core.presets import PRESETS
    from varshift.core.topology import TOPOLOGIES

    return frozenset(PRESETS) | frozenset(KINDS) | frozenset(TOPOLOGIES)


def _string_literals(path: Path) -> set[str]:
    """Every string constant of a module except docstrings (prose may name anything)."""
    tree = ast.parse(path.read_text())
    docs = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            first = body[0] if body else None
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docs.add(id(first.value))
    return {
        n.value
        for n in ast.walk(tree)
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs
    }


def test_registry_names_are_spelled_only_in_their_registries() -> None:
    # DESIGN §3 / issue 12: a grep for a framework, preset, dropout kind or topology name outside
    # its registry (and the CLI's generated choices, cli/_common.py, which holds none) finds
    # nothing but the allow-listed uses above.
    names = _registry_names()
    assert {"torch", "tf-keras", "uout", "linear"} <= names  # the scan looks for the real names
    hits, stale = [], []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel in REGISTRIES:
            continue
        found = _string_literals(path) & names
        allowed = ALLOWED.get(rel, (frozenset(), ""))[0]
        hits += [f"{rel}: {name!r}" for name in sorted(found - allowed)]
        stale += [f"{rel}: {name!r}" for name in sorted(allowed - found)]
    assert hits == [], "registry names outside their registry (use the registry or its fields)"
    assert stale == [], "allow-list entries no longer needed: remove them"


def test_the_scan_finds_a_planted_name(tmp_path: Path) -> None:
    planted = tmp_path / "m.py"
    planted.write_text('"""Doc names torch."""\n\nX = "tf-keras" if Y else "uout"\n')
    assert _string_literals(planted) & _registry_names() == {"tf-keras", "uout"}


# --- function length --------------------------------------------------------------------------

MAX_FUNCTION = 60
MAX_COMMAND_BODY = 40


def _code_lines(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> tuple[int, int]:
    """Lines of a function without its docstring, and of its body after the docstring."""
    assert fn.end_lineno is not None
    body = fn.body
    doc = 0
    if len(body) > 1 and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        assert body[0].end_lineno is not None
        doc = body[0].end_lineno - body[0].lineno + 1
    total = fn.end_lineno - fn.lineno + 1 - doc
    return total, fn.end_lineno - body[1 if doc else 0].lineno + 1


def _is_command(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    return any(
        isinstance(d, ast.Call) and isinstance(d.func, ast.Attribute) and d.func.attr == "command"
        for d in fn.decorator_list
    )


def _too_long(path: Path) -> list[str]:
    lines = path.read_text().splitlines()
    out = []
    for fn in ast.walk(ast.parse("\n".join(lines))):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        if "# long: " in lines[fn.lineno - 1]:
            continue
        total, body = _code_lines(fn)
        if _is_command(fn):  # the typer options signature is declarations, not code
            if body > MAX_COMMAND_BODY:
                out.append(f"{path.name}:{fn.lineno} {fn.name}: command body of {body} lines")
        elif total > MAX_FUNCTION:
            out.append(f"{path.name}:{fn.lineno} {fn.name}: {total} lines")
    return out


def test_functions_and_command_bodies_are_short() -> None:
    # STYLE / issue 12: no function over ~60 lines (docstring not counted) and no CLI command
    # body over ~40 (the options signature not counted) without `# long: <reason>` on its def.
    offenders = [hit for path in sorted(PACKAGE.rglob("*.py")) for hit in _too_long(path)]
    assert offenders == []


def test_the_length_rule_sees_a_long_function_and_its_reason(tmp_path: Path) -> None:
    body = "".join(f"    x{i} = {i}\n" for i in range(MAX_FUNCTION))
    long_fn = tmp_path / "m.py"
    long_fn.write_text(f'def f():\n    """Doc."""\n{body}')
    assert _too_long(long_fn) == [f"m.py:1 f: {MAX_FUNCTION + 1} lines"]
    long_fn.write_text(f'def f():  # long: a table written out\n    """Doc."""\n{body}')
    assert _too_long(long_fn) == []
    command = "".join(f"    y{i} = {i}\n" for i in range(MAX_COMMAND_BODY + 1))
    long_fn.write_text(f'@app.command()\ndef c():\n    """Doc."""\n{command}')
    assert _too_long(long_fn) == [f"m.py:2 c: command body of {MAX_COMMAND_BODY + 1} lines"]
