"""Coupling rules for norms and PReLU: BatchNorm / InstanceNorm, GroupNorm, LayerNorm.

Like the rules in ``layers``, each works for the module, functional and ATen forms.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from fxprune.graph.depgraph import Analysis
from fxprune.graph.layerbase import channel_vec, param_name
from fxprune.graph.rules import arg, barrier, keep_along, rule, set_arg
from fxprune.graph.trace import tensor_meta

aten = torch.ops.aten


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
