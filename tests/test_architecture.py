"""The package's shape, enforced: imports only go down the layers below, and no module imports
another module's private name (a public seam exists for each one that is needed)."""

from __future__ import annotations

import ast
import pathlib

import fxprune

ROOT = pathlib.Path(fxprune.__file__).parent

# Lowest first. A module may import its own layer and those below, never one above.
LAYERS = [
    [
        "fxprune.errors",
        "fxprune._util",
        "fxprune.atomic",
        "fxprune.charts",
        "fxprune.hf",
        "fxprune.models",
        "fxprune.weight_norms",
    ],
    ["fxprune.graph"],
    [
        "fxprune.stats",
        "fxprune.importance",
        "fxprune.calibration",
        "fxprune.gates",
        "fxprune.layer_timing",
        "fxprune.layer_timing_ort",
        "fxprune.modelstate",
    ],
    ["fxprune.passes"],
    ["fxprune.exporters"],
    ["fxprune.verify"],
    [
        "fxprune.layer_fixes",
        "fxprune.materialize",
        "fxprune.materialize_alibi",
        "fxprune.materialize_timm",
        "fxprune.materialize_torch",
        "fxprune.uniform",
    ],
    [
        "fxprune.checkpoint",
        "fxprune.stored_proof",
        "fxprune.summary",
        "fxprune.plan",
        "fxprune.recipe",
        "fxprune.options",
    ],
    ["fxprune.api"],
    ["fxprune.replay"],
    [
        "fxprune.compile_backend",
        "fxprune.distill",
        "fxprune.trainmasks",
        "fxprune.trainloop",
        "fxprune.heal",
        "fxprune.iterative",
        "fxprune.sensitivity",
        "fxprune.estimator",
        "fxprune.streaming_checks",
        "fxprune.streaming_io",
        "fxprune.streaming",
    ],
    ["fxprune.report"],
    [
        "fxprune.cli",
        "fxprune.cli_args",
        "fxprune.cli_commands",
        "fxprune.cli_inputs",
        "fxprune.cli_inspect",
        "fxprune.cli_stream",
        "fxprune",
    ],
]
LEVEL = {m: i for i, group in enumerate(LAYERS) for m in group}


def _unit(module: str) -> str:
    """The layer unit a module belongs to: a subpackage as a whole, else the module."""
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else module


def _modules():
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        name = ".".join(rel.parts).removesuffix(".__init__")
        yield name, path


def _imports(path: pathlib.Path):
    """(imported module, names, line) for every fxprune import, function-local ones included."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fxprune"):
            yield node.module, [a.name for a in node.names], node.lineno
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("fxprune"):
                    yield a.name, [], node.lineno


def test_every_module_has_a_layer():
    units = {_unit(name) for name, _ in _modules()}
    assert units <= set(LEVEL), f"modules without a layer in LAYERS: {sorted(units - set(LEVEL))}"


def test_imports_only_go_down():
    upward = []
    for name, path in _modules():
        here = LEVEL[_unit(name)]
        for target, names, line in _imports(path):
            # `from fxprune import x`: the module x, or the package itself for a name it exports
            targets = (
                [f"{target}.{n}" for n in names] if target == "fxprune" and names else [target]
            )
            for t in targets:
                unit = _unit(t) if _unit(t) in LEVEL else "fxprune"
                if LEVEL[unit] > here:
                    upward.append(f"{name}:{line} imports {t} (layer {LEVEL[unit]} > {here})")
    assert not upward, "\n".join(upward)


def test_no_private_name_crosses_a_module():
    private = []
    for name, path in _modules():
        for target, names, line in _imports(path):
            for n in names:
                if n.startswith("_") and target != name:
                    private.append(f"{name}:{line} imports {target}.{n}")
    assert not private, "\n".join(private)


def test_the_rules_catch_what_they_forbid(tmp_path):
    """The checks above are not vacuous: an upward import and a private name are seen."""
    bad = tmp_path / "bad.py"
    bad.write_text(
        "from fxprune.api import compile\nfrom fxprune.calibration import _loss\n"
        "def f():\n    import fxprune\n"
    )
    found = list(_imports(bad))
    assert ("fxprune.api", ["compile"], 1) in found and ("fxprune", [], 4) in found
    assert any(n.startswith("_") for _, names, _ in found for n in names)
    assert LEVEL[_unit("fxprune.api")] > LEVEL[_unit("fxprune.graph.trace")]


def test_passes_and_their_replay_come_from_one_registry():
    import pytest

    from fxprune.errors import PassError
    from fxprune.passes import REGISTRY, pass_of
    from fxprune.passes.heads import Heads, prune_heads

    assert set(REGISTRY) == {
        "blocks",
        "experts",
        "heads",
        "ffn",
        "channels",
        "permute",
        "nm",
        "unstructured",
    }
    assert pass_of(Heads(0.5)) is prune_heads and REGISTRY["heads"].config is Heads
    replayed = REGISTRY["heads"].replay({"name": "heads", "kept": {"attn": [0, 2]}})
    assert isinstance(replayed, Heads) and replayed.kept == {"attn": [0, 2]}
    with pytest.raises(PassError, match="no registered pass takes a int"):
        pass_of(3)


MAX_FUNCTION = 80  # lines of a function's body, its docstring not counted
MAX_MODULE = 400


def _function_lengths(tree):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            first = body[0]
            if isinstance(first, ast.Expr) and isinstance(
                getattr(first, "value", None), ast.Constant
            ):
                body = body[1:]  # the docstring
            if body:
                yield node.name, node.lineno, body[-1].end_lineno - body[0].lineno + 1


def test_no_function_is_longer_than_80_lines():
    long = [
        f"{name}:{line} {fn} is {n} lines"
        for name, path in _modules()
        for fn, line, n in _function_lengths(ast.parse(path.read_text()))
        if n > MAX_FUNCTION
    ]
    assert not long, "\n".join(long)


def test_no_module_is_longer_than_400_lines():
    over = []
    for _, path in _modules():
        rel = path.relative_to(ROOT.parent).as_posix()
        n = len(path.read_text().splitlines())
        if n > MAX_MODULE:
            over.append(f"{rel}: {n} lines (limit {MAX_MODULE})")
    assert not over, "\n".join(over)


def test_the_length_rule_counts_bodies_not_docstrings():
    src = 'def f():\n    """doc\n' + "    more\n" * 50 + '    """\n' + "    x = 1\n" * 81
    ((name, _, n),) = list(_function_lengths(ast.parse(src)))
    assert name == "f" and n == 81 > MAX_FUNCTION
