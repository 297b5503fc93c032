"""Coupling rules for shape operators: reshape, expand, permute, cat, split, roll, shuffle.

Channels survive these ops but move: a concat puts them at offsets, a split takes a slice, a view
merges them with spatial positions. Each rule moves the atom array the same way the op moves the
data, and registers a rewrite for every constant (split sizes, slice bounds, view sizes) that
encodes a channel count. Indexing and slicing rules live in ``indexing``, the rewrites of view
sizes in ``viewsizes``; importing this module registers both.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from fxprune.graph.attention import (
    baddbmm_rule,
    einsum_head_dims,
    einsum_rule,
    matmul_operands,
    matmul_rule,
    sdpa_rule,
)
from fxprune.graph.depgraph import Analysis, compress, varying_dims
from fxprune.graph.indexing import aten_select_rule, aten_slice_rule, getitem_rule, picked_dims
from fxprune.graph.rules import (
    align,
    arg,
    barrier,
    binary_rule,
    elementwise,
    elementwise_arrays,
    find_rule,
    keep_along,
    none_output,
    out_ndim,
    rule,
    unary_rule,
)
from fxprune.graph.trace import tensor_meta
from fxprune.graph.viewsizes import rewrite_sizes, rewrite_unflatten

aten = torch.ops.aten


# ---- shape ops ----------------------------------------------------------------------------------


def reshape_blocks(src: tuple[int, ...], dst: tuple[int, ...]):
    """Pair runs of input dims with runs of output dims whose sizes multiply to the same number."""
    blocks, i, j = [], 0, 0
    while i < len(src) and j < len(dst):
        I, J, pi, pj = [i], [j], src[i], dst[j]
        i, j = i + 1, j + 1
        while pi != pj:
            if pi < pj and i < len(src):
                I.append(i)
                pi *= src[i]
                i += 1
            elif j < len(dst):
                J.append(j)
                pj *= dst[j]
                j += 1
            else:
                return None
        blocks.append((I, J))
    if not blocks:
        return [(list(range(len(src))), list(range(len(dst))))]
    blocks[-1][0].extend(range(i, len(src)))
    blocks[-1][1].extend(range(j, len(dst)))
    return blocks


def reshape_atoms(ctx: Analysis, node: fx.Node, X: np.ndarray, src, dst) -> np.ndarray | None:
    """Move atoms through a reshape; None when it cannot be followed."""
    if 0 in src or 0 in dst:
        return None
    blocks = reshape_blocks(tuple(src), tuple(dst))
    if blocks is None:
        return None
    active_in = set()
    full_in, full_out = [], []
    for I, J in blocks:
        act = any(X.shape[d] > 1 for d in I)
        if act:
            active_in.update(I)
        full_in += [src[d] if act else 1 for d in I]
        full_out += [dst[d] if act else 1 for d in J]
    out = np.broadcast_to(X, full_in).reshape(full_out)
    out = compress(out)
    head_dims = None
    for I, J in blocks:
        vary_in = [d for d in I if X.shape[d] > 1]
        vary_out = [d for d in J if out.shape[d] > 1]
        if len(vary_in) == 1 and len(vary_out) > 1:
            # One channel dim split into several: removal must stay a whole slice, so one dim
            # keeps channel identity and the others are coupled into it. Before an attention
            # product the split is (..., heads, head_dim): the head index is kept, so a unit is a
            # whole head (q, k, v rows and the output projection's columns); whole heads split
            # again keep a group of heads. Elsewhere (channel shuffle) the largest dim is kept.
            head_dims = attention_head_dims(ctx, node) if head_dims is None else head_dims
            heads = int(out.shape[vary_out[-1]]) in head_dims
            if heads:
                primary = _head_dim_kept(node, vary_out)
            elif _whole_heads(ctx, X):
                primary = _regrouped_heads_kept(node, vary_out)
            else:
                primary = max(vary_out, key=lambda d: (out.shape[d], d))
            ref = out
            for d in vary_out:
                if d != primary:
                    ref = ref.take([0], axis=d)
            ctx.union(out, ref)
            out = ref
            if heads:
                ctx.head_atoms.append(np.asarray(ref).reshape(-1))
        elif (
            len(vary_in) == 1
            and len(J) > 1
            and vary_out == J[-1:]
            and all(dst[j] == 1 for j in J[:-1])
        ):
            # (..., C) -> (..., 1, head_dim): a single head (one key/value head left after
            # pruning, or multi-query attention); its dims are one unit, as a head's are
            head_dims = attention_head_dims(ctx, node) if head_dims is None else head_dims
            d = vary_out[0]
            if int(out.shape[d]) in head_dims:
                ref = out.take([0], axis=d)
                ctx.union(out, ref)
                out = ref
                ctx.head_atoms.append(np.asarray(ref).reshape(-1))
    if len(varying_dims(out)) > 1:
        ctx.multi_arrays.append((node.name, out))
    return out


def _head_dim_kept(node: fx.Node, vary: list[int]) -> int:
    """Which dim of a fused projection's split ``(..., a, b, head_dim)`` is the head: the last
    one the users do not take apart by position. ``(3, heads, D)`` and Bloom's ``(heads, 3, D)``
    select q / k / v along the ``3``; Falcon's ``(kv groups, q per group + 2, D)`` slices the
    query slots and indexes the key / value slot, so a unit is a KV group with its query heads."""
    if len(vary) < 3:
        return vary[-2]
    picked = picked_dims(node)
    free = [d for d in vary[:-1] if d not in picked]
    return free[-1] if free else vary[-2]


def _whole_heads(ctx: Analysis, X: np.ndarray) -> bool:
    """``X`` holds whole heads, one per position: a reshape grouped its atoms into heads."""
    a = X[X >= 0]
    if not (a.size and ctx.head_atoms):
        return False
    return bool(np.isin(a, np.concatenate(ctx.head_atoms)).all())


def _regrouped_heads_kept(node: fx.Node, vary: list[int]) -> int:
    """Which dim keeps the heads when a dim of whole heads is split again: Falcon's new
    decoder architecture on transformers >= 5.25 views ``(slots, D)`` as ``(kv groups, q per
    group + 2, D)``, slices the query slots and selects the key / value slot. The last dim the
    users do not take apart by position is kept (the KV group: a unit is a group with its query
    heads); with every dim taken apart, the last."""
    picked = picked_dims(node)
    free = [d for d in vary if d not in picked]
    return free[-1] if free else vary[-1]


def attention_head_dims(ctx: Analysis, node: fx.Node, limit: int = 32) -> set[int]:
    """The head_dim sizes of the attention products (matmul or scaled dot-product attention)
    that ``node``'s output reaches through ops that only move, slice or rescale values
    (transpose, rotary embedding, ``repeat_kv``'s expand + reshape).

    A split of a channel dim is read as (heads, head_dim) only when its last part has one of
    these sizes: MultiheadAttention's ``unflatten(-1, (3, E))`` reaches attention too, but its
    ``E`` is split again before it gets there."""
    seen: set[fx.Node] = set()
    todo = list(node.users)
    dims: set[int] = set()
    while todo and len(seen) < limit:
        u = todo.pop()
        if u in seen:
            continue
        seen.add(u)
        fn = find_rule(ctx.gm, u) if u.op != "output" else None
        if fn is matmul_rule or fn is baddbmm_rule:
            a, b = (tensor_meta(f) for f in matmul_operands(u))
            if a is not None and b is not None and a.ndim >= 2 and b.ndim >= 2:
                dims |= {int(a.shape[-1]), int(b.shape[-2]), int(b.shape[-1])}
        elif fn is sdpa_rule:
            q, v = tensor_meta(u.args[0]), tensor_meta(u.args[2])
            dims |= {int(t.shape[-1]) for t in (q, v) if t is not None}
        elif fn is einsum_rule:
            dims |= einsum_head_dims(u)
        elif fn in TRANSPARENT:
            if fn is _split and _splits_last_dim(u) and attention_head_dims(ctx, u, limit):
                # LeViT / EfficientFormer: view(B, N, H, -1).split([kd, kd, vd], dim=-1): the
                # last size is one head's q, k and v widths side by side, still per head
                dims.add(int(tensor_meta(u.args[0]).shape[-1]))
            todo.extend(u.users)
    return dims


def _splits_last_dim(node: fx.Node) -> bool:
    t = tensor_meta(node.args[0])
    name = str(getattr(node.target, "__name__", node.target))
    if t is None or "unbind" in name or not t.ndim:
        return False
    d = arg(node, 2, "dim", 0)
    return isinstance(d, int) and d % t.ndim == t.ndim - 1


# fmt: off
@rule(
    torch.reshape, torch.flatten, torch.squeeze, torch.unsqueeze, aten.view, aten.reshape,
    aten._unsafe_view, aten.flatten, aten.squeeze, aten.unsqueeze, aten.unflatten, nn.Flatten,
    nn.Unflatten, torch.unflatten, "method:view", "method:reshape", "method:flatten",
    "method:squeeze", "method:unsqueeze", "method:unflatten", "method:view_as",
    "method:reshape_as",
)
# fmt: on
def _reshape(ctx, node):
    x = node.args[0]
    X, t, o = ctx.atoms(x), tensor_meta(x), tensor_meta(node)
    if X is None or o is None:
        return none_output(node)
    out = reshape_atoms(ctx, node, X, tuple(t.shape), tuple(o.shape))
    if out is None:
        return barrier(ctx, node, "reshape the analysis cannot follow")
    if node.target in (
        torch.reshape,
        aten.view,
        aten.reshape,
        aten._unsafe_view,
        "view",
        "reshape",
    ) or getattr(node.target, "overloadpacket", None) in (aten.view, aten.reshape):
        rewrite_sizes(ctx, node, out, tuple(o.shape))
    elif node.target in (torch.unflatten, "unflatten") or (
        getattr(node.target, "overloadpacket", None) is aten.unflatten
    ):
        rewrite_unflatten(ctx, node, out, tuple(o.shape))
    return out


# fmt: off
@rule(
    torch.permute, torch.transpose, torch.t, torch.movedim, torch.swapaxes, aten.permute,
    aten.transpose, aten.t, aten.movedim, aten.swapaxes, "method:permute", "method:transpose",
    "method:t", "method:movedim", "method:swapaxes",
)
# fmt: on
def _permute(ctx, node):
    X = ctx.atoms(node.args[0])
    nd = X.ndim
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    name = str(getattr(node.target, "overloadpacket", name)).split(".")[-1]
    if name == "permute":
        dims = (
            node.args[1:]
            if node.op == "call_method" and not isinstance(node.args[1], (tuple, list))
            else arg(node, 1, "dims")
        )
        perm = [d % nd for d in dims]
    elif name == "t":
        perm = list(range(nd))[::-1]
    else:  # transpose / swapaxes / movedim of two dims
        a, b = arg(node, 1, "dim0"), arg(node, 2, "dim1")
        if name == "movedim":
            return np.moveaxis(X, a, b)
        perm = list(range(nd))
        perm[a % nd], perm[b % nd] = perm[b % nd], perm[a % nd]
    return np.transpose(X, perm)


@rule(aten.expand, "method:expand", torch.broadcast_to, aten.broadcast_to)
def _expand(ctx, node):
    X, o = ctx.atoms(node.args[0]), tensor_meta(node)
    out = align(X, o.ndim)
    rewrite_sizes(ctx, node, out, tuple(o.shape))
    return out


@rule(torch.cat, torch.concat, torch.concatenate, aten.cat, aten.concat)
def _cat(ctx, node):
    tensors = [a for a in arg(node, 0, "tensors") if isinstance(a, fx.Node)]
    nd = out_ndim(node)
    d = arg(node, 1, "dim", 0) % nd
    arrs = [align(ctx.atoms(a), nd) for a in tensors]
    if all(a.shape[d] == 1 for a in arrs):
        # Concatenating along a dim without channels (tokens, space): same channels in every part.
        return elementwise(ctx, node, tensors)
    other = np.broadcast_shapes(
        *[tuple(1 if i == d else s for i, s in enumerate(a.shape)) for a in arrs]
    )
    parts = []
    for a, t in zip(arrs, tensors, strict=True):
        shape = list(other)
        shape[d] = tensor_meta(t).shape[d]
        parts.append(np.broadcast_to(a, shape))
    out = compress(np.concatenate(parts, axis=d))
    if len(varying_dims(out)) > 1:
        ctx.multi_arrays.append((node.name, out))
    return out


@rule(torch.stack, aten.stack, "method:stack")
def _stack(ctx, node):
    """Stacking along a new dim keeps every input's channels on its old dims: the inputs are
    coupled position by position (GPT-J / CodeGen's rotary: ``stack((-x2, x1), -1)``)."""
    tensors = [a for a in arg(node, 0, "tensors") if isinstance(a, fx.Node)]
    nd = out_ndim(node)
    d = arg(node, 1, "dim", 0) % nd
    if len(tensors) != len(arg(node, 0, "tensors")):
        return barrier(ctx, node, "stack of values the graph does not hold")
    arrs = [np.expand_dims(align(ctx.atoms(a), nd - 1), d) for a in tensors]
    return elementwise_arrays(ctx, node, arrs)


# fmt: off
@rule(
    torch.split, torch.chunk, torch.tensor_split, aten.split, aten.split_with_sizes, aten.chunk,
    aten.tensor_split, "method:split", "method:chunk", "method:tensor_split", aten.unbind,
    torch.unbind, "method:unbind",
)
# fmt: on
def _split(ctx, node):
    x = node.args[0]
    X, t = ctx.atoms(x), tensor_meta(x)
    outs = node.meta.get("val")
    name = (
        node.target
        if isinstance(node.target, str)
        else str(getattr(node.target, "overloadpacket", getattr(node.target, "__name__", "")))
    )
    name = name.split(".")[-1]
    d = arg(node, 2 if name != "unbind" else 1, "dim", 0) % t.ndim
    if X.shape[d] == 1:
        return tuple(X.take(0, axis=d) if name == "unbind" else X for _ in outs)
    if name in ("unbind", "tensor_split"):
        return barrier(ctx, node, f"{name} along a channel dim")
    sizes = [o.shape[d] for o in outs]
    offs = np.cumsum([0] + sizes)
    ctx.positional(X)
    pieces = tuple(X.take(range(offs[i], offs[i + 1]), axis=d) for i in range(len(sizes)))

    def fix(removed):
        new = [int(keep_along(removed, p, d).sum()) for p in pieces]
        if node.op == "call_method":
            node.target = "split"
            node.args, node.kwargs = (node.args[0], new, d), {}
        elif node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
            node.target = aten.split_with_sizes.default
            node.args, node.kwargs = (node.args[0], new, d), {}
        else:
            node.target = torch.split
            node.args, node.kwargs = (node.args[0], new, d), {}

    ctx.on_apply(node, fix)
    return pieces



@rule(torch.roll, aten.roll, "method:roll")
def _roll(ctx, node):
    """A cyclic shift (Swin's shifted windows) is fine along dims that carry no channels."""
    X = ctx.atoms(node.args[0])
    dims = arg(node, 2, "dims")
    dims = [dims] if isinstance(dims, int) else list(dims or [])
    if not dims or any(X.shape[d % X.ndim] > 1 for d in dims):
        return barrier(ctx, node, "roll along a dim that carries channels")
    return X



# ---- channel mixing without weights -------------------------------------------------------------


@rule(nn.ChannelShuffle, F.channel_shuffle, torch.channel_shuffle, aten.channel_shuffle)
def _channel_shuffle(ctx, node):
    X = ctx.atoms(node.args[0])
    g = ctx.modules[node.target].groups if node.op == "call_module" else arg(node, 1, "groups")
    if X.ndim < 2 or X.shape[1] == 1:
        return X
    c = X.shape[1]
    grid = X.reshape(X.shape[:1] + (g, c // g) + X.shape[2:])
    ref = grid.take([0], axis=1)
    ctx.union(grid, ref)  # channel j of every shuffle group goes together
    return np.repeat(np.squeeze(ref, axis=1), g, axis=1)


# Rules that only move, slice or rescale values: attention detection looks through them.
TRANSPARENT = frozenset(
    {
        unary_rule, binary_rule, _permute, _reshape, _expand, _cat, _stack, _split, getitem_rule,
        aten_slice_rule, aten_select_rule, _roll,
    }
)
