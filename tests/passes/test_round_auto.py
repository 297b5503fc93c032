"""``round_to="auto"``: each group keeps the count (the plain one or a nearby multiple of
8 / 16 / 32 channels) its layers run fastest at, priced by ``fxprune.layer_timing``. The
choice is tested against injected timing tables (deterministic); one real timing run checks
that it completes and stays among the candidates."""

from __future__ import annotations

import importlib
import json

import numpy as np
import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune.errors import ConfigError, NothingToPruneError
from fxprune.graph import build_graph, trace
from fxprune.layer_timing import (
    LayerShape,
    LayerTimer,
    clear_cache,
    layer_shape,
    layer_timer,
    onnx_layer,
    time_layer,
)
from fxprune.passes import Channels
from fxprune.passes.channels import auto_candidates, cheapest
from tests.verify.test_latency import Net

lt = importlib.import_module("fxprune.layer_timing")


@pytest.fixture
def model():
    torch.manual_seed(0)
    return Net().eval(), torch.randn(2, 3, 16, 16)


@pytest.fixture
def table(monkeypatch):
    """Register a layer timer "table" that prices a shape by ``cost[c]`` of its input and its
    output width (0.5 for widths the table does not name); ``seen`` records every shape."""
    monkeypatch.setattr(lt, "TIMERS", dict(lt.TIMERS))
    state = {"cost": {}, "seen": [], "calls": 0}

    @layer_timer("table")
    class Table(LayerTimer):
        def measure(self, shape, threads):
            state["calls"] += 1
            state["seen"].append(shape)
            cost = state["cost"]
            return cost.get(shape.out_channels, 0.5) + cost.get(shape.in_channels, 0.5)

    return state


def _kept(res) -> dict[str, int]:
    return {k: len(v) for k, v in res.plan.passes[0]["kept"].items()}


def _auto(m, x, ratio=0.4, **kw):
    recipe = fxprune.Recipe(
        [Channels(ratio, ignore=("fc",), round_to="auto", round_backend="table", **kw)]
    )
    return fxprune.compile(m, x, recipe)


# channels=0.4 of 32 keeps 20 (the plain count); the candidates are 20, 24 and 32


def test_candidates_are_the_plain_count_and_the_next_multiples():
    assert auto_candidates(32, 1, 20) == [20, 24, 32]
    assert auto_candidates(32, 1, 24) == [24, 32]
    assert auto_candidates(100, 1, 33) == [33, 40, 48, 64]
    assert auto_candidates(10, 1, 7) == [7, 8, 10]  # never more than the group has
    assert auto_candidates(16, 4, 3) == [3, 4, 8]  # units of 4 channels: 12, 16, 32
    assert cheapest({20: 1.0, 24: 1.02, 32: 0.99}) == 20  # within the tie margin: fewest
    assert cheapest({20: 2.0, 24: 1.0, 32: 1.01}) == 24
    assert cheapest({12: 0.0109, 16: 0.0104}) == 12  # half a microsecond: a tie


def test_auto_keeps_the_count_the_table_says_is_fastest(model, table):
    m, x = model
    table["cost"] = {20: 3.0, 24: 1.0, 32: 2.0}
    res = _auto(m, x)
    assert _kept(res) == {"a": 24, "b": 24}
    entry = res.plan.passes[0]["round_auto"]
    assert entry["backend"] == "table"
    assert entry["groups"]["a"]["plain"] == 20 and entry["groups"]["a"]["kept"] == 24
    assert set(entry["groups"]["a"]["ms"]) == {"20", "24", "32"}
    assert fxprune.verify.equivalence(m, res, x).ok

    clear_cache()
    table["cost"] = {20: 3.0, 24: 3.0, 32: 1.0}  # the full width is cheapest in every group:
    with pytest.raises(NothingToPruneError, match="must keep 32"):  # pruning would not pay
        _auto(m, x)


def test_never_fewer_channels_than_the_ratio_keeps(model, table):
    m, x = model
    table["cost"] = {c: float(c) for c in range(1, 64)}  # fewer channels always faster
    res = _auto(m, x)
    assert _kept(res) == {"a": 20, "b": 20}
    # every width priced for the pruned dims is a candidate, never below the plain count
    widths = {s.out_channels for s in table["seen"]} | {s.in_channels for s in table["seen"]}
    assert widths - {3, 10} <= {20, 24, 32}


def test_replay_reproduces_the_choice_without_timing(model, table):
    m, x = model
    table["cost"] = {20: 3.0, 24: 1.0, 32: 2.0}
    res = _auto(m, x)
    calls = table["calls"]
    clear_cache()
    again = fxprune.apply_plan(Net().eval(), json.loads(res.plan.to_json()), x)
    assert table["calls"] == calls  # nothing measured
    assert _kept(again) == _kept(res) == {"a": 24, "b": 24}
    assert again.module.b.weight.shape == res.module.b.weight.shape


def test_global_ranking_and_min_channels_stay_among_the_candidates(model, table):
    m, x = model
    table["cost"] = {24: 0.1}
    res = _auto(m, x, ratio=0.4, global_ranking=True)
    assert all(k in (24, 32) or k >= 20 for k in _kept(res).values())
    res = _auto(m, x, ratio=0.9, min_channels=12)  # 0.9 keeps 4, min_channels asks 12
    assert all(k >= 12 for k in _kept(res).values())


def test_full_width_fastest_everywhere_is_refused_with_the_timings(model, table):
    m, x = model
    table["cost"] = {32: 0.1}  # the unpruned width is the fastest for both groups
    with pytest.raises(NothingToPruneError) as e:
        _auto(m, x)
    msg = str(e.value)
    assert "round_to='auto' timed every group fastest at its full width on table" in msg
    assert "a: 20 ch" in msg and "32 ch 1.2 ms" in msg and "round_to (e.g. 8)" in msg


def test_a_real_timing_run_completes(model):
    """Real timings decide, so either outcome is legitimate: some group pruned to a candidate
    width (with its table in the plan), or every group timed fastest whole, which is refused
    with the timings in the message (oneDNN's 16-channel blocks make 32 the fastest width on
    some CPUs)."""
    m, x = model
    clear_cache()
    try:
        res = fxprune.compile(m, x, channels=0.4, ignore=["fc"], round_to="auto")
    except NothingToPruneError as e:
        msg = str(e)
        assert "round_to='auto' timed every group fastest at its full width on torch" in msg
        assert all(f"{w} ch" in msg for w in (20, 24, 32)) and " ms" in msg
        return
    kept = {res.module.a.out_channels, res.module.b.out_channels}  # 32: kept whole
    assert kept <= {20, 24, 32} and kept != {32}
    table = res.plan.passes[0]["round_auto"]["groups"]
    assert all(v > 0 for g in table.values() for v in g["ms"].values())
    assert fxprune.verify.equivalence(m, res, x).ok
    assert res.plan.config["recipe"]["passes"][0]["round_to"] == "auto"


def test_the_recipe_carries_auto():
    recipe = fxprune.Recipe([Channels(0.5, round_to="auto", round_backend="onnxruntime")])
    d = json.loads(recipe.to_json())
    assert d["passes"][0]["round_to"] == "auto"
    assert d["passes"][0]["round_backend"] == "onnxruntime"
    assert fxprune.Recipe.from_dict(d) == recipe


@pytest.mark.parametrize("bad", [0, -8, 2.5, True, "fast", "AUTO", None])
def test_bad_round_to_is_refused_by_value(bad):
    with pytest.raises(ConfigError, match="round_to=" + repr(bad).replace("(", r"\(")):
        Channels(0.5, round_to=bad)


def test_bad_round_backend_and_compile_keyword(model):
    m, x = model
    with pytest.raises(ConfigError, match="round_backend='tvm'.*torch"):
        Channels(0.5, round_to="auto", round_backend="tvm")
    with pytest.raises(ConfigError, match="round_to='auto8'"):
        fxprune.compile(m, x, channels=0.5, round_to="auto8")


# ---------------------------------------------------------------- fxprune.layer_timing


def test_layer_shapes_are_read_the_same_from_fx_and_export(model):
    m, x = model
    shapes = {}
    for mode in ("fx", "export"):
        g = build_graph(trace(m, x, mode=mode).gm)
        nodes = {n.name: n for n in g.gm.graph.nodes}
        shapes[mode] = [layer_shape(g.gm, nodes[s.node]) for s in g.sources]
    assert shapes["fx"] == shapes["export"]
    a, b, fc = shapes["fx"]
    assert a == LayerShape("conv", (2, 3, 16, 16), 32, (3, 3), (1, 1), (1, 1), (1, 1), 1, True)
    assert b.in_channels == 32 and fc.kind == "linear" and fc.input == (2, 32)


def test_with_channels_keeps_depthwise_convs_depthwise():
    dw = LayerShape("conv", (1, 16, 8, 8), 16, (3, 3), (1, 1), (1, 1), (1, 1), 16)
    assert dw.depthwise
    got = dw.with_channels(out=8)
    assert got.groups == got.in_channels == got.out_channels == 8 and got.input == (1, 8, 8, 8)
    plain = LayerShape("conv", (1, 16, 8, 8), 32, (1, 1), (1, 1), (0, 0), (1, 1), 1)
    assert plain.with_channels(out=24, inp=12).input == (1, 12, 8, 8)
    grouped = LayerShape("conv", (1, 16, 8, 8), 32, (1, 1), (1, 1), (0, 0), (1, 1), 4)
    assert grouped.with_channels(inp=10) is None  # 10 channels do not split into 4 groups
    assert grouped.with_channels(inp=12).groups == 4


def test_time_layer_caches_in_memory_and_on_disk(table, tmp_path):
    shape = LayerShape("linear", (4, 16), 8)
    table["cost"] = {8: 1.0, 16: 2.0}
    path = tmp_path / "timings.json"
    assert time_layer(shape, "table", threads=1, cache=path) == 3.0
    assert time_layer(shape, "table", threads=1, cache=path) == 3.0
    assert table["calls"] == 1  # memory
    clear_cache()
    assert time_layer(shape, "table", threads=1, cache=path) == 3.0
    assert table["calls"] == 1  # disk
    (key,) = json.loads(path.read_text())
    assert "table" in key and torch.__version__ in key and shape.key() in key
    time_layer(shape, "table", threads=2, cache=path)
    assert table["calls"] == 2  # another thread count is another measurement
    with pytest.raises(ConfigError, match="'nope'"):
        time_layer(shape, "nope")


@pytest.mark.parametrize(
    "shape",
    [
        LayerShape("conv", (1, 8, 10, 10), 12, (3, 3), (2, 2), (1, 1), (1, 1), 1),
        LayerShape("conv", (1, 8, 10, 10), 8, (3, 3), (1, 1), (1, 1), (1, 1), 8),
        LayerShape("conv", (1, 4, 9), 6, (3,), (1,), "same", (2,), 1, False),
        LayerShape("linear", (2, 5, 16), 12),
    ],
)
def test_the_onnx_layer_computes_what_the_torch_layer_does(shape):
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    m = shape.module().eval()
    model = onnx_layer(shape, m)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = torch.randn(shape.input)
    (got,) = sess.run(None, {"x": x.numpy()})
    with torch.no_grad():
        want = m(x).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert time_layer(shape, "onnxruntime", threads=1) > 0.0


def test_the_torch_timer_times_a_real_layer():
    clear_cache()
    ms = time_layer(LayerShape("conv", (1, 8, 8, 8), 8, (3, 3), (1, 1), (1, 1), (1, 1)), "torch")
    assert ms > 0.0


def test_depthwise_groups_are_priced_through_their_conv(table):
    class DW(nn.Module):
        def __init__(self):
            super().__init__()
            self.pw = nn.Conv2d(3, 32, 1)
            self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32)
            self.out = nn.Conv2d(32, 4, 1)

        def forward(self, x):
            return self.out(torch.relu(self.dw(torch.relu(self.pw(x)))))

    torch.manual_seed(0)
    m, x = DW().eval(), torch.randn(1, 3, 8, 8)
    table["cost"] = {24: 0.1}
    recipe = fxprune.Recipe(
        [Channels(0.4, ignore=("out",), round_to="auto", round_backend="table")]
    )
    res = fxprune.compile(m, x, recipe)
    assert res.module.dw.groups == res.module.dw.out_channels == 24
    assert any(s.depthwise and s.out_channels == 24 for s in table["seen"])
    assert fxprune.verify.equivalence(m, res, x).ok


def test_a_round_backend_without_auto_is_refused(model):
    """round_backend only matters for round_to='auto': set alone it would time nothing."""
    m, x = model
    with pytest.raises(ConfigError, match="round_backend='onnxruntime' times layers"):
        fxprune.compile(m, x, channels=0.5, round_to=8, round_backend="onnxruntime")


def test_a_backend_layout_multiple_keeps_conv_counts_on_it(model, monkeypatch, table):
    """ORT keeps convs in its blocked layout only at multiples of its NCHWc step: a plain count
    that is fastest alone (20 of 32 here) is not offered when the step is 8."""
    m, x = model
    table["cost"] = {20: 1.0, 24: 2.0, 32: 3.0}  # alone, the plain count wins
    assert _kept(_auto(m, x)) == {"a": 20, "b": 20}
    clear_cache()
    monkeypatch.setattr(lt.TIMERS["table"], "layout_multiple", lambda: 8)
    res = _auto(m, x)
    assert _kept(res) == {"a": 24, "b": 24}
    entry = res.plan.passes[0]["round_auto"]["groups"]["a"]
    assert entry["layout_multiple"] == 8 and set(entry["ms"]) == {"24", "32"}
    assert fxprune.verify.equivalence(m, res, x).ok


def test_the_nchwc_probe_matches_what_ort_does_to_a_conv_chain():
    pytest.importorskip("onnxruntime")
    from fxprune.layer_timing import nchwc_multiple
    from fxprune.layer_timing_ort import stays_blocked

    step = nchwc_multiple()
    assert step in (1, 2, 4, 8, 16, 32)
    assert lt.TIMERS["onnxruntime"].layout_multiple() == step
    assert lt.TIMERS["torch"].layout_multiple() == 1
    if step > 1:  # on the step a conv chain stays blocked, off it it does not
        assert stays_blocked(64 + step) and stays_blocked(96 + step)
        assert not stays_blocked(64 + step // 2) and not stays_blocked(65)


def test_the_sparse_cuda_timer_is_no_round_backend(model):
    m, x = model
    with pytest.raises(ConfigError, match="torch-cuda-2:4"):
        fxprune.compile(m, x, Channels(0.4, round_to="auto", round_backend="torch-cuda-2:4"))
