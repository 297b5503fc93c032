"""Long work shows progress on stderr (issue #24: a compile of SmolLM2 ran for minutes without
a word): calibration forwards and SparseGPT's layers tick a bar when FXPRUNE_PROGRESS=1 (or
stderr is a terminal), and nothing when it is 0."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune._util import ticking

pytest.importorskip("tqdm")


def _compile():
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    x = torch.randn(4, 8)
    return fxprune.compile(m, x, sparsity="2:4", sparsity_method="sparsegpt", calibration=[x] * 3)


def test_calibration_and_sparsegpt_layers_show_progress(monkeypatch, capsys):
    monkeypatch.setenv("FXPRUNE_PROGRESS", "1")
    _compile()
    err = capsys.readouterr().err
    assert "calibrating (N:M)" in err and "0/3" in err and "SparseGPT layers" in err


def test_no_progress_when_turned_off(monkeypatch, capsys):
    monkeypatch.setenv("FXPRUNE_PROGRESS", "0")
    _compile()
    assert capsys.readouterr().err == ""


def test_ticking_yields_every_item_once(monkeypatch):
    monkeypatch.setenv("FXPRUNE_PROGRESS", "1")
    assert list(ticking([1, 2, 3], "x")) == [1, 2, 3]
    assert list(ticking([], "x")) == []


def test_the_cli_quiet_and_json_show_no_progress(monkeypatch):
    from fxprune import cli
    from fxprune._util import progress_wanted, silent

    monkeypatch.setenv("FXPRUNE_PROGRESS", "1")
    with silent():
        assert not progress_wanted()
    assert progress_wanted()
    seen = []
    monkeypatch.setitem(cli.COMMANDS, "prune", lambda a, log: seen.append(progress_wanted()) or 0)
    for flags in ([], ["--quiet"], ["--json"]):
        assert cli.main(["prune", "torchvision:resnet18", "--channels", "0.25", *flags]) == 0
    assert seen == [True, False, False]
