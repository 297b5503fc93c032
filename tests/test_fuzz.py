"""Random CNN graphs: every one must prune exactly or be refused with a clear fxprune error."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fxprune
from fxprune.errors import FxPruneError
from tests.conftest import randomize

OPS = ["conv", "residual", "concat", "split", "grouped", "depthwise", "se", "pool", "shuffle"]


class RandomNet(nn.Module):
    """A chain of blocks drawn from OPS; channel counts are multiples of 4 so groups divide."""

    def __init__(self, ops: list[str], widths: list[int]):
        super().__init__()
        self.ops = ops
        self.blocks = nn.ModuleList()
        c = 4
        for op, w in zip(ops, widths, strict=True):
            b = nn.Module()
            if op in ("conv", "residual"):
                b.conv = nn.Conv2d(c, w if op == "conv" else c, 3, padding=1)
                b.bn = nn.BatchNorm2d(b.conv.out_channels)
            elif op == "concat":
                b.x, b.y = nn.Conv2d(c, w, 1), nn.Conv2d(c, 4, 3, padding=1)
            elif op == "split":
                b.conv = nn.Conv2d(c // 2, c // 2, 1)
            elif op == "grouped":
                b.conv = nn.Conv2d(c, c, 3, padding=1, groups=4)
            elif op == "depthwise":
                b.conv = nn.Conv2d(c, c, 3, padding=1, groups=c)
            elif op == "se":
                b.fc1, b.fc2 = nn.Conv2d(c, 4, 1), nn.Conv2d(4, c, 1)
            self.blocks.append(b)
            c = {"conv": w, "concat": w + 4}.get(op, c)
        self.head = nn.Linear(c, 3)

    def forward(self, x):
        x = F.pad(x, (0, 0, 0, 0, 0, 1))[:, :4] if x.shape[1] < 4 else x
        for op, b in zip(self.ops, self.blocks, strict=True):
            if op == "conv":
                x = F.relu(b.bn(b.conv(x)))
            elif op == "residual":
                x = x + F.relu(b.bn(b.conv(x)))
            elif op == "concat":
                x = torch.cat([b.x(x), b.y(x)], dim=1)
            elif op == "split":
                p, q = x.chunk(2, dim=1)
                x = torch.cat([p, b.conv(q)], dim=1)
            elif op in ("grouped", "depthwise"):
                x = F.relu(b.conv(x))
            elif op == "se":
                x = x * torch.sigmoid(b.fc2(F.relu(b.fc1(x.mean((2, 3), keepdim=True)))))
            elif op == "pool":
                x = F.max_pool2d(x, 2, ceil_mode=True)
            elif op == "shuffle":
                n, c, h, w = x.shape
                x = x.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


@pytest.mark.slow
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ops=st.lists(st.sampled_from(OPS), min_size=1, max_size=7),
    data=st.data(),
    ratio=st.sampled_from([0.25, 0.5, 0.75]),
    mode=st.sampled_from(["fx", "export"]),
)
def test_random_graph_exact_or_refused(ops, data, ratio, mode):
    widths = [data.draw(st.sampled_from([4, 8, 12, 16])) for _ in ops]
    torch.manual_seed(0)
    model = randomize(RandomNet(ops, widths))
    x = torch.randn(2, 4, 8, 8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        res = fxprune.compile(model, x, channels=ratio, ignore=["head"], mode=mode)
    except FxPruneError as e:  # a refusal must be an fxprune error with a message
        assert str(e)
        return
    finally:
        for k, v in model.state_dict().items():
            assert torch.equal(v, before[k])
    rep = fxprune.verify.equivalence(model, res, x)
    assert rep.ok, (ops, widths, rep.message)
