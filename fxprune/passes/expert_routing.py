"""What a router computes between its linear layer and its top-k, for the experts pass.

A group-limited router (DeepSeek-V3's ``DeepseekV3TopkRouter``) splits the experts into
``n_group`` equal groups: its scores (``sigmoid(logits) + e_score_correction_bias``) are viewed
``(-1, n_group, n // n_group)``, each group is scored by its top-``k_in`` experts, the top
``topk_group`` groups are kept (a mask expanded back to ``(-1, n)``) and the final top-k picks
among their experts. The graph bakes ``n`` and ``n // n_group`` into those view / expand /
reshape sizes; after a removal they take the kept counts (:func:`resize`).

Removing experts keeps the layout valid only when every group loses as many (``n_group`` still
divides the count, and group ``g``'s kept experts are group ``g`` of the smaller router), each
group keeps its ``k_in`` and the chosen groups still hold the top-k: :func:`check` refuses
anything else with a typed error naming why. A per-expert score bias added on the way (the
correction bias) is sliced with the router rows, and the proof's reference gives its removed
entries -inf (``bias_names``), which with the balanced removal makes the dense model route
exactly as the pruned one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.fx as fx

from fxprune.errors import ConfigError

aten = torch.ops.aten
_SIZED = {aten.view.default, aten.reshape.default, aten.expand.default, aten._unsafe_view.default}
_SIZED_METHODS = {"view", "reshape", "expand"}
_TOPK = {aten.topk.default, torch.topk}


@dataclass
class Routing:
    """The router of one layer, read off the graph between its weight and its top-k."""

    n: int  # experts
    groups: int = 1  # n_group (1: no group limit, or one group)
    k_in: int = 0  # top-k inside a group that scores it (0: none)
    groups_k: int = 0  # groups chosen per token (0: none)
    sizes: list[tuple[fx.Node, int, int]] = field(default_factory=list)  # node, index, divisor
    bias_names: list[str] = field(default_factory=list)  # per-expert score biases (-inf: gone)


def _size_list(node: fx.Node):
    """``(sizes, rebuild)`` of a view / reshape / expand node; None for any other node."""
    if node.op == "call_function" and node.target in _SIZED:
        return list(node.args[1]), lambda s: (node.args[0], s, *node.args[2:])
    if node.op == "call_method" and node.target in _SIZED_METHODS:
        if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)):
            return list(node.args[1]), lambda s: (node.args[0], s)
        return list(node.args[1:]), lambda s: (node.args[0], *s)
    return None


def _region(topk: fx.Node, weight: str) -> list[fx.Node]:
    """Nodes on a path from the router weight to its top-k, in graph order."""
    up, todo = set(), [topk]
    while todo:
        n = todo.pop()
        if n in up:
            continue
        up.add(n)
        todo.extend(n.all_input_nodes)
    owner = weight.rpartition(".")[0]  # an fx capture calls the router's Linear as a module
    start = [
        n
        for n in up
        if (n.op == "get_attr" and n.target == weight)
        or (n.op == "call_module" and n.target == owner)
    ]
    down, todo = set(), list(start)
    while todo:
        n = todo.pop()
        if n in down or n not in up:
            continue
        down.add(n)
        todo.extend(n.users)
    return [n for n in topk.graph.nodes if n in down]


def routing(gm: fx.GraphModule, weight: str, topk: fx.Node, n: int) -> Routing:
    """Read the router whose weight is ``weight`` (``n`` rows) and whose final top-k is
    ``topk``; raises ``ConfigError`` where it groups the experts in a way not followed."""
    r = Routing(n)
    found = set()
    for node in _region(topk, weight):
        val = node.meta.get("val")
        is_topk = node.target in _TOPK or (node.op == "call_method" and node.target == "topk")
        if node is not topk and is_topk and node.args:
            shape = tuple(getattr(node.args[0].meta.get("val"), "shape", ()))
            k = node.args[1] if len(node.args) > 1 else node.kwargs.get("k")
            if len(shape) >= 2 and shape[-2] * shape[-1] == n:
                r.k_in = k
            else:
                r.groups_k = k
        if node.target in (aten.add.Tensor, "add"):
            r.bias_names += [
                b.target
                for b in node.args
                if isinstance(b, fx.Node) and b.op == "get_attr"
                and tuple(getattr(b.meta.get("val"), "shape", ())) == (n,)
            ]  # fmt: skip
        sizes = _size_list(node)
        if sizes is None or not isinstance(val, torch.Tensor) or val.ndim < 1:
            continue
        shape = tuple(val.shape)
        if shape[-1] == n:
            r.sizes.append((node, len(sizes[0]) - 1, 1))
        elif len(shape) >= 2 and shape[-2] > 1 and shape[-2] * shape[-1] == n:
            found.add(shape[-2])
            r.sizes.append((node, len(sizes[0]) - 1, shape[-2]))
    if len(found) > 1:
        raise ConfigError(
            f"experts=: the router {weight} views its {n} experts in groups of "
            f"{sorted(n // g for g in found)}: routing groups the analysis cannot follow"
        )
    r.groups = found.pop() if found else 1
    return r


def check(r: Routing, path: str, gone: list[int], k: int) -> None:
    """Raise ``ConfigError`` naming why removing ``gone`` would break ``r``'s routing: groups
    losing different counts, a group left with fewer than its scoring top-``k_in``, or the
    chosen groups holding fewer than the final top-``k``."""
    per = r.n // r.groups
    counts = np.bincount(np.asarray(gone, dtype=np.int64) // per, minlength=r.groups)
    if (counts != counts[0]).any():
        raise ConfigError(
            f"experts: {path} routes in {r.groups} groups of {per} experts (n_group); removing "
            f"{counts.tolist()} per group would break the groups: remove as many from each"
        )
    kept = per - int(counts[0])
    if kept < r.k_in:
        raise ConfigError(
            f"experts: {path} scores each of its {r.groups} expert groups by its top {r.k_in} "
            f"experts; {kept} per group would be left: at least {r.k_in} must stay in each"
        )
    if r.groups_k and r.groups_k * kept < k:
        raise ConfigError(
            f"experts: {path} routes each token to {k} experts of its {r.groups_k} best groups; "
            f"{kept} per group would be left: they must hold {k}"
        )


def balanced(r: Routing, path: str, scores: np.ndarray, count: int) -> list[int]:
    """The ``count`` least used experts, as many from every group of a grouped router."""
    if r.groups == 1:
        return sorted(int(e) for e in np.argsort(scores, kind="stable")[:count])
    if count % r.groups:
        raise ConfigError(
            f"experts={count}: {path} routes in {r.groups} groups (n_group); the groups stay "
            f"equal only when every group loses as many: give a multiple of {r.groups}"
        )
    per = r.n // r.groups
    out = []
    for g in range(r.groups):
        order = np.argsort(scores[g * per : (g + 1) * per], kind="stable")
        out += [int(g * per + e) for e in order[: count // r.groups]]
    return sorted(out)


def resize(r: Routing, kept: int) -> None:
    """Give the router's view / expand / reshape sizes the kept counts (``n`` -> ``kept``,
    ``n // n_group`` -> ``kept // n_group``); a size read at run time (-1) follows by itself."""
    for node, i, div in r.sizes:
        sizes, rebuild = _size_list(node)
        if sizes[i] == r.n // div:
            sizes[i] = kept // div
            node.args = rebuild(sizes)
