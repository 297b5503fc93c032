"""Every result, report and estimate speaks one protocol: ``table()``, ``to_dict()`` (JSON
values only) and ``to_json()`` (the same, serialised)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune.exporters.tensorrt import TensorRTReport
from fxprune.streaming import LayerReport, StreamResult


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.b(torch.relu(self.a(x)))).mean((2, 3)))


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    torch.manual_seed(0)
    m, x = Net().eval(), torch.randn(2, 3, 8, 8)
    res = fxprune.compile(m, x, channels=0.5, ignore=["fc"])
    out = tmp_path_factory.mktemp("rep")
    streamed = StreamResult(out, {"heads": 8}, {"heads": 6}, [LayerReport(0, 0.2, 100, 75, 1e-7)])
    return {
        "compile": res,
        "summary": res.summary,
        "equivalence": fxprune.verify.equivalence(m, res, x),
        "latency": fxprune.verify.latency(m, res, x, backend="torch", batch_sizes=(1,), repeats=2),
        "estimate": fxprune.estimate(m, x, hardware=("cpu",), batch_sizes=(1,)),
        "iterative": fxprune.iterative_prune(m, x, channels=0.5, steps=2, ignore=["fc"]),
        "onnx": res.export(out / "net.onnx", x),
        "tensorrt": TensorRTReport(out / "e.engine", out / "e.onnx", "trtexec ...", ["a"], []),
        "stream": streamed,
    }


@pytest.mark.parametrize(
    "kind",
    [
        "compile",
        "summary",
        "equivalence",
        "latency",
        "estimate",
        "iterative",
        "onnx",
        "tensorrt",
        "stream",
    ],
)
def test_one_protocol(reports, kind):
    rep = reports[kind]
    assert isinstance(rep, fxprune.Report)
    text = rep.table()
    assert isinstance(text, str) and text.strip()
    d = rep.to_dict()
    assert json.loads(json.dumps(d)) == d  # JSON values only: nothing was stringified away
    assert json.loads(rep.to_json()) == d
    assert not any(isinstance(v, (Path, torch.Tensor, nn.Module)) for v in d.values())


def test_the_compile_result_dict_carries_the_plan(reports):
    d = reports["compile"].to_dict()
    assert fxprune.Plan.from_dict(d["plan"]).passes == reports["compile"].plan.passes
    assert d["summary"]["params_after"] < d["summary"]["params_before"]
