"""Rewrites of a fresh capture into the forms the coupling rules know, value for value.

A layer written as ``x @ self.weight.T`` (Falcon's ``FalconLinear``, some hand-written MLPs)
captures as a matmul with a transposed parameter; the rules see a contraction with a constant
and no layer. :func:`linear_from_matmul` turns it into ``aten.linear(x, W)``, the form
``nn.Linear`` captures as, so the layer's channels are found and sliced like any Linear's.

A tensor made empty and filled slice by slice (DeepSeek-V3's ``expand_kv`` on transformers 5.25:
``key = k_nope.new_empty(...)``, ``key[..., :nope].copy_(k_nope)``, ``key[..., nope:].copy_(k_rot)``)
captures as ``new_empty`` + ``slice`` + in-place ``copy_``; :func:`cat_from_filled_empty` turns it
into the ``aten.cat`` of the pieces it holds, whose channels the cat rule places.
:func:`canonicalize` runs every rewrite; each capture (and each re-trace compared with one) calls it.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

aten = torch.ops.aten

_MATMULS = {aten.matmul.default, torch.matmul, operator.matmul}


def canonicalize(gm: fx.GraphModule) -> int:
    """Every rewrite of this module on ``gm`` (in place); returns how many nodes changed."""
    return linear_from_matmul(gm) + cat_from_filled_empty(gm)


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


def _piece(s: fx.Node, order: dict, before: int, dtype):
    """``(dim, start, copy_ node, source, size)`` when ``s`` is ``slice(empty, dim, start,
    end)`` (step 1) whose only use is ``copy_(s, source)`` before position ``before``, the
    source of the slice's very shape and ``dtype``; else None."""
    if s.kwargs or len(s.users) != 1 or not isinstance(s.meta.get("val"), torch.Tensor):
        return None
    dim, start, _, step = (list(s.args[1:]) + [0, None, None, 1][len(s.args) - 1 :])[:4]
    (cp,) = s.users
    src = cp.args[1] if len(cp.args) == 2 and not cp.kwargs else None
    sval, tval = s.meta["val"], getattr(src, "meta", {}).get("val")
    ok = (
        cp.target is aten.copy_.default and cp.args[0] is s and not cp.users
        and order[cp] < before and step == 1 and isinstance(dim, int)
        and isinstance(start, (int, type(None))) and isinstance(tval, torch.Tensor)
        and tval.shape == sval.shape and tval.dtype == dtype
    )  # fmt: skip
    return (dim % sval.ndim, start or 0, cp, src, int(sval.shape[dim])) if ok else None


def _filled_pieces(empty: fx.Node, order: dict):
    """``(dim, [(start, copy_ node, source, size)])`` when every use of ``empty`` (an
    ``aten.new_empty``) before its first other use is a slice filled by ``copy_`` (``_piece``)
    and the slices tile one dim exactly; else None."""
    val = empty.meta.get("val")
    if not isinstance(val, torch.Tensor) or not val.ndim:
        return None
    others = [u for u in empty.users if u.target is not aten.slice.Tensor]
    before = min((order[u] for u in others), default=len(order))
    pieces = [_piece(s, order, before, val.dtype) for s in empty.users if s not in others]
    if len(pieces) < 2 or None in pieces or len({p[0] for p in pieces}) != 1:
        return None
    d = pieces[0][0]
    pieces = sorted((p[1:] for p in pieces), key=lambda p: p[0])
    at = 0
    for start, _, _, size in pieces:
        if start != at:
            return None
        at += size
    return (d, pieces) if at == val.shape[d] else None


def cat_from_filled_empty(gm: fx.GraphModule) -> int:
    """Rewrite ``new_empty`` filled by ``copy_`` into slices that tile one dim into the
    ``aten.cat`` of the sources (the same values); returns how many were rewritten."""
    done = 0
    for empty in list(gm.graph.nodes):
        if empty.op != "call_function" or empty.target is not aten.new_empty.default:
            continue
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        found = _filled_pieces(empty, order)
        if found is None:
            continue
        d, pieces = found
        with gm.graph.inserting_after(max((p[1] for p in pieces), key=order.__getitem__)):
            cat = gm.graph.call_function(aten.cat.default, ([p[2] for p in pieces], d))
        cat.meta = dict(empty.meta)
        for user in [u for u in empty.users if u.target is not aten.slice.Tensor]:
            user.replace_input_with(empty, cat)
        for _, cp, _, _ in pieces:
            s = cp.args[0]
            gm.graph.erase_node(cp)
            gm.graph.erase_node(s)
        gm.graph.erase_node(empty)  # its size arguments stay: unused sizes, no tensor
        done += 1
    if done:
        gm.recompile()
    return done
