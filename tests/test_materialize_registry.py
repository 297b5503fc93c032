"""The ``MODULES`` registry entries of ``fxprune.materialize``: torch's MultiheadAttention with
heads removed, and timm's classes whose forward reads sizes of their children. Each timm entry
is proven on the class alone in a tiny model, and shown needed: without it the module tree
disagrees with the graph and ``result.model`` falls back to the graph module."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune.materialize import MODULES, NotMaterialized, fix_layer, fix_module
from fxprune.materialize_torch import PrunedMultiheadAttention
from tests.conftest import assert_equivalent, randomize

# ---------------------------------------------------------------- nn.MultiheadAttention

E, H, L, S, N = 32, 4, 5, 7, 2


def _mha(batch_first: bool, **kw) -> nn.MultiheadAttention:
    torch.manual_seed(0)
    m = nn.MultiheadAttention(E, H, batch_first=batch_first, **kw)
    with torch.no_grad():
        m.in_proj_bias.normal_()
        m.out_proj.bias.normal_()
    return m.eval()


def _inputs(batch_first: bool, cross: bool, batched: bool = True):
    g = torch.Generator().manual_seed(1)
    shape = (lambda t: (N, t, E) if batch_first else (t, N, E)) if batched else (lambda t: (t, E))
    q = torch.randn(shape(L), generator=g)
    if not cross:
        return q, q, q
    kv = torch.randn(shape(S), generator=g)
    return q, kv, kv


def _masks(kind: str, cross: bool, batched: bool = True):
    """``(attn_mask, key_padding_mask, is_causal)``; no query row is fully masked."""
    s = S if cross else L
    if kind == "none":
        return None, None, False
    if kind == "causal":
        return torch.ones(L, L, dtype=torch.bool).triu(1), None, True
    g = torch.Generator().manual_seed(2)
    kpm = torch.zeros(N if batched else 1, s, dtype=torch.bool)
    kpm[-1, -2:] = True
    attn = torch.rand(L, s, generator=g) > 0.6
    attn[:, 0] = False
    if kind == "float3d":  # (N * H, L, S) additive
        attn = torch.randn(N * H, L, s, generator=g)
        kpm = torch.zeros(kpm.shape).masked_fill(kpm, float("-inf"))
    return attn, (kpm if batched else kpm[0]), False


MHA_CASES = [
    # batch_first, cross, need_weights, average, masks, batched
    (True, False, False, True, "none", True),
    (False, False, True, True, "none", True),
    (True, True, True, False, "bool", True),
    (False, True, False, True, "float3d", True),
    (True, False, False, True, "causal", True),
    (False, False, True, False, "bool", True),
    (True, True, True, True, "bool", False),
]


@pytest.mark.parametrize("bf,cross,weights,avg,masks,batched", MHA_CASES)
def test_pruned_mha_forward_is_torchs(bf, cross, weights, avg, masks, batched):
    """Unpruned, the subclass's forward computes what nn.MultiheadAttention's does."""
    dense = _mha(bf)
    sub = copy.deepcopy(dense)
    sub.__class__ = PrunedMultiheadAttention
    q, k, v = _inputs(bf, cross, batched)
    attn_mask, kpm, causal = _masks(masks, cross, batched)
    kw = dict(
        key_padding_mask=kpm,
        need_weights=weights,
        attn_mask=attn_mask,
        average_attn_weights=avg,
        is_causal=causal,
    )
    for grad in (False, True):  # no_grad: torch's own fast path where it applies
        with torch.set_grad_enabled(grad):
            ref, ref_w = dense(q, k, v, **kw)
            got, got_w = sub(q, k, v, **kw)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        if weights:
            torch.testing.assert_close(got_w, ref_w, rtol=1e-5, atol=1e-6)
        else:
            assert got_w is None and ref_w is None


def _remove_heads(m: nn.MultiheadAttention, keep: list[int]) -> nn.MultiheadAttention:
    """What the heads pass leaves: q/k/v rows and out_proj columns of the kept heads only."""
    d = m.head_dim
    cols = torch.cat([torch.arange(h * d, (h + 1) * d) for h in keep])
    rows = torch.cat([cols + i * E for i in range(3)])
    p = copy.deepcopy(m)
    p.in_proj_weight = nn.Parameter(m.in_proj_weight[rows].clone())
    p.in_proj_bias = nn.Parameter(m.in_proj_bias[rows].clone())
    p.out_proj.weight = nn.Parameter(m.out_proj.weight[:, cols].clone())
    fix_layer(p.out_proj)
    fix_module(p, {id(p.out_proj)})
    return p


@pytest.mark.parametrize("bf", [True, False], ids=["batch_first", "seq_first"])
def test_mha_heads_removed_against_dense_reference(bf):
    """Heads 1 and 3 removed: the output is the dense module's with those heads' out_proj
    columns zeroed, and the attention weights are the kept heads' (averaged over them)."""
    keep = [0, 2]
    dense = _mha(bf)
    pruned = _remove_heads(dense, keep)
    assert type(pruned) is PrunedMultiheadAttention and isinstance(pruned, nn.MultiheadAttention)
    assert (pruned.num_heads, pruned.head_dim, pruned.embed_dim) == (2, 8, E)
    assert pruned.state_dict().keys() == dense.state_dict().keys()
    zeroed = copy.deepcopy(dense)
    with torch.no_grad():
        for h in set(range(H)) - set(keep):
            zeroed.out_proj.weight[:, h * 8 : (h + 1) * 8] = 0
    q, k, v = _inputs(bf, cross=True)
    attn_mask, kpm, _ = _masks("bool", cross=True)
    kw = dict(key_padding_mask=kpm, attn_mask=attn_mask)
    ref, per_head = zeroed(q, k, v, need_weights=True, average_attn_weights=False, **kw)
    for need in (False, True):
        got, w = pruned(q, k, v, need_weights=need, **kw)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w, per_head[:, keep].mean(1))
    _, w = pruned(q, k, v, need_weights=True, average_attn_weights=False, **kw)
    torch.testing.assert_close(w, per_head[:, keep])


def test_mha_bias_kv_with_heads_removed_is_not_rebuilt():
    with pytest.raises(NotMaterialized, match="add_bias_kv"):
        _remove_heads(_mha(True, add_bias_kv=True), [0, 2])


def test_tv_vit_heads_materialize():
    """torchvision's VisionTransformer with half its heads: the user's class, its MHA a
    PrunedMultiheadAttention (still an nn.MultiheadAttention, same state_dict names)."""
    from tests.transformer_models import tv_vit

    model, (x,), _ = tv_vit()
    model = randomize(model)
    res = fxprune.compile(model, x, heads=0.5)
    assert res.materialized, res.model_note
    assert type(res.model) is type(model)
    mhas = [m for m in res.model.modules() if isinstance(m, nn.MultiheadAttention)]
    assert mhas and all(type(m) is PrunedMultiheadAttention for m in mhas)
    assert all((m.num_heads, m.head_dim) == (2, 16) for m in mhas)
    assert res.model.state_dict().keys() == model.state_dict().keys()
    rep = fxprune.verify.equivalence(model, res, x, target="model")
    assert rep.ok, rep.message
    assert rep.pruning_effect > 1e-3


def test_transformer_encoder_layer_takes_the_pruned_forward():
    """nn.TransformerEncoderLayer's fused eval fast path assumes q/k/v embed_dim wide; the
    pruned MHA turns it off and its own forward runs."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, H, 64, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    x = torch.randn(N, L, E)
    res = fxprune.compile(model, x, heads=0.5, mode="export")
    assert res.materialized, res.model_note
    with torch.no_grad():
        torch.testing.assert_close(res.model(x), res.module(x), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- timm

timm = pytest.importorskip("timm")
from timm.layers import MixedConv2d  # noqa: E402
from timm.models import cait, dpn, efficientformer, levit, res2net, rexnet, xcit  # noqa: E402


class Image(nn.Module):
    """stem conv -> the block -> pooled linear head: the block's input and output prunable."""

    def __init__(self, block, cin, cout):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, cin, 3, padding=1), nn.BatchNorm2d(cin), nn.ReLU())
        self.block, self.head = block, nn.Linear(cout, 10)

    def forward(self, x):
        return self.head(self.block(self.stem(x)).mean((2, 3)))


class Tokens(nn.Module):
    """(B, N, C) tokens -> linear -> the attention -> mean over tokens -> head."""

    def __init__(self, attn, dim, out):
        super().__init__()
        self.inp, self.attn, self.head = nn.Linear(dim, dim), attn, nn.Linear(out, 10)

    def forward(self, x):
        return self.head(self.attn(self.inp(x)).mean(1))


def _bn(c):
    return nn.Sequential(nn.Conv2d(32, c, 1), nn.BatchNorm2d(c))


def _dpn(b):
    # a projecting block (residual 32, dense 2 x 8) then a normal one on its 56 channels
    blocks = [dpn.DualPathBlock(32, 32, 32, 32, 8, 4, "proj", b=b)]
    return Image(nn.Sequential(*blocks, dpn.DualPathBlock(56, 32, 32, 32, 8, 4, b=b)), 32, 64)


IMG, TOK = torch.randn(2, 3, 16, 16), torch.randn(2, 16, 32)
BN = {"norm_layer": nn.BatchNorm2d}

# (id, registry key, model, input, compile kwargs)
FIXED = [
    (
        "mixed_conv",
        "timm.layers.mixed_conv2d.MixedConv2d",
        lambda: Image(
            nn.Sequential(MixedConv2d(24, 24, [3, 5], depthwise=True), nn.Conv2d(24, 16, 1)), 24, 16
        ),
        IMG,
        {"channels": 0.5},
    ),
    (
        "rexnet_block",
        "timm.models.rexnet.LinearBottleneck",
        lambda: Image(rexnet.LinearBottleneck(16, 24, 1, exp_ratio=6.0, se_ratio=0.25), 16, 24),
        IMG,
        {"channels": 0.5},
    ),
    (
        "res2net_block",
        "timm.models.res2net.Bottle2neck",
        lambda: Image(
            nn.Sequential(
                res2net.Bottle2neck(32, 16, downsample=_bn(64), **BN),  # split, pool the last
                res2net.Bottle2neck(64, 16, **BN),  # hierarchical: part + previous conv
            ),
            32,
            64,
        ),
        IMG,
        {"channels": 0.25},
    ),
    ("dpn_block_b", "timm.models.dpn.DualPathBlock", lambda: _dpn(b=True), IMG, {"channels": 0.5}),
    # b=False: c1x1_c's outputs split [residual | dense] by num_1x1_c; the kept rows say where
    ("dpn_block", "timm.models.dpn.DualPathBlock", lambda: _dpn(b=False), IMG, {"channels": 0.5}),
    (
        "levit_attention",
        "timm.models.levit.Attention",
        lambda: Tokens(levit.Attention(32, 8, 4, 2.0, resolution=4), 32, 32),
        TOK,
        {"channels": 0.0, "heads": 0.5},
    ),
    (
        "levit_attention_downsample",
        "timm.models.levit.AttentionDownsample",
        lambda: Tokens(levit.AttentionDownsample(32, 48, 8, 4, 2.0, resolution=4), 32, 48),
        TOK,
        {"channels": 0.0, "heads": 0.5},
    ),
    (
        "efficientformer_attention",
        "timm.models.efficientformer.Attention",
        lambda: Tokens(efficientformer.Attention(32, 8, 4, 2.0, resolution=4), 32, 32),
        TOK,
        {"channels": 0.0, "heads": 0.5},
    ),
]


@pytest.mark.parametrize("key,make,x,kw", [f[1:] for f in FIXED], ids=[f[0] for f in FIXED])
def test_timm_entry_materializes(key, make, x, kw, monkeypatch):
    torch.manual_seed(0)
    model = randomize(make())
    assert_equivalent(model, x, **kw)
    monkeypatch.delitem(MODULES, key)  # the generic fixes leave a size the forward reads stale
    res = fxprune.compile(model, x, **kw)
    assert not res.materialized and res.model is res.module


# the forward cannot hold the pruned widths, or the shapes do not determine them: the entry
# says which attribute (without it the fallback only reports a disagreement)
# (id, registry key, model, input, compile kwargs, what the note names)
GRAPH_ONLY = [
    (
        "cait_class_attn",  # reshape(B, 1, num_heads, C // num_heads), C the input width
        "timm.models.cait.ClassAttn",
        lambda: Tokens(cait.ClassAttn(32, 4), 32, 32),
        TOK,
        {"channels": 0.0, "heads": 0.5},
        "ClassAttn.num_heads",
    ),
    (
        "cait_talking_heads",  # the same, and reshape(B, N, C) back
        "timm.models.cait.TalkingHeadAttn",
        lambda: Tokens(cait.TalkingHeadAttn(32, 4), 32, 32),
        TOK,
        {"channels": 0.0, "heads": 0.5},
        "TalkingHeadAttn.num_heads",
    ),
]


@pytest.mark.parametrize(
    "key,make,x,kw,names", [g[1:] for g in GRAPH_ONLY], ids=[g[0] for g in GRAPH_ONLY]
)
def test_timm_entry_says_graph_only(key, make, x, kw, names, monkeypatch):
    torch.manual_seed(0)
    model = randomize(make())
    res, _ = assert_equivalent(model, x, tree=False, **kw)
    assert res.model is res.module and names in res.model_note
    monkeypatch.delitem(MODULES, key)
    res = fxprune.compile(model, x, **kw)
    assert res.model is res.module and names not in res.model_note


def test_xca_with_heads_removed_is_not_rebuilt():
    """XCA reads head_dim as C // num_heads off its input (the heads pass finds no heads in
    its cross-covariance attention today): two of four heads removed by hand."""
    torch.manual_seed(0)
    m = xcit.XCA(32, 4)
    rows = torch.cat([torch.arange(16) + i * 32 for i in range(3)])
    m.qkv.weight = nn.Parameter(m.qkv.weight[rows])
    m.proj.weight = nn.Parameter(m.proj.weight[:, :16])
    for layer in (m.qkv, m.proj):
        fix_layer(layer)
    with pytest.raises(NotMaterialized, match="XCA.num_heads"):
        fix_module(m, {id(m.qkv)})
