"""Data-driven importance (taylor, activation, entropy, confidence) removes what it should."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune
from fxprune.errors import ConfigError
from tests.conftest import assert_equivalent


class Block(nn.Module):
    """Plain attention + MLP with separate q/k/v projections (traced by torch.fx)."""

    def __init__(self, dim=32, heads=4, hidden=16):
        super().__init__()
        self.h, self.d = heads, dim // heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.up, self.down = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        b, s, _ = x.shape

        def split(t):
            return t.view(b, s, self.h, self.d).transpose(1, 2)

        a = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)))
        x = x + self.o(a.transpose(1, 2).reshape(b, s, self.h * self.d))
        return x + self.down(F.relu(self.up(x)))


@pytest.fixture
def block():
    torch.manual_seed(0)
    m = Block().eval()
    x = torch.randn(4, 12, 32)
    return m, x


def _kept_heads(res, d=8):
    return sorted({i // d for i in res.plan.passes[0]["kept"]["q"]})


@pytest.mark.parametrize("criterion", ["entropy", "confidence"])
def test_diffuse_head_is_removed_first(block, criterion):
    m, x = block
    with torch.no_grad():
        m.q.weight[16:24] = 0  # head 2 attends uniformly: maximal entropy, lowest confidence
        m.q.bias[16:24] = 0
        m.q.weight[:16] *= 4  # the others are peaked
        m.q.weight[24:] *= 4
    res, _ = assert_equivalent(m, x, channels=0.0, heads=1, importance=criterion)
    assert _kept_heads(res) == [0, 1, 3]


def test_activation_removes_the_quiet_head(block):
    m, x = block
    with torch.no_grad():
        for lin in (m.q, m.k, m.v):
            lin.weight[8:16] *= 1e-3
            lin.bias[8:16] = 0
    res = fxprune.compile(m, x, heads=1, importance="activation")
    assert fxprune.verify.equivalence(
        m, res, x
    ).ok  # the quiet head barely matters: no effect check
    assert _kept_heads(res) == [0, 2, 3]


def test_taylor_sees_a_neuron_that_magnitude_keeps(block):
    m, x = block
    with torch.no_grad():
        m.up.weight[5] *= 20  # the largest weights of the MLP ...
        m.down.weight[:, 5] = 0  # ... but nothing reads the neuron: its loss effect is zero
    l1 = fxprune.compile(m, x, ffn=1 / 16, importance="l1")
    taylor = fxprune.compile(m, x, ffn=1 / 16, importance="taylor")
    assert fxprune.verify.equivalence(m, taylor, x).ok
    assert 5 in l1.plan.passes[0]["kept"]["up"]
    assert 5 not in taylor.plan.passes[0]["kept"]["up"]


def test_taylor_uses_the_given_loss_on_calibration_batches(block):
    m, x = block
    calls = []

    def loss_fn(out, batch):
        calls.append(batch[0].shape)
        return out.pow(2).sum()

    batches = [torch.randn(2, 12, 32) for _ in range(3)]
    fxprune.compile(m, x, ffn=0.25, importance="taylor", calibration=batches, loss_fn=loss_fn)
    assert calls == [(2, 12, 32)] * 3
    assert all(p.grad is None and p.requires_grad for p in m.parameters())


def test_empty_calibration_is_an_error(block):
    m, x = block
    with pytest.raises(ConfigError, match="calibration"):
        fxprune.compile(m, x, ffn=0.25, importance="activation", calibration=[])
