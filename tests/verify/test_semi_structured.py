"""2:4 semi-structured sparse weights only where measured faster: the shapes read off a real
forward, the decision from the two timings (fake timers here, so wrong timings must flip it),
every refusal, the CPU fallback when the kernels refuse, and on a GPU (``gpu`` marker) the real
measurement and the swapped model's outputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune
from fxprune.compile_backend.sparse import compile_sparse, semi_structured
from fxprune.errors import ConfigError
from fxprune.layer_timing import LayerTimer
from fxprune.verify.gpu import TorchCudaRunner
from fxprune.verify.latency import TorchCuda
from fxprune.verify.semi_structured import (
    MIN_SPEEDUP,
    SwapPlan,
    SwapRow,
    linear_inputs,
    plan_semi_structured,
    swap_semi_structured,
)

CUDA = torch.cuda.is_available()


class Net(nn.Module):
    """Two Linears (one big, one small), a conv, and a weight read by a matmul."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(4, 8, 1)
        self.big = nn.Linear(8, 64)
        self.small = nn.Linear(64, 16)
        self.proj = nn.Parameter(torch.randn(16, 16))

    def forward(self, x):  # x: [B, T, 4]
        h = self.conv(x.transpose(1, 2)).transpose(1, 2)
        h = self.small(F.relu(self.big(h)))
        return h @ self.proj.t()


class Timer(LayerTimer):
    """Milliseconds by output width: ``table[out]``; counts its calls."""

    def __init__(self, table):
        self.table, self.calls = table, []

    def measure(self, shape, threads):
        self.calls.append(shape)
        return self.table[shape.out_channels]


@pytest.fixture
def pruned():
    torch.manual_seed(0)
    m, x = Net().eval(), torch.randn(2, 5, 4)
    return m, x, fxprune.compile(m, x, sparsity="2:4", ignore=["conv"])


def _masks(res):
    masks = dict(res.nm_masks)
    masks["proj"] = torch.tensor([1, 1, 0, 0], dtype=torch.bool).repeat(16, 4)
    return masks


def test_linear_inputs_reads_each_weights_call_shape(pruned):
    m, x, res = pruned
    for mod in (m, res.module, res.model):  # eager, fxprune's graph, the module tree
        seen = linear_inputs(mod, (x,), ["big.weight", "small.weight", "proj"])
        assert seen == {"big.weight": ((2, 5, 8), True), "small.weight": ((2, 5, 64), True)}


def test_only_linears_measured_faster_are_swapped(pruned):
    _, x, res = pruned
    dense, sparse = Timer({64: 1.0, 16: 1.0}), Timer({64: 0.5, 16: 2.0})
    plan = plan_semi_structured(res.module, _masks(res), (x,), dense=dense, sparse=sparse)
    rows = {r.name: r for r in plan.rows}
    assert plan.swapped == ["big.weight"]
    assert rows["big.weight"].speedup == 2.0 and rows["big.weight"].reason == "measured 2.00x"
    assert not rows["small.weight"].swap and rows["small.weight"].speedup == 0.5
    assert [s.input for s in dense.calls] == [(2, 5, 8), (2, 5, 64)]  # the real call shapes
    assert "no F.linear call" in plan.skipped["proj"]
    note = plan.note("pruned")
    assert note.startswith(f"pruned: 1 of {len(plan.rows) + len(plan.skipped)} N:M weights")
    assert "small.weight (measured 0.50x)" in note and "proj (no F.linear call" in note
    table = plan.table()
    assert "| big.weight | [2, 5, 8] | 64 | 1.0000 | 0.5000 | 2.00x | yes |" in table
    assert "| small.weight |" in table and "| proj |" in table


def test_a_speedup_under_the_margin_is_not_swapped(pruned):
    _, x, res = pruned
    just = 1.0 / (MIN_SPEEDUP - 0.01)  # faster, but by less than the margin
    dense, sparse = Timer({64: 1.0, 16: 1.0}), Timer({64: just, 16: 1.0 / (MIN_SPEEDUP + 0.01)})
    plan = plan_semi_structured(res.module, res.nm_masks, (x,), dense=dense, sparse=sparse)
    assert plan.swapped == ["small.weight"]
    loose = plan_semi_structured(
        res.module, res.nm_masks, (x,), min_speedup=0.5, dense=dense, sparse=sparse
    )
    assert sorted(loose.swapped) == ["big.weight", "small.weight"]


class Refusing(Timer):
    """A sparse timer whose kernels refuse the 16-wide Linear (as cuSPARSELt refuses fp32, or
    a side off its tile)."""

    def measure(self, shape, threads):
        if shape.out_channels == 16:
            raise RuntimeError("sparse_semi_structured: shape not supported\ndetails")
        return super().measure(shape, threads)


def test_a_shape_the_sparse_kernels_refuse_stays_dense_with_the_reason(pruned):
    _, x, res = pruned
    dense, sparse = Timer({64: 1.0, 16: 1.0}), Refusing({64: 0.5})
    plan = plan_semi_structured(res.module, res.nm_masks, (x,), dense=dense, sparse=sparse)
    rows = {r.name: r for r in plan.rows}
    assert plan.swapped == ["big.weight"]
    assert not rows["small.weight"].swap and rows["small.weight"].sparse_ms is None
    assert rows["small.weight"].reason == (
        "the 2:4 kernels refused it (torch.float32): RuntimeError: sparse_semi_structured: "
        "shape not supported"
    )


def test_all_and_off_do_not_measure(pruned):
    _, x, res = pruned
    never = Timer({})  # a KeyError if anything were timed
    everything = plan_semi_structured(res.module, res.nm_masks, (x,), "all", dense=never)
    assert sorted(everything.swapped) == ["big.weight", "small.weight"]
    assert all(r.dense_ms is None for r in everything.rows) and not never.calls
    off = plan_semi_structured(res.module, res.nm_masks, (x,), "off")
    assert off.swapped == [] and set(off.skipped) == set(res.nm_masks)


def test_bad_options_are_refused(pruned):
    _, x, res = pruned
    with pytest.raises(ConfigError, match="semi_structured='fast'"):
        plan_semi_structured(res.module, res.nm_masks, (x,), "fast")
    with pytest.raises(ConfigError, match="min_speedup=0"):
        plan_semi_structured(res.module, res.nm_masks, (x,), min_speedup=0)
    with pytest.raises(ConfigError, match="semi_structured='yes'"):
        TorchCuda("yes")
    with pytest.raises(ConfigError, match="semi_structured='on'"):
        fxprune.backend(res.plan, semi_structured="on")
    for mode in ("all", "off"):  # they time nothing: a margin would be ignored
        with pytest.raises(ConfigError, match="min_speedup=1.2 applies to"):
            plan_semi_structured(res.module, res.nm_masks, (x,), mode, min_speedup=1.2)
        with pytest.raises(ConfigError, match="min_speedup=1.2 applies to"):
            TorchCuda(mode, min_speedup=1.2)
        with pytest.raises(ConfigError, match="min_speedup=1.2 applies to"):
            fxprune.backend(res.plan, semi_structured=mode, min_speedup=1.2)
    with pytest.raises(ConfigError, match="min_speedup=0"):
        fxprune.backend(res.plan, min_speedup=0)


@pytest.mark.skipif(CUDA, reason="checks the message shown when no GPU is visible")
def test_measuring_without_a_gpu_says_so(pruned):
    _, x, res = pruned
    with pytest.raises(ConfigError, match="'torch-cuda' needs an NVIDIA GPU"):
        plan_semi_structured(res.module, res.nm_masks, (x,))


@pytest.mark.skipif(CUDA, reason="the CPU refusal of the sparse kernels")
def test_a_conversion_the_kernels_refuse_keeps_the_dense_weight(pruned):
    _, x, res = pruned
    before = res.module.big.weight
    measured = SwapPlan("measured", 1.05, rows=[SwapRow("big.weight", [2, 5, 8], 64, swap=True)])
    assert swap_semi_structured(res.module, measured) == []
    assert res.module.big.weight is before
    assert not measured.rows[0].swap
    assert measured.rows[0].reason.startswith("conversion refused: RuntimeError")
    forced = plan_semi_structured(res.module, res.nm_masks, (x,), "all")
    with pytest.raises(ConfigError, match="no N:M weight could become"):
        swap_semi_structured(res.module, forced)  # 'all' is a request: none converted
    assert res.module.big.weight is before


def test_the_backend_keeps_a_cpu_graph_dense_and_says_why(pruned):
    m, x, res = pruned
    b = fxprune.backend(res.plan, compiler="eager")
    torch._dynamo.reset()
    y = torch.compile(m, backend=b)(x)
    torch.testing.assert_close(y, res.module(x), rtol=1e-5, atol=1e-6)
    (g,) = b.report.graphs
    assert g.semi_structured.swapped == []
    assert set(g.semi_structured.skipped) == set(res.nm_masks)
    assert "CUDA-only" in next(iter(g.semi_structured.skipped.values()))
    assert f"0 of {len(res.nm_masks)} N:M weights" in b.report.table()
    assert b.report.to_dict()["graphs"][0]["semi_structured"]["mode"] == "measured"
    torch._dynamo.reset()


def test_graphs_without_masks_have_no_plan():
    assert semi_structured(None, {}, (), "measured", 1.05) == (None, {})


def test_a_compiler_that_refuses_the_sparse_weights_gets_the_dense_ones(pruned):
    _, x, res = pruned
    gm = res.module
    dense = gm.big.weight
    gm.big._parameters["weight"] = nn.Parameter(dense.detach().clone())  # "swapped"
    plan = SwapPlan("measured", 1.05, rows=[SwapRow("big.weight", [2, 5, 8], 64, swap=True)])
    calls = []

    def compiler(g, inputs):
        calls.append(g.big.weight is dense)
        if len(calls) == 1:
            raise RuntimeError("no kernel for SparseSemiStructuredTensor\nmore")
        return g.forward

    fn = compile_sparse(compiler, gm, [x], plan, {"big.weight": dense})
    assert calls == [False, True] and gm.big.weight is dense
    assert (
        plan.swapped == [] and "compiler refused it: RuntimeError: no kernel" in plan.rows[0].reason
    )
    torch.testing.assert_close(fn(x), res.module(x))
    with pytest.raises(RuntimeError, match="boom"):  # nothing swapped: the error stands

        def broken(g, inputs):
            raise RuntimeError("boom")

        compile_sparse(broken, gm, [x], SwapPlan("measured", 1.05), {})


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_on_a_gpu_the_decision_follows_the_measured_times():
    """BERT-base FFN shapes at 8 x 128 tokens: both timings are real; a swapped weight gives the
    dense masked Linear's output (fp16)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(768, 3072), nn.GELU(), nn.Linear(3072, 768)).eval()
    x = torch.randn(8, 128, 768)
    res = fxprune.compile(m, x, sparsity="2:4")
    gm = res.module.to("cuda", torch.float16)
    xc = x.to("cuda", torch.float16)
    with torch.no_grad():
        ref = gm(xc)
    plan = plan_semi_structured(gm, res.nm_masks, (xc,))
    assert len(plan.rows) == 2
    for r in plan.rows:
        assert r.dense_ms > 0 and r.sparse_ms > 0
        assert r.swap == (r.speedup >= MIN_SPEEDUP)
    forced = plan_semi_structured(gm, res.nm_masks, (xc,), "all")
    assert sorted(swap_semi_structured(gm, forced)) == ["0.weight", "2.weight"]
    with torch.no_grad():
        torch.testing.assert_close(gm(xc), ref, rtol=2e-2, atol=2e-2)
    print(plan.table())


def test_all_with_nothing_to_swap_is_refused(pruned):
    """semi_structured='all' is a request: no N:M masks, or a CPU graph, is an error."""
    m, x, res = pruned
    structural = fxprune.compile(m, x, channels=0.25, ignore=["small"])
    with pytest.raises(ConfigError, match="sets no N:M masks"):
        fxprune.backend(structural.plan, semi_structured="all")
    with pytest.raises(ConfigError, match="sets no N:M masks"):
        fxprune.backend(semi_structured="all", channels=0.25)
    with pytest.raises(ConfigError, match="no N:M masks"):
        TorchCudaRunner(structural.module, {}, "pruned", (x,), "all")
    b = fxprune.backend(res.plan, compiler="eager", semi_structured="all")
    torch._dynamo.reset()
    with pytest.raises(Exception, match="semi-structured sparse kernels are CUDA-only"):
        torch.compile(m, backend=b)(x)
    torch._dynamo.reset()
