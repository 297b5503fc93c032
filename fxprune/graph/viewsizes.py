"""Rewrite the size constants of view, reshape, expand and unflatten calls after pruning.

A view's sizes encode channel counts: :func:`rewrite_sizes` and :func:`rewrite_unflatten`
register a fix that writes the pruned count into the call (an int, a computed ``batch * c``, or
a size read off another tensor).
"""

from __future__ import annotations

import operator

import numpy as np
import torch
import torch.fx as fx

from fxprune.graph.depgraph import Analysis
from fxprune.graph.rules import arg, new_sizes, set_arg


def _size_args(node: fx.Node):
    """(start index, sizes) of the size arguments of view/reshape/expand-like calls."""
    if node.op == "call_method":
        if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)):
            return 1, list(node.args[1])
        return 2, list(node.args[1:])
    return 1, list(arg(node, 1, "shape", []) or [])


def _scaled_size(node: fx.Node, s, old: int, new: int):
    """A size entry for the pruned graph: an int becomes ``new``; a computed ``batch * c``
    (MultiheadAttention's ``bsz * num_heads``) becomes a new ``batch * c'`` node with the same
    ratio; anything else is left (the re-check then names the node if it no longer fits)."""
    if isinstance(s, int) and s > 0:
        return new
    if isinstance(s, fx.Node) and s.target is operator.mul and old and new != old:
        a, b = s.args
        var, c = (a, b) if isinstance(b, int) else (b, a)
        if isinstance(c, int) and (c * new) % old == 0 and isinstance(var, fx.Node):
            with node.graph.inserting_before(node):
                return node.graph.call_function(operator.mul, (var, c * new // old))
    if isinstance(s, fx.Node) and new != old and _reads_a_size(s):
        # ``reshape(B, N, C)`` with ``C = x.shape[-1]`` read off another (unpruned) tensor: a
        # dim carrying channels has the static size the weights give it
        return new
    return s


def _reads_a_size(s: fx.Node) -> bool:
    """``x.shape[i]`` / ``x.size(i)`` / ``aten.sym_size``: a size read off a tensor."""
    if s.op == "call_method" and s.target == "size":
        return True
    if s.target is operator.getitem and isinstance(s.args[0], fx.Node):
        src = s.args[0]
        return (src.op == "call_function" and src.target is getattr) or (
            src.op == "call_method" and src.target == "size"
        )
    return s.op == "call_function" and s.target is torch.ops.aten.sym_size.int


def _needs_rewrite(s, varies: bool) -> bool:
    return varies and (
        (isinstance(s, int) and s > 0)
        or (isinstance(s, fx.Node) and (s.target is operator.mul or _reads_a_size(s)))
    )


def rewrite_sizes(ctx: Analysis, node: fx.Node, out_arr: np.ndarray, dense_shape) -> None:
    start, sizes = _size_args(node)
    if len(sizes) != len(dense_shape) or not any(
        _needs_rewrite(s, out_arr.shape[d] > 1) for d, s in enumerate(sizes)
    ):
        return

    def fix(removed):
        new = new_sizes(removed, out_arr, dense_shape)
        fixed = [
            _scaled_size(node, s, int(dense_shape[d]), new[d])
            if _needs_rewrite(s, out_arr.shape[d] > 1)
            else s
            for d, s in enumerate(sizes)
        ]
        if start == 2:  # method form: x.view(a, b, c)
            node.args = (node.args[0], *fixed)
        elif node.op == "call_method":
            node.args = (node.args[0], tuple(fixed))
        else:
            set_arg(
                node,
                1,
                "shape",
                list(fixed) if isinstance(arg(node, 1, "shape"), list) else tuple(fixed),
            )

    ctx.on_apply(node, fix)


def rewrite_unflatten(ctx: Analysis, node: fx.Node, out_arr: np.ndarray, dense_shape) -> None:
    """``unflatten(x, dim, sizes)``: the sizes cover output dims ``dim .. dim + len(sizes)``."""
    if node.op == "call_module":
        return  # nn.Unflatten keeps its sizes in the module: the re-check names it if they break
    dim, sizes = arg(node, 1, "dim"), arg(node, 2, "sizes")
    if not isinstance(dim, int) or not isinstance(sizes, (list, tuple)):
        return
    first = dim % (len(dense_shape) - len(sizes) + 1)  # ``dim`` counts the input's dims
    span = range(first, first + len(sizes))
    if not any(out_arr.shape[d] > 1 for d in span):
        return

    def fix(removed):
        new = new_sizes(removed, out_arr, dense_shape)
        fixed = [
            new[d] if isinstance(s, int) and s > 0 and out_arr.shape[d] > 1 else s
            for d, s in zip(span, sizes, strict=True)
        ]
        set_arg(node, 2, "sizes", type(sizes)(fixed))

    ctx.on_apply(node, fix)
