"""Coupling rules for layers with weights: conv, linear, norms, PReLU, embedding.

Each rule works for the module form (``call_module`` on ``nn.Conv2d``), the functional form with
``get_attr`` weights (``F.conv2d``) and the ATen form that ``torch.export`` produces
(``aten.conv2d.default``), so both capture paths share one set of coupling decisions.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

from fxprune.errors import UnsupportedModelError
from fxprune.graph.depgraph import NONE, Analysis
from fxprune.graph.rules import arg, barrier, keep_along, rule, set_arg
from fxprune.graph.trace import tensor_meta

aten = torch.ops.aten


def channel_vec(ctx: Analysis, node: fx.Node, X: np.ndarray, d: int, n: int) -> np.ndarray:
    """Atoms along dim ``d`` as a vector of length ``n``; atoms on other dims are blocked."""
    others = [k for k in range(X.ndim) if k != d and X.shape[k] > 1]
    if others:
        ctx.block(X, node, "channels spread over more than one dim of a layer input")
        return np.full(n, NONE, dtype=np.int64)
    if X.shape[d] == 1:
        return (
            np.full(n, int(X.reshape(-1)[0]), dtype=np.int64)
            if n == 1
            else np.full(n, NONE, dtype=np.int64)
        )
    return X.reshape(-1).astype(np.int64)


def with_vec(ndim: int, d: int, vec: np.ndarray) -> np.ndarray:
    shape = [1] * ndim
    shape[d] = vec.size
    return vec.reshape(shape)


def param_name(node: fx.Node, a) -> str | None:
    """Name of the parameter behind a get_attr argument, else None."""
    return a.target if isinstance(a, fx.Node) and a.op == "get_attr" else None


def layer_of(param: str) -> str:
    return param.rsplit(".", 1)[0] if "." in param else param


def get_tensor(ctx: Analysis, name: str) -> torch.Tensor:
    try:
        return ctx.gm.get_parameter(name)
    except AttributeError:
        pass
    try:
        return ctx.gm.get_buffer(name)
    except AttributeError:
        owner, _, attr = name.rpartition(".")
        mod = ctx.gm.get_submodule(owner) if owner else ctx.gm
        if parametrize.is_parametrized(mod, attr):
            raise UnsupportedModelError(
                f"'{owner}': its {attr} is computed by a parametrization (weight_norm / "
                "spectral_norm) that torch.fx does not look into; use mode='export' (its "
                "channels are kept, the rest prunes) or torch.nn.utils.parametrize."
                "remove_parametrizations first"
            ) from None
        raise


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
    if w is None or (arg(node, 2, "bias") is not None and b is None):
        return barrier(ctx, node, "linear whose weight is not a parameter")
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


# ---- normalisation ------------------------------------------------------------------------------


def per_channel(ctx: Analysis, node: fx.Node, x, params, cd: int = 1):
    """Ops that treat each channel on dim ``cd`` independently (BatchNorm, InstanceNorm, PReLU)."""
    X, t = ctx.atoms(x), tensor_meta(x)
    if t.ndim <= cd:
        cd = 0
    vec = channel_vec(ctx, node, X, cd, t.shape[cd])
    for p, role in params:
        ctx.param_dim(p, 0, vec, role)
    return X, vec


@rule(nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)
def _bn_module(ctx, node):
    m = ctx.modules[node.target]
    names = [
        (f"{node.target}.{p}", "norm" if p == "weight" else "other")
        for p in ("weight", "bias", "running_mean", "running_var")
        if getattr(m, p, None) is not None
    ]
    X, vec = per_channel(ctx, node, node.args[0], names)

    def fix(removed):
        m.num_features = int((~removed[vec]).sum())

    ctx.on_apply(node, fix)
    return X


@rule(F.batch_norm, F.instance_norm, aten.batch_norm, aten.instance_norm)
def _bn_fn(ctx, node):
    key = getattr(node.target, "overloadpacket", node.target)
    if key in (aten.batch_norm, aten.instance_norm):
        order = ["weight", "bias", "running_mean", "running_var"]  # input, w, b, rm, rv
    elif key is F.batch_norm:
        order = ["running_mean", "running_var", "weight", "bias"]
    else:  # F.instance_norm(input, running_mean, running_var, weight, bias)
        order = ["running_mean", "running_var", "weight", "bias"]
    params = []
    for i, role in enumerate(order):
        a = arg(node, 1 + i, role)
        if a is None:
            continue
        name = param_name(node, a)
        if name is None:
            return barrier(ctx, node, "norm whose statistics are not parameters")
        params.append((name, "norm" if role == "weight" else "other"))
    X, _ = per_channel(ctx, node, node.args[0], params)
    return X


def group_norm(ctx: Analysis, node: fx.Node, x, groups: int, params, set_groups):
    X, t = ctx.atoms(x), tensor_meta(x)
    vec = channel_vec(ctx, node, X, 1, t.shape[1])
    per = t.shape[1] // groups
    heads = np.repeat(vec[::per], per)
    ctx.union(vec, heads)  # statistics span a group: remove whole groups
    if ((vec < 0) != (heads < 0)).any():
        ctx.block(vec, node, "GroupNorm group mixes removable and fixed channels")
    for p, role in params:
        ctx.param_dim(p, 0, vec, role)
    ctx.on_apply(node, lambda removed: set_groups(int((~removed[vec[::per]]).sum())))
    return X


@rule(nn.GroupNorm)
def _gn_module(ctx, node):
    m = ctx.modules[node.target]
    params = (
        [(f"{node.target}.weight", "norm"), (f"{node.target}.bias", "other")] if m.affine else []
    )

    def set_groups(g):
        m.num_channels = m.num_channels // m.num_groups * g
        m.num_groups = g

    return group_norm(ctx, node, node.args[0], m.num_groups, params, set_groups)


@rule(F.group_norm, aten.group_norm)
def _gn_fn(ctx, node):
    params = []
    for i, role in ((2, "norm"), (3, "other")):
        a = arg(node, i, "weight" if i == 2 else "bias")
        if a is not None:
            if param_name(node, a) is None:
                return barrier(ctx, node, "GroupNorm affine parameters are not parameters")
            params.append((a.target, role))
    return group_norm(
        ctx,
        node,
        node.args[0],
        arg(node, 1, "num_groups"),
        params,
        lambda g: set_arg(node, 1, "num_groups", g),
    )


def layer_norm(ctx: Analysis, node: fx.Node, x, ndims: int, params, set_shape):
    """LayerNorm over the last ``ndims`` dims: exact only when none of them carries channels."""
    X, t = ctx.atoms(x), tensor_meta(x)
    normed = list(range(t.ndim - ndims, t.ndim))
    if not any(X.shape[d] > 1 for d in normed):
        return X
    if not ctx.approximate(X, node, "LayerNorm statistics span the channel dim: inexact"):
        return X
    for p, role in params:
        for k, d in enumerate(normed):
            if X.shape[d] > 1:
                ctx.param_dim(p, k, channel_vec(ctx, node, X, d, t.shape[d]), role)

    def fix(removed):
        set_shape(
            [
                int(keep_along(removed, X, d).sum()) if X.shape[d] > 1 else int(t.shape[d])
                for d in normed
            ]
        )

    ctx.on_apply(node, fix)
    return X


@rule(nn.LayerNorm)
def _ln_module(ctx, node):
    m = ctx.modules[node.target]
    params = [
        (f"{node.target}.{p}", "norm" if p == "weight" else "other")
        for p in ("weight", "bias")
        if getattr(m, p, None) is not None
    ]

    def set_shape(s):
        m.normalized_shape = tuple(s)

    return layer_norm(ctx, node, node.args[0], len(m.normalized_shape), params, set_shape)


@rule(F.layer_norm, aten.layer_norm)
def _ln_fn(ctx, node):
    shape = arg(node, 1, "normalized_shape")
    params = []
    for i, role in ((2, "norm"), (3, "other")):
        a = arg(node, i, "weight" if i == 2 else "bias")
        if a is not None:
            if param_name(node, a) is None:
                return barrier(ctx, node, "LayerNorm affine parameters are not parameters")
            params.append((a.target, role))
    return layer_norm(
        ctx,
        node,
        node.args[0],
        len(shape),
        params,
        lambda s: set_arg(node, 1, "normalized_shape", list(s)),
    )


@rule(nn.PReLU)
def _prelu(ctx, node):
    m = ctx.modules[node.target]
    if m.num_parameters == 1:
        return ctx.atoms(node.args[0])
    X, vec = per_channel(ctx, node, node.args[0], [(f"{node.target}.weight", "norm")])

    def fix(removed):
        m.num_parameters = int((~removed[vec]).sum())

    ctx.on_apply(node, fix)
    return X


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
