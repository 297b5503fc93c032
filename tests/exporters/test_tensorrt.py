"""TensorRT exporter: the parts that run without a GPU (log parsing, report, trtexec line, errors).

The log lines are recorded builder output (formats quoted in docs/research/tensorrt-sparsity.md).
"""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn as nn

from fxprune.errors import ExportError, MissingExtraError
from fxprune.exporters import exporter_for
from fxprune.exporters.tensorrt import (
    TensorRTExporter,
    layer_report,
    parse_sparsity_log,
    trtexec_command,
)

TRTEXEC_LOG = """\
[03/23/2021-00:14:05] [I] [TRT] Detected 1 inputs and 1 output network tensors.
[03/23/2021-00:14:05] [I] [TRT] (Sparsity) Layers eligible for sparse math: conv1, conv2, conv3
[03/23/2021-00:14:05] [I] [TRT] (Sparsity) TRT inference plan picked sparse implementation for layers: conv2, conv3
[03/23/2021-00:14:06] [I] Engine built in 12.3 sec.
"""

PYTHON_LOGGER = [
    "(Sparsity) Layers eligible for sparse math: /layer1/layer1.0/conv1/Conv + /layer1/layer1.0/relu/Relu, /fc/Gemm",
    "(Sparsity) TRT inference plan picked sparse implementation for layers: ",
]


def test_parse_trtexec_log():
    eligible, picked = parse_sparsity_log(TRTEXEC_LOG.splitlines())
    assert eligible == ["conv1", "conv2", "conv3"] and picked == ["conv2", "conv3"]


def test_parse_python_logger_with_fused_names_and_empty_picks():
    eligible, picked = parse_sparsity_log(PYTHON_LOGGER)
    assert eligible == ["/layer1/layer1.0/conv1/Conv + /layer1/layer1.0/relu/Relu", "/fc/Gemm"]
    assert picked == []


def test_layer_report_maps_fused_layers_back_to_onnx_nodes():
    eligible, picked = parse_sparsity_log(PYTHON_LOGGER)
    rows = layer_report(eligible, ["/fc/Gemm"], ["/layer1/layer1.0/conv1/Conv", "/fc/Gemm", "/x"])
    by = {r.onnx_node: r for r in rows}
    assert (
        by["/layer1/layer1.0/conv1/Conv"].eligible
        and not by["/layer1/layer1.0/conv1/Conv"].picked_sparse
    )
    assert by["/layer1/layer1.0/conv1/Conv"].trt_layer.endswith("relu/Relu")
    assert by["/fc/Gemm"].picked_sparse and not by["/x"].eligible and by["/x"].trt_layer is None


def test_trtexec_command_per_version():
    assert trtexec_command("m.onnx", "m.engine", trt_major=10) == (
        "trtexec --onnx=m.onnx --saveEngine=m.engine --fp16 --sparsity=enable "
        "--profilingVerbosity=detailed --verbose"
    )
    assert "--fp16" not in trtexec_command("m.onnx", "m.engine", trt_major=11)  # strongly typed
    assert "--sparsity" not in trtexec_command("m.onnx", "m.engine", sparse=False)


def test_engine_suffix_picks_tensorrt():
    assert exporter_for("model.engine") is TensorRTExporter


def test_missing_tensorrt_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError
    with pytest.raises(MissingExtraError, match=r"pip install 'fxprune\[tensorrt\]'"):
        TensorRTExporter().export(nn.Linear(4, 4), torch.randn(2, 4), tmp_path / "m.engine")
    assert list(tmp_path.iterdir()) == []


def test_no_gpu_is_a_clear_error(monkeypatch, tmp_path):
    fake = type(sys)("tensorrt")
    fake.__version__ = "10.13.0"
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ExportError, match="needs an NVIDIA GPU"):
        TensorRTExporter().export(nn.Linear(4, 4), torch.randn(2, 4), tmp_path / "m.engine")


def test_profile_covers_every_dynamic_axis():
    from fxprune.exporters.tensorrt import profile_shapes

    # text input [batch, sequence]: both dims get a range, optimised for the example
    assert profile_shapes([-1, -1], [4, 40], opt_batch=4) == ([1, 1], [4, 40], [64, 512])
    # image input: only the batch is dynamic
    lo, opt, hi = profile_shapes([-1, 3, 224, 224], [8, 3, 224, 224], opt_batch=8)
    assert lo == [1, 3, 224, 224] and opt == [8, 3, 224, 224] and hi == [64, 3, 224, 224]
    assert profile_shapes([2, 16], None) == ([2, 16], [2, 16], [2, 16])  # static stays static
