"""The verifier tests' shared fixture: the small CNN of test_latency pruned by half."""

import pytest
import torch

import fxprune
from tests.verify.test_latency import Net


@pytest.fixture(scope="module")
def pruned():
    torch.manual_seed(0)
    m = Net().eval()
    x = torch.randn(2, 3, 16, 16)
    return m, x, fxprune.compile(m, x, channels=0.5, ignore=["fc"])
