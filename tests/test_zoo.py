"""The equivalence proof on a representative torchvision zoo (random weights, CPU, small inputs)."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import assert_equivalent, randomize

tv = pytest.importorskip("torchvision")

# (model, input size, what it exercises)
ZOO = [
    ("resnet18", 64, "residual add"),
    ("resnext50_32x4d", 64, "grouped conv"),
    pytest.param("wide_resnet50_2", 64, "wide bottleneck", marks=pytest.mark.slow),
    ("mobilenet_v2", 64, "depthwise + inverted residual"),
    ("mobilenet_v3_small", 64, "SE scaling + hardswish"),
    ("efficientnet_b0", 64, "SE + stochastic depth"),
    ("efficientnet_v2_s", 64, "fused MBConv"),
    ("densenet121", 64, "concat"),
    ("googlenet", 64, "inception concat"),
    ("inception_v3", 96, "asymmetric inception concat"),
    ("shufflenet_v2_x0_5", 64, "split + channel shuffle"),
    ("convnext_tiny", 64, "channels-last permute + layer scale"),
    ("regnet_x_400mf", 64, "grouped RegNet"),
    ("regnet_y_400mf", 64, "RegNet with SE"),
    pytest.param("vgg11_bn", 64, "flatten into Linear", marks=pytest.mark.slow),
    ("squeezenet1_1", 64, "fire concat"),
    ("mnasnet0_5", 64, "MnasNet"),
    ("alexnet", 64, "adaptive pool + flatten"),
    pytest.param(
        "vit_b_16", 224, "transformer MLPs around attention barriers", marks=pytest.mark.slow
    ),
    ("swin_t", 64, "windowed attention, channels-last"),
]


# Models whose own forward cannot run the pruned widths, so result.model stays the graph module,
# and the reason compile gives (see docs/design.md, "The module tree").
GRAPH_ONLY = {
    "shufflenet_v2_x0_5": "Conv2d",  # x.chunk(2) needs equal halves; the graph splits unequally
}


@pytest.mark.parametrize(
    "name,size,what", ZOO, ids=[(z.values if hasattr(z, "values") else z)[0] for z in ZOO]
)
def test_zoo_equivalence(name, size, what):
    torch.manual_seed(0)
    model = randomize(tv.models.get_model(name, weights=None))
    x = torch.randn(2, 3, size, size)
    res, rep = assert_equivalent(model, x, channels=0.5, tree=name not in GRAPH_ONLY)
    assert res.summary.macs_after < res.summary.macs_before
    if name in GRAPH_ONLY:
        assert res.model is res.module and GRAPH_ONLY[name] in res.model_note


def test_convnext_approximate_is_reported():
    """LayerNorm over channels: pruned only on request, and then flagged approximate."""
    torch.manual_seed(0)
    model = randomize(tv.models.convnext_tiny())
    x = torch.randn(1, 3, 64, 64)
    import fxprune

    exact = fxprune.compile(model, x, channels=0.5)
    assert not exact.approximate
    assert any("LayerNorm" in b["reason"] for b in exact.barriers)
    approx = fxprune.compile(model, x, channels=0.5, allow_approximate=True)
    assert approx.approximate
    assert approx.summary.params_after < exact.summary.params_after
    rep = fxprune.verify.equivalence(model, approx, x)
    assert rep.approximate and "approximate" in rep.message
