"""Parameter and MAC counts per layer, read off the graph's fake shapes (no forward pass)."""

from __future__ import annotations

import math
import re
from collections import defaultdict, deque

import torch
import torch.fx as fx

from fxprune.graph.trace import tensor_meta
from fxprune.graph.weighted import weighted_layer

aten = torch.ops.aten


def _owner(name: str) -> str:
    """The layer a module or parameter belongs to: a parametrization's modules and tensors
    (``conv.parametrizations.weight.original0``) count for the layer they parametrize."""
    head, sep, _ = ("." + name).partition(".parametrizations.")
    return head[1:] if sep else name


def _weight(gm: fx.GraphModule, name: str) -> torch.Tensor:
    """A layer's weight by qualified name: a parameter, a buffer (a fixed filter) or the value a
    parametrization computes (``weight_norm``: ``conv.weight`` is a property, not a parameter)."""
    owner, _, attr = name.rpartition(".")
    with torch.no_grad():
        return getattr(gm.get_submodule(owner) if owner else gm, attr)


def _computed_weight(node: fx.Node) -> tuple[str, str, bool, torch.Tensor] | None:
    """(layer, kind, transposed, weight) of a conv / linear call whose weight the graph computes
    from parameters alone (a parametrization under torch.export), named after the parameter."""
    key = getattr(node.target, "overloadpacket", node.target)
    fn = getattr(key, "__name__", str(key)).split(".")[-1]
    if node.op != "call_function" or not re.fullmatch(r"linear|conv(_transpose)?[123]d", fn):
        return None
    w = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
    wt = tensor_meta(w)
    if wt is None:
        return None
    seen, todo, attrs = set(), deque([w]), []
    while todo:
        n = todo.popleft()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "placeholder":
            return None  # a weight computed from the input is not a layer's weight
        if n.op == "get_attr":
            attrs.append(n.target)
        todo += n.all_input_nodes
    if not attrs:
        layer = node.name
    elif _owner(attrs[0]) != attrs[0]:
        layer = _owner(attrs[0])  # conv.parametrizations.weight.original0 -> conv
    else:
        layer = attrs[0].rpartition(".")[0] or attrs[0]
    kind = "linear" if fn == "linear" else "conv"
    return layer, kind, fn.startswith("conv_transpose"), wt


def node_macs(gm: fx.GraphModule, node: fx.Node) -> tuple[str, int] | None:
    """(layer, multiply-accumulates) of one conv / linear / matmul node."""
    out = tensor_meta(node)
    if out is None:
        return None
    wl = weighted_layer(gm, node)
    found = (
        (wl.layer, wl.kind, wl.transposed, _weight(gm, wl.param))
        if wl is not None
        else _computed_weight(node)
    )
    if found is not None:
        layer, kind, transposed, w = found
        if kind == "conv" and transposed:  # each input element meets a [Cout/g, k..] slice
            return layer, tensor_meta(node.args[0]).numel() * math.prod(w.shape[1:])
        if kind == "conv":
            return layer, out.numel() * math.prod(w.shape[1:])
        return layer, out.numel() * w.shape[wl.reduce_dim if wl is not None else 1]
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
            rows[_owner(name)]["params"] += n
    for node in gm.graph.nodes:
        found = node_macs(gm, node)
        if found:
            rows[found[0]]["macs"] += int(found[1])
    return dict(rows)
