"""The rule registry (``RULES``, ``@rule``, ``find_rule``) and the helpers coupling rules share:
argument access, output shapes, atom-array alignment, barriers and pruned sizes. What a rule is:
``rules.py``."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from fxprune.graph.depgraph import Analysis, none_like
from fxprune.graph.trace import tensor_meta

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
