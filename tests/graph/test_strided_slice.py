"""Strided slices along a channel dim (GPT-OSS's interleaved ``gate_up[..., ::2]`` /
``[..., 1::2]``): each row of the interleave goes together, so a removal keeps it; any other
stride is a barrier that names itself."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune.graph import build_graph, trace
from tests.conftest import assert_equivalent


class Interleaved(nn.Module):
    def __init__(self, step=2, start=0, width=32):
        super().__init__()
        self.step, self.start = step, start
        self.up = nn.Linear(16, width * step)
        self.down = nn.Linear(len(range(start, width * step, step)), 16)

    def forward(self, x):
        h = self.up(x)
        gate = h[..., self.start :: self.step]
        if self.start == 0 and self.step == 2:  # the GPT-OSS gate: x * sigmoid(x) * (up + 1)
            gate = gate * torch.sigmoid(gate) * (h[..., 1::2] + 1)
        return self.down(torch.relu(gate)) + x


@pytest.mark.parametrize("mode", ["fx", "export"])
@pytest.mark.parametrize("step", [2, 3])
def test_a_whole_interleave_prunes_by_rows_exactly(mode, step):
    torch.manual_seed(0)
    model, x = Interleaved(step=step).eval(), torch.randn(2, 5, 16)
    res, _ = assert_equivalent(model, x, channels=0.0, ffn=0.25, mode=mode)
    up = res.model.up
    assert up.out_features == 24 * step  # 8 of 32 rows, each of `step` channels
    rows = res.plan.passes[0]["kept"]["up"]
    kept = torch.tensor(rows).view(-1, step)  # whole rows, in order
    assert torch.equal(kept - kept[:, :1], torch.arange(step).expand_as(kept))
    assert (kept[:, 0] % step == 0).all()


def test_a_stride_that_is_not_a_whole_interleave_is_a_named_barrier():
    torch.manual_seed(0)
    model, x = Interleaved(step=2, start=2).eval(), torch.randn(2, 5, 16)  # h[..., 2::2]
    graph = build_graph(trace(model, (x,)).gm)
    reasons = [r["reason"] for r in graph.barrier_report()]
    assert any("strided slice along a channel dim (not a whole interleave)" in r for r in reasons)
    with pytest.raises(fxprune.errors.NothingToPruneError):
        fxprune.compile(model, x, ffn=0.25)
