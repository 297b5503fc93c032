"""The equivalence proof on timm families torchvision lacks (random weights, CPU)."""

from __future__ import annotations

import pytest
import torch

import fxprune
from tests.conftest import assert_equivalent, randomize

timm = pytest.importorskip("timm")


def _name(case) -> str:
    return (case.values if hasattr(case, "values") else case)[0]  # a pytest.param or a tuple


# (model, input size, what it exercises)
TIMM = [
    pytest.param(
        "ghostnet_100",
        64,
        "ghost modules: concat of a conv and its cheap depthwise copy",
        marks=pytest.mark.slow,
    ),
    pytest.param(
        "mixnet_s",
        64,
        "mixed depthwise kernels: split, per-part conv, concat",
        marks=pytest.mark.slow,
    ),
    ("rexnet_100", 64, "partial residuals: add into a slice of channels"),
    ("res2net50_26w_4s", 64, "hierarchical split/add/concat inside a block"),
    ("hrnet_w18_small", 64, "multi-resolution branches fused by upsample + add"),
    ("repvgg_a0", 64, "RepVGG branches"),
    pytest.param(
        "dpn68",
        64,
        "dual path: residual add on a slice, dense concat on the rest",
        marks=pytest.mark.slow,
    ),
    ("deit_tiny_patch16_224", 224, "fused qkv + unbind + scaled_dot_product_attention barrier"),
]


# result.model stays the graph module (fxprune/materialize_timm.py says why), and the note
# names the class: model -> class
GRAPH_ONLY = {
    # ClassAttn takes head_dim as C // num_heads with C its input width: fewer heads than C
    # holds cannot be expressed (XCA likewise, but the heads pass finds none in it)
    "xcit_nano_12_p16_224": "ClassAttn",
    # TalkingHeadAttn (and ClassAttn) the same: reshape(B, N, 3, num_heads, C // num_heads)
    "cait_xxs24_224": "TalkingHeadAttn",
}


def _graph_only(name, res):
    if name in GRAPH_ONLY:
        assert res.model is res.module and GRAPH_ONLY[name] in res.model_note, res.model_note


@pytest.mark.parametrize("name,size,what", TIMM, ids=[_name(t) for t in TIMM])
def test_timm_equivalence(name, size, what):
    torch.manual_seed(0)
    model = randomize(timm.create_model(name, pretrained=False, num_classes=10))
    x = torch.randn(2, 3, size, size)
    res, _ = assert_equivalent(model, x, channels=0.5, tree=name not in GRAPH_ONLY)
    _graph_only(name, res)


# Attention layouts that found no heads before the einsum / split-head / size-read rules
# (model, input size, creation kwargs that keep it small, what it exercises)
TIMM_HEADS = [
    ("xcit_nano_12_p16_224", 64, {"depth": 2}, "reshape(B, N, C) with C read off x.shape"),
    pytest.param(
        "levit_128s",
        224,
        {},
        "view(B, N, H, -1).split([kd, kd, vd]) and table[:, idx] biases",
        marks=pytest.mark.slow,
    ),
    pytest.param(
        "efficientformer_l1",
        224,
        {},
        "the same split layout after a permute",
        marks=pytest.mark.slow,
    ),
    (
        "cait_xxs24_224",
        64,
        {"depth": 2, "img_size": 64},
        "talking-heads attention with reshape(B, N, C)",
    ),
]


@pytest.mark.parametrize("name,size,kw,what", TIMM_HEADS, ids=[_name(t) for t in TIMM_HEADS])
def test_timm_heads(name, size, kw, what):
    torch.manual_seed(0)
    model = randomize(timm.create_model(name, pretrained=False, num_classes=10, **kw))
    x = torch.randn(2, 3, size, size)
    res, _ = assert_equivalent(model, x, channels=0.0, heads=0.5, tree=name not in GRAPH_ONLY)
    assert res.passes[0].details["groups_pruned"] >= 1
    _graph_only(name, res)


@pytest.mark.slow  # EfficientFormerV2 only runs at 224 x 224
def test_a_conv_mlp_is_an_ffn():
    """EfficientFormerV2's Mlp is 1x1 conv -> depthwise 3x3 -> 1x1 conv (BN after each): its
    hidden channels are MLP neurons, so ffn= finds them (issue #22: it found nothing); a 1x1
    conv whose output a 3x3 conv reads (a ResNet bottleneck) stays a channel group."""
    import torchvision

    torch.manual_seed(0)
    model = randomize(timm.create_model("efficientformerv2_s0", pretrained=False, num_classes=10))
    res, _ = assert_equivalent(
        model, torch.randn(1, 3, 224, 224), channels=0.0, ffn=0.25, tree=True
    )
    mlp = res.model.stages[0].blocks[0].mlp
    assert mlp.fc1.conv.out_channels == mlp.fc2.conv.in_channels < 4 * 32
    resnet = torchvision.models.resnet50().eval()
    with pytest.raises(fxprune.errors.NothingToPruneError):
        fxprune.compile(resnet, torch.randn(1, 3, 32, 32), ffn=0.25)
