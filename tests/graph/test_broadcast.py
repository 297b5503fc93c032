"""Broadcast operands must not couple channels: a [1]-shaped scale, RoPE tables that vary along
head_dim, a one-channel attention map. Each used to tie every channel (or every head of every
layer) into one unit, so a ratio removed nothing without a word."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune
from fxprune.graph import build_graph, trace
from tests.conftest import assert_equivalent, randomize


class LearnableAffine(nn.Module):  # timm HGNetV2's LearnableAffineBlock: scale * x + bias, [1]
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([1.3]))
        self.bias = nn.Parameter(torch.tensor([0.2]))

    def forward(self, x):
        return self.scale * x + self.bias


class AffineNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.lab = LearnableAffine()
        self.b = nn.Conv2d(16, 16, 3, padding=1)
        self.lab2 = LearnableAffine()
        self.out = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.out(self.lab2(F.relu(self.b(self.lab(F.relu(self.a(x)))))))


class SpatialGate(nn.Module):  # CBAM-style: x * sigmoid(conv(x)) with a one-channel map
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.gate = nn.Conv2d(16, 1, 1)
        self.out = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        y = F.relu(self.a(x))
        return self.out(y * torch.sigmoid(self.gate(y)))


class RopeAttention(nn.Module):
    """LLaMA-style attention whose cos/sin are computed in forward from an ``inv_freq`` buffer by
    element-wise ops (transformers >= 5.24): the tables vary along head_dim, q varies by head."""

    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.h, self.d = heads, dim // heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim, bias=False) for _ in range(4))
        inv = 1.0 / (10000 ** (torch.arange(0, self.d, 2).float() / self.d))
        self.register_buffer("inv_freq", inv, persistent=False)

    def rope(self, t, cos, sin):
        a, b = t[..., : self.d // 2], t[..., self.d // 2 :]
        return t * cos + torch.cat([-b, a], dim=-1) * sin

    def forward(self, x):
        B, S, _ = x.shape
        pos = torch.arange(S, dtype=torch.float32)[None, :, None]
        freqs = pos * self.inv_freq  # [1, S, d/2]: a mul, not a matmul
        emb = torch.cat([freqs, freqs], dim=-1)
        cos, sin = emb.cos()[:, None], emb.sin()[:, None]
        q = self.q(x).view(B, S, self.h, self.d).transpose(1, 2)
        k = self.k(x).view(B, S, self.h, self.d).transpose(1, 2)
        v = self.v(x).view(B, S, self.h, self.d).transpose(1, 2)
        q, k = self.rope(q, cos, sin), self.rope(k, cos, sin)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(self.d), dim=-1)
        return x + self.o((att @ v).transpose(1, 2).reshape(B, S, -1))


class RopeStack(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([RopeAttention(), RopeAttention()])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def test_scalar_affine_does_not_couple_channels():
    torch.manual_seed(0)
    model, x = randomize(AffineNet()).eval(), torch.randn(2, 3, 8, 8)
    groups = build_graph(trace(model, x).gm).groups
    assert sorted(len(g.units) for g in groups) == [16, 16]  # was: one unit each
    res, _ = assert_equivalent(model, x, channels=0.5)
    assert res.module.get_parameter("b.weight").shape == (8, 8, 3, 3)
    assert res.module.get_parameter("lab.scale").shape == (1,)  # broadcast: never sliced


def test_one_channel_gate_is_broadcast_not_coupled():
    torch.manual_seed(0)
    model, x = randomize(SpatialGate()).eval(), torch.randn(2, 3, 8, 8)
    res, _ = assert_equivalent(model, x, channels=0.5)
    assert res.module.get_parameter("a.weight").shape[0] == 8
    assert res.module.get_parameter("gate.weight").shape == (1, 8, 1, 1)


@pytest.mark.parametrize("mode", ["fx", "export"])
def test_rope_tables_from_a_buffer_leave_heads_separate(mode):
    torch.manual_seed(0)
    model, x = randomize(RopeStack()).eval(), torch.randn(2, 6, 32)
    graph = build_graph(trace(model, x, mode=mode).gm)
    heads = [g for g in graph.groups if g.kind == "heads"]
    assert sorted(len(g.units) for g in heads) == [4, 4]  # one group per layer, a unit a head
    res, _ = assert_equivalent(model, x, channels=0.0, heads=0.5, mode=mode)
    assert res.module.get_parameter("layers.1.q.weight").shape == (16, 32)
    assert res.module.get_buffer("layers.0.inv_freq").shape == (4,)  # head_dim unchanged


@pytest.mark.slow
def test_hgnetv2_learnable_affine_prunes():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = randomize(timm.create_model("hgnetv2_b0", pretrained=False, num_classes=10)).eval()
    x = torch.randn(2, 3, 64, 64)
    res, _ = assert_equivalent(model, x, channels=0.5, ignore=["head.fc"])
    assert res.summary.params_ratio < 0.5  # was 1.0: every group had one unit
    assert fxprune.verify.equivalence(model, res, x).ok


class EinsumAttention(nn.Module):
    """Attention written with einsum (MViTv2, many research codebases)."""

    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.h, self.d = heads, dim // heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.h, self.d).permute(2, 0, 3, 1, 4).unbind(0)
        att = torch.einsum("bhid,bhjd->bhij", q, k).mul(self.d**-0.5).softmax(dim=-1)
        ctx = torch.einsum("bhij,bhjd->bhid", att, v)
        return x + self.proj(ctx.transpose(1, 2).reshape(B, N, C))


class SplitHeadAttention(nn.Module):
    """LeViT / EfficientFormer: view(B, N, H, -1).split([kd, kd, vd], dim=3): q, k and v widths
    of one head side by side, value width != key width."""

    def __init__(self, dim=32, heads=4, kd=4, vd=8):
        super().__init__()
        self.h, self.kd, self.vd = heads, kd, vd
        self.qkv = nn.Linear(dim, heads * (2 * kd + vd))
        self.proj = nn.Linear(heads * vd, dim)

    def forward(self, x):
        B, N, _ = x.shape
        q, k, v = self.qkv(x).view(B, N, self.h, -1).split([self.kd, self.kd, self.vd], dim=3)
        q, k, v = q.permute(0, 2, 1, 3), k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3)
        att = (q @ k.transpose(-2, -1) * self.kd**-0.5).softmax(dim=-1)
        return x + self.proj((att @ v).transpose(1, 2).reshape(B, N, self.h * self.vd))


@pytest.mark.parametrize("cls", [EinsumAttention, SplitHeadAttention])
@pytest.mark.parametrize("mode", ["fx", "export"])
def test_einsum_and_split_head_layouts_find_heads(cls, mode):
    torch.manual_seed(0)
    model, x = randomize(nn.Sequential(cls(), cls())).eval(), torch.randn(2, 6, 32)
    graph = build_graph(trace(model, x, mode=mode).gm)
    assert sorted(len(g.units) for g in graph.groups if g.kind == "heads") == [4, 4]
    res, _ = assert_equivalent(model, x, channels=0.0, heads=0.5, mode=mode)
    assert res.module.get_parameter("1.proj.weight").shape[1] == 16  # half the heads
