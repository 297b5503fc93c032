"""Dependency-graph core: capture (``capture``, over ``trace``), coupling rules (``rules``, ``layers``), the solved
graph (``depgraph``) and the rewrite that applies a removal (``rewrite``)."""

from __future__ import annotations

import torch
import torch.fx as fx

from fxprune.graph import attention as _attention  # noqa: F401 - matmul, SDPA, einsum rules
from fxprune.graph import experts as _experts  # noqa: F401 - grouped matmuls of MoE experts
from fxprune.graph import layers as _layers  # noqa: F401 - registers the layer rules
from fxprune.graph import shapes as _shapes  # noqa: F401 - registers the shape rules
from fxprune.graph.capture import capture, hidden_attention, without_cache  # noqa: E402
from fxprune.graph.depgraph import Analysis, DependencyGraph, Group, none_like
from fxprune.graph.rules import RULES, barrier, find_rule
from fxprune.graph.shapeprop import propagate_shapes
from fxprune.graph.trace import Traced, retarget, trace

__all__ = [
    "DependencyGraph",
    "Group",
    "Traced",
    "build_graph",
    "capture",
    "hidden_attention",
    "propagate_shapes",
    "retarget",
    "trace",
    "without_cache",
]


def build_graph(gm: fx.GraphModule, allow_approximate: bool = False) -> DependencyGraph:
    """Walk ``gm`` (nodes carrying ``meta["val"]``) through the coupling rules and solve it."""
    ctx = Analysis(gm, allow_approximate=allow_approximate)
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            continue  # atoms are created lazily when a parameter is used as a tensor
        if node.op == "placeholder":
            v = node.meta.get("val")
            ctx.values[node] = none_like(v.ndim) if isinstance(v, torch.Tensor) else None
            continue
        if node.op == "output":
            RULES["output"](ctx, node)
            continue
        v = node.meta.get("val")
        is_tensor = isinstance(v, torch.Tensor) or (
            isinstance(v, (tuple, list)) and any(isinstance(t, torch.Tensor) for t in v)
        )
        if not is_tensor:
            continue  # sizes, dims, asserts: no channels flow through them
        fn = find_rule(gm, node)
        ctx.values[node] = fn(ctx, node) if fn is not None else barrier(ctx, node)
    return ctx.finish()
