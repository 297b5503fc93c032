"""Parameter and MAC counts per layer, read off the graph's fake shapes (no forward pass)."""

from __future__ import annotations

import math
from collections import defaultdict

import torch
import torch.fx as fx

from fxprune.graph.trace import tensor_meta
from fxprune.graph.weighted import weighted_layer

aten = torch.ops.aten


def node_macs(gm: fx.GraphModule, node: fx.Node) -> tuple[str, int] | None:
    """(layer, multiply-accumulates) of one conv / linear / matmul node."""
    out = tensor_meta(node)
    if out is None:
        return None
    wl = weighted_layer(gm, node)
    if wl is not None:
        w = gm.get_parameter(wl.param)
        if wl.kind == "conv" and wl.transposed:  # each input element meets a [Cout/g, k..] slice
            return wl.layer, tensor_meta(node.args[0]).numel() * math.prod(w.shape[1:])
        if wl.kind == "conv":
            return wl.layer, out.numel() * math.prod(w.shape[1:])
        return wl.layer, out.numel() * w.shape[wl.reduce_dim]
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
