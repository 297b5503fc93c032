"""Coupling rules for element-wise operators: broadcasting binary ops (arithmetic, ``where``,
``masked_fill``) couple atoms position by position; unary ops (activations, dropout, casts, copies)
pass their input's atoms through."""

from __future__ import annotations

import operator

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.utils import _pytree as pytree

from fxprune.graph.depgraph import Analysis, none_like
from fxprune.graph.rules_registry import (
    align,
    barrier,
    first_tensor,
    none_output,
    out_ndim,
    rule,
)
from fxprune.graph.trace import tensor_meta

aten = torch.ops.aten


def _detach_broadcast(ctx: Analysis, node: fx.Node, arrs: list, shapes: list):
    """Drop the operands whose atoms cannot be coupled position by position with the others'.

    An operand whose atoms vary on none of the dims where the other operands' atoms vary is
    never sliced when those channels go: it is broadcast across them. Coupling it position by
    position would tie all of the others' channels into one unit through it:

    * a scalar ``scale`` / ``bias`` of shape [1] (timm's LearnableAffineBlock) next to a conv's
      C channels would make the C channels one unit;
    * RoPE's ``cos`` / ``sin`` tables vary along head_dim (they come from the ``inv_freq``
      buffer), while q's heads vary along the head dim: every head of every layer would become
      one unit.

    Such an operand is dropped from the coupling when it is a constant nobody is coupled to yet
    (it is simply not sliced) or when it is truly broadcast (size 1) along every dim where the
    others vary; a broadcast operand with channels of its own keeps them (they are blocked: the
    op needs its one position for every channel of the other operand)."""
    vary = [{d for d in range(a.ndim) if a.shape[d] > 1} if (a >= 0).any() else set() for a in arrs]
    drop = []
    for i, a in enumerate(arrs):
        rest = set().union(*(v for j, v in enumerate(vary) if j != i and j not in drop))
        if not rest or not vary[i].isdisjoint(rest) or not (a >= 0).any():
            continue
        broadcast = all(shapes[i][d] == 1 for d in rest)
        if ctx.free_constant(a):
            drop.append(i)
        elif broadcast:
            ctx.block(a, node, "broadcast across the channels of another operand")
            drop.append(i)
    if not drop or len(drop) == len(arrs):
        return arrs, shapes
    keep = [i for i in range(len(arrs)) if i not in drop]
    return [arrs[i] for i in keep], [shapes[i] for i in keep]


def elementwise(ctx: Analysis, node: fx.Node, operands) -> np.ndarray:
    """Broadcasting op: atoms at the same output position are coupled."""
    nd = out_ndim(node)
    arrs, shapes = [], []
    for a in operands:
        t = tensor_meta(a)
        if t is None:
            continue
        arrs.append(align(ctx.atoms(a), nd))
        shapes.append((1,) * (nd - t.ndim) + tuple(t.shape))
    if not arrs:
        return none_like(nd)
    arrs, shapes = _detach_broadcast(ctx, node, arrs, shapes)
    try:
        b = np.broadcast_shapes(*[x.shape for x in arrs])
    except ValueError:
        return barrier(ctx, node, "operands' channel layouts do not broadcast")
    stack = [np.broadcast_to(x, b) for x in arrs]
    out = stack[0].copy()
    for s in stack[1:]:
        ctx.union(out, s)
        out = np.where(out >= 0, out, s)
    # The operands are now coupled position by position, so an operand that holds an atom
    # wherever the output does can stand for the output unbroadcast (a [1, 1, C] token layout
    # stays small after adding a [1, T, C] positional embedding).
    has = out >= 0
    small = next(
        (
            x
            for x, s in sorted(zip(arrs, stack, strict=True), key=lambda p: p[0].size)
            if x.size < out.size and np.array_equal(s >= 0, has)
        ),
        None,
    )
    vary = [d for d in range(nd) if out.shape[d] > 1]
    for s, shp in zip(stack, shapes, strict=True):
        if any(shp[d] > 1 for d in vary):  # this operand really has the channel dim ...
            lost = (out >= 0) & (s < 0)  # ... but no prunable channels there (input, constant)
            if lost.any():
                ctx.block(
                    out[lost], node, "combined with a tensor whose channels cannot be removed"
                )
    return out if small is None else small


def elementwise_arrays(ctx: Analysis, node: fx.Node, arrs) -> np.ndarray:
    """Atom arrays already aligned to the output: coupled position by position (broadcast)."""
    out = np.broadcast_arrays(*arrs)
    res = out[0].copy()
    for s in out[1:]:
        ctx.union(res, s)
        res = np.where(res >= 0, res, s)
    return res


# fmt: off
BINARY = [
    operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.iadd,
    operator.isub, operator.imul, operator.itruediv, torch.add, torch.sub, torch.mul, torch.div,
    torch.maximum, torch.minimum, torch.where, torch.true_divide, torch.lerp, aten.add, aten.add_,
    aten.sub, aten.sub_, aten.mul, aten.mul_, aten.div, aten.div_, aten.maximum, aten.minimum,
    aten.where, aten.masked_fill, torch.masked_fill, "method:add", "method:add_", "method:sub",
    "method:sub_", "method:mul", "method:mul_", "method:div", "method:div_", "method:masked_fill",
    "method:masked_fill_", "method:expand_as",
]
# fmt: on


@rule(*BINARY)
def binary_rule(ctx, node):
    if node.op == "call_method" and node.target == "expand_as":
        return ctx.atoms(node.args[0])
    return elementwise(ctx, node, pytree.tree_leaves((node.args, node.kwargs)))


UNARY = [
    F.relu,
    F.relu6,
    F.silu,
    F.gelu,
    F.hardswish,
    F.hardsigmoid,
    F.sigmoid,
    F.tanh,
    F.mish,
    F.leaky_relu,
    F.elu,
    F.selu,
    F.softplus,
    F.hardtanh,
    F.dropout,
    F.dropout1d,
    F.dropout2d,
    F.alpha_dropout,
    torch.relu,
    torch.sigmoid,
    torch.tanh,
    torch.exp,
    torch.abs,
    torch.neg,
    torch.clamp,
    torch.clip,
    torch.sqrt,
    torch.rsqrt,
    torch.erf,
    operator.neg,
    torch.dropout,
    torch.clone,
    torch.square,
    torch.sin,
    torch.cos,
    torch.pow,
    operator.pow,
    aten.relu,
    aten.relu_,
    aten.hardtanh,
    aten.hardtanh_,
    aten.silu,
    aten.silu_,
    aten.gelu,
    aten.sigmoid,
    aten.sigmoid_,
    aten.tanh,
    aten.hardswish,
    aten.hardswish_,
    aten.hardsigmoid,
    aten.hardsigmoid_,
    aten.dropout,
    aten.dropout_,
    aten.clone,
    aten.contiguous,
    aten.exp,
    aten.neg,
    aten.abs,
    aten.clamp,
    aten.clamp_min,
    aten.clamp_max,
    aten.leaky_relu,
    aten.elu,
    aten.mish,
    aten.softplus,
    aten.sqrt,
    aten.rsqrt,
    aten.erf,
    aten.alias,
    aten.detach,
    aten._to_copy,
    aten.to,
    aten.pow,
    aten.square,
    aten.sin,
    aten.cos,
    nn.ReLU,
    nn.ReLU6,
    nn.SiLU,
    nn.GELU,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Sigmoid,
    nn.Tanh,
    nn.Mish,
    nn.LeakyReLU,
    nn.ELU,
    nn.SELU,
    nn.Softplus,
    nn.Hardtanh,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.Identity,
    "method:relu",
    "method:relu_",
    "method:sigmoid",
    "method:sigmoid_",
    "method:tanh",
    "method:contiguous",
    "method:clone",
    "method:to",
    "method:float",
    "method:half",
    "method:type_as",
    aten.type_as,
    "method:detach",
    "method:clamp",
    "method:clamp_",
    "method:exp",
    "method:neg",
    "method:abs",
    "method:sqrt",
    "method:pow",
    "method:square",
    "method:hardtanh_",
]


_BROADCASTING = {"pow", "clamp", "clamp_", "clip", "clamp_min", "clamp_max"}


def _op_name(node: fx.Node) -> str:
    t = node.target
    if isinstance(t, str):
        return t
    t = getattr(t, "overloadpacket", t)
    return str(getattr(t, "__name__", t)).split(".")[-1]


@rule(*UNARY, "torchvision.ops.stochastic_depth.stochastic_depth")
def unary_rule(ctx, node):
    tensors = [
        a
        for a in pytree.tree_leaves((node.args, node.kwargs))
        if isinstance(a, fx.Node) and tensor_meta(a) is not None
    ]
    if len(tensors) > 1 and _op_name(node) in _BROADCASTING:
        # pow(tensor, tensor) (Bloom's ALiBi slopes), clamp(x, lo_t, hi_t): a binary op; the
        # others (type_as, to) only read their second tensor's dtype
        return binary_rule(ctx, node)
    x = first_tensor(ctx, node)
    return ctx.atoms(x) if x is not None else none_output(node)
