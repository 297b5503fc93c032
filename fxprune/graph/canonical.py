"""Rewrites of a fresh capture into the forms the coupling rules know, value for value.

A layer written as ``x @ self.weight.T`` (Falcon's ``FalconLinear``, some hand-written MLPs)
captures as a matmul with a transposed parameter; the rules see a contraction with a constant
and no layer. :func:`linear_from_matmul` turns it into ``aten.linear(x, W)``, the form
``nn.Linear`` captures as, so the layer's channels are found and sliced like any Linear's.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

aten = torch.ops.aten

_MATMULS = {aten.matmul.default, torch.matmul, operator.matmul}


def _transposed_weight(gm: fx.GraphModule, node) -> fx.Node | None:
    """The 2-D parameter ``node`` transposes (``W.T``, ``W.t()``, ``permute(W, [1, 0])``,
    ``transpose(W, 0, 1)``), or None."""
    if not isinstance(node, fx.Node):
        return None
    t = node.target
    if node.op == "call_function" and t in (aten.numpy_T.default, aten.t.default, torch.t):
        w = node.args[0]
    elif node.op == "call_function" and t is getattr and node.args[1] in ("T", "mT"):
        w = node.args[0]
    elif node.op == "call_method" and t == "t":
        w = node.args[0]
    elif node.op == "call_function" and t is aten.permute.default and list(node.args[1]) == [1, 0]:
        w = node.args[0]
    elif node.op == "call_function" and t in (aten.transpose.int, torch.transpose):
        w = node.args[0] if sorted(d % 2 for d in node.args[1:3]) == [0, 1] else None
    else:
        return None
    if not (isinstance(w, fx.Node) and w.op == "get_attr"):
        return None
    try:
        p = gm.get_parameter(w.target)
    except AttributeError:
        return None
    return w if p.ndim == 2 else None


def linear_from_matmul(gm: fx.GraphModule) -> int:
    """Rewrite ``matmul(x, W^T)`` with ``W`` a 2-D parameter into ``aten.linear(x, W)`` (the
    same values); returns how many were rewritten."""
    done = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in _MATMULS or len(node.args) != 2:
            continue
        w = _transposed_weight(gm, node.args[1])
        if w is None:
            continue
        node.target = aten.linear.default
        node.args = (node.args[0], w)
        done += 1
    if done:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return done
