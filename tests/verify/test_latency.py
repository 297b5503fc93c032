"""The latency verifier: what it reports and how it gates (no timing is asserted here: speed
claims live in benchmarks/ and docs/benchmarks.md)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune.errors import ConfigError
from fxprune.verify.forward import repeat_batch
from fxprune.verify.latency import verdict
from tests.transformer_models import encoder_config


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 32, 3, padding=1)
        self.b = nn.Conv2d(32, 32, 3, padding=1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.b(torch.relu(self.a(x))))
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_report_fields(pruned, backend):
    m, x, res = pruned
    rep = fxprune.verify.latency(m, res, x, backend=backend, batch_sizes=(1, 3), repeats=4)
    assert [r.batch for r in rep.rows] == [1, 3]
    for r in rep.rows:
        assert r.mac_ratio == pytest.approx(res.summary.macs_ratio)
        assert r.speedup == pytest.approx(r.dense_ms / r.pruned_ms)
        assert r.efficiency == pytest.approx(r.speedup * r.mac_ratio)
        assert r.dense_p10 <= r.dense_ms <= r.dense_p90
        assert r.parity < 1e-5  # the backend computes what PyTorch computes
        assert r.verdict
    data = json.loads(rep.to_json())
    assert data["backend"] == backend and data["rows"][1]["batch"] == 3
    assert "| batch |" in rep.table()


def test_module_instead_of_result_counts_macs(pruned):
    m, x, res = pruned
    rep = fxprune.verify.latency(m, res.module, x, backend="torch", batch_sizes=(1,), repeats=2)
    assert rep.rows[0].mac_ratio == pytest.approx(res.summary.macs_ratio)


def test_batches_repeat_rows():
    (b,) = repeat_batch((torch.arange(2).view(2, 1),), 5)
    assert b.shape == (5, 1) and b[:, 0].tolist() == [0, 1, 0, 1, 0]


def test_verdicts():
    assert verdict(0.8, 0.4) == "slower"
    assert verdict(1.0, 0.5) == "no measurable change"
    assert verdict(1.5, 0.3).startswith("faster, but")
    assert verdict(1.5, 0.9) == "faster"


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"backend": "tvm"}, "choose one of"),
        ({"batch_sizes": (0,)}, "positive"),
        ({"repeats": 1}, "repeats"),
    ],
)
def test_bad_arguments(pruned, kw, match):
    m, x, res = pruned
    with pytest.raises(ConfigError, match=match):
        fxprune.verify.latency(m, res, x, **kw)


@pytest.mark.slow
def test_cli_verify_gates_a_pipeline(tmp_path):
    src = tmp_path / "net.py"
    src.write_text(
        "import torch, sys\n"
        f"sys.path.insert(0, {str(__import__('pathlib').Path(__file__).parents[2])!r})\n"
        "from tests.verify.test_latency import Net\n"
        "def build():\n"
        "    torch.manual_seed(0)\n"
        "    return Net().eval(), torch.randn(2, 3, 16, 16)\n"
    )
    cmd = [sys.executable, "-m", "fxprune.cli", "verify", f"{src}:build", "--ignore", "fc"]
    cmd += ["--trust", "--batch", "1", "--repeats", "4", "--backend", "torch", "--json"]
    ok = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    data = json.loads(ok.stdout)
    assert data["equivalence"]["ok"] and data["failed"] == []
    assert {"speedup", "mac_ratio", "efficiency"} <= set(data["rows"][0])
    gated = subprocess.run(cmd + ["--min-speedup", "1000"], capture_output=True, text=True)
    assert gated.returncode == 1
    assert "below --min-speedup 1000" in json.loads(gated.stdout)["failed"][0]


@pytest.mark.slow
def test_batch_one_example_still_serves_other_batches():
    """torch.export specialises a size-1 dim; fxprune traces a batch of 1 as 2 so the pruned
    graph and its ONNX export take any batch (the verifier times batch 1 and 8 from one input)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = encoder_config(hidden=32, ffn=64, positions=16)
    m, ids = transformers.BertModel(cfg).eval(), torch.randint(0, 100, (1, 8))
    res = fxprune.compile(m, ids, heads=0.5, ffn=0.5)
    assert res.plan.mode == "export"
    out = res.module(ids.repeat(5, 1))
    assert (out[0] if isinstance(out, (tuple, list)) else out["last_hidden_state"]).shape[0] == 5
    rep = fxprune.verify.latency(m, res, ids, batch_sizes=[1, 3], repeats=2, warmup=0)
    assert [r.batch for r in rep.rows] == [1, 3] and max(r.parity for r in rep.rows) < 1e-4


def test_a_user_backend_times_through_the_registry(pruned, monkeypatch):
    """A backend registered with @fxprune.verify.backend is timed like a built-in: its runner
    prepares once, runs warm-up + timed + parity calls, its notes reach the report, and a
    backend whose outputs are wrong shows it in the parity column (the check can fail)."""
    import importlib

    lat = importlib.import_module("fxprune.verify.latency")  # the module, not the function
    monkeypatch.setattr(lat, "REGISTRY", dict(lat.REGISTRY))
    calls = {"dense": 0, "pruned": 0}

    class Runner:
        def __init__(self, module, tag, scale):
            self.module, self.tag, self.scale = module, tag, scale
            self.notes = [f"{tag}: counted"]

        def prepare(self, args):
            return args

        def run(self, prepared):
            calls[self.tag] += 1
            with torch.inference_mode():
                return self.module(*prepared) * self.scale

    @fxprune.verify.backend("counting")
    class Counting(fxprune.verify.Backend):
        scale = 1.0

        def runner(self, module, args, ctx):
            assert ctx.threads >= 1 and ctx.max_batch in (1, 3) and ctx.workdir.is_dir()
            return Runner(module, ctx.tag, self.scale)

    m, x, res = pruned
    rep = fxprune.verify.latency(m, res, x, backend="counting", batch_sizes=(1, 3), repeats=4)
    assert rep.backend == "counting" and [r.batch for r in rep.rows] == [1, 3]
    assert calls == {"dense": 2 * (5 + 4), "pruned": 2 * (5 + 4 + 1)}  # + one parity call
    assert "pruned: counted" in rep.notes and max(r.parity for r in rep.rows) < 1e-5

    @fxprune.verify.backend("wrong")
    class Wrong(Counting):
        scale = 1.5  # computes something else

    bad = fxprune.verify.latency(m, res, x, backend="wrong", batch_sizes=(1,), repeats=2)
    assert bad.rows[0].parity == pytest.approx(0.5, rel=1e-4)
    with pytest.raises(ConfigError, match="counting"):  # the error lists registered names
        fxprune.verify.latency(m, res, x, backend="nope")


def test_torch_compile_runner_compiles_in_prepare_with_one_compile_thread():
    """The compile happens in prepare (not in a timed call) with compile_threads=1, under which
    inductor starts no worker pool (a default compile's pool kept a core busy while timing)."""
    from fxprune.verify.latency_runners import CompiledRunner

    seen = []

    def counting(gm, inputs):
        import torch._inductor.config as inductor

        seen.append(inductor.compile_threads)
        return gm.forward

    import torch._inductor.config as inductor

    before = inductor.compile_threads
    torch._dynamo.reset()
    r = CompiledRunner(nn.Linear(4, 2).eval(), backend=counting)
    x = (torch.randn(3, 4),)
    ready = r.prepare(x)
    assert seen == [1] and inductor.compile_threads == before
    r.run(ready)
    r.run(ready)
    assert seen == [1]  # the timed calls hit the compiled graph
    torch._dynamo.reset()
