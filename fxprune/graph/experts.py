"""Coupling rules for mixture-of-experts layers: a grouped matmul over stacked expert weights.

Hugging Face's MoE experts (Mixtral, Qwen3-MoE, OLMoE, ...) hold every expert's projection in one
3-D parameter ``[experts, out, in]`` and run them as one grouped matmul over tokens sorted by
expert: ``grouped_mm(x [tokens, in], W^T [experts, in, out], offsets) -> [tokens, out]``
(``torch._grouped_mm`` where the kernel exists, transformers' ``grouped_mm_fallback`` op
elsewhere). Each token row meets only its own expert's weights, so column ``j`` of the output is
neuron ``j`` of whichever expert served that row: removing ``j`` removes it from every expert
(the parameter's ``out`` dim), and the next grouped matmul's ``in`` dim follows, the same values
for every token. The expert dim itself is routed by data (top-k indices), not by channels: it is
never coupled here (whole experts are the ``experts`` pass's work).
"""

from __future__ import annotations

import torch
import torch.fx as fx

from fxprune.graph.layerbase import channel_vec, get_tensor, layer_of, param_name, with_vec
from fxprune.graph.rules import arg, barrier, rule
from fxprune.graph.trace import tensor_meta

aten = torch.ops.aten

# transformers' CPU fallback, keyed by qualified name (the op exists once transformers' MoE
# integration is imported; fxprune does not import transformers to register it)
_FALLBACK = "torch._ops.transformers.transformers::grouped_mm_fallback"
_TRANSPOSES = (aten.transpose.int, torch.transpose)


def expert_weight(node: fx.Node, w) -> tuple[str, bool] | None:
    """``(parameter name, read transposed)`` of the 3-D expert parameter behind a grouped
    matmul's weight argument (the parameter itself, or its last two dims swapped), else None."""
    name = param_name(node, w)
    if name is not None:
        return name, False
    if (
        isinstance(w, fx.Node)
        and w.op == "call_function"
        and w.target in _TRANSPOSES
        and sorted(d % 3 for d in w.args[1:3]) == [1, 2]
    ):
        name = param_name(w, w.args[0])
        return (name, True) if name is not None else None
    return None


@rule(aten._grouped_mm, _FALLBACK)
def _grouped_mm(ctx, node):
    x, w = node.args[0], node.args[1]
    found, t = expert_weight(node, w), tensor_meta(x)
    if found is None or t is None or t.ndim != 2 or arg(node, 3, "bias") is not None:
        return barrier(ctx, node, "grouped matmul whose weight is not a 3-D expert parameter")
    name, transposed = found
    W = get_tensor(ctx, name)
    if W.ndim != 3:
        return barrier(ctx, node, "grouped matmul whose weight is not a 3-D expert parameter")
    out_dim, in_dim = (1, 2) if transposed else (2, 1)
    ctx.probe(x)
    xin = channel_vec(ctx, node, ctx.atoms(x), 1, t.shape[1])
    out = ctx.new_source(node, layer_of(name), name, out_dim, W.shape[out_dim], "linear")
    ctx.param_dim(name, out_dim, out, "weight")
    ctx.param_dim(name, in_dim, xin, "weight", consumer=True)
    return with_vec(2, 1, out)
