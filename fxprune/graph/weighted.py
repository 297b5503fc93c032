"""Recognise Conv / Linear nodes and their weight in every capture form (module, functional,
ATen), for the passes and counters that work on weights rather than on channel coupling."""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx
import torch.nn as nn

_CONV_FNS = {
    "conv1d",
    "conv2d",
    "conv3d",
    "conv_transpose1d",
    "conv_transpose2d",
    "conv_transpose3d",
}


@dataclass(frozen=True)
class WeightedLayer:
    layer: str  # module name
    param: str  # the weight's qualified name
    kind: str  # "conv" or "linear"
    groups: int
    transposed: bool
    reduce_dim: int = 1  # the weight dim the layer sums over (0 for addmm's [in, out] weight)


def weighted_layer(gm: fx.GraphModule, node: fx.Node) -> WeightedLayer | None:
    """The Conv / Linear behind ``node``, or None."""
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        if isinstance(m, nn.Linear):
            return WeightedLayer(node.target, f"{node.target}.weight", "linear", 1, False)
        if isinstance(m, nn.modules.conv._ConvNd):
            return WeightedLayer(
                node.target, f"{node.target}.weight", "conv", m.groups, m.transposed
            )
        return None
    if node.op != "call_function":
        return None
    key = getattr(node.target, "overloadpacket", node.target)
    name = getattr(key, "__name__", str(key)).split(".")[-1]
    if name == "addmm":  # addmm(bias, x, W[in, out]): Hugging Face Conv1D under torch.export
        w = node.args[2] if len(node.args) > 2 else None
        if isinstance(w, fx.Node) and w.op == "get_attr":
            return WeightedLayer(w.target.rsplit(".", 1)[0], w.target, "linear", 1, False, 0)
        return None
    w = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
    if not (isinstance(w, fx.Node) and w.op == "get_attr"):
        return None
    layer = w.target.rsplit(".", 1)[0]
    if name == "linear":
        return WeightedLayer(layer, w.target, "linear", 1, False)
    if name in _CONV_FNS:
        groups = node.args[6] if len(node.args) > 6 else node.kwargs.get("groups", 1)
        return WeightedLayer(layer, w.target, "conv", groups, name.startswith("conv_transpose"))
    return None
