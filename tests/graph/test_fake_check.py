"""The fake-tensor shape check that runs after every slicing is as strict as the real layer: a
layer whose bias, norm statistics or packed projections no longer fit is caught there (the
module tree's structural check relies on it instead of running the pruned graph)."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

from fxprune.graph.shapeprop import propagate_shapes


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.gn = nn.GroupNorm(2, 8)
        self.fc = nn.Linear(8, 6)
        self.ln = nn.LayerNorm(6)
        self.mha = nn.MultiheadAttention(6, 2, batch_first=True)

    def forward(self, x):
        h = self.gn(self.bn(self.conv(x))).mean((2, 3))
        h = self.ln(self.fc(h)).unsqueeze(1)
        return self.mha(h, h, h, need_weights=False)[0]


def _shrink(net: _Net, attr: str) -> None:
    mod, _, name = attr.rpartition(".")
    owner = net.get_submodule(mod)
    t = getattr(owner, name)
    new = t[: t.shape[0] - 1].clone()
    if name in owner._parameters:
        owner._parameters[name] = nn.Parameter(new)
    else:
        owner._buffers[name] = new


def test_the_intact_model_passes():
    gm = fx.symbolic_trace(_Net().eval())
    propagate_shapes(gm, (torch.randn(2, 3, 5, 5),))


@pytest.mark.parametrize(
    "attr",
    [
        "conv.bias",
        "fc.bias",
        "bn.weight",
        "bn.bias",
        "bn.running_mean",
        "bn.running_var",
        "gn.weight",
        "gn.bias",
        "ln.weight",
        "ln.bias",
        "mha.in_proj_bias",
        "mha.out_proj.bias",
    ],
)
def test_a_tensor_that_no_longer_fits_its_layer_is_caught(attr):
    net = _Net().eval()
    _shrink(net, attr)
    x = torch.randn(2, 3, 5, 5)
    with pytest.raises(Exception):  # noqa: B017, PT011 - the real layer fails too
        net(x)
    gm = fx.symbolic_trace(net)
    with pytest.raises(RuntimeError):
        propagate_shapes(gm, (x,))


def test_shape_formulas_give_the_fake_tensor_new_empty_gives():
    """Conv / Linear / attention outputs are built from a meta tensor, not a fake dispatch: they
    must be the very fake tensor ``new_empty`` would give (a downstream rule reads them)."""
    gm = fx.symbolic_trace(_Net().eval())
    x = torch.randn(2, 3, 5, 5)
    propagate_shapes(gm, (x,))
    for name in ("conv", "fc", "mha"):
        node = next(n for n in gm.graph.nodes if n.target == name)
        got = node.meta["val"]
        got = got[0] if name == "mha" else got
        inp = node.args[0].meta["val"]
        with got.fake_mode:
            want = inp.new_empty(got.shape)
        assert type(got) is type(want) and got.fake_mode is inp.fake_mode
        assert (got.shape, got.stride(), got.dtype, got.device, got.requires_grad) == (
            want.shape,
            want.stride(),
            want.dtype,
            want.device,
            want.requires_grad,
        )


class _Joins(nn.Module):
    def __init__(self, c=8, tail=False):
        super().__init__()
        self.a, self.b, self.tail = nn.Conv2d(3, c, 1), nn.Conv2d(3, 8, 1), tail

    def forward(self, x):
        a, b = self.a(x), self.b(x)
        y = torch.cat([a, b], 1) + torch.cat([b, a], dim=1)
        y += torch.cat((b, b), 1)
        return torch.cat([y, a if self.tail else y], 2)  # a: 8 channels against 16


def test_residual_adds_and_cats_give_what_a_fake_dispatch_gives():
    """Adds and cats of same-layout fake tensors are built, not dispatched: the same fake
    tensors as a dispatch (shape, strides, dtype)."""
    from fxprune.graph import shapeprop

    x = torch.randn(2, 3, 5, 5)
    gm = fx.symbolic_trace(_Joins().eval())
    metas = []
    for join in (shapeprop._join, lambda *a: None):  # built, then dispatched
        shapeprop_join, shapeprop._join = shapeprop._join, join
        try:
            propagate_shapes(gm, (x,))
        finally:
            shapeprop._join = shapeprop_join
        vals = [n.meta["val"] for n in gm.graph.nodes if n.op == "call_function"]
        metas.append([(v.shape, v.stride(), v.dtype, v.requires_grad) for v in vals])
    assert metas[0] == metas[1] and len(metas[0]) == 6


def test_a_residual_or_cat_that_no_longer_fits_is_caught():
    """A residual add of 7 channels to 8, or a cat whose parts differ off the cat dim, fails
    the shape check as the real op fails."""
    x = torch.randn(2, 3, 5, 5)
    for net in (_Joins(c=7), _Joins(tail=True)):
        with pytest.raises(RuntimeError):
            net(x)
        with pytest.raises(RuntimeError):
            propagate_shapes(fx.symbolic_trace(net.eval()), (x,))
