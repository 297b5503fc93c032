"""The equivalence proof on timm families torchvision lacks (random weights, CPU)."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import assert_equivalent, randomize

timm = pytest.importorskip("timm")

# (model, input size, what it exercises)
TIMM = [
    ("ghostnet_100", 64, "ghost modules: concat of a conv and its cheap depthwise copy"),
    ("mixnet_s", 64, "mixed depthwise kernels: split, per-part conv, concat"),
    ("rexnet_100", 64, "partial residuals: add into a slice of channels"),
    ("res2net50_26w_4s", 64, "hierarchical split/add/concat inside a block"),
    ("hrnet_w18_small", 64, "multi-resolution branches fused by upsample + add"),
    ("repvgg_a0", 64, "RepVGG branches"),
    ("dpn68", 64, "dual path: residual add on a slice, dense concat on the rest"),
    ("deit_tiny_patch16_224", 224, "fused qkv + unbind + scaled_dot_product_attention barrier"),
]


@pytest.mark.parametrize("name,size,what", TIMM, ids=[t[0] for t in TIMM])
def test_timm_equivalence(name, size, what):
    torch.manual_seed(0)
    model = randomize(timm.create_model(name, pretrained=False, num_classes=10))
    assert_equivalent(model, torch.randn(2, 3, size, size), channels=0.5)


# Attention layouts that found no heads before the einsum / split-head / size-read rules
# (model, input size, creation kwargs that keep it small, what it exercises)
TIMM_HEADS = [
    ("xcit_nano_12_p16_224", 64, {"depth": 2}, "reshape(B, N, C) with C read off x.shape"),
    ("levit_128s", 224, {}, "view(B, N, H, -1).split([kd, kd, vd]) and table[:, idx] biases"),
    ("efficientformer_l1", 224, {}, "the same split layout after a permute"),
    (
        "cait_xxs24_224",
        64,
        {"depth": 2, "img_size": 64},
        "talking-heads attention with reshape(B, N, C)",
    ),
]


@pytest.mark.parametrize("name,size,kw,what", TIMM_HEADS, ids=[t[0] for t in TIMM_HEADS])
def test_timm_heads(name, size, kw, what):
    torch.manual_seed(0)
    model = randomize(timm.create_model(name, pretrained=False, num_classes=10, **kw))
    res, _ = assert_equivalent(model, torch.randn(2, 3, size, size), channels=0.0, heads=0.5)
    assert res.passes[0].details["groups_pruned"] >= 1
