"""Options that would do nothing are refused by name: ``compile`` with no pass (it would return
an unpruned "result"), a ``train_fn`` no criterion reads; and keyword options of a type that
would be misread (``bool("false")`` is True, ``tuple("fc1")`` is three names)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune.errors import ConfigError
from fxprune.options import PASS_OPTIONS
from fxprune.passes import Channels
from tests.conftest import randomize

X = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return randomize(
        nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    )


def train_fn(gated):  # a training loop: never reached when refused
    raise AssertionError("train_fn ran")


@pytest.mark.parametrize(
    "kw",
    [{}, {"channels": 0.0}, {"uniform": True}, {"importance": "l2", "ignore": ["4"]}],
    ids=["nothing", "zero-ratio", "only-uniform", "only-modifiers"],
)
def test_compile_with_no_pass_is_refused_naming_the_options_that_select_one(kw):
    with pytest.raises(ConfigError, match="no pass selected.*prune nothing") as e:
        fxprune.compile(mlp(), X, **kw)
    assert all(f"{k}=" in str(e.value) for k in PASS_OPTIONS)


@pytest.mark.parametrize(
    "kw",
    [
        {"sparsity": "2:4"},
        {"unstructured": 0.5},
        {"layer_ratios": {"0": 0.5}},
        {"channels": 0.5, "ignore": ["4"]},
    ],
    ids=["only-nm", "only-unstructured", "only-layer-ratios", "channels"],
)
def test_any_one_pass_is_enough(kw):
    model = mlp()
    res = fxprune.compile(model, X, **kw)
    assert res.passes and fxprune.verify.equivalence(model, res, X).ok


def test_a_recipe_is_unaffected():
    model = mlp()
    res = fxprune.compile(model, X, fxprune.Recipe([Channels(0.5, ignore=("4",))]))
    assert res.plan.passes


@pytest.mark.parametrize(
    "kw", [{"channels": 0.5}, {"channels": 0.5, "importance": "activation"}], ids=["l1", "act"]
)
def test_a_train_fn_no_criterion_reads_is_refused_by_name(kw):
    with pytest.raises(ConfigError, match=r"train_fn is given but no pass reads it.*learned"):
        fxprune.compile(mlp(), X, train_fn=train_fn, **kw)
    with pytest.raises(ConfigError, match=r"train_fn .*\(channels: l1\)"):
        fxprune.compile(mlp(), X, fxprune.Recipe([Channels(0.5)]), train_fn=train_fn)
    with pytest.raises(ConfigError, match=r"train_fn .*\(no pass ranks by importance\)"):
        fxprune.compile(mlp(), X, sparsity="2:4", train_fn=train_fn)


def test_a_train_fn_goes_to_the_learned_criterion():
    calls = []

    def loop(gated):
        calls.append(gated)
        opt = torch.optim.SGD(gated.parameters(), lr=0.1)
        for _ in range(3):
            opt.zero_grad()
            gated(X).pow(2).mean().backward()
            opt.step()

    fxprune.compile(mlp(), X, channels=0.5, importance="learned", train_fn=loop)
    assert len(calls) == 1


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"allow_approximate": "false"}, "allow_approximate='false': give True or False"),
        ({"uniform": "no"}, "uniform='no': give True or False"),
        ({"global_ranking": 1}, "global_ranking=1: give True or False"),
        ({"sparsity_permute": "yes", "sparsity": "2:4"}, "sparsity_permute='yes'"),
        ({"leaf_modules": "0"}, r"leaf_modules='0': give a list of names \(\['0'\]\)"),
        ({"ignore": "4"}, r"ignore='4': give a list of names"),
        ({"sparsity_exclude": "4", "sparsity": "2:4"}, "sparsity_exclude='4'"),
        ({"layer_ratios": [("0", 0.5)]}, r"layer_ratios=.*give a dict \{module name"),
    ],
)
def test_keyword_options_of_a_misread_type_are_refused_by_name(kw, match):
    with pytest.raises(ConfigError, match=match):
        fxprune.compile(mlp(), X, **{"channels": 0.5, **kw})
