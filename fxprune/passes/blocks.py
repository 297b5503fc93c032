"""Block pass: remove whole residual blocks (transformer layers) from the traced graph.

A block is one child of the model's main stack of repeated modules (``encoder.layer.3``,
``layers.7``, ``h.2``, ``blocks.5``), found from the ``nn_module_stack`` that both capture paths
record on every node. Removing it rewires the block's output to its hidden-state input (the one
external input with the output's shape) and deletes the nodes and parameters inside it.

Which blocks go, when a count is given, is measured on calibration batches: ``"cosine"`` (the
seed guide's criterion: 1 - cosine similarity between a block's input and output; a block that
barely turns the hidden state matters least) or ``"l2"`` (``||out - in|| / ||in||``). Removing a
block is not exact: the pass reports the measured deviation of the model output, and the
equivalence proof compares against the dense model with the same blocks bypassed.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from fxprune._util import ticking
from fxprune.calibration import Capture, as_batches
from fxprune.errors import ConfigError
from fxprune.graph.depgraph import DependencyGraph
from fxprune.graph.shapeprop import propagate_shapes
from fxprune.graph.trace import tensor_meta
from fxprune.passes import BlocksResult, PassResult, register_pass

CRITERIA = ("cosine", "l2")


@dataclass(frozen=True)
class Blocks:
    """Options of the block pass.

    Args:
        which: a number of blocks to remove (chosen by ``criterion``), or the blocks themselves:
            indices into the main stack or module names.
        criterion: ``"cosine"`` or ``"l2"`` (see the module docstring).
        calibration: batches (each a tensor or a tuple of tensors) to measure on; default the
            example inputs.
        min_blocks: never keep fewer blocks than this.
    """

    which: int | tuple[int | str, ...] = 0
    criterion: str = "cosine"
    calibration: tuple | None = field(default=None, compare=False, hash=False)
    min_blocks: int = 1

    name = "blocks"

    def __post_init__(self):
        w = self.which
        if isinstance(w, bool) or not (
            (isinstance(w, int) and w >= 0)
            or (isinstance(w, tuple) and all(isinstance(b, (int, str)) for b in w))
        ):
            raise ConfigError(
                f"blocks={w!r}: give a number of blocks to remove or a list of block indices "
                "or module names"
            )
        if self.criterion not in CRITERIA:
            raise ConfigError(f"block_importance={self.criterion!r}: choose one of {CRITERIA}")


def _stack_paths(node: fx.Node) -> list[str]:
    stack = node.meta.get("nn_module_stack") or {}
    return [v[0] for v in stack.values() if isinstance(v, tuple) and v and isinstance(v[0], str)]


def _class_name(cls) -> str:
    return cls if isinstance(cls, str) else f"{cls.__module__}.{cls.__qualname__}"


def find_blocks(gm: fx.GraphModule) -> list[str]:
    """The model's blocks in graph order: module paths ``prefix.<i>`` of one class under a common
    prefix. The longest such run (ties: more nodes) names the block class; every run of that
    class counts (a ResNet's stages are four runs of Bottleneck)."""
    classes: dict[str, str] = {}
    first: dict[str, int] = {}
    weight: Counter = Counter()
    for i, node in enumerate(gm.graph.nodes):
        for v in (node.meta.get("nn_module_stack") or {}).values():
            if isinstance(v, tuple) and len(v) == 2 and isinstance(v[0], str):
                classes.setdefault(v[0], _class_name(v[1]))
                first.setdefault(v[0], i)
                weight[v[0]] += 1
    runs: dict[tuple[str, str], list[str]] = {}
    for path, cls in classes.items():
        last = path.rsplit(".", 1)[-1]
        m = re.fullmatch(r"(.*?)[._]?(\d+)", last)
        if m:
            runs.setdefault((path[: len(path) - len(last)] + m.group(1), cls), []).append(path)
    runs = {k: v for k, v in runs.items() if len(v) >= 2}
    if not runs:
        return []
    main = max(runs, key=lambda k: (len(runs[k]), sum(weight[p] for p in runs[k])))
    pool = [p for (_, cls), paths in runs.items() if cls == main[1] for p in paths]
    return sorted(pool, key=first.__getitem__)


@dataclass
class Region:
    path: str
    nodes: list[fx.Node]  # in graph order
    hidden: fx.Node  # the external input the output replaces
    out: fx.Node


def block_region(gm: fx.GraphModule, path: str) -> Region:
    """The nodes of block ``path``, its single output and its hidden-state input."""

    def is_value(n):  # tensors, and side-effect-only nodes (asserts) that use them
        v = n.meta.get("val")
        return isinstance(v, (torch.Tensor, tuple, list)) or (v is None and not n.users)

    tagged = [
        n for n in gm.graph.nodes if any(p == path for p in _stack_paths(n)) and n.op != "output"
    ]
    # size arithmetic export shares between blocks (``batch * heads``) stays in the graph
    inside = [n for n in tagged if is_value(n)]
    members = set(inside)
    if not inside:
        raise ConfigError(f"block {path}: no node of the traced graph belongs to it")
    for n in tagged:
        if n not in members and any(a in members for a in n.all_input_nodes):
            raise ConfigError(f"block {path}: {n.name} reads a tensor of the block")
    outs = [
        n for n in inside if tensor_meta(n) is not None and any(u not in members for u in n.users)
    ]
    others = [n for n in inside if n not in outs and any(u not in members for u in n.users)]
    if len(outs) != 1 or others:
        raise ConfigError(
            f"block {path}: {len(outs) + len(others)} of its values are used after it; only a "
            "block with one output (the hidden state) can be removed"
        )
    out = outs[0]
    ot = tensor_meta(out)
    ext = []
    for n in inside:
        for a in pytree.tree_leaves((n.args, n.kwargs)):
            if isinstance(a, fx.Node) and a not in members and a.op != "get_attr":
                t = tensor_meta(a)
                if t is not None and t.shape == ot.shape and t.dtype == ot.dtype and a not in ext:
                    ext.append(a)
    if len(ext) != 1:
        raise ConfigError(
            f"block {path}: {len(ext)} inputs have the output's shape {tuple(ot.shape)}; "
            "removing it needs exactly one (the residual stream)"
        )
    return Region(path, inside, ext[0], out)


def block_scores(gm, regions: list[Region], batches, criterion: str) -> dict[str, float]:
    """Importance of each block on the calibration batches (higher = keep). Each block's input
    is held from when the forward makes it until its last block's output is made and scored."""
    keep = {r.hidden.name for r in regions} | {r.out.name for r in regions}
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    ends: dict[str, list[Region]] = {}  # a block's output node -> the blocks it ends
    last: dict[str, str] = {}  # a block input -> the output node of the last block reading it
    for r in regions:
        ends.setdefault(r.out.name, []).append(r)
        h = r.hidden.name
        if h not in last or order[r.out.name] > order[last[h]]:
            last[h] = r.out.name
    totals = dict.fromkeys((r.path for r in regions), 0.0)
    held: dict[str, torch.Tensor] = {}

    def on_value(name, v):
        for r in ends.get(name, ()):
            x = held[r.hidden.name].double().flatten(1)
            y = v.double().flatten(1)
            if criterion == "cosine":
                s = 1 - torch.nn.functional.cosine_similarity(x, y, dim=1).mean()
            else:
                s = ((y - x).norm(dim=1) / x.norm(dim=1).clamp_min(1e-12)).mean()
            totals[r.path] += float(s) / len(batches)
        for h in [h for h, out in last.items() if out == name]:
            held.pop(h, None)
        if name in last:
            held[name] = v

    with torch.no_grad():
        for b in ticking(batches, "scoring blocks"):
            held.clear()
            Capture(gm, keep, on_value=on_value).run(*b)
    return totals


def frozen_copy(gm: fx.GraphModule) -> fx.GraphModule:
    """A second graph module over the same parameters (nothing copied but the graph), so the
    model before a removal can run beside the model after it."""
    g = fx.Graph()
    out = g.graph_copy(gm.graph, {})
    g.output(out)
    return fx.GraphModule(gm, g)


def output_deviation(before: fx.GraphModule, after: fx.GraphModule, batches) -> float:
    """max |after - before| over every output leaf of every batch, relative to the largest
    |before|; one batch's outputs are held at a time (a causal LM's logits for 32 windows of
    512 tokens would be ~13 GB in float64)."""
    scale = dev = 0.0
    with torch.no_grad():
        for b in batches:
            leaves = zip(pytree.tree_leaves(before(*b)), pytree.tree_leaves(after(*b)), strict=True)
            for x, y in leaves:
                if not (isinstance(x, torch.Tensor) and x.numel()):
                    continue
                # in float64 a million values at a time: whole-tensor float64 temporaries of
                # one batch's logits (8 x 512 x 49k) would be 1.6 GB each
                xf, yf, step = x.detach().reshape(-1), y.detach().reshape(-1), 1 << 20
                for i in range(0, xf.numel(), step):
                    xs, ys = xf[i : i + step].double(), yf[i : i + step].double()
                    scale = max(scale, xs.abs().max().item())
                    dev = max(dev, (ys - xs).abs().max().item())
    return dev / scale if scale else dev


def _resolve(cfg: Blocks, stack: list[str]) -> list[str]:
    out = []
    for b in cfg.which:
        if isinstance(b, int):
            if not -len(stack) <= b < len(stack):
                raise ConfigError(
                    f"blocks: index {b} is out of range; the model has {len(stack)} blocks "
                    f"({stack[0]} .. {stack[-1]})"
                )
            out.append(stack[b])
        elif b in stack:
            out.append(b)
        else:
            raise ConfigError(f"blocks: {b!r} is not one of the model's blocks {stack[:3]}...")
    return list(dict.fromkeys(out))


@register_pass("blocks", Blocks, lambda e: Blocks(tuple(e["removed"])))
def prune_blocks(graph: DependencyGraph, cfg: Blocks, args: tuple) -> PassResult:
    """Remove whole blocks from ``graph.gm`` (in place) and report the output deviation."""
    gm = graph.gm
    stack = find_blocks(gm)
    if not stack:
        raise ConfigError(
            f"blocks={cfg.which!r}: no stack of repeated blocks (modules named prefix.0, "
            "prefix.1, ... of one class) was found in the traced graph"
        )
    batches = as_batches(cfg.calibration, args)
    scores: dict[str, float] = {}
    fixed: dict[str, str] = {}
    if isinstance(cfg.which, int):
        if cfg.which > len(stack) - cfg.min_blocks:
            raise ConfigError(
                f"blocks={cfg.which}: the model has {len(stack)} blocks and at least "
                f"{cfg.min_blocks} must stay"
            )
        regions = []
        for p in stack:
            try:
                regions.append(block_region(gm, p))
            except ConfigError as e:  # a block that changes the shape (a downsampling stage)
                fixed[p] = str(e)
        if cfg.which > len(regions):
            raise ConfigError(
                f"blocks={cfg.which}: only {len(regions)} of {len(stack)} blocks can be "
                f"removed; not removable: {list(fixed.values())[:3]}"
            )
        scores = block_scores(gm, regions, batches, cfg.criterion)
        chosen = sorted(scores, key=lambda p: scores[p])[: cfg.which]
    else:
        chosen = _resolve(cfg, stack)
        if len(stack) - len(chosen) < cfg.min_blocks:
            raise ConfigError(
                f"blocks={list(cfg.which)}: removes {len(chosen)} of {len(stack)} blocks; at "
                f"least {cfg.min_blocks} must stay"
            )
    if not chosen:
        return BlocksResult("blocks", changed=False)
    regions = {p: block_region(gm, p) for p in chosen}  # all checked before anything changes
    before = frozen_copy(gm)
    for p in sorted(chosen, key=stack.index, reverse=True):
        r = regions[p]
        members = set(r.nodes)
        r.out.replace_all_uses_with(r.hidden, delete_user_cb=lambda u, m=members: u not in m)
        for n in reversed(r.nodes):
            gm.graph.erase_node(n)
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.recompile()
    propagate_shapes(gm, args)
    deviation = output_deviation(before, gm, batches)
    removed = sorted(chosen, key=stack.index)
    return BlocksResult(
        "blocks",
        changed=True,
        plan={"name": "blocks", "removed": removed},
        removed=removed,
        blocks_before=len(stack),
        scores=scores,
        criterion=cfg.criterion if scores else None,
        output_deviation=deviation,
        not_removable=fixed,
    )
