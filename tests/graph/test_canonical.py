"""``fxprune.graph.canonical``: a tensor made empty and filled slice by slice (DeepSeek-V3's
``expand_kv`` on transformers 5.25) becomes the cat of its pieces, value for value; any other
fill is left as captured (the rules then refuse ``new_empty`` / ``copy_`` by name)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from fxprune.graph import trace
from fxprune.graph.canonical import cat_from_filled_empty

aten = torch.ops.aten


class _Filled(nn.Module):
    """``out = x.new_empty(..., 12)`` filled from two sources; ``fill``: ``"tiled"`` (``[:8]``
    and ``[8:]``), ``"gap"`` (``[8:]`` zeroed, not copied), ``"overlap"`` (``[:8]`` and
    ``[4:]``), ``"cast"`` (a float64 source copied into float32: a cast, not a piece)."""

    def __init__(self, fill):
        super().__init__()
        self.fill = fill

    def forward(self, x):
        a, b = x * 2, x[..., :4] + 1
        out = x.new_empty(*x.shape[:-1], 12)
        out[..., :8].copy_(a)
        if self.fill == "tiled":
            out[..., 8:].copy_(b)
        elif self.fill == "gap":
            out[..., 8:].zero_()
        elif self.fill == "overlap":
            out[..., 4:].copy_(torch.cat([b, b], -1))
        else:
            out[..., 8:].copy_(b.double())
        return out.sin()


def _count(gm, target):
    return sum(n.target is target for n in gm.graph.nodes)


def test_a_tensor_filled_slice_by_slice_becomes_the_cat_of_its_pieces():
    x = torch.randn(2, 3, 8)
    gm = trace(_Filled("tiled").eval(), (x,), mode="export").gm
    assert _count(gm, aten.new_empty.default) == 1
    assert cat_from_filled_empty(gm) == 1
    assert _count(gm, aten.new_empty.default) == _count(gm, aten.copy_.default) == 0
    assert _count(gm, aten.cat.default) == 1
    out = gm(x)
    torch.testing.assert_close(out[0] if isinstance(out, tuple) else out, _Filled("tiled")(x))


@pytest.mark.parametrize("fill", ["gap", "overlap", "cast"])
def test_a_fill_that_is_no_concatenation_is_left_as_captured(fill):
    x = torch.randn(2, 3, 8)
    gm = trace(_Filled(fill).eval(), (x,), mode="export").gm
    assert cat_from_filled_empty(gm) == 0
    assert _count(gm, aten.new_empty.default) == 1
