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
