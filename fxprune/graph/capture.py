"""One capture for every entry point: ``capture(model, args, ...)`` -> :class:`Traced`.

``compile``, ``iterative_prune`` and ``sensitivity`` all capture the model this way (streaming
captures a block once and retargets it). The rules, in one place:

* ``mode="auto"`` traces with torch.fx, or with torch.export when a layer is parametrized (fx
  keeps a parametrized layer opaque; export computes its weight);
* when the caller prunes heads (``heads=True``) and fx stopped at an attention it cannot see into
  (``nn.MultiheadAttention`` as a leaf, torchvision's ``fx.wrap``-ed
  ``shifted_window_attention``), the model is captured again with torch.export, which
  decomposes attention into ops whose heads the graph follows; ``leaf_modules`` and
  ``dynamic_shapes`` carry over, and an explicit ``mode`` is never overridden;
* a Hugging Face ``config.use_cache`` is off during the capture (torch.export cannot carry a
  ``DynamicCache``; a KV cache is no part of the computation to prune) and back afterwards.
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Sequence

import torch
import torch.fx as fx
import torch.nn as nn
from torch.nn.utils import parametrize

from fxprune._util import eval_mode, module_attr
from fxprune.graph.canonical import canonicalize
from fxprune.graph.rules import find_rule
from fxprune.graph.trace import Traced, symbolic, trace

__all__ = ["capture", "hidden_attention", "same_capture", "without_cache"]


def hidden_attention(gm: fx.GraphModule) -> list[str]:
    """Nodes where torch.fx stopped at an attention it cannot see into (``nn.MultiheadAttention``
    is a leaf module; torchvision's ``shifted_window_attention`` is an ``fx.wrap`` function)."""
    out = []
    for node in gm.graph.nodes:
        if node.op == "call_module":
            m = gm.get_submodule(node.target)
            if isinstance(m, nn.MultiheadAttention) and find_rule(gm, node) is None:
                out.append(node.target)
        elif node.op == "call_function" and find_rule(gm, node) is None:
            if "attention" in getattr(node.target, "__name__", "").lower():
                out.append(node.name)
    return out


@contextlib.contextmanager
def without_cache(model: nn.Module):
    """``config.use_cache`` off for the capture (torch.export cannot carry a DynamicCache), the
    user's setting back afterwards: the module tree and its saved config keep the KV cache."""
    # every config of the tree: T5's decoder stack holds its own copy, use_cache on
    cfgs = {id(c): c for m in model.modules() if (c := module_attr(m, "config")) is not None}
    on = [c for c in cfgs.values() if getattr(c, "use_cache", None)]
    for c in on:
        c.use_cache = False
    try:
        yield
    finally:
        for c in on:
            c.use_cache = True


def capture(
    model: nn.Module,
    args: tuple,
    *,
    mode: str = "auto",
    leaf_modules: Sequence[str | type] = (),
    dynamic_shapes=None,
    heads: bool = False,
) -> Traced:
    """Capture ``model`` on ``args`` (a tuple of positional inputs) for pruning; see the module
    docstring for how ``mode="auto"`` chooses. ``heads``: the caller will prune attention heads,
    so an attention fx cannot see into sends the capture to torch.export."""
    if mode == "auto" and any(parametrize.is_parametrized(m) for m in model.modules()):
        mode = "export"
    kw = {"leaf_modules": leaf_modules, "dynamic_shapes": dynamic_shapes}
    with without_cache(model):
        traced = trace(model, args, mode=mode, **kw)
        if heads and mode == "auto" and traced.mode == "fx" and hidden_attention(traced.gm):
            traced = trace(model, args, mode="export", **kw)
    canonicalize(traced.gm)  # x @ W.T as the Linear it is (Falcon), filled empties as cats
    return traced


def same_capture(gm: fx.GraphModule, module: nn.Module, leaf_modules: Sequence = ()) -> bool:
    """Does ``module`` trace (torch.fx, eval mode, the capture's own rewrites) to exactly
    ``gm``'s code over the very layers ``gm`` calls and tensors equal to ``gm``'s? Then it
    computes what ``gm`` computes on every input, not only on inputs tried. False where it does
    not trace or anything differs (a forward that hard-codes a size the passes rewrote, a layer
    that is another object)."""
    try:
        with eval_mode(module), without_cache(module):
            again = symbolic(module, leaf_modules)
    except Exception:  # noqa: BLE001 - any failure to trace means it cannot be compared
        return False
    canonicalize(again)
    if again.code != gm.code:
        return False
    for node in again.graph.nodes:
        if node.op not in ("call_module", "get_attr"):
            continue
        try:
            get = operator.attrgetter(node.target)
            mine, theirs = get(gm), get(module)
        except AttributeError:
            return False
        if mine is theirs:
            continue
        same = (
            node.op == "get_attr"
            and isinstance(mine, torch.Tensor)
            and isinstance(theirs, torch.Tensor)
            and mine.shape == theirs.shape
            and mine.dtype == theirs.dtype
            and bool(torch.equal(mine, theirs))
        )
        if not same:
            return False
    return True
