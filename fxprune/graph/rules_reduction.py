"""Coupling rules for operators that combine values over some dims: pooling and resizing, padding,
softmax / cumsum along a dim, and reductions. A dim they combine over may carry no channels: the
channels there are kept."""

from __future__ import annotations

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from fxprune.graph.depgraph import NONE
from fxprune.graph.rules_registry import arg, barrier, none_output, rule

aten = torch.ops.aten


def _spatial(ctx, node, x, spatial_from: int = 2):
    """Ops that mix values only within each channel's spatial extent (pooling, resizing).

    Atoms that vary along a spatial dim (a parameter used as a tensor, one atom per element:
    BEiT's relative position bias table, resized per head) are mixed within each channel, so
    they go together: one unit per channel, which the channel's consumers then decide."""
    X = ctx.atoms(x)
    for d in range(spatial_from, X.ndim):
        if X.shape[d] > 1:
            first = X.take([0], axis=d)
            ctx.union(X, first)
            X = first
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


def _is_mean(node) -> bool:
    t = node.target
    name = t if isinstance(t, str) else str(getattr(getattr(t, "overloadpacket", t), "__name__", t))
    return name.split(".")[-1] == "mean"


def _owner(node) -> str:
    """`` in <module> (its class)`` from the capture's module stack, where it has one."""
    stack = list((node.meta.get("nn_module_stack") or {}).values())
    if not stack:
        return ""
    path, cls = stack[-1]
    return f" in {path} ({str(getattr(cls, '__name__', cls)).split('.')[-1]})"


def _is_softmax(ctx, node) -> bool:
    if node.op == "call_module":
        return isinstance(ctx.modules[node.target], nn.Softmax)
    name = str(getattr(node.target, "__name__", node.target))
    return "softmax" in name and "log" not in name




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
        if _is_mean(node) and dims == [X.ndim - 1]:
            # a norm written out (RMSNorm: x * rsqrt(mean(x^2))): OLMo2's q_norm / k_norm span
            # every head, so removing one changes the statistics: approximate, not exact
            ctx.approximate(X, node, f"a norm's mean over the channel dim{_owner(node)}: inexact")
        else:
            ctx.block(X, node, "reduces over a dim that carries channels")
        X = np.full(X.shape, NONE)  # the statistic carries no channel
    out = X
    for d in reversed(dims):
        out = out.take([0], axis=d)
        if not keep:
            out = out.reshape(out.shape[:d] + out.shape[d + 1 :])
    v = node.meta.get("val")
    if isinstance(v, (tuple, list)):  # torch.max(x, dim) -> (values, indices)
        return (out, out)
    return out
