"""Coupling rules for layers with weights that create channels: conv, linear, embedding.

Each rule works for the module form (``call_module`` on ``nn.Conv2d``), the functional form with
``get_attr`` weights (``F.conv2d``) and the ATen form that ``torch.export`` produces
(``aten.conv2d.default``), so both capture paths share one set of coupling decisions. The rules
for norms and PReLU live in ``norms`` (importing this module registers them too), the helpers
both share in ``layerbase``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from fxprune.graph import norms  # noqa: F401 - registers the norm and PReLU rules
from fxprune.graph.depgraph import NONE, Analysis
from fxprune.graph.layerbase import channel_vec, get_tensor, layer_of, param_name, with_vec
from fxprune.graph.rules import arg, barrier, rule, set_arg
from fxprune.graph.trace import tensor_meta

aten = torch.ops.aten


# ---- convolution --------------------------------------------------------------------------------


def conv(
    ctx: Analysis,
    node: fx.Node,
    x,
    w: str,
    b: str | None,
    groups: int,
    transposed: bool,
    set_groups,
):
    """Shared conv coupling; ``set_groups(n)`` writes the pruned group count back."""
    W = get_tensor(ctx, w)
    X, t = ctx.atoms(x), tensor_meta(x)
    ctx.probe(x)
    cd = t.ndim - (W.ndim - 2) - 1  # channel dim: 1 when batched, 0 when not
    cin = t.shape[cd]
    xin = channel_vec(ctx, node, X, cd, cin)
    cout = W.shape[1] * groups if transposed else W.shape[0]
    out = ctx.new_source(node, layer_of(w), w, 1 if transposed else 0, cout, "conv")
    in_dim, out_dim = (0, 1) if transposed else (1, 0)
    if groups == 1:
        ctx.param_dim(w, out_dim, out, "weight")
        ctx.param_dim(w, in_dim, xin, "weight", consumer=True)
    else:
        # Channels of one group only meet each other: remove whole groups, inputs and outputs.
        cin_g, cout_g = cin // groups, cout // groups
        heads = np.repeat(out[::cout_g], cin_g)
        ctx.union(xin, heads)
        ctx.union(out, np.repeat(out[::cout_g], cout_g))
        if (xin < 0).any():
            ctx.block(heads[xin < 0], node, "grouped conv reads channels that cannot be removed")
        ctx.param_dim(w, 0, xin if transposed else out, "weight")
    ctx.param_dim(b, 0, out, "other")

    def fix(removed):
        n_groups = int((~removed[out[:: cout // groups]]).sum()) if groups > 1 else 1
        set_groups(n_groups)

    ctx.on_apply(node, fix)
    res = np.full((1,) * tensor_meta(node).ndim, NONE, dtype=np.int64)
    return with_vec(res.ndim, cd, out)


@rule(nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
def _conv_module(ctx, node):
    m = ctx.modules[node.target]
    if not isinstance(node.args[0], fx.Node) or m.padding_mode != "zeros":
        return barrier(ctx, node, "conv with non-zero padding mode")
    transposed = isinstance(m, nn.modules.conv._ConvTransposeNd)

    def set_groups(g):
        m.groups = g
        if transposed:
            m.in_channels, m.out_channels = m.weight.shape[0], m.weight.shape[1] * g
        else:
            m.out_channels, m.in_channels = m.weight.shape[0], m.weight.shape[1] * g

    bias = f"{node.target}.bias" if m.bias is not None else None
    return conv(
        ctx, node, node.args[0], f"{node.target}.weight", bias, m.groups, transposed, set_groups
    )


CONV_FN = {F.conv1d: 6, F.conv2d: 6, F.conv3d: 6, aten.conv1d: 6, aten.conv2d: 6, aten.conv3d: 6}
CONVT_FN = {
    F.conv_transpose1d: 6,
    F.conv_transpose2d: 6,
    F.conv_transpose3d: 6,
    aten.conv_transpose1d: 6,
    aten.conv_transpose2d: 6,
    aten.conv_transpose3d: 6,
}


@rule(*CONV_FN, *CONVT_FN, aten.convolution)
def _conv_fn(ctx, node):
    key = getattr(node.target, "overloadpacket", node.target)
    w, b = param_name(node, arg(node, 1, "weight")), param_name(node, arg(node, 2, "bias"))
    if w is None or (arg(node, 2, "bias") is not None and b is None):
        return barrier(ctx, node, "conv whose weight is not a parameter")
    if key is aten.convolution:
        transposed, gi = bool(arg(node, 6, "transposed")), 8
    else:
        transposed, gi = key in CONVT_FN, (CONV_FN.get(key) or CONVT_FN[key])
    groups = arg(node, gi, "groups", 1)
    return conv(
        ctx,
        node,
        node.args[0],
        w,
        b,
        groups,
        transposed,
        lambda g: set_arg(node, gi, "groups", g) if groups != 1 else None,
    )


# ---- linear -------------------------------------------------------------------------------------


def linear(ctx: Analysis, node: fx.Node, x, w: str, b: str | None):
    W = get_tensor(ctx, w)
    X, t = ctx.atoms(x), tensor_meta(x)
    ctx.probe(x)
    xin = channel_vec(ctx, node, X, X.ndim - 1, t.shape[-1])
    out = ctx.new_source(node, layer_of(w), w, 0, W.shape[0], "linear")
    ctx.param_dim(w, 0, out, "weight")
    ctx.param_dim(w, 1, xin, "weight", consumer=True)
    ctx.param_dim(b, 0, out, "other")
    return with_vec(tensor_meta(node).ndim, tensor_meta(node).ndim - 1, out)


@rule(nn.Linear)
def _linear_module(ctx, node):
    m = ctx.modules[node.target]

    def fix(removed):
        m.out_features, m.in_features = m.weight.shape

    ctx.on_apply(node, fix)
    bias = f"{node.target}.bias" if m.bias is not None else None
    return linear(ctx, node, node.args[0], f"{node.target}.weight", bias)


@rule(F.linear, aten.linear)
def _linear_fn(ctx, node):
    w, b = param_name(node, arg(node, 1, "weight")), param_name(node, arg(node, 2, "bias"))
    bias = arg(node, 2, "bias")
    if w is not None and bias is not None and b is None:
        # a bias computed in forward (EVA's cat(q_bias, zero k_bias, v_bias)): its elements
        # are coupled to the output channels they are added to, and sliced with them
        B = ctx.atoms(bias)
        if B is not None and B.ndim == 1 and len(B) == get_tensor(ctx, w).shape[0]:
            out = linear(ctx, node, node.args[0], w, None)
            ctx.union(out, B)
            return out
    if w is None or (bias is not None and b is None):
        return barrier(ctx, node, "linear whose weight or bias is not a parameter")
    return linear(ctx, node, node.args[0], w, b)


@rule(aten.addmm, torch.addmm)
def _addmm(ctx, node):
    """``addmm(bias, x, W)`` with ``W`` stored ``[in, out]``: Hugging Face's ``Conv1D`` (GPT-2's
    ``c_attn``, ``c_fc``, ``c_proj``) as ``torch.export`` records it."""
    b, x, w = node.args[0], node.args[1], node.args[2]
    wn, bn = param_name(node, w), param_name(node, b)
    t = tensor_meta(x)
    if wn is None or bn is None or t is None or t.ndim != 2:
        return barrier(ctx, node, "addmm whose weight and bias are not parameters")
    W = get_tensor(ctx, wn)
    ctx.probe(x)
    xin = channel_vec(ctx, node, ctx.atoms(x), 1, t.shape[1])
    out = ctx.new_source(node, layer_of(wn), wn, 1, W.shape[1], "linear")
    ctx.param_dim(wn, 0, xin, "weight", consumer=True)
    ctx.param_dim(wn, 1, out, "weight")
    if get_tensor(ctx, bn).ndim == 1:
        ctx.param_dim(bn, 0, out, "other")
    else:
        return barrier(ctx, node, "addmm with a 2-D bias")
    return with_vec(2, 1, out)


@rule(nn.Embedding)
def _embedding(ctx, node):
    m = ctx.modules[node.target]
    w = f"{node.target}.weight"
    out = ctx.new_source(node, node.target, w, 1, m.embedding_dim, "embedding")
    ctx.param_dim(w, 1, out, "weight")

    def fix(removed):
        m.embedding_dim = m.weight.shape[1]

    ctx.on_apply(node, fix)
    nd = tensor_meta(node).ndim
    return with_vec(nd, nd - 1, out)


@rule(F.embedding, aten.embedding)
def _embedding_fn(ctx, node):
    wa = (
        arg(node, 1, "weight")
        if getattr(node.target, "overloadpacket", None) is None
        else arg(node, 0, "weight")
    )
    w = param_name(node, wa)
    if w is None:
        return barrier(ctx, node, "embedding whose table is not a parameter")
    out = ctx.new_source(node, layer_of(w), w, 1, get_tensor(ctx, w).shape[1], "embedding")
    ctx.param_dim(w, 1, out, "weight")
    nd = tensor_meta(node).ndim
    return with_vec(nd, nd - 1, out)
