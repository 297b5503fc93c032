"""Key / value channels every attention head shares, and the per-head constants a removal indexes.

Two layouts broadcast one key to every query head before the attention product:

* multi-query attention through ``repeat_kv``'s expand + reshape (Falcon on transformers
  >= 5.25): the whole key / value is one head (``one_head_for_all``);
* multi-head latent attention (DeepSeek-V2 / V3): the key is ``cat(k_nope, k_rot)`` along
  head_dim, ``k_nope`` one slice per head (``kv_b_proj``), ``k_rot`` one rotary head
  (``kv_a_proj_with_mqa``) expanded to every head (``latent_key``).

The shared part stays whole: it is no unit, and it does not couple the query heads into one
(the product pairs head ``h`` of q only with head ``h`` of k). After a removal it is indexed
with the kept heads (``slice_per_head``), unless its head count is read off a per-head tensor
at run time and follows by itself (``head_count_read_at_run_time``).
"""

from __future__ import annotations

import operator

import numpy as np
import torch
import torch.fx as fx

from fxprune.graph.depgraph import none_like
from fxprune.graph.indexing import op_short_name, unused_name
from fxprune.graph.rules import arg
from fxprune.graph.trace import tensor_meta

aten = torch.ops.aten

_CATS = frozenset({torch.cat, aten.cat.default, aten.concat.default, torch.concat})


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
        shared.append((node, t, what))
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


def latent_key(ctx, node: fx.Node, k: fx.Node, K: np.ndarray, shared: list):
    """A key ``[..., H, S, E]`` (``k``, atoms ``K``) made by ``cat`` along head_dim of parts
    that are either one slice per head or the same on every head (multi-head latent attention:
    ``cat(k_nope, k_rot.expand(-1, H, -1, -1))``). The shared parts' channels stay (blocked);
    the key is then its per-head part, one atom per head, coupled with the query's heads as
    usual; each shared part is recorded in ``shared`` as ``(cat node, part, "key")`` to be
    indexed with the kept heads. None for any other key (the caller refuses channels on E)."""
    if K.ndim < 3 or K.shape[-1] == 1 or K.shape[-3] == 1 or K.shape[-2] > 1:
        return None
    same = np.all(K == K.take([0], axis=-3), axis=tuple(range(K.ndim - 1)))  # per E position
    per = K[..., ~same]
    if same.all() or not same.any() or not (per == per[..., :1]).all():
        return None
    parts = _cat_parts(k, K.ndim)
    if (
        parts is None
        or parts[-1][2] != K.shape[-1]
        or any(len(set(same[a:b].tolist())) != 1 for _, a, b in parts)
    ):
        return None  # a part mixes per-head and shared channels: not this layout
    ctx.block(K[..., same], node, "the rotary key part every head shares (latent attention)")
    for t, a, _ in parts:
        if same[a] and not head_count_read_at_run_time(ctx, t):
            shared.append((k, t, "key"))
    multi = [(n, arr) for n, arr in ctx.multi_arrays if n != k.name]
    ctx.multi_arrays[:] = multi  # the per-head part alone fills whole heads (checked above)
    return per[..., :1]


def latent_key_transposed(ctx, node: fx.Node, kt: fx.Node, KT: np.ndarray, shared: list):
    """``latent_key`` for ``k.transpose(-2, -1)`` (``KT``: its atoms), the key of an eager
    ``q @ k^T``; the per-head part transposed back, or None."""
    is_transpose = (kt.op == "call_function" and kt.target is aten.transpose.int) or (
        kt.op == "call_method" and kt.target == "transpose"
    )
    if not is_transpose or KT.ndim < 3 or not isinstance(kt.args[0], fx.Node):
        return None
    dims = kt.args[1:3]
    if len(dims) != 2 or sorted(d % KT.ndim for d in dims) != [KT.ndim - 2, KT.ndim - 1]:
        return None
    K = latent_key(ctx, node, kt.args[0], np.swapaxes(KT, -1, -2), shared)
    return None if K is None else np.swapaxes(K, -1, -2)


def _cat_parts(k: fx.Node, ndim: int):
    """``[(part, start, end)]`` of ``k`` when it is a ``cat`` along its last dim, else None."""
    if k.op != "call_function" or k.target not in _CATS:
        return None
    d = arg(k, 1, "dim", 0)
    tensors = arg(k, 0, "tensors")
    metas = [tensor_meta(t) if isinstance(t, fx.Node) else None for t in tensors]
    if d % ndim != ndim - 1 or any(m is None or m.ndim != ndim for m in metas):
        return None
    out, at = [], 0
    for t, m in zip(tensors, metas, strict=True):
        out.append((t, at, at + int(m.shape[-1])))
        at += int(m.shape[-1])
    return out
