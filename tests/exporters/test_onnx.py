"""ONNX export: checker, ONNX Runtime parity, the N:M audit (incl. a broken weight), atomic write."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import onnx
import pytest
import torch
import torch.nn as nn
from onnx import numpy_helper

import fxprune
from fxprune import atomic
from fxprune.errors import ExportError, FileAccessError
from fxprune.exporters import check_target, export, exporter_for
from fxprune.exporters import onnx as onnx_exp
from fxprune.exporters.audit import audit_nm
from tests.conftest import randomize
from tests.transformer_models import encoder_config


class TinyEncoder(nn.Module):
    """Token MLP block with attention: Linear weights on [B, T, D] become MatMul or Gemm."""

    def __init__(self, d=32, hidden=64):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, 4, batch_first=True)
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.fc1, self.fc2 = nn.Linear(d, hidden), nn.Linear(hidden, d)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        x = x + self.fc2(torch.nn.functional.gelu(self.fc1(self.ln2(x))))
        return self.head(x.mean(1))


@pytest.fixture(scope="module")
def cnn_export(tmp_path_factory):
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = randomize(tv.models.resnet18())
    x = torch.randn(2, 3, 64, 64)
    res = fxprune.compile(model, x, channels=0.5, round_to=4, sparsity="2:4", ignore=["fc"])
    path = tmp_path_factory.mktemp("onnx") / "r18.onnx"
    return res, res.export(path), path


def test_cnn_export_checked_runs_and_keeps_2to4(cnn_export):
    res, rep, path = cnn_export
    assert path.exists() and rep.opset == onnx_exp.DEFAULT_OPSET and rep.dynamic_batch
    assert rep.ort_max_rel_err < 1e-4
    masked = set(res.passes[-1].masks)
    assert {r.initializer for r in rep.audit if r.expected} == masked
    assert all(r.nm_ok for r in rep.audit if r.expected)
    model = onnx.load(str(path))
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch


def test_transformer_export_audits_matmul_weights(tmp_path):
    torch.manual_seed(0)
    model = TinyEncoder().eval()
    x = torch.randn(2, 5, 32)
    res = fxprune.compile(model, x, channels=0.5, sparsity="2:4", sparsity_exclude=["head"])
    rep = res.export(tmp_path / "enc.onnx")
    expected = [r for r in rep.audit if r.expected]
    # fc1/fc2 leave the exporter as MatMul with transposed (renamed) initializers: the audit
    # finds them by value and checks the pattern along dim 0, the reduction axis of X @ W
    assert len(expected) == 2 and all(r.op == "MatMul" and r.axis == 0 for r in expected)
    assert all(r.nm_ok for r in expected) and rep.ort_max_rel_err < 1e-4
    assert fxprune.verify.equivalence(model, res, x).ok


def test_audit_catches_a_broken_initializer(cnn_export):
    res, _, path = cnn_export
    model = onnx.load(str(path))
    init = next(i for i in model.graph.initializer if i.name == "layer1.0.conv1.weight")
    w = numpy_helper.to_array(init).copy()
    w[:] = 1.0  # dense again: the pattern is gone
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    expected = {k: res.module.get_parameter(k).detach().numpy() for k in res.passes[-1].masks}
    with pytest.raises(ExportError, match="lost the pattern: layer1.0.conv1.weight"):
        audit_nm(model, 2, 4, expected=expected)


def test_failed_export_leaves_no_file(tmp_path, monkeypatch):
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    res = fxprune.compile(model, torch.randn(2, 8), channels=0.5)

    def wrong(*a, **k):
        raise ExportError("simulated parity failure")

    monkeypatch.setattr(onnx_exp, "_parity", wrong)
    target = tmp_path / "m.onnx"
    with pytest.raises(ExportError, match="simulated"):
        res.export(target)
    assert list(tmp_path.iterdir()) == []  # neither the file nor the staging folder


def test_unknown_suffix():
    with pytest.raises(ExportError, match="no exporter for '.tflite'; known: .*'.engine'.*'.onnx'"):
        exporter_for("model.tflite")


def test_model_in_train_mode_exports_its_inference_graph(tmp_path):
    """A model handed over in train mode: parity is checked in eval, like the exported graph."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4)
    )
    randomize(model).train()
    res = fxprune.compile(model, torch.randn(2, 3, 8, 8), channels=0.5, sparsity="2:4")
    assert res.module.training
    rep = res.export(tmp_path / "bn.onnx")
    assert rep.ort_max_rel_err < 1e-4 and res.module.training  # mode restored afterwards


def test_hf_bert_channels_2to4_export(tmp_path):
    """A BERT-style model (torch.export capture): FFN pruned, 2:4 everywhere, dynamic batch ONNX."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = encoder_config(positions=512)
    model = transformers.BertModel(cfg).eval()
    ids = torch.randint(0, 100, (2, 16))
    res = fxprune.compile(model, (ids,), channels=0.5, sparsity="2:4")
    assert res.plan.mode == "export"
    assert res.module.get_parameter("encoder.layer.0.intermediate.dense.weight").shape[0] == 64
    rep = fxprune.verify.equivalence(model, res, (ids,))
    assert rep.ok and rep.pruning_effect > 1e-3
    out = res.export(tmp_path / "bert.onnx")
    masked = [r for r in out.audit if r.expected]
    assert len(masked) == len(res.passes[-1].masks) == 13 and all(r.nm_ok for r in masked)
    assert out.ort_max_rel_err < 1e-4


def test_nan_output_fails_the_runtime_parity_check(tmp_path):
    """A NaN weight: both runtimes agree on NaN, which proves nothing and must not pass."""
    model = nn.Linear(4, 3).eval()
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    with pytest.raises(ExportError, match=r"PyTorch output 0 has \d+ NaN/Inf values"):
        export(model, torch.randn(2, 4), tmp_path / "nan.onnx")
    assert list(tmp_path.iterdir()) == []


def test_nan_in_onnx_runtime_output_only_fails(tmp_path, monkeypatch):
    ort = pytest.importorskip("onnxruntime")
    model = nn.Linear(4, 3).eval()
    real_run = ort.InferenceSession.run

    def run_with_nan(self, *a, **k):
        out = real_run(self, *a, **k)
        out[0][0, 0] = float("nan")
        return out

    monkeypatch.setattr(ort.InferenceSession, "run", run_with_nan)
    with pytest.raises(ExportError, match="ONNX Runtime output 0 has 1 NaN/Inf values"):
        export(model, torch.randn(2, 4), tmp_path / "m.onnx")


def test_stale_staging_folders_are_removed_by_the_next_export(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid that no longer runs
    dead = tmp_path / f".m.onnx.{gone.pid}.abcd_123"  # a killed export of this target
    old = tmp_path / ".m.onnx.old_fxpr"  # an older fxprune's name (no pid), long untouched
    recent = tmp_path / ".m.onnx.new_fxpr"  # the same, but recent: maybe still being written
    live = tmp_path / f".m.onnx.{os.getpid()}.live_123"  # owned by a running export
    other = tmp_path / f".other.onnx.{gone.pid}.abcd_123"  # another target's: not ours to clean
    for d in (dead, old, recent, live, other):
        d.mkdir()
        (d / "m.onnx").write_bytes(b"partial")
    long_ago = time.time() - 2 * atomic.STALE_AFTER_S
    os.utime(old, (long_ago, long_ago))
    model = nn.Sequential(nn.Linear(4, 3)).eval()
    export(model, torch.randn(2, 4), tmp_path / "m.onnx")
    left = {p.name for p in tmp_path.iterdir()}
    assert left == {"m.onnx", recent.name, live.name, other.name}


def test_an_unwritable_destination_is_refused_before_any_work(tmp_path, monkeypatch):
    """A path under a file, or a folder where the file goes: a FileAccessError naming it
    before the export runs (it failed with FileExistsError / IsADirectoryError, the latter
    after the whole export)."""
    net = nn.Linear(4, 2).eval()
    x = torch.randn(1, 4)
    res = fxprune.compile(nn.Sequential(net, nn.ReLU(), nn.Linear(2, 2)), x, channels=0.5)

    def no_export(*a, **k):
        raise AssertionError("the export ran")

    monkeypatch.setattr(onnx_exp, "write_onnx", no_export)
    (tmp_path / "afile").write_text("")
    (tmp_path / "adir.onnx").mkdir()
    cases = [
        ("afile/m.onnx", "afile is a file, not a folder"),
        ("afile/sub/m.onnx", "afile is a file, not a folder"),
        ("adir.onnx", "adir.onnx: it is a folder; give a file path"),
    ]
    for name, words in cases:
        with pytest.raises(FileAccessError, match=words):
            res.export(tmp_path / name)
        with pytest.raises(FileAccessError, match=words):
            export(net, torch.randn(1, 4), tmp_path / name)
    with pytest.raises(FileAccessError, match="afile: it is a file; give a folder"):
        check_target(tmp_path / "afile", folder=True)
    check_target(tmp_path / "new" / "deeper" / "m.onnx")  # folders that do not exist yet: fine
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir.onnx", "afile"]
    assert list((tmp_path / "adir.onnx").iterdir()) == []
