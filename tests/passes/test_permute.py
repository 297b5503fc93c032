"""Channel permutation before 2:4: exact, raises the kept magnitude, replays from the plan."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune.errors import ConfigError
from fxprune.passes.permute import _kept, search
from tests.conftest import randomize

tv = pytest.importorskip("torchvision")


def test_search_finds_the_obvious_reorder():
    # the four large columns share one group of 4, so 2:4 keeps only two of them; spreading
    # them over both groups keeps all four
    mat = torch.tensor([[9.0, 8.0, 7.0, 6.0, 0.1, 0.2, 0.3, 0.4]] * 3)
    perm = search(mat, 2, 4, rounds=10, candidates=256, gen=torch.Generator().manual_seed(0))
    assert sorted(perm.tolist()) == list(range(8))
    before = float(_kept(mat.view(3, 2, 4), 2).sum())
    after = float(_kept(mat[:, torch.as_tensor(perm)].view(3, 2, 4), 2).sum())
    assert before == pytest.approx(3 * (9 + 8 + 0.4 + 0.3))
    assert after == pytest.approx(3 * (9 + 8 + 7 + 6))


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return randomize(tv.models.resnet18()), torch.randn(2, 3, 32, 32)


@pytest.mark.slow
def test_permutation_is_exact_and_keeps_more(resnet):
    model, x = resnet
    plain = fxprune.compile(model, x, channels=0.3, sparsity="2:4")
    res = fxprune.compile(model, x, channels=0.3, sparsity="2:4", sparsity_permute=True)
    perm, nm = res.passes[1], res.passes[2]
    assert perm.name == "permute" and perm.details["groups_permuted"] > 0
    assert perm.details["kept_magnitude_after"] > perm.details["kept_magnitude_before"]
    assert nm.details["kept_magnitude"] > plain.passes[1].details["kept_magnitude"]
    rep = fxprune.verify.equivalence(model, res, x)
    assert rep.ok, rep.message  # permuted, pruned, masked == dense with the same zeros
    again = fxprune.apply_plan(
        tv.models.resnet18().load_state_dict(model.state_dict()) and model, res.plan
    )
    for k, v in res.module.state_dict().items():
        torch.testing.assert_close(again.module.state_dict()[k], v)


def test_split_channels_are_not_reordered():
    class Split(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 16, 1)
            self.b, self.c = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1)

        def forward(self, x):
            p, q = self.a(x).split(8, dim=1)
            return self.b(p) + self.c(q)

    torch.manual_seed(0)
    m = Split().eval()
    res = fxprune.compile(m, torch.randn(1, 3, 8, 8), sparsity="2:4", sparsity_permute=True)
    assert "split" in res.passes[0].details["not_permuted"]["a"]


def test_permute_needs_a_pattern(resnet):
    with pytest.raises(ConfigError, match="sparsity_permute"):
        fxprune.compile(resnet[0], resnet[1], channels=0.3, sparsity_permute=True)
