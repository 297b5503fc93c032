"""GPU verifier backends: what runs everywhere (the clear errors without a GPU or TensorRT, which
weights become semi-structured sparse tensors and why others stay dense) and, marked ``gpu``, the
real measurement where a CUDA device is present."""

import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune.errors import ConfigError, MissingExtraError
from fxprune.verify.gpu import semi_structured_plan
from fxprune.verify.latency import TorchCuda

CUDA = torch.cuda.is_available()


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 16, 3, padding=1)
        self.fc1 = nn.Linear(16, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x):
        x = torch.relu(self.conv(x)).mean((2, 3))
        return self.fc2(torch.relu(self.fc1(x)))


@pytest.fixture
def nm_result():
    torch.manual_seed(0)
    m, x = Mixed().eval(), torch.randn(2, 8, 8, 8)
    return m, x, fxprune.compile(m, x, sparsity="2:4")


def test_semi_structured_plan_takes_linear_weights_and_says_why_not_convs(nm_result):
    _, _, res = nm_result
    ok, skipped = semi_structured_plan(res.module, res.nm_masks)
    assert sorted(ok) == ["fc1.weight", "fc2.weight"]
    assert "Linear / matmul only" in skipped["conv.weight"]
    assert "tensorrt" in skipped["conv.weight"]
    bad = {"fc1.weight": torch.ones(64, 16, dtype=torch.bool)}  # dense mask: not 2:4
    assert semi_structured_plan(res.module, bad)[1]["fc1.weight"].startswith("not 2:4")


@pytest.mark.skipif(CUDA, reason="checks the message shown when no GPU is visible")
@pytest.mark.parametrize("backend", ["torch-cuda", "tensorrt"])
def test_gpu_backends_without_a_gpu_say_so(nm_result, backend):
    m, x, res = nm_result
    with pytest.raises((ConfigError, MissingExtraError)) as e:
        fxprune.verify.latency(m, res, x, backend=backend)
    msg = str(e.value)
    assert ("needs an NVIDIA GPU" in msg and backend in msg) or "pip install" in msg


def test_tensorrt_missing_names_the_extra(nm_result):
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        m, x, res = nm_result
        with pytest.raises(MissingExtraError, match=r"fxprune\[tensorrt\]"):
            fxprune.verify.latency(m, res, x, backend="tensorrt")
    else:
        pytest.skip("tensorrt is installed")


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_torch_cuda_measures_2_4_linear_model():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(512, 2048), nn.GELU(), nn.Linear(2048, 512)).eval()
    x = torch.randn(64, 512)
    res = fxprune.compile(m, x, sparsity="2:4")
    forced = TorchCuda("all")  # every eligible weight, unmeasured
    rep = fxprune.verify.latency(m, res, x, backend=forced, batch_sizes=[64], repeats=10)
    assert "2 of 2 N:M weights as 2:4 semi-structured sparse tensors" in " ".join(rep.notes)
    assert rep.rows[0].parity < 2e-2  # fp16 on the GPU against fp32 eager on the CPU
    measured = fxprune.verify.latency(m, res, x, backend="torch-cuda", batch_sizes=[64], repeats=10)
    note = " ".join(measured.notes)
    assert "(those measured >= 1.05x faster than dense)" in note
    assert measured.rows[0].parity < 2e-2
