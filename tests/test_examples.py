"""The examples run as shipped."""

import runpy
from pathlib import Path

import pytest

pytest.importorskip("torchvision")
EXAMPLES = [
    pytest.param(p, id=p.name, marks=[pytest.mark.slow] if "digits" in p.name else [])
    for p in sorted((Path(__file__).parent.parent / "examples").glob("*.py"))
]


@pytest.mark.parametrize("path", EXAMPLES)
def test_example_runs(path, capsys):
    runpy.run_path(str(path), run_name="__main__")
    assert "equivalent" in capsys.readouterr().out
