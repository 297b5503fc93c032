"""Current Hugging Face families beyond the eleven the suite builds everywhere (issue #22): each on
a tiny random config, its biases and norm gains non-trivial, proved exact like the rest."""

from __future__ import annotations

import pytest
import torch

import fxprune
from tests.conftest import assert_equivalent

transformers = pytest.importorskip("transformers")


def _nontrivial(model):
    """Random biases and norm gains, so a leaked or dropped one changes the output."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if "norm" in name else 0.0))
    return model.eval()


def bloom():
    torch.manual_seed(0)
    cfg = transformers.BloomConfig(vocab_size=100, hidden_size=64, n_layer=2, n_head=4)
    return _nontrivial(transformers.BloomForCausalLM(cfg)), torch.randint(0, 100, (2, 8))


def test_bloom_ffn_is_exact():
    """Bloom's ALiBi slopes are ``pow(tensor, arange)``: a two-tensor pow once crashed the graph
    build with an untyped IndexError; it broadcasts like any binary op now."""
    model, ids = bloom()
    res, _ = assert_equivalent(model, ids, channels=0.0, ffn=0.25, tree=True)
    assert res.model.transformer.h[0].mlp.dense_h_to_4h.out_features == 192
    with torch.no_grad():  # a new batch and sequence length run
        res.model(torch.randint(0, 100, (3, 5)))
    assert fxprune.verify.equivalence(model, res, ids, target="model").ok
