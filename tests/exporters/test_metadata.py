"""The ONNX hand-off metadata: every field equals what the compile result and the reports say,
the file still passes the checker and runs in ONNX Runtime, a changed plan is caught, external
data stays on disk, and ``fxprune inspect FILE.onnx`` prints it back."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune.cli import main
from fxprune.exporters import export
from fxprune.exporters import onnx as onnx_exp
from fxprune.exporters.metadata import (
    MetadataError,
    build_metadata,
    describe,
    read_metadata,
    write_metadata,
)
from fxprune.passes import NMResult, UnitsResult
from fxprune.verify.latency_report import LatencyReport, LatencyRow
from tests.conftest import randomize
from tests.transformer_models import build

LATENCY = LatencyReport(
    "onnxruntime",
    2,
    1,
    4,
    [
        LatencyRow(1, 2.5, 2.4, 2.7, 1.25, 1.2, 1.3, 2.0, 0.5, 1.0, 1e-7, "faster"),
        LatencyRow(8, 9.0, 8.8, 9.5, 6.0, 5.9, 6.2, 1.5, 0.5, 0.75, 2e-7, "faster"),
    ],
    machine="x86_64, 2 cpus",
)


def _raw(path) -> dict[str, str]:
    model = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in model.metadata_props}


@pytest.fixture(scope="module")
def r18(tmp_path_factory):
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = randomize(tv.models.resnet18())
    x = torch.randn(1, 3, 64, 64)
    res = fxprune.compile(model, x, channels=0.5)
    eq = fxprune.verify.equivalence(model, res, x)
    path = tmp_path_factory.mktemp("meta") / "r18.onnx"
    rep = res.export(path, equivalence=eq, latency=LATENCY)
    return res, eq, rep, path, x


def test_resnet18_fields_equal_the_result_and_the_reports(r18):
    res, eq, rep, path, _ = r18
    meta, raw = read_metadata(path), _raw(path)
    assert meta["version"] == fxprune.__version__ == raw["fxprune.version"]
    # the digest is the sha256 of exactly the stored string, and the plan replays
    assert raw["fxprune.plan_sha256"] == hashlib.sha256(raw["fxprune.plan"].encode()).hexdigest()
    assert meta["plan_sha256"] == raw["fxprune.plan_sha256"] and meta["digest_ok"] is True
    assert meta["plan"] == res.plan.to_dict()
    assert fxprune.Plan.from_json(raw["fxprune.plan"]).passes == res.plan.passes
    for here in (str(path.parent), os.getcwd(), str(Path.home())):
        assert here not in raw["fxprune.plan"]  # path-free: nothing of this machine
    (units,) = [p for p in res.passes if isinstance(p, UnitsResult)]
    before = sum(b for b, _ in units.units.values())
    assert meta["removed"] == {
        "channels": {
            "groups": len(units.units),
            "units_before": before,
            "units_kept": sum(k for _, k in units.units.values()),
        }
    }
    assert meta["removed"]["channels"]["units_kept"] * 2 == before == 2880  # 0.5 of 12 groups
    assert meta["equivalence"] == {
        "ok": True,
        "max_rel_err": eq.max_rel_err,
        "max_abs_err": eq.max_abs_err,
        "tolerance": eq.tolerance,
        "worst_output": eq.worst_output,
        "dtype": "float32",
        "inputs_checked": eq.inputs_checked,
        "approximate": False,
        "pruning_effect": eq.pruning_effect,
    }
    assert meta["latency"]["backend"] == "onnxruntime" and meta["latency"]["threads"] == 2
    assert [(b["batch"], b["dense_ms"], b["pruned_ms"], b["speedup"]) for b in
            meta["latency"]["batches"]] == [(1, 2.5, 1.25, 2.0), (8, 9.0, 6.0, 1.5)]  # fmt: skip
    assert "nm_audit" not in meta  # no N:M pass, no audit
    assert rep.metadata == [
        "fxprune.version",
        "fxprune.plan",
        "fxprune.plan_sha256",
        "fxprune.removed",
        "fxprune.equivalence",
        "fxprune.latency",
        "fxprune.io",
        "fxprune.sha256",
    ]
    assert meta["io"] == {
        "inputs": [{"name": "x", "dtype": "float32", "shape": ["batch", 3, 64, 64]}],
        "outputs": [{"name": "output_0", "dtype": "float32", "shape": ["batch", 1000]}],
    }
    # every other field is covered by its own sha256, the file passes every check
    digests = json.loads(raw["fxprune.sha256"])
    assert set(digests) == {k[len("fxprune.") :] for k in raw if k != "fxprune.sha256"}
    for k, v in digests.items():
        assert v == hashlib.sha256(raw["fxprune." + k].encode()).hexdigest()
    assert meta["sha256"] == digests and meta["failures"] == [] and "unverified" not in meta


def test_the_file_with_metadata_checks_and_runs(r18):
    res, _, _, path, x = r18
    onnx.checker.check_model(str(path), full_check=True)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert set(sess.get_modelmeta().custom_metadata_map) >= {"fxprune.plan", "fxprune.version"}
    for batch in (x, torch.randn(3, 3, 64, 64)):  # the dynamic batch axis is intact
        (got,) = sess.run(None, {sess.get_inputs()[0].name: batch.numpy()})
        with torch.no_grad():
            ref = res.module(batch).numpy()
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_the_file_carries_no_path_of_this_machine(r18):
    import os
    import sys

    res, _, _, path, _ = r18
    model = onnx.load(str(path), load_external_data=False)
    values = [p.value for p in model.metadata_props]
    values += [p.value for n in model.graph.node for p in n.metadata_props]
    here = [os.getcwd(), sys.prefix, os.path.expanduser("~"), str(path.parent)]
    assert values and not [v for v in values for h in here if h in v]


def test_a_changed_plan_fails_the_digest(r18, tmp_path, capsys):
    path = tmp_path / "tampered.onnx"
    shutil.copy(r18[3], path)
    model = onnx.load(str(path))
    entry = next(p for p in model.metadata_props if p.key == "fxprune.plan")
    plan = json.loads(entry.value)
    kept = next(iter(plan["passes"][0]["kept"].values()))
    kept[0] += 1  # one kept channel moved: valid JSON, a different plan
    entry.value = json.dumps(plan, separators=(",", ":"))
    onnx.save(model, str(path))
    meta = read_metadata(path)
    assert meta["digest_ok"] is False and meta["plan"] == plan
    assert main(["inspect", str(path)]) == 1  # a failed check
    assert "MISMATCH: the plan was changed" in capsys.readouterr().out
    entry.value = entry.value[:-1]  # not JSON any more
    onnx.save(model, str(path))
    with pytest.raises(MetadataError, match=r"tampered.onnx: metadata fxprune.plan .*digest"):
        read_metadata(path)


def test_bert_heads_ffn_2to4_removed_and_audit(tmp_path):
    model, x, info = build("bert")
    res = fxprune.compile(model, x, heads=0.25, ffn=0.25, sparsity="2:4")
    rep = res.export(tmp_path / "bert.onnx")
    meta = read_metadata(tmp_path / "bert.onnx")
    heads, ffn = meta["removed"]["heads"], meta["removed"]["ffn"]
    assert heads == {"groups": 2, "units_before": 2 * info["heads"], "units_kept": 6}
    assert ffn == {"groups": 2, "units_before": 2 * info["ffn"], "units_kept": 192}
    (nm,) = [p for p in res.passes if isinstance(p, NMResult)]
    assert meta["removed"]["nm"]["n"] == 2 and meta["removed"]["nm"]["m"] == 4
    assert meta["removed"]["nm"]["layers"] == len(nm.layers) == 12
    assert meta["nm_audit"] == {
        "n": 2,
        "m": 4,
        "layers_checked": len(rep.audit),
        "masked": len(nm.masks),
        "nm_layers": sum(r.nm_ok for r in rep.audit),
        "violations": 0,
        "ok": True,
    }
    assert meta["nm_audit"]["masked"] == 12 and "equivalence" not in meta and meta["digest_ok"]


def test_plain_export_writes_the_version_only(tmp_path):
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    rep = export(net, torch.randn(2, 4), tmp_path / "plain.onnx")
    meta = read_metadata(rep.path)
    assert meta["version"] == fxprune.__version__ and meta["digest_ok"] and not meta["failures"]
    assert rep.metadata == ["fxprune.version", "fxprune.io", "fxprune.sha256"]
    assert [v["name"] for v in meta["io"]["inputs"] + meta["io"]["outputs"]] == [
        "input",  # nn.Sequential.forward(input)
        "output_0",
    ]
    assert "no plan: exported without a compile result" in describe(read_metadata(rep.path))


def test_external_data_stays_on_disk(tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_exp, "EXTERNAL_DATA_BYTES", 0)  # every model is "over 2 GB"
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    x = torch.randn(2, 16)
    res = fxprune.compile(net, x, channels=0.5)
    rep = res.export(tmp_path / "ext.onnx", equivalence=fxprune.verify.equivalence(net, res, x))
    data = [p for p in tmp_path.iterdir() if p.name != "ext.onnx"]
    assert rep.external_data and len(data) == 1 and read_metadata(rep.path)["digest_ok"]
    # rewriting the metadata never reads or rewrites the external tensors
    before = data[0].read_bytes()

    def no_load(*a, **k):
        raise AssertionError("external data loaded")

    monkeypatch.setattr(onnx, "load_external_data_for_model", no_load)
    monkeypatch.setattr(onnx.external_data_helper, "load_external_data_for_model", no_load)
    write_metadata(rep.path, {"fxprune.version": "9.9"})
    monkeypatch.undo()
    assert data[0].read_bytes() == before and read_metadata(rep.path)["version"] == "9.9"
    sess = ort.InferenceSession(str(rep.path), providers=["CPUExecutionProvider"])
    (got,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    np.testing.assert_allclose(got, res.module(x).detach().numpy(), rtol=1e-4, atol=1e-5)


def test_tensorrt_forwards_the_metadata_options(tmp_path, monkeypatch):
    from fxprune.exporters import tensorrt as trt_exp

    fake = type(sys)("tensorrt")
    fake.__version__ = "10.13.0"
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    real = torch.cuda.is_available

    def gpu_for_tensorrt_only():  # torch.onnx asks too: it must see the real answer
        return sys._getframe(1).f_globals["__name__"] == trt_exp.__name__ or real()

    monkeypatch.setattr(torch.cuda, "is_available", gpu_for_tensorrt_only)
    monkeypatch.setattr(trt_exp, "build_engine", lambda *a, **k: b"engine")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2)).eval()
    x = torch.randn(2, 8)
    res = fxprune.compile(net, x, channels=0.5)
    rep = res.export(tmp_path / "m.engine", latency=LATENCY)
    assert rep.engine.read_bytes() == b"engine"
    meta = read_metadata(rep.onnx)
    assert meta["plan"] == res.plan.to_dict() and meta["latency"]["backend"] == "onnxruntime"


NET = """
import torch, torch.nn as nn

def build():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 3),
                        nn.Flatten(), nn.LazyLinear(4))
    x = torch.randn(1, 3, 8, 8)
    net(x)
    return net.eval(), x
"""


@pytest.fixture
def net(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "net.py").write_text(NET)
    return "net.py:build"


def test_cli_prune_export_then_inspect(net, capsys):
    args = ["prune", net, "--trust", "--ignore", "4", "--export", "out.onnx", "--json"]
    assert main(args) == 0
    pruned = json.loads(capsys.readouterr().out)
    assert main(["inspect", "out.onnx", "--json"]) == 0
    meta = json.loads(capsys.readouterr().out)
    assert meta == read_metadata("out.onnx")  # --json round-trips
    assert meta["plan"] == pruned["plan"] and meta["digest_ok"] is True
    assert meta["equivalence"]["max_rel_err"] == pruned["equivalence"]["max_rel_err"]
    assert meta["removed"]["channels"]["units_kept"] < meta["removed"]["channels"]["units_before"]
    assert main(["inspect", "out.onnx"]) == 0
    out = capsys.readouterr().out
    assert f"out.onnx: exported by fxprune {fxprune.__version__}" in out
    assert "matches the stored plan" in out and "equivalence: ok" in out
    assert "| channels | 2 groups, 24 -> 12 units |" in out


def test_cli_verify_export_records_the_latency(net, capsys):
    args = ["verify", net, "--trust", "--ignore", "4", "--backend", "torch", "--batch", "1"]
    assert main([*args, "--repeats", "2", "--warmup", "1", "--export", "v.onnx", "--json"]) == 0
    ver = json.loads(capsys.readouterr().out)
    assert ver["export"] == "v.onnx"
    lat = read_metadata("v.onnx")["latency"]
    assert lat["backend"] == "torch" and lat["threads"] == ver["threads"]
    assert [(b["batch"], b["dense_ms"], b["pruned_ms"], b["speedup"]) for b in lat["batches"]] == [
        (r["batch"], r["dense_ms"], r["pruned_ms"], r["speedup"]) for r in ver["rows"]
    ]
    assert main(["inspect", "v.onnx"]) == 0
    assert "latency: torch" in capsys.readouterr().out


def test_cli_inspect_without_metadata_missing_and_corrupt(tmp_path, capsys):
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    onnx.save(helper.make_model(graph), str(tmp_path / "other.onnx"))
    assert read_metadata(tmp_path / "other.onnx") == {}
    assert main(["inspect", str(tmp_path / "other.onnx")]) == 0
    assert "no fxprune metadata" in capsys.readouterr().out
    assert main(["inspect", str(tmp_path / "other.onnx"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {}
    (tmp_path / "bad.onnx").write_bytes(b"not an onnx model at all")
    for name, words in (("gone.onnx", "cannot read"), ("bad.onnx", "is not an ONNX model")):
        assert main(["inspect", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("fxprune: error: ") and words in err[0], err
        assert name in err[0]


def test_reports_are_duck_typed_and_stored_as_strict_json():
    eq = {"ok": False, "max_rel_err": float("inf"), "dtype": "float16", "worst_output": "[1]"}
    props = build_metadata(equivalence=eq, latency={"backend": "torch", "threads": 1})
    assert set(props) == {
        "fxprune.version",
        "fxprune.equivalence",
        "fxprune.latency",
        "fxprune.sha256",
    }
    stored = json.loads(props["fxprune.equivalence"], parse_constant=pytest.fail)  # no Infinity
    assert stored["max_rel_err"] == "inf" and stored["ok"] is False and stored["tolerance"] is None
    assert json.loads(props["fxprune.latency"])["batches"] == []


def test_decode_latency_is_recorded_per_step_with_its_generation():
    """A decode backend's report (``onnxruntime-genai``) times ms per decode step: the metadata
    keeps the mode, prompt and new-token counts, and the text says per step."""
    from fxprune.exporters.metadata import describe, latency_summary

    lat = {
        "backend": "onnxruntime-genai",
        "threads": 2,
        "warmup": 1,
        "repeats": 4,
        "machine": "x86_64",
        "mode": "decode",
        "prompt_len": 16,
        "new_tokens": 8,
        "rows": [{"batch": 1, "dense_ms": 2.0, "pruned_ms": 1.0, "speedup": 2.0}],
    }
    rec = latency_summary(lat)
    assert (rec["mode"], rec["prompt_len"], rec["new_tokens"]) == ("decode", 16, 8)
    text = describe({"version": "0", "latency": rec})
    assert "| batch | dense ms / step | pruned ms / step | decode speedup (16 prompt" in text
    forward = latency_summary({**lat, "mode": "forward"})
    assert "mode" not in forward
    assert "| batch | dense ms | pruned ms | speedup |" in describe({"latency": forward})
