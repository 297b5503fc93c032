"""Coupling rules for shape and element-wise operators (layers with weights are in ``layers.py``).

A rule is ``rule(ctx, node) -> atoms`` registered for a module class, a function (torch, operator,
``torch.nn.functional`` or an ATen overload) or a tensor-method name. It returns the atom array of
the node's output (a tuple of arrays for tuple outputs) and may union, block, record parameter
slices and register rewrites on ``ctx`` (an ``Analysis``). Anything without a rule is a barrier.
"""

from __future__ import annotations

import operator
from collections.abc import Callable

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.utils import _pytree as pytree

from fxprune.graph.depgraph import NONE, Analysis, none_like
from fxprune.graph.trace import tensor_meta

aten = torch.ops.aten
RULES: dict[object, Callable] = {}


def rule(*keys):
    """Register a rule for module classes, functions, ATen overloads or ``"method:name"`` keys."""

    def deco(fn):
        for k in keys:
            RULES[k] = fn
        return fn

    return deco


def find_rule(gm: fx.GraphModule, node: fx.Node) -> Callable | None:
    if node.op == "call_module":
        for cls in type(gm.get_submodule(node.target)).__mro__:
            if cls in RULES:
                return RULES[cls]
        return None
    if node.op == "call_method":
        return RULES.get("method:" + node.target)
    if node.op == "call_function":
        t = node.target
        if t in RULES:
            return RULES[t]
        packet = getattr(t, "overloadpacket", None)  # aten.add.Tensor -> aten.add
        if packet in RULES:
            return RULES[packet]
        # Functions of optional packages (torchvision.ops ...) are keyed by qualified name.
        return RULES.get(f"{getattr(t, '__module__', '')}.{getattr(t, '__qualname__', '')}")
    return None


def arg(node: fx.Node, i: int, name: str, default=None):
    """Positional argument ``i`` or keyword ``name`` of a call."""
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def set_arg(node: fx.Node, i: int, name: str, value) -> None:
    if len(node.args) > i:
        args = list(node.args)
        args[i] = value
        node.args = tuple(args)
    else:
        node.kwargs = {**node.kwargs, name: value}


def out_ndim(node: fx.Node) -> int:
    t = tensor_meta(node)
    return t.ndim if t is not None else 0


def first_tensor(ctx: Analysis, node: fx.Node):
    for a in pytree.tree_leaves((node.args, node.kwargs)):
        if isinstance(a, fx.Node) and tensor_meta(a) is not None:
            return a
    return None


def keep_along(removed: np.ndarray, arr: np.ndarray, d: int) -> np.ndarray:
    """Bool per index of dim ``d``: False where every atom in that slice is removed."""
    moved = np.moveaxis(arr, d, 0).reshape(arr.shape[d], -1)
    has = (moved >= 0).any(axis=1)
    gone = np.where(moved >= 0, removed[moved], True).all(axis=1)
    return ~(has & gone)


def new_sizes(removed: np.ndarray, arr: np.ndarray, shape) -> list[int]:
    """The pruned shape of a tensor whose atom array is ``arr`` and dense shape ``shape``."""
    return [
        int(keep_along(removed, arr, d).sum()) if arr.shape[d] > 1 else int(s)
        for d, s in enumerate(shape)
    ]


def block_inputs(ctx: Analysis, node: fx.Node, reason: str) -> None:
    for a in pytree.tree_leaves((node.args, node.kwargs)):
        if isinstance(a, fx.Node) and (a.op != "get_attr" or a in ctx.values):
            ctx.block(ctx.atoms(a), node, reason)


def none_output(node: fx.Node):
    v = node.meta.get("val")
    if isinstance(v, (tuple, list)):
        return tuple(none_like(t.ndim) if isinstance(t, torch.Tensor) else None for t in v)
    return none_like(v.ndim) if isinstance(v, torch.Tensor) else None


def barrier(ctx: Analysis, node: fx.Node, reason: str | None = None):
    """No rule: every channel reaching this op is kept, and its output carries no atoms."""
    block_inputs(ctx, node, reason or "no coupling rule for this op")
    return none_output(node)


def align(arr: np.ndarray | None, ndim: int) -> np.ndarray:
    if arr is None:  # a value with no atom array (a 0-d getitem): it carries no channels
        return none_like(ndim)
    return arr.reshape((1,) * (ndim - arr.ndim) + arr.shape) if arr.ndim < ndim else arr


# ---- element-wise -------------------------------------------------------------------------------


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


@rule(*UNARY, "torchvision.ops.stochastic_depth.stochastic_depth")
def unary_rule(ctx, node):
    x = first_tensor(ctx, node)
    return ctx.atoms(x) if x is not None else none_output(node)


def _spatial(ctx, node, x, spatial_from: int = 2):
    """Ops that mix values only within each channel's spatial extent (pooling, resizing)."""
    X = ctx.atoms(x)
    bad = [d for d in range(spatial_from, X.ndim) if X.shape[d] > 1]
    if bad:
        ctx.block(X, node, "pooling/resizing over a dim that carries channels")
        return none_output(node)
    return X


# fmt: off
SPATIAL = [
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d,
    F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.interpolate, F.upsample, F.lp_pool2d,
    aten.max_pool1d, aten.max_pool2d, aten.max_pool3d, aten.avg_pool1d, aten.avg_pool2d,
    aten.avg_pool3d, aten.adaptive_avg_pool1d, aten.adaptive_avg_pool2d, aten.adaptive_avg_pool3d,
    aten.adaptive_max_pool2d, aten.upsample_nearest2d, aten.upsample_bilinear2d,
    aten.max_pool2d_with_indices, aten._adaptive_avg_pool2d, nn.MaxPool1d, nn.MaxPool2d,
    nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d, nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d,
    nn.LPPool2d,
]
# fmt: on


@rule(*SPATIAL)
def _pool(ctx, node):
    out = _spatial(ctx, node, node.args[0])
    v = node.meta.get("val")
    if isinstance(v, (tuple, list)):  # max-pool with indices
        return (out, out)
    return out


# fmt: off
@rule(
    F.pad, aten.pad, aten.constant_pad_nd, nn.ZeroPad2d, nn.ConstantPad2d, nn.ReflectionPad2d,
    nn.ReplicationPad2d,
)
# fmt: on
def _pad(ctx, node):
    x = node.args[0]
    X = ctx.atoms(x)
    if node.op == "call_module":
        pads = ctx.modules[node.target].padding
        pads = pads if isinstance(pads, (tuple, list)) else (pads,) * 4
    else:
        pads = arg(node, 1, "pad")
    if not isinstance(pads, (tuple, list)) or any(not isinstance(p, int) for p in pads):
        return barrier(ctx, node, "padding amounts are not constants")
    padded = [X.ndim - 1 - i for i in range(len(pads) // 2) if pads[2 * i] or pads[2 * i + 1]]
    if any(X.shape[d] > 1 for d in padded):
        return barrier(ctx, node, "padding along a channel dim")
    return X


# fmt: off
@rule(
    F.softmax, F.log_softmax, torch.softmax, torch.log_softmax, aten._softmax, aten.softmax,
    aten._log_softmax, aten.log_softmax, nn.Softmax, nn.LogSoftmax, "method:softmax",
    "method:log_softmax", torch.cumsum, "method:cumsum", aten.cumsum,
)
# fmt: on
def _along_dim(ctx, node):
    """Ops that mix values along one dim: channels on that dim are kept."""
    X = ctx.atoms(node.args[0])
    if node.op == "call_module":
        d = ctx.modules[node.target].dim
    else:
        d = arg(node, 1, "dim")
    if d is None:
        return barrier(ctx, node, "implicit dim")
    d = d % X.ndim if X.ndim else 0
    if X.ndim and X.shape[d] > 1:
        ctx.block(X, node, f"mixes values along dim {d}, which carries channels")
    elif X.ndim >= 3 and d == X.ndim - 1 and X.shape[-3] > 1 and _is_softmax(ctx, node):
        ctx.attention[node.name] = X  # attention probabilities of an explicit q @ k^T
    return X


def _is_softmax(ctx, node) -> bool:
    if node.op == "call_module":
        return isinstance(ctx.modules[node.target], nn.Softmax)
    name = str(getattr(node.target, "__name__", node.target))
    return "softmax" in name and "log" not in name


# ---- reductions ---------------------------------------------------------------------------------


# fmt: off
@rule(
    torch.mean, torch.sum, torch.amax, torch.amin, torch.std, torch.var, torch.logsumexp,
    torch.max, torch.min, aten.mean, aten.sum, aten.amax, aten.amin, aten.var, aten.std,
    aten.logsumexp, aten.max, aten.min, "method:mean", "method:sum", "method:amax", "method:amin",
    "method:std", "method:var", "method:max", "method:min", "method:logsumexp",
)
# fmt: on
def _reduce(ctx, node):
    x = node.args[0]
    X = ctx.atoms(x)
    if X is None:
        return none_output(node)
    dims = arg(node, 1, "dim")
    if dims is None and "axis" in node.kwargs:
        dims = node.kwargs["axis"]
    if isinstance(dims, fx.Node):
        return barrier(ctx, node, "reduction over a computed dim")
    keep = bool(arg(node, 2, "keepdim", False))
    if dims is None:
        dims = list(range(X.ndim))
    dims = [dims] if isinstance(dims, int) else list(dims)
    dims = sorted(d % X.ndim for d in dims) if X.ndim else []
    if any(X.shape[d] > 1 for d in dims):
        ctx.block(X, node, "reduces over a dim that carries channels")
        X = np.full(X.shape, NONE)
    out = X
    for d in reversed(dims):
        out = out.take([0], axis=d)
        if not keep:
            out = out.reshape(out.shape[:d] + out.shape[d + 1 :])
    v = node.meta.get("val")
    if isinstance(v, (tuple, list)):  # torch.max(x, dim) -> (values, indices)
        return (out, out)
    return out


@rule("output")
def _output(ctx, node):
    for a in pytree.tree_leaves(node.args):
        if isinstance(a, fx.Node):
            ctx.block(ctx.atoms(a), node, "reaches the model output")
    return None
