"""Each pass reports a typed result on one base: its own fields, the effects every consumer
reads (empty where the pass has none), a dict view and JSON."""

from __future__ import annotations

import json

import pytest
import torch

import fxprune
from fxprune.passes import BlocksResult, NMResult, PassResult, PermuteResult, UnitsResult
from tests.transformer_models import build, tiny_llama_lm


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


@pytest.mark.parametrize("criterion", ["cosine", "l2"])
def test_block_scores_are_each_blocks_change_of_the_hidden_state(criterion):
    """Blocks are scored as the forward makes their outputs (each block's input held only until
    then): the scores equal those recomputed from the model's own hidden states."""
    llama = tiny_llama_lm(layers=3)
    batches = [torch.randint(0, 100, (2, 8)) for _ in range(2)]
    r = fxprune.compile(
        llama, batches[0], blocks=1, block_importance=criterion, calibration=batches
    )
    want = dict.fromkeys(range(2), 0.0)
    with torch.no_grad():
        for b in batches:
            hs = llama(b, output_hidden_states=True).hidden_states
            for i in range(2):  # hidden_states[3] is after the final norm, not block 2's output
                x, y = hs[i].double().flatten(1), hs[i + 1].double().flatten(1)
                if criterion == "cosine":
                    s = 1 - torch.nn.functional.cosine_similarity(x, y, dim=1).mean()
                else:
                    s = ((y - x).norm(dim=1) / x.norm(dim=1).clamp_min(1e-12)).mean()
                want[i] += float(s) / len(batches)
    got = r.passes[0].scores
    for i in (0, 1):
        (key,) = [k for k in got if k.endswith(f"layers.{i}")]
        assert got[key] == pytest.approx(want[i], rel=1e-5), (key, got, want)
