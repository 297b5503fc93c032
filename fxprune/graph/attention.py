"""Coupling rules for the products attention is made of: matmul / bmm, scaled dot-product
attention and ``torch.einsum``. Batched dims (heads) are coupled position by position, as by an
element-wise op; a contracted dim must carry no channels. Under grouped-query attention a
key/value head is coupled with its query heads."""

from __future__ import annotations

import operator

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F

from fxprune.graph.depgraph import none_like
from fxprune.graph.indexing import op_short_name, unused_name
from fxprune.graph.rules import (
    align,
    arg,
    barrier,
    block_inputs,
    elementwise_arrays,
    keep_along,
    none_output,
    out_ndim,
    rule,
)
from fxprune.graph.trace import tensor_meta

aten = torch.ops.aten


# fmt: off
@rule(
    torch.matmul, torch.bmm, operator.matmul, aten.matmul, aten.bmm, aten.mm, "method:matmul",
    "method:bmm",
)
# fmt: on
def matmul_rule(ctx, node):
    return _product(ctx, node, *matmul_operands(node))


def matmul_operands(node: fx.Node) -> tuple:
    """The two factors of a matmul-like node (``baddbmm``'s ``batch1`` / ``batch2``)."""
    if "baddbmm" in str(getattr(node.target, "__name__", node.target)):
        return arg(node, 1, "batch1"), arg(node, 2, "batch2")
    return node.args[0], node.args[1]


def _product(ctx, node: fx.Node, a, b):
    """``a @ b``: batched dims coupled position by position, the contracted dim channel-free."""
    A, B = ctx.atoms(a), ctx.atoms(b)
    if A is None or B is None or A.ndim < 2 or B.ndim < 2:
        return barrier(ctx, node, "vector matmul")
    if A.shape[-1] > 1 or B.shape[-2] > 1:
        ctx.block(A, node, "contracts a dim that carries channels")
        ctx.block(B, node, "contracts a dim that carries channels")
        return none_output(node)
    nd = out_ndim(node)
    rows, cols = align(A, nd), align(B, nd)  # [..., n, 1] and [..., 1, m]
    if rows.shape[-2] > 1 and cols.shape[-1] > 1:
        return barrier(ctx, node, "both operands carry channels")
    return elementwise_arrays(ctx, node, [rows, cols])


@rule(torch.baddbmm, aten.baddbmm, "method:baddbmm")
def baddbmm_rule(ctx, node):
    """``beta * bias + alpha * (q @ k)`` over ``batch x heads`` (Bloom's ALiBi scores): the
    product as a batched matmul, the bias added element-wise. A bias with one slice per head
    that the forward builds from the head count (no channels traced into it) is indexed with
    the kept heads, in every batch (``bias.unflatten(0, (-1, heads))``), so each kept head
    keeps its own slope."""
    bias = node.args[0]
    out = _product(ctx, node, *matmul_operands(node))
    M, mt = ctx.atoms(bias), tensor_meta(bias)
    if not isinstance(out, np.ndarray) or M is None or mt is None:
        return barrier(ctx, node, "baddbmm the analysis cannot follow")
    shape = (1,) * (out.ndim - mt.ndim) + tuple(mt.shape)
    vary = [d for d in range(out.ndim) if out.shape[d] > 1]
    if (M >= 0).any() or all(shape[d] == 1 for d in vary):
        return elementwise_arrays(ctx, node, [out, align(M, out.ndim)])
    period = _period(out.reshape(-1)) if vary == [0] else None
    if period is None:
        why = "a bias made in forward over a batch x heads dim that is not batch-major"
        return barrier(ctx, node, why)

    def fix(removed):
        slice_per_head(ctx.gm, node, bias, keep_along(removed, out, 0), 0, period)

    ctx.on_apply(node, fix)
    return out


def _period(heads: np.ndarray) -> int | None:
    """The head count ``p`` of a ``batch * heads`` dim laid out batch-major (the atoms repeat
    every ``p`` positions, each head once per batch); None for any other layout."""
    n = heads.size
    for p in range(1, n + 1):
        if n % p == 0 and np.array_equal(heads, np.tile(heads[:p], n // p)):
            return p if np.unique(heads[:p]).size == p else None
    return None


# fmt: off
@rule(
    F.scaled_dot_product_attention, aten.scaled_dot_product_attention,
    aten._scaled_dot_product_flash_attention_for_cpu, aten._scaled_dot_product_efficient_attention,
    aten._scaled_dot_product_flash_attention,
)
# fmt: on
def sdpa_rule(ctx, node):
    """Attention of q ``[..., Hq, L, E]``, k ``[..., Hk, S, E]``, v ``[..., Hk, S, Ev]``: head ``h``
    of the output comes from head ``h`` of q and head ``h // (Hq / Hk)`` of k and v (grouped-query
    attention), so those heads are coupled; sequence and head_dim must carry no channels."""
    q, k, v = node.args[0], node.args[1], node.args[2]
    Q, K, V = ctx.atoms(q), ctx.atoms(k), ctx.atoms(v)
    if any(a is None or a.ndim < 3 for a in (Q, K, V)):
        return barrier(ctx, node, "attention on tensors the analysis cannot follow")
    if any(a.shape[-1] > 1 or a.shape[-2] > 1 for a in (Q, K, V)):
        block_inputs(ctx, node, "attention over a dim that carries channels")
        return none_output(node)
    mask = arg(node, 3, "attn_mask")
    hq, hk = tensor_meta(q).shape[-3], tensor_meta(k).shape[-3]
    bias = None  # a per-head additive mask (T5's relative position bias): coupled to the heads
    constant_heads = False
    if isinstance(mask, fx.Node):
        M, mt = ctx.atoms(mask), tensor_meta(mask)
        per_head = (
            M is not None and mt is not None and M.ndim >= 3 and mt.shape[-3] == hq > 1
            and M.shape[-3] > 1 and M.shape[-1] == 1 and M.shape[-2] == 1
        )  # fmt: skip
        if per_head:
            bias = M
        elif M is not None and M.size and (M >= 0).any():
            ctx.block(M, node, "attention mask carries channels")
        elif mt is not None and mt.ndim >= 3 and mt.shape[-3] == hq > 1:
            constant_heads = True  # a per-head mask made in forward (T5's zeros((1, n_heads)))
    shared = []  # key / value inputs holding one head broadcast to every query head
    if hk == 1 < hq:  # multi-query: one key/value head serves every query head; it stays
        for t, what in ((K, "key"), (V, "value")):
            ctx.block(t, node, f"the one {what} head every query head shares (multi-query)")
        K, V = none_like(K.ndim), none_like(V.ndim)
    elif hk != hq:
        if hq % hk:
            return barrier(ctx, node, f"{hq} query heads do not divide into {hk} key/value heads")
        K = np.repeat(K, hq // hk, axis=-3) if K.shape[-3] > 1 else K
        V = np.repeat(V, hq // hk, axis=-3) if V.shape[-3] > 1 else V
    elif Q.shape[-3] > 1:
        K = one_head_for_all(ctx, node, k, K, "key", shared)
        V = one_head_for_all(ctx, node, v, V, "value", shared)
    nd = out_ndim(node) if isinstance(node.meta.get("val"), torch.Tensor) else Q.ndim
    parts = [align(Q, nd), align(K, nd), align(V, nd)]
    out = elementwise_arrays(ctx, node, parts + ([align(bias, nd)] if bias is not None else []))
    if out.shape[-3] > 1:
        ctx.attention[node.name] = out
        made = [mask] if constant_heads else []

        def fix(removed):
            keep = keep_along(removed, out, -3)
            for t in made:
                slice_per_head(ctx.gm, node, t, keep, -3)
            for t, what in {t: w for t, w in shared}.items():  # k is v: indexed once
                slice_per_head(ctx.gm, node, t, keep, -3, prefix=f"_fxprune_shared_{what}_")

        if made or shared:
            ctx.on_apply(node, fix)
    if not isinstance(node.meta.get("val"), torch.Tensor):  # ATen variants return a tuple
        return (out,) + tuple(none_output(node)[1:])
    return out


def one_head_for_all(ctx, node: fx.Node, t: fx.Node, T: np.ndarray, what: str, shared: list):
    """A key / value with as many heads as the query whose channels are the same on every
    head: one head broadcast to every query head before the product (multi-query attention
    through ``repeat_kv``'s expand + reshape: Falcon's default layout on transformers >= 5.25).
    Its channels stay; the query heads are not coupled through it, and after a removal it is
    indexed with the kept heads (``shared``), each kept query head keeping its own slice,
    unless its head count is read off the query at run time and follows by itself."""
    if T.shape[-3] > 1:
        return T
    ctx.block(T, node, f"the one {what} head every query head shares (multi-query)")
    if not head_count_read_at_run_time(ctx, t):
        shared.append((t, what))
    return none_like(T.ndim)


_SHAPE_OPS = frozenset(
    {"expand", "expand_as", "broadcast_to", "reshape", "view", "view_as", "reshape_as", "slice"}
    | {"unsqueeze", "squeeze", "transpose", "permute", "flatten", "contiguous", "clone"}
)


def head_count_read_at_run_time(ctx, t: fx.Node, limit: int = 8) -> bool:
    """Whether the shape ops that make ``t`` read a size at run time off a dim that carries
    channels (``k.expand_as(q)``, ``broadcast_to(k, q.shape)``, ``k.expand(b, q.size(1), ...)``
    in an fx capture; torch.export bakes such sizes in): ``t``'s head count then follows the
    kept query heads by itself, and indexing it too would take positions it no longer has."""
    n = t
    for _ in range(limit):
        if not isinstance(n, fx.Node) or op_short_name(n) not in _SHAPE_OPS or not n.args:
            return False
        found: list[fx.Node] = []
        fx.node.map_arg((n.args[1:], n.kwargs), found.append)
        if any(_reads_channels(ctx, a) for a in found):
            return True
        n = n.args[0]
    return False


def _reads_channels(ctx, a: fx.Node) -> bool:
    """``a`` is a tensor with channels (``expand_as``'s template) or sizes read off dims of one
    that carry channels: ``x.shape``, ``x.size()``, ``x.shape[i]``, ``x.size(i)``, ``sym_size``."""
    if tensor_meta(a) is not None:
        X = ctx.atoms(a)
        return X is not None and bool((X >= 0).any())
    idx = None
    if a.op == "call_function" and a.target is operator.getitem and isinstance(a.args[0], fx.Node):
        a, idx = a.args[0], a.args[1]
    whole = (a.op == "call_function" and a.target is getattr and a.args[1] == "shape") or (
        a.op == "call_method" and a.target == "size" and len(a.args) == 1
    )
    if not whole:
        one = (a.op == "call_method" and a.target == "size") or a.target is aten.sym_size.int
        if idx is not None or not one:
            return False
        idx = arg(a, 1, "dim")
    X = ctx.atoms(a.args[0])
    if X is None or not isinstance(idx, (int, slice, type(None))):
        return False
    dims = range(X.ndim) if idx is None else range(X.ndim)[idx]
    return any(X.shape[d] > 1 for d in ([dims] if isinstance(dims, int) else dims))


def slice_per_head(
    gm: fx.GraphModule,
    node: fx.Node,
    mask: fx.Node,
    keep: np.ndarray,
    dim: int,
    period=None,
    prefix: str = "_fxprune_heads_",
) -> None:
    """Give ``node`` only the kept heads of ``mask``, a per-head constant the forward builds
    from the head count (no channels traced into it): it is indexed with the kept heads'
    positions along ``dim``, so each head keeps its own slice. ``period``: ``dim`` is
    ``batch * heads`` (batch-major) with that many heads, indexed in every batch. ``prefix``
    names the index buffer (``head_constants`` reads ``_fxprune_heads_``)."""
    keep = keep[:period] if period else keep
    if keep.all():
        return
    name = unused_name(gm, f"{prefix}{node.name}")
    gm.register_buffer(name, torch.as_tensor(np.nonzero(keep)[0]), persistent=False)
    with gm.graph.inserting_before(node):
        idx = gm.graph.get_attr(name)
        src = mask
        if period:
            src = gm.graph.call_function(aten.unflatten.int, (mask, dim, [-1, period]))
        kept = gm.graph.call_function(aten.index_select.default, (src, dim + bool(period), idx))
        if period:
            kept = gm.graph.call_function(aten.flatten.using_ints, (kept, dim, dim + 1))
    node.replace_input_with(mask, kept)


def head_constants(gm: fx.GraphModule) -> list[str]:
    """Nodes whose per-head constant, built in forward from the head count, the pruned graph
    indexes with the kept heads (``slice_per_head``)."""
    return [n[len("_fxprune_heads_") :] for n, _ in gm.named_buffers() if "_fxprune_heads_" in n]


def _einsum_parts(node: fx.Node):
    """(input subscripts per operand, output subscripts, operand nodes) of an einsum call, with
    ``...`` expanded to one letter per broadcast dim; None when it cannot be read."""
    eq = node.args[0]
    ops = node.args[1:]
    if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
        ops = ops[0]
    if not isinstance(eq, str) or "->" not in eq:
        return None  # an implicit output (no "->") orders letters alphabetically: not followed
    lhs, out = eq.replace(" ", "").split("->")
    ins = lhs.split(",")
    if len(ins) != len(ops):
        return None
    spare = iter(c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in eq)
    n_ell = 0
    for sub, op in zip(ins, ops, strict=True):
        t = tensor_meta(op)
        if t is None:
            return None
        if "..." in sub:
            n_ell = max(n_ell, t.ndim - (len(sub) - 3))
    ell = "".join(next(spare) for _ in range(n_ell))
    fixed = []
    for sub, op in zip(ins, ops, strict=True):
        if "..." in sub:
            k = tensor_meta(op).ndim - (len(sub) - 3)
            sub = sub.replace("...", ell[n_ell - k :])
        fixed.append(sub)
    return fixed, out.replace("...", ell), list(ops)


def einsum_head_dims(node: fx.Node) -> set[int]:
    """Sizes an einsum attention product gives head_dim: its contracted letters and the last
    letter of each operand (``bhid,bhjd->bhij`` contracts d; ``bhij,bhjd->bhid`` keeps it)."""
    parts = _einsum_parts(node)
    if parts is None:
        return set()
    ins, out, ops = parts
    dims = set()
    for sub, op in zip(ins, ops, strict=True):
        shape = tensor_meta(op).shape
        for i, c in enumerate(sub):
            if c not in out or i == len(sub) - 1:
                dims.add(int(shape[i]))
    return dims


@rule(torch.einsum, aten.einsum)
def einsum_rule(ctx, node):
    """``torch.einsum``: a letter kept in the output moves its atoms there (the operands are
    coupled along it, as an element-wise op); a contracted letter must carry no channels."""
    parts = _einsum_parts(node)
    if parts is None:
        return barrier(ctx, node, "einsum equation the analysis cannot follow")
    ins, out, ops = parts
    arrs = []
    for sub, op in zip(ins, ops, strict=True):
        A = ctx.atoms(op)
        if A is None or A.ndim != len(sub) or len(set(sub)) != len(sub):
            return barrier(ctx, node, "einsum with a repeated or unreadable subscript")
        if any(A.shape[i] > 1 for i, c in enumerate(sub) if c not in out):
            block_inputs(ctx, node, "einsum contracts a dim that carries channels")
            return none_output(node)
        kept = [c for c in sub if c in out]  # contracted dims have size 1 here: drop them
        arr = A.reshape([A.shape[sub.index(c)] for c in kept])
        arr = np.transpose(arr, sorted(range(len(kept)), key=lambda i: out.index(kept[i])))
        arr = arr.reshape([A.shape[sub.index(c)] if c in kept else 1 for c in out])
        arrs.append(arr)
    try:
        np.broadcast_shapes(*[a.shape for a in arrs])
    except ValueError:
        return barrier(ctx, node, "einsum operands' channel layouts do not broadcast")
    return elementwise_arrays(ctx, node, arrs)
