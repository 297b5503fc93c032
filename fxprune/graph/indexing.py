"""Coupling rules for indexing and slicing: ``x[...]``, aten.slice, aten.index, aten.select.

A slice along a channel dim keeps a range of the atoms and registers a rewrite of its bounds; a
gather by an index tensor couples the indexed dim's atoms into one; selecting one channel blocks
it.
"""

from __future__ import annotations

import operator

import numpy as np
import torch
import torch.fx as fx

from fxprune.graph.depgraph import varying_dims
from fxprune.graph.rules import arg, barrier, keep_along, none_output, rule, set_arg
from fxprune.graph.trace import tensor_meta

aten = torch.ops.aten


@rule(operator.getitem)
def getitem_rule(ctx, node):
    src, idx = node.args
    v = ctx.values.get(src)
    if isinstance(v, (tuple, list)):
        return v[idx]
    X, t = ctx.atoms(src), tensor_meta(src)
    if X is None:
        return none_output(node)
    return _index(ctx, node, X, tuple(t.shape), idx)


def _index(ctx, node, X, shape, idx):
    idx = idx if isinstance(idx, tuple) else (idx,)
    tensors = [k for k, i in enumerate(idx) if tensor_meta(i) is not None]
    full = all(k in tensors or i == slice(None) for k, i in enumerate(idx))
    if len(tensors) == 1 and full and len(idx) <= X.ndim:
        # ``table[:, idx]`` (LeViT / EfficientFormer attention biases), as ``aten.index``
        return gather_atoms(ctx, X, tensors[0], tensor_meta(idx[tensors[0]]).ndim)
    if any(isinstance(i, fx.Node) or isinstance(i, (list, torch.Tensor)) for i in idx):
        # Advanced indexing: follow it only when no channel dim is indexed.
        if varying_dims(X):
            return barrier(ctx, node, "tensor indexing on a tensor with channels")
        return none_output(node)
    n_real = sum(1 for i in idx if i is not None and i is not Ellipsis)
    out_dims, d, rewrites = [], 0, []
    for k, i in enumerate(idx):
        if i is Ellipsis:
            skip = X.ndim - n_real
            out_dims += [(dd, slice(None)) for dd in range(d, d + skip)]
            d += skip
        elif i is None:
            out_dims.append((None, None))
        elif isinstance(i, int):
            if X.shape[d] > 1:
                ctx.block(X.take([i], axis=d), node, "selects one channel")
                rewrites.append((k, d, i))
            out_dims.append((d, i))
            d += 1
        elif isinstance(i, slice):
            if X.shape[d] > 1 and i.step not in (None, 1):
                return barrier(ctx, node, "strided slice along a channel dim")
            if X.shape[d] > 1 and (i.start not in (None, 0) or i.stop is not None):
                rewrites.append((k, d, i))
            out_dims.append((d, i))
            d += 1
        else:
            return barrier(ctx, node, f"index {i!r}")
    out_dims += [(dd, slice(None)) for dd in range(d, X.ndim)]
    pieces = []
    for dd, i in out_dims:
        if dd is None:
            pieces.append(None)
        elif X.shape[dd] == 1:
            pieces.append(0 if isinstance(i, int) else slice(None))
        else:
            pieces.append(i)
    arr = X[tuple(pieces)]
    if rewrites:
        ctx.positional(X)

        def fix(removed):
            new = list(node.args[1]) if isinstance(node.args[1], tuple) else [node.args[1]]
            for k, dd, i in rewrites:
                keep = keep_along(removed, X, dd)
                before = np.concatenate([[0], np.cumsum(keep)])
                n = shape[dd]
                if isinstance(i, int):
                    new[k] = int(before[i % n])
                else:
                    s, e, _ = i.indices(n)
                    new[k] = slice(int(before[s]), int(before[e]), None)
            node.args = (node.args[0], tuple(new) if isinstance(node.args[1], tuple) else new[0])

        ctx.on_apply(node, fix)
    return arr


@rule(aten.slice)
def aten_slice_rule(ctx, node):
    x = node.args[0]
    X, t = ctx.atoms(x), tensor_meta(x)
    d = arg(node, 1, "dim", 0) % t.ndim
    start, end, step = arg(node, 2, "start"), arg(node, 3, "end"), arg(node, 4, "step", 1)
    if X.shape[d] == 1:
        return X
    if step != 1 or isinstance(start, fx.Node) or isinstance(end, fx.Node):
        return barrier(ctx, node, "strided or computed slice along a channel dim")
    s, e, _ = slice(start, end).indices(t.shape[d])
    out = X.take(range(s, e), axis=d)
    ctx.positional(X)

    def fix(removed):
        keep = keep_along(removed, X, d)
        before = np.concatenate([[0], np.cumsum(keep)])
        set_arg(node, 2, "start", int(before[s]))
        set_arg(node, 3, "end", int(before[e]))

    ctx.on_apply(node, fix)
    return out


@rule(aten.index)
def _aten_index(ctx, node):
    """``x[idx]`` with one index tensor (a relative-position-bias table gathered by a buffer
    of positions): the indexed dim's atoms are coupled into one (the gather may repeat or drop
    any of them), the other dims keep theirs."""
    x, indices = node.args[0], list(node.args[1])
    X, o = ctx.atoms(x), tensor_meta(node)
    used = [d for d, i in enumerate(indices) if i is not None]
    if X is None or o is None or len(used) != 1:
        return barrier(ctx, node, "tensor indexing the analysis cannot follow")
    return gather_atoms(ctx, X, used[0], tensor_meta(indices[used[0]]).ndim)


def gather_atoms(ctx, X: np.ndarray, d: int, k: int) -> np.ndarray:
    """Dim ``d`` of ``X`` gathered by a ``k``-dim index tensor: its atoms are coupled into one
    (the gather may repeat or drop any of them), the other dims keep theirs."""
    if X.shape[d] > 1:
        ref = X.take([0], axis=d)
        ctx.union(X, ref)
        X = ref
    return X.reshape(X.shape[:d] + (1,) * k + X.shape[d + 1 :])


@rule(aten.select)
def aten_select_rule(ctx, node):
    x = node.args[0]
    X, t = ctx.atoms(x), tensor_meta(x)
    d = arg(node, 1, "dim") % t.ndim
    if X.shape[d] > 1:
        return barrier(ctx, node, "selects one channel")
    return X.take(0, axis=d) if X.ndim else X
