"""A linear whose bias is computed in forward (EVA's ``cat(q_bias, zeros k_bias, v_bias)``):
its elements are coupled to the output channels and sliced with them (it was a barrier)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.conftest import assert_equivalent


class ComputedBias(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(16, 48, bias=False)
        self.a_bias = nn.Parameter(torch.randn(16))
        self.register_buffer("zero", torch.zeros(16), persistent=False)
        self.b_bias = nn.Parameter(torch.randn(16))
        self.down = nn.Linear(48, 16)

    def forward(self, x):
        bias = torch.cat((self.a_bias, self.zero, self.b_bias))
        return self.down(torch.relu(F.linear(x, self.up.weight, bias))) + x


@pytest.mark.parametrize("mode", ["fx", "export"])
def test_a_computed_bias_is_sliced_with_its_channels(mode):
    torch.manual_seed(0)
    model, x = ComputedBias().eval(), torch.randn(2, 5, 16)
    res, _ = assert_equivalent(model, x, channels=0.0, ffn=0.25, mode=mode)
    kept = res.module.get_parameter("a_bias").numel() + res.module.get_parameter("b_bias").numel()
    assert res.module.get_parameter("up.weight").shape[0] == 36
    assert kept + res.module.get_buffer("zero").numel() == 36
