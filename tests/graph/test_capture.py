"""``fxprune.graph.capture``: the one capture compile, iterative_prune and sensitivity share."""

from __future__ import annotations

import ast
import pathlib

import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune.graph import capture, hidden_attention


class MHA(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
        self.out = nn.Linear(16, 4)

    def forward(self, x):
        return self.out(self.attn(x, x, x, need_weights=False)[0])


def test_hidden_attention_sends_a_heads_capture_to_export_and_only_then():
    model, x = MHA().eval(), torch.randn(2, 5, 16)
    plain = capture(model, (x,))
    assert plain.mode == "fx" and hidden_attention(plain.gm) == ["attn"]
    assert capture(model, (x,), heads=True).mode == "export"
    assert capture(model, (x,), mode="fx", heads=True).mode == "fx"  # explicit mode is kept


def test_a_parametrized_layer_is_captured_by_export():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    nn.utils.parametrizations.weight_norm(model[0])
    assert capture(model, (torch.randn(2, 4),)).mode == "export"


def test_use_cache_is_off_for_the_capture_and_back_after():
    from tests.transformer_models import build

    model, (ids,), _ = build("llama")
    model.config.use_cache = True
    seen = []
    hook = model.register_forward_pre_hook(lambda m, a: seen.append(m.config.use_cache))
    try:
        capture(model, (ids,), mode="export")
    finally:
        hook.remove()
    assert seen == [False] and model.config.use_cache is True


def test_compile_iterative_and_sensitivity_capture_through_it():
    """No entry point traces on its own: each calls ``capture`` (a copy of the fx-then-export
    rule drifted before: two dropped ``leaf_modules`` and overrode an explicit ``mode``)."""
    root = pathlib.Path(fxprune.__file__).parent
    for name in ("api.py", "iterative.py", "sensitivity.py"):
        calls = [
            n.func.id if isinstance(n.func, ast.Name) else n.func.attr
            for n in ast.walk(ast.parse((root / name).read_text()))
            if isinstance(n, ast.Call) and isinstance(n.func, (ast.Name, ast.Attribute))
        ]
        assert "trace" not in calls or name == "api.py", name  # api: the train-mode re-trace
        assert any(c in ("capture", "graph_capture") for c in calls), name


@pytest.mark.parametrize("mode", ["auto", "fx"])
def test_iterative_heads_on_a_hidden_attention(mode):
    """iterative_prune used to override an explicit mode="fx"; now only "auto" moves to export
    (and fx, which cannot see the heads, says so: it used to return the model unpruned)."""
    torch.manual_seed(0)
    model, x = MHA().eval(), torch.randn(2, 5, 16)
    if mode == "auto":
        out = fxprune.iterative_prune(model, x, heads=0.5, steps=2)
        assert out.steps[-1].result.plan.mode == "export"
    else:
        with pytest.raises(fxprune.errors.NothingToPruneError, match="cannot see into attn"):
            fxprune.iterative_prune(model, x, heads=0.5, steps=2, mode="fx")


class _MatmulMLP(torch.nn.Module):
    """Layers written as ``x @ W.T`` / ``x @ W.t()``, no nn.Linear in sight."""

    def __init__(self):
        super().__init__()
        self.w1 = torch.nn.Parameter(torch.randn(16, 8))
        self.w2 = torch.nn.Parameter(torch.randn(4, 16))

    def forward(self, x):
        return torch.relu(x @ self.w1.T) @ self.w2.t()


@pytest.mark.parametrize("mode", ["fx", "export"])
def test_matmul_with_a_transposed_parameter_is_a_linear_layer(mode):
    import fxprune

    torch.manual_seed(0)
    m, x = _MatmulMLP().eval(), torch.randn(3, 8)
    res = fxprune.compile(m, x, channels=0.5, mode=mode)
    assert res.module.get_parameter("w1").shape == (8, 8)  # its 16 outputs halved
    assert res.module.get_parameter("w2").shape == (4, 8)  # and the consumer's inputs
    assert fxprune.verify.equivalence(m, res, x).ok


@pytest.mark.parametrize("leaf", [(), (nn.MultiheadAttention,)])
def test_a_retrace_has_the_code_the_capture_has(leaf):
    """The checks trace without building a GraphModule (``symbolic``): its code after the
    capture's rewrites (a matmul made a Linear, dead nodes removed) is the capture's code, so
    ``same_capture`` proves an unchanged model and refuses one whose forward traces otherwise."""
    from fxprune.graph.canonical import canonicalize
    from fxprune.graph.capture import same_capture
    from fxprune.graph.trace import symbolic

    for m, x in ((_MatmulMLP().eval(), torch.randn(3, 8)), (MHA().eval(), torch.randn(2, 5, 16))):
        gm = capture(m, (x,), leaf_modules=leaf).gm
        again = symbolic(m, leaf)
        assert canonicalize(again) == (1 if isinstance(m, _MatmulMLP) else 0) * 2
        assert again.code == gm.code
        assert same_capture(gm, m, leaf)

    class Flat(nn.Module):
        n = 8

        def forward(self, x):
            return x.reshape(-1, self.n)

    m = Flat()
    gm = capture(m, (torch.randn(2, 8),)).gm
    m.n = 4  # the forward now traces to other code
    assert not same_capture(gm, m)
