"""Parameter and MAC counts per layer, read off the graph's fake shapes (no forward pass)."""

from __future__ import annotations

import math
from collections import defaultdict

import torch
import torch.fx as fx
import torch.nn as nn

from fxprune.graph.trace import tensor_meta

aten = torch.ops.aten
_CONV = {
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
}


def _weight_of(gm: fx.GraphModule, node: fx.Node):
    """(layer name, weight tensor, kind) for conv/linear nodes in either capture form."""
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        if type(m) in _CONV or isinstance(m, nn.modules.conv._ConvNd):
            return node.target, m.weight, "convT" if m.transposed else "conv"
        if isinstance(m, nn.Linear):
            return node.target, m.weight, "linear"
        return None
    if node.op != "call_function":
        return None
    name = str(getattr(node.target, "overloadpacket", getattr(node.target, "__name__", "")))
    name = name.split(".")[-1]
    w = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
    if not (isinstance(w, fx.Node) and w.op == "get_attr"):
        return None
    layer = w.target.rsplit(".", 1)[0]
    if name in ("conv1d", "conv2d", "conv3d"):
        return layer, gm.get_parameter(w.target), "conv"
    if name.startswith("conv_transpose"):
        return layer, gm.get_parameter(w.target), "convT"
    if name == "linear":
        return layer, gm.get_parameter(w.target), "linear"
    return None


def node_macs(gm: fx.GraphModule, node: fx.Node) -> tuple[str, int] | None:
    """(layer, multiply-accumulates) of one conv / linear / matmul node."""
    out = tensor_meta(node)
    if out is None:
        return None
    found = _weight_of(gm, node)
    if found is not None:
        layer, w, kind = found
        if kind == "conv":
            return layer, out.numel() * math.prod(w.shape[1:])
        if kind == "convT":
            x = tensor_meta(node.args[0])
            return layer, x.numel() * math.prod(w.shape[1:])
        return layer, out.numel() * w.shape[1]
    name = str(
        getattr(node.target, "overloadpacket", getattr(node.target, "__name__", node.target))
    )
    if name.split(".")[-1] in ("matmul", "bmm", "mm") and node.op in (
        "call_function",
        "call_method",
    ):
        a = tensor_meta(node.args[0])
        return node.name, out.numel() * (a.shape[-1] if a is not None else 1)
    return None


def layer_stats(gm: fx.GraphModule) -> dict[str, dict[str, int]]:
    """``{layer: {"params": n, "macs": n}}`` for every module with parameters or MACs."""
    rows: dict[str, dict[str, int]] = defaultdict(lambda: {"params": 0, "macs": 0})
    for name, mod in gm.named_modules():
        n = sum(p.numel() for p in mod.parameters(recurse=False))
        if n:
            rows[name]["params"] += n
    for node in gm.graph.nodes:
        found = node_macs(gm, node)
        if found:
            rows[found[0]]["macs"] += int(found[1])
    return dict(rows)
