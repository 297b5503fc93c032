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
from fxprune.graph.shared_heads import (
    latent_key,
    latent_key_transposed,
    one_head_for_all,
    slice_per_head,
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
    """``a @ b``: batched dims coupled position by position, the contracted dim channel-free,
    but for a transposed latent-attention key's shared part (``shared_heads.latent_key``)."""
    A, B = ctx.atoms(a), ctx.atoms(b)
    if A is None or B is None or A.ndim < 2 or B.ndim < 2:
        return barrier(ctx, node, "vector matmul")
    shared = []  # (cat, part) of a key every head shares, indexed with the kept heads
    if A.ndim >= 3 and A.shape[-3] > 1 and A.shape[-1] == 1 and B.shape[-2] > 1:
        latent = latent_key_transposed(ctx, node, b, B, shared)
        B = B if latent is None else latent
    if A.shape[-1] > 1 or B.shape[-2] > 1:
        ctx.block(A, node, "contracts a dim that carries channels")
        ctx.block(B, node, "contracts a dim that carries channels")
        return none_output(node)
    nd = out_ndim(node)
    rows, cols = align(A, nd), align(B, nd)  # [..., n, 1] and [..., 1, m]
    if rows.shape[-2] > 1 and cols.shape[-1] > 1:
        return barrier(ctx, node, "both operands carry channels")
    out = elementwise_arrays(ctx, node, [rows, cols])
    for f, arr in ((a, rows), (b, cols)):
        held_whole(ctx, node, out, f, arr)
    if shared and out.ndim >= 3 and out.shape[-3] > 1:

        def fix(removed):
            keep = keep_along(removed, out, -3)
            for at, t, what in shared:
                slice_per_head(ctx.gm, at, t, keep, -3, prefix=f"_fxprune_shared_{what}_")

        ctx.on_apply(node, fix)
    return out


def held_whole(ctx, node: fx.Node, out: np.ndarray, f: fx.Node, arr: np.ndarray) -> None:
    """A batched dim (heads) factor ``f`` really has (size > 1) but holds no channels on (the
    scores of a product that kept its heads) cannot lose positions the other factor's channels
    would take away: those channels are blocked (the product's batch sizes would differ)."""
    t = tensor_meta(f)
    if t is None:
        return
    shape = (1,) * (out.ndim - t.ndim) + tuple(t.shape)
    if any(out.shape[d] > 1 and shape[d] > 1 for d in range(out.ndim - 2)):
        lost = (out >= 0) & (np.broadcast_to(arr, out.shape) < 0)
        if lost.any():
            ctx.block(out[lost], node, "a batched dim the other factor holds whole")


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
    attention), so those heads are coupled; sequence and head_dim must carry no channels, but a
    key part every head shares (latent attention's rotary key, ``shared_heads.latent_key``)."""
    q, k, v = node.args[0], node.args[1], node.args[2]
    Q, K, V = ctx.atoms(q), ctx.atoms(k), ctx.atoms(v)
    if any(a is None or a.ndim < 3 for a in (Q, K, V)):
        return barrier(ctx, node, "attention on tensors the analysis cannot follow")
    shared = []  # (node, input) pairs holding a key / value part every query head shares
    same_heads = tensor_meta(q).shape[-3] == tensor_meta(k).shape[-3]
    if Q.shape[-3] > 1 and K.shape[-1] > 1 and same_heads:  # latent attention's key
        latent = latent_key(ctx, node, k, K, shared)
        K = K if latent is None else latent
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
            for (at, t), what in {(at, t): w for at, t, w in shared}.items():  # k is v: once
                slice_per_head(ctx.gm, at, t, keep, -3, prefix=f"_fxprune_shared_{what}_")

        if made or shared:
            ctx.on_apply(node, fix)
    if not isinstance(node.meta.get("val"), torch.Tensor):  # ATen variants return a tuple
        return (out,) + tuple(none_output(node)[1:])
    return out


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
