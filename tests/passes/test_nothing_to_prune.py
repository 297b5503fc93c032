"""A pass the user asked for that removes nothing is an error saying why, never a silent success."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune.cli import main
from fxprune.errors import ConfigError, NothingToPruneError
from tests.conftest import randomize
from tests.transformer_models import build


def cnn():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1))
    return randomize(m).eval(), torch.randn(1, 3, 8, 8)


def test_a_ratio_that_rounds_to_zero_heads_says_so():
    pytest.importorskip("transformers")
    model, x, _ = build("bert")  # 4 heads per layer: 10 % of 4 is 0
    with pytest.raises(NothingToPruneError, match=r"rounds down to 0.*floor\(4 x 0.1\) = 0"):
        fxprune.compile(model, x, heads=0.1)


def test_heads_on_two_kv_groups_name_the_smallest_ratio_and_kv_counting():
    """A Llama with 4 query heads over 2 KV heads has 2 head units per layer: 0.25 removes
    nothing, and the error says heads are counted in KV groups and that 0.5 is the smallest
    fraction that removes one."""
    pytest.importorskip("transformers")
    model, x, _ = build("llama")
    kv = model.config.num_key_value_heads
    assert kv == 2, kv
    with pytest.raises(
        NothingToPruneError, match=r"smallest fraction that removes one unit is 0.5"
    ) as e:
        fxprune.compile(model, x, heads=0.25)
    assert "key/value groups" in str(e.value)
    fxprune.compile(model, x, heads=0.5)  # the ratio it names works


def test_every_head_ignored_says_so():
    pytest.importorskip("transformers")
    model, x, _ = build("bert")
    with pytest.raises(NothingToPruneError, match="ignored module"):
        fxprune.compile(model, x, heads=0.5, ignore=["encoder"])


def test_min_heads_reached_says_so():
    pytest.importorskip("transformers")
    model, x, _ = build("bert")
    with pytest.raises(NothingToPruneError, match="at its minimum.*min_heads"):
        fxprune.compile(model, x, heads=0.5, min_heads=4)


def test_no_attention_at_all():
    model, x = cnn()
    with pytest.raises(ConfigError, match="no prunable attention heads"):
        fxprune.compile(model, x, heads=0.25)


def test_no_mlp_neurons_in_a_cnn():
    model, x = cnn()
    with pytest.raises(NothingToPruneError, match="no prunable MLP neuron group"):
        fxprune.compile(model, x, ffn=0.5)


def test_every_layer_feeds_the_output():
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(4, 8)).eval(), torch.randn(2, 4)
    with pytest.raises(NothingToPruneError, match="kept by a barrier.*output"):
        fxprune.compile(model, x, channels=0.5)


def test_cli_nothing_to_prune_is_one_line_and_exit_2(capsys):
    assert main(["prune", "torchvision:resnet18", "--heads", "0.25", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no prunable attention heads" in err[0]


def test_nm_with_no_eligible_weight_says_why():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Conv2d(6, 2, 1)).eval()
    with pytest.raises(NothingToPruneError, match=r"sparsity='2:4' masks nothing.*0:"):
        fxprune.compile(model, torch.randn(1, 3, 8, 8), sparsity="2:4")
