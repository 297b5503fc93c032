"""Experts pass: remove whole routed experts from each mixture-of-experts layer.

A mixture-of-experts layer is found from its router: a ``topk`` over the scores of a linear
layer whose weight has one row per expert (``softmax`` / ``sigmoid`` / a dtype cast / an added
per-expert bias may sit between them). The layer's experts are the tensors under the router's
parent module with one entry per expert on dim 0, held by the router or by a module that holds
a 3-D expert parameter (``experts.gate_up_proj [experts, 2 x ffn, hidden]``); a shared expert
(plain Linears) is not routed and stays.

Which experts go is measured on calibration batches by how much the router uses them, summed
over every token's top-k choice: ``"weight"`` (the router scores it gave them: softmax
probabilities in Mixtral / Qwen-MoE / OLMoE) or ``"frequency"`` (how many tokens chose them).
Removing an expert deletes its router row and its weights, so the router picks its top-k among
the rest; the graph's per-expert counts (``histc`` bins of the grouped matmul's token offsets,
``one_hot`` classes) follow. That is exactly the dense model with the removed experts' router
scores at -inf (no token reaches them), which is what the proof compares against
(``verify/reference.py``); against the dense model it is approximate by nature (tokens that
chose a removed expert go to another), so the pass reports the measured output deviation, as
the block pass does. A group-limited router (DeepSeek-V3: ``n_group``, a score correction bias)
is read by ``expert_routing``: every group loses as many experts, the sizes that count experts
follow, and the reference gives the removed experts' bias -inf too.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from fxprune._util import ticking
from fxprune.calibration import Capture, as_batches
from fxprune.errors import ConfigError, NothingToPruneError
from fxprune.graph.depgraph import DependencyGraph
from fxprune.graph.shapeprop import propagate_shapes
from fxprune.passes import ExpertsResult, PassResult, register_pass
from fxprune.passes.blocks import frozen_copy, output_deviation
from fxprune.passes.expert_routing import Routing, balanced, check, resize, routing

aten = torch.ops.aten
CRITERIA = ("weight", "frequency")
# ops between a router's linear layer and its top-k that keep one score per expert
_THROUGH = {
    aten.softmax.int,
    aten._softmax.default,
    aten.sigmoid.default,
    aten.to.dtype,
    aten._to_copy.default,
    aten.type_as.default,
    aten.add.Tensor,
    aten.masked_fill.Scalar,  # a group-limited router's experts outside the chosen groups
    torch.softmax,
    torch.sigmoid,
    F.softmax,
    operator.add,
}
_THROUGH_METHODS = {"softmax", "sigmoid", "float", "to", "type_as", "add", "masked_fill"}
_CASTS = {aten.to.dtype, aten._to_copy.default}
_LINEARS = {aten.linear.default, F.linear}
_TOPK = {aten.topk.default, torch.topk}


@dataclass(frozen=True)
class Experts:
    """Options of the experts pass.

    Args:
        which: fraction of each mixture-of-experts layer's routed experts to remove, in
            [0, 1); or an ``int``: that many experts removed from every such layer.
        criterion: ``"weight"`` or ``"frequency"`` (see the module docstring).
        calibration: batches to measure on; default the example inputs.
    """

    which: float | int = 0.0
    criterion: str = "weight"
    calibration: tuple | None = field(default=None, compare=False, hash=False)
    removed: tuple[tuple[str, tuple[int, ...]], ...] | None = None  # replay: layer -> experts

    name = "experts"

    def __post_init__(self):
        w = self.which
        if isinstance(w, bool) or not (
            (isinstance(w, int) and w >= 0) or (isinstance(w, float) and 0.0 <= w < 1.0)
        ):
            raise ConfigError(
                f"experts={w!r}: give a fraction of each layer's experts in [0, 1) or a number "
                "of experts per layer"
            )
        if self.criterion not in CRITERIA:
            raise ConfigError(f"expert_importance={self.criterion!r}: choose one of {CRITERIA}")


@dataclass
class MoELayer:
    """One mixture-of-experts layer of the graph."""

    path: str  # the module holding router and experts (``model.layers.0.mlp``)
    router: str  # the router's weight, one row per expert
    topk: fx.Node
    k: int
    n: int  # experts
    tensors: list[str]  # every tensor with one entry per expert on dim 0 (the router's first)
    routing: Routing  # groups, the sizes that count experts, per-expert score biases


def _is_through(n: fx.Node) -> bool:
    if n.op == "call_function":
        return n.target in _THROUGH
    return n.op == "call_method" and n.target in _THROUGH_METHODS


def _router_weight(gm: fx.GraphModule, n) -> str | None:
    """The weight of the linear layer whose scores reach a top-k through ``n``."""
    while isinstance(n, fx.Node):
        if n.op == "call_function" and n.target in _LINEARS:
            w = n.args[1] if len(n.args) > 1 else n.kwargs.get("weight")
            while isinstance(w, fx.Node) and w.op == "call_function" and w.target in _CASTS:
                w = w.args[0]  # DeepSeek-V3: linear(x.float(), weight.float())
            return w.target if isinstance(w, fx.Node) and w.op == "get_attr" else None
        if n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.Linear):
            return f"{n.target}.weight"
        if not _is_through(n):
            return None
        n = n.args[0]
    return None


def _tensor(gm: nn.Module, name: str) -> torch.Tensor:
    owner, _, attr = name.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, attr)


def _expert_tensors(gm: fx.GraphModule, path: str, router: str, n: int) -> list[str]:
    """The router's per-expert tensors, then those of every module under ``path`` that holds
    a 3-D parameter with ``n`` experts on dim 0 (a shared expert's Linears do not)."""
    router_mod = router.rpartition(".")[0]
    out = [router]
    for name, mod in gm.get_submodule(path).named_modules(prefix=path):
        own = [
            (k, t) for k, t in (*mod._parameters.items(), *mod._buffers.items()) if t is not None
        ]
        experts = any(t.ndim == 3 and t.shape[0] == n for _, t in own)
        if name == router_mod or experts:
            out += [
                f"{name}.{k}"
                for k, t in own
                if t.ndim >= 1 and t.shape[0] == n and f"{name}.{k}" != router
            ]
    return out


def find_moe(gm: fx.GraphModule) -> list[MoELayer]:
    """Every mixture-of-experts layer: a top-k over a linear router's per-expert scores."""
    layers = []
    for node in gm.graph.nodes:
        is_topk = (node.op == "call_function" and node.target in _TOPK) or (
            node.op == "call_method" and node.target == "topk"
        )
        if not is_topk:
            continue
        router = _router_weight(gm, node.args[0])
        if router is None:
            continue
        w = _tensor(gm, router)
        k = node.args[1] if len(node.args) > 1 else node.kwargs.get("k")
        path = router.rpartition(".")[0].rpartition(".")[0]
        if w.ndim != 2 or not isinstance(k, int) or not path:
            continue
        tensors = _expert_tensors(gm, path, router, w.shape[0])
        if len(tensors) > 1:  # a router with experts behind it (not a plain top-k of a Linear)
            r = routing(gm, router, node, w.shape[0])
            layers.append(MoELayer(path, router, node, k, w.shape[0], tensors, r))
    return layers


def expert_scores(gm, layers: list[MoELayer], batches, criterion: str) -> dict[str, np.ndarray]:
    """Per layer, how much the router used each expert over the calibration batches."""
    totals = {m.path: np.zeros(m.n) for m in layers}
    with torch.no_grad():
        for b in ticking(batches, "scoring experts"):
            cap = Capture(gm, {m.topk.name for m in layers})
            cap.run(*b)
            for m in layers:
                values, idx = cap.seen[m.topk.name][0], cap.seen[m.topk.name][1]
                w = torch.ones_like(values) if criterion == "frequency" else values
                flat = torch.zeros(m.n, dtype=torch.float64)
                flat.index_add_(0, idx.reshape(-1).long(), w.reshape(-1).double())
                totals[m.path] += flat.numpy()
    return totals


def _choose(cfg: Experts, layers, gm, batches) -> tuple[dict[str, list[int]], dict]:
    if cfg.removed is not None:
        given = dict(cfg.removed)
        unknown = sorted(set(given) - {m.path for m in layers})
        if unknown:
            raise ConfigError(f"experts: {unknown[:3]} are not mixture-of-experts layers here")
        removed = {p: sorted(int(e) for e in v) for p, v in given.items()}
        for m in layers:
            check(m.routing, m.path, removed.get(m.path, []), m.k)
        return removed, {}
    scores = expert_scores(gm, layers, batches, cfg.criterion)
    removed = {}
    for m in layers:
        count = cfg.which if isinstance(cfg.which, int) else int(round(cfg.which * m.n))
        if m.n - count < m.k:
            raise ConfigError(
                f"experts={cfg.which!r}: {m.path} has {m.n} experts and routes each token to "
                f"{m.k}; at least {m.k} must stay"
            )
        removed[m.path] = balanced(m.routing, m.path, scores[m.path], count)  # least used
        check(m.routing, m.path, removed[m.path], m.k)
    return removed, {p: [round(float(v), 6) for v in s] for p, s in scores.items()}


def _slice(gm: fx.GraphModule, name: str, keep: torch.Tensor) -> None:
    owner, _, attr = name.rpartition(".")
    mod = gm.get_submodule(owner) if owner else gm
    t = getattr(mod, attr)
    new = t.detach().index_select(0, keep).contiguous()
    if attr in mod._parameters:
        mod._parameters[attr] = nn.Parameter(new, requires_grad=t.requires_grad)
    else:
        mod._buffers[attr] = new


def _in_layer(n: fx.Node, path: str) -> bool:
    stack = n.meta.get("nn_module_stack") or {}
    return any(isinstance(v, tuple) and v and v[0] == path for v in stack.values())


def _recount(gm: fx.GraphModule, m: MoELayer, kept: int) -> None:
    """Per-expert counts the graph baked in: histc bins (token offsets of a grouped matmul)
    and one_hot classes (the experts, and transformers' extra class for dropped tokens)."""
    for n in gm.graph.nodes:
        if n.op != "call_function" or not _in_layer(n, m.path):
            continue
        if n.target in (aten.histc.default, torch.histc) and n.args[1:4] == (m.n, 0, m.n - 1):
            n.args = (n.args[0], kept, 0, kept - 1, *n.args[4:])
        elif n.target in (aten.one_hot.default, F.one_hot) and n.args[1] in (m.n, m.n + 1):
            n.args = (n.args[0], n.args[1] - m.n + kept, *n.args[2:])


@register_pass(
    "experts",
    Experts,
    lambda e: Experts(removed=tuple((k, tuple(v)) for k, v in e["removed"].items())),
)
def prune_experts(graph: DependencyGraph, cfg: Experts, args: tuple) -> PassResult:
    """Remove whole routed experts from ``graph.gm`` (in place); report the output deviation."""
    gm = graph.gm
    layers = find_moe(gm)
    if not layers:
        raise NothingToPruneError(
            f"experts={cfg.which!r}: no mixture-of-experts layer found (a top-k over a linear "
            "router's per-expert scores, with 3-D expert parameters beside it)"
        )
    batches = as_batches(cfg.calibration, args)
    removed, scores = _choose(cfg, layers, gm, batches)
    removed = {p: v for p, v in removed.items() if v}
    if not removed:
        n = min(m.n for m in layers)
        raise NothingToPruneError(
            f"experts={cfg.which!r} removes no expert (layers of {n} experts round it to 0): "
            f"give at least {1 / n:.3g} or an expert count per layer"
        )
    before = frozen_copy(gm)
    keeps, unrouted = {}, {}
    for m in layers:
        gone = removed.get(m.path)
        if not gone:
            continue
        keep = np.ones(m.n, dtype=bool)
        keep[gone] = False
        idx = torch.as_tensor(np.flatnonzero(keep))
        for name in m.tensors:
            _slice(gm, name, idx)
            keeps[name] = {0: keep}
        unrouted[m.router] = list(gone)
        for bias in m.routing.bias_names:  # a score bias: -inf in the reference, as the logits
            unrouted[bias] = list(gone)
        _recount(gm, m, int(keep.sum()))
        resize(m.routing, int(keep.sum()))
    gm.recompile()
    propagate_shapes(gm, args)
    return ExpertsResult(
        "experts",
        changed=True,
        plan={"name": "experts", "removed": removed},
        keeps=keeps,
        unrouted=unrouted,
        removed=removed,
        experts_before={m.path: m.n for m in layers},
        scores=scores,
        criterion=cfg.criterion if scores else None,
        output_deviation=output_deviation(before, gm, batches),
    )
