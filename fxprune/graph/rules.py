"""The coupling table: how each operator couples channel dims.

A rule is ``rule(ctx, node) -> atoms`` registered for a module class, a function (torch, operator,
``torch.nn.functional`` or an ATen overload) or a tensor-method name. It returns the atom array of
the node's output (a tuple of arrays for tuple outputs) and may union, block, record parameter
slices and register rewrites on ``ctx`` (an ``Analysis``). Anything without a rule is a barrier.

The registry and the helpers rules share live in ``rules_registry.py``. Importing this module fills
the table, in this order: element-wise ops (``rules_elementwise.py``), pooling, padding, softmax and
reductions (``rules_reduction.py``), then the model output rule below. Layers with weights
(``layers.py``), shape ops (``shapes.py``) and attention products (``attention.py``) add theirs
when ``fxprune.graph`` imports them; they import the helpers re-exported here.
"""

from __future__ import annotations

import torch.fx as fx
from torch.utils import _pytree as pytree

from fxprune.graph.rules_elementwise import (  # registers the element-wise rules (first)
    BINARY,
    UNARY,
    binary_rule,
    elementwise,
    elementwise_arrays,
    unary_rule,
)
from fxprune.graph.rules_reduction import SPATIAL  # registers pooling ... reductions (second)
from fxprune.graph.rules_registry import (
    RULES,
    align,
    arg,
    barrier,
    block_inputs,
    find_rule,
    first_tensor,
    keep_along,
    new_sizes,
    none_output,
    out_ndim,
    rule,
    set_arg,
)

__all__ = [  # re-exported: the other rule modules and build_graph import these from here
    "BINARY",
    "RULES",
    "SPATIAL",
    "UNARY",
    "align",
    "arg",
    "barrier",
    "binary_rule",
    "block_inputs",
    "elementwise",
    "elementwise_arrays",
    "find_rule",
    "first_tensor",
    "keep_along",
    "new_sizes",
    "none_output",
    "out_ndim",
    "rule",
    "set_arg",
    "unary_rule",
]


@rule("output")
def _output(ctx, node):
    for a in pytree.tree_leaves(node.args):
        if isinstance(a, fx.Node):
            ctx.block(ctx.atoms(a), node, "reaches the model output")
    return None
