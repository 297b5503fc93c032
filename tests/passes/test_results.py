"""Each pass reports a typed result on one base: its own fields, the effects every consumer
reads (empty where the pass has none), a dict view and JSON."""

from __future__ import annotations

import json

import pytest
import torch

import fxprune
from fxprune.passes import BlocksResult, NMResult, PassResult, PermuteResult, UnitsResult
from tests.transformer_models import build


def test_every_pass_returns_its_typed_result():
    model, x, _ = build("bert")
    res = fxprune.compile(
        model, x, blocks=1, heads=0.5, ffn=0.25, sparsity="2:4", sparsity_permute=True
    )
    kinds = [(p.name, type(p)) for p in res.passes]
    assert kinds == [
        ("blocks", BlocksResult),
        ("heads", UnitsResult),
        ("ffn", UnitsResult),
        ("permute", PermuteResult),
        ("nm", NMResult),
    ]
    blocks, heads, ffn, perm, nm = res.passes
    assert blocks.bypassed == blocks.removed and len(blocks.removed) == 1
    assert heads.units and all(kept < total for total, kept in heads.units.values())
    assert heads.keeps and not heads.masks and not heads.bypassed  # effects it lacks: empty
    assert nm.n == 2 and nm.m == 4 and nm.method == "magnitude" and set(nm.masks) == set(nm.layers)
    assert not nm.keeps and not nm.units and nm.approximate_groups == 0
    assert perm.groups_permuted == len(perm.plan.get("orders", {}))
    # the dict view holds the report fields, never the effects
    assert set(nm.details) >= {"n", "m", "method", "layers", "kept_magnitude"}
    assert "masks" not in nm.details and "keeps" not in heads.details
    assert heads.details["units"] == heads.units and heads.details["groups_pruned"] == len(
        heads.units
    )
    for p in res.passes:
        assert isinstance(p, PassResult)
        json.dumps(p.to_dict())


def test_the_base_cannot_be_written_through_a_missing_effect():
    """An effect a pass lacks is a read-only empty view, so no consumer fills it by mistake."""
    r = PassResult("x", changed=False)
    assert dict(r.keeps) == {} and r.bypassed == () and r.details == {}
    with pytest.raises(TypeError):
        r.keeps["w"] = {0: torch.tensor([0])}
