"""docs/design.md stays true: its module map lists every module, and its worked examples (a
coupling rule, a pass, a criterion, a latency backend) run as written."""

from __future__ import annotations

import pathlib
import re

import pytest

import fxprune

DESIGN = pathlib.Path(__file__).parent.parent / "docs" / "design.md"
ROOT = pathlib.Path(fxprune.__file__).parent


def _examples() -> list[str]:
    text = DESIGN.read_text()
    return re.findall(r"<!-- example -->\n```python\n(.*?)```", text, flags=re.S)


def test_the_module_map_lists_every_module():
    text = DESIGN.read_text()
    table = text[text.index("## Module map") : text.index("## The graph")]
    listed = set(re.findall(r"^\| `([\w/]+\.py)` \|", table, flags=re.M))
    modules = {p.relative_to(ROOT).as_posix() for p in ROOT.rglob("*.py")}
    assert modules - listed == set(), "modules missing from design.md's module map"
    assert listed - modules == set(), "design.md's module map names modules that do not exist"


def test_there_are_four_worked_examples():
    assert len(_examples()) == 4


@pytest.fixture
def registries():
    """Snapshot every registry an example adds to, and restore it afterwards."""
    import importlib

    from fxprune import importance, passes
    from fxprune.graph import rules

    latency = importlib.import_module("fxprune.verify.latency")  # the module, not the function
    tables = [rules.RULES, passes.REGISTRY, passes.BY_CONFIG, latency.REGISTRY]
    tables.append(importance.REGISTRY)
    saved = [dict(t) for t in tables]
    yield
    for t, s in zip(tables, saved, strict=True):
        t.clear()
        t.update(s)


@pytest.mark.parametrize("i", range(4), ids=["rule", "pass", "criterion", "backend"])
def test_the_worked_example_runs(i, registries):
    pytest.importorskip("torchvision")
    code = _examples()[i]
    exec(compile(code, f"docs/design.md example {i + 1}", "exec"), {"__name__": "__main__"})
