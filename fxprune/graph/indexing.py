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
                rest = [j for j in idx if j is not i]
                if all(j is Ellipsis or j == slice(None) for j in rest):
                    return _strided(ctx, node, X, d, i, shape[d])
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
    if isinstance(start, fx.Node) or isinstance(end, fx.Node) or isinstance(step, fx.Node):
        return barrier(ctx, node, "computed slice along a channel dim")
    if step != 1:
        return _strided(ctx, node, X, d, slice(start, end, step), t.shape[d])
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


def _strided(ctx, node, X: np.ndarray, d: int, i: slice, n: int) -> np.ndarray:
    """``x[..., s::k]`` along a channel dim of a multiple of ``k`` channels, ``0 <= s < k``
    (GPT-OSS's interleaved ``gate_up[..., ::2]`` / ``[..., 1::2]``): the ``k`` channels of each
    row ``j`` (``j*k .. j*k+k-1``) go together, so a removal keeps the interleave and the slice
    reads the same rows' channels afterwards."""
    s, _, k = i.indices(n)
    whole = i.stop is None or (isinstance(i.stop, int) and i.stop >= n)
    if not (whole and 0 <= s < k and n % k == 0):
        return barrier(ctx, node, "strided slice along a channel dim (not a whole interleave)")
    first = X.take(range(0, n, k), axis=d)
    for r in range(1, k):
        ctx.union(X.take(range(r, n, k), axis=d), first)
    ctx.positional(X)  # whole rows go: start, stop and step still read the same rows
    return X.take(range(s, n, k), axis=d)


@rule(aten.index)
def _aten_index(ctx, node):
    """``x[idx]`` with one index tensor. A constant 1-D index of distinct positions (Falcon's
    ``qkv[..., [-2], :]``, the key slot of a multi-query layout) takes those positions: the
    atoms stay apart and the index is rewritten after a removal. Any other index (a relative
    position bias table gathered by a buffer of positions, with repeats) couples the indexed
    dim's atoms into one (the gather may repeat or drop any of them); the other dims keep
    theirs."""
    x, indices = node.args[0], list(node.args[1])
    X, o = ctx.atoms(x), tensor_meta(node)
    used = [d for d, i in enumerate(indices) if i is not None]
    if X is None or o is None or len(used) != 1:
        return barrier(ctx, node, "tensor indexing the analysis cannot follow")
    d = used[0]
    values = constant_value(ctx.gm, indices[d])
    if X.shape[d] > 1 and values is not None and values.ndim == 1 and values.numel():
        pos = values.long() % X.shape[d]
        if pos.unique().numel() == pos.numel():  # a selection, not a gather that repeats
            return _take_positions(ctx, node, X, d, pos)
    return gather_atoms(ctx, X, d, tensor_meta(indices[d]).ndim)


COPIES = (aten.lift_fresh_copy.default, aten.clone.default)  # a constant's value, copied


def constant_value(gm: fx.GraphModule, node) -> torch.Tensor | None:
    """The integer tensor a graph constant holds (a ``get_attr``, through torch.export's
    ``lift_fresh_copy``); None for anything computed."""
    while isinstance(node, fx.Node) and node.op == "call_function" and node.target in COPIES:
        node = node.args[0]
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    try:
        value = operator.attrgetter(node.target)(gm)
    except AttributeError:
        return None
    ints = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)  # not a bool mask
    ok = isinstance(value, torch.Tensor) and value.dtype in ints and value.numel() < 4096
    return value.detach().cpu() if ok else None


def _take_positions(ctx, node: fx.Node, X: np.ndarray, d: int, pos: torch.Tensor) -> np.ndarray:
    """``x[..., pos, ...]`` along a channel dim: the atoms at ``pos``, positional; after a
    removal the index holds the kept positions' new places (a removed one leaves it)."""
    pos = pos.numpy()
    ctx.positional(X)

    def fix(removed):
        keep = keep_along(removed, X, d)
        before = np.concatenate([[0], np.cumsum(keep)])
        new = [int(before[p]) for p in pos if keep[p]]
        name = unused_name(ctx.gm, f"_fxprune_index_{node.name}")
        ctx.gm.register_buffer(name, torch.tensor(new, dtype=torch.long), persistent=False)
        with ctx.gm.graph.inserting_before(node):
            idx = ctx.gm.graph.get_attr(name)
        indices = list(node.args[1])
        indices[d] = idx
        node.args = (node.args[0], indices, *node.args[2:])

    ctx.on_apply(node, fix)
    return X.take(pos, axis=d)


def unused_name(gm: fx.GraphModule, name: str) -> str:
    """``name``, or ``name_1``, ``name_2``... where an earlier removal took it."""
    i, out = 0, name
    while hasattr(gm, out):
        i += 1
        out = f"{name}_{i}"
    return out


def picked_dims(node: fx.Node, limit: int = 16) -> set[int]:
    """Dims of ``node``'s output that its users take apart by position: a select, a partial
    slice, an index, a split / chunk / unbind along them. Whole slices (``qkv[:, :, :, :-2]``
    slices dims 0 and 1 whole first, as torch.export records it) are looked through."""
    t = tensor_meta(node)
    out: set[int] = set()
    if t is None:
        return out
    nd = t.ndim
    for u in list(node.users)[:limit]:
        name = op_short_name(u)
        if name == "slice" and u.args[0] is node:
            d = arg(u, 1, "dim", 0) % nd
            s, e, step = arg(u, 2, "start"), arg(u, 3, "end"), arg(u, 4, "step", 1)
            whole = isinstance(s, (int, type(None))) and isinstance(e, (int, type(None)))
            if whole and step == 1 and slice(s, e).indices(t.shape[d])[:2] == (0, t.shape[d]):
                out |= picked_dims(u, limit)
                continue
            out.add(d)
        elif name == "select":
            out.add(arg(u, 1, "dim") % nd)
        elif name == "index":
            out |= {d for d, i in enumerate(u.args[1]) if i is not None}
        elif name in ("split", "split_with_sizes", "chunk", "unbind", "tensor_split"):
            d = arg(u, 1 if name == "unbind" else 2, "dim", 0)
            out |= {d % nd} if isinstance(d, int) else set()
        elif name == "getitem" and not isinstance(u.args[1], int):
            out |= _getitem_dims(u.args[1], nd)
    return out


def _getitem_dims(idx, nd: int) -> set[int]:
    """Dims a ``x[idx]`` subscript takes apart (anything but ``:`` and ``None``)."""
    idx = idx if isinstance(idx, tuple) else (idx,)
    real = sum(1 for i in idx if i is not None and i is not Ellipsis)
    out, d = set(), 0
    for i in idx:
        if i is Ellipsis:
            d += nd - real
        elif i is not None:
            if i != slice(None):
                out.add(d)
            d += 1
    return out


def op_short_name(node: fx.Node) -> str:
    """``expand`` for ``aten.expand.default``, ``torch.expand`` or ``x.expand``."""
    t = node.target
    if node.op == "call_method":
        return t
    t = getattr(t, "overloadpacket", t)
    return str(getattr(t, "__name__", t)).split(".")[-1]


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
