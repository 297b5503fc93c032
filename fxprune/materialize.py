"""The pruned model as the user's own module tree: ``result.model``.

The passes prune a captured graph (``result.module``, an ``fx.GraphModule``). Deployment code
wants the user's class back: ``save_pretrained``, ``generate()``, methods, train-mode behaviour,
``torch.compile``. This module rebuilds that from the copy the compile worked on, in one place:

1. every tensor a pass changed (sliced, reordered, N:M-masked, reconstructed) is taken from the
   graph module into the copy, under the same name (the two share those tensors);
2. each layer's shape attributes follow its new weights (``LAYERS``: ``out_features``,
   ``in_channels`` / ``groups``, ``num_features``, ``normalized_shape``, HF ``Conv1D.nf``...);
3. each attention module whose projections shrank gets its head counts recomputed from the new
   projection sizes and its ``head_dim`` (``num_heads``, ``num_key_value_heads``,
   ``all_head_size``, GPT-2's ``split_size``...), an MLP its ``intermediate_size``;
4. removed blocks leave their ``ModuleList`` / ``Sequential`` (later ``layer_idx`` renumbered,
   the HF config's per-layer lists shortened), and the HF config takes the new counts.

The graph decided what to remove; nothing here chooses. Then the tree is run against the graph
module on the example and a fresh draw; a forward that hard-codes a size the graph rewrote (a
literal ``view(B, T, 12, 64)``) fails that check, and the reason names the innermost module
that raised. ``compile`` then keeps the graph module as ``result.model`` and says why.
"""

from __future__ import annotations

import contextlib
import contextvars

import torch
import torch.nn as nn

from fxprune.errors import FxPruneError, PassError
from fxprune.graph.capture import same_capture, without_cache
from fxprune.graph.shared_heads import head_constants
from fxprune.hf import HEADS as HF_HEADS
from fxprune.layer_fixes import (
    HEAD_DIM,
    HEADS,
    LAYERS,
    MODULES,
    Q_PROJ,
    QKV_PROJ,
    Shrunk,
    fix_layer,
    fix_module,
    kept_rows,
    layer_fix,
    module_fix,
    out_size,
)
from fxprune.materialize_alibi import KeptHeads, keep_head_constants
from fxprune.uniform import in_stack, stacks
from fxprune.verify.proof import agreement


class NotMaterialized(FxPruneError):
    """The pruned model cannot be the user's module tree; the message says which module."""


def post_order(m: nn.Module):
    for child in m.children():
        yield from post_order(child)
    yield m


# ---------------------------------------------------------------- blocks


def remove_blocks(tree: nn.Module, paths: list[str]) -> dict[str, list[str]]:
    """Delete each block from the list that holds it; ``{list path: removed names}``. A
    ``ModuleList`` / ``Sequential`` of numbered children is renumbered (HF's ``layers.3`` becomes
    ``layers.2``); a ``Sequential`` of named children (torchvision's ``encoder_layer_3``)
    keeps the other names."""
    by_parent: dict[str, list[str]] = {}
    for path in paths:
        parent, _, key = path.rpartition(".")
        holder = tree.get_submodule(parent) if parent else tree
        numbered = isinstance(holder, nn.ModuleList) and key.isdigit()
        if not (numbered or isinstance(holder, nn.Sequential)):
            raise NotMaterialized(
                f"removed block {path!r} sits in a {type(holder).__name__}, which its forward "
                "calls by name, not a ModuleList or Sequential it iterates: it cannot be deleted"
            )
        by_parent.setdefault(parent, []).append(key)
    for parent, keys in by_parent.items():
        holder = tree.get_submodule(parent) if parent else tree
        if all(k.isdigit() for k in keys):
            for i in sorted((int(k) for k in keys), reverse=True):
                del holder[i]
        else:
            for k in keys:
                del holder._modules[k]
        for i, block in enumerate(holder):  # the KV cache is indexed by layer_idx
            for sub in block.modules():
                if isinstance(getattr(sub, "layer_idx", None), int):
                    sub.layer_idx = i
    return by_parent


# ---------------------------------------------------------------- the whole tree


def changed_tensors(results) -> set[str]:
    names: set[str] = set()
    for r in results:
        names |= set(r.keeps) | set(r.masks) | set(r.updated) | set(r.order)
    return names


def take_tensors(tree: nn.Module, gm: nn.Module, names: set[str]) -> set[int]:
    """Put ``gm``'s version of each named tensor into ``tree``; ids of the modules that changed.
    Each owner module is looked up once per root (a layer's weight and bias share it; nothing
    here adds or removes a module)."""
    touched: set[int] = set()
    owners: dict[tuple[int, str], nn.Module] = {}

    def owner_of(root: nn.Module, name: str) -> tuple[nn.Module, str]:
        path, _, attr = name.rpartition(".")
        key = (id(root), path)
        if key not in owners:
            owners[key] = root.get_submodule(path) if path else root
        return owners[key], attr

    for name in sorted(names):
        owner, attr = owner_of(gm, name)
        new = getattr(owner, attr)
        mod, attr = owner_of(tree, name)
        if attr in mod._parameters:
            if not isinstance(new, nn.Parameter):
                new = nn.Parameter(new, requires_grad=mod._parameters[attr].requires_grad)
            mod._parameters[attr] = new
        elif attr in mod._buffers:
            mod._buffers[attr] = new
        else:
            setattr(mod, attr, new)
        touched.add(id(mod))
    return touched


def materialize(tree: nn.Module, gm: nn.Module, results, hf_config=None) -> None:
    """Turn ``tree`` (the dense copy the compile traced) into the pruned model, in place.

    Raises :class:`NotMaterialized` when a removed block cannot leave the tree."""
    before = {id(m): out_size(m) for m in tree.modules()}
    touched = take_tensors(tree, gm, changed_tensors(results))
    for m in tree.modules():
        if id(m) in touched:
            fix_layer(m)
    shrunk = Shrunk(
        (id(m) for m in tree.modules() if out_size(m) != before.get(id(m))),
        kept_rows(results),
        {id(m): name for name, m in tree.named_modules()},
    )
    seen: set[int] = set()
    for m in post_order(tree):
        if id(m) not in seen:
            seen.add(id(m))
            fix_module(m, shrunk)
    selecting = keep_head_constants(tree, gm)  # before blocks go: the graph's module paths
    removed = remove_blocks(tree, [b for r in results for b in r.bypassed])
    cfg = getattr(tree, "config", None)
    if hf_config is not None and cfg is not None and hasattr(cfg, "to_dict"):
        n_before = getattr(cfg, "num_hidden_layers", None)
        if not selecting:  # else the model builds its per-head constant for every head
            follow_head_count(tree, cfg, hf_config)
        cfg.__dict__.update(hf_config.__dict__)  # the submodules hold this same object
        gone = sorted(int(k) for keys in removed.values() for k in keys if k.isdigit())
        types = getattr(cfg, "layer_types", None)
        if gone and isinstance(types, list) and len(types) == n_before:
            cfg.layer_types = [t for i, t in enumerate(types) if i not in set(gone)]


def follow_head_count(tree: nn.Module, cfg, new_cfg) -> None:
    """A module that copied the config's head count at init and has no projections or head
    size of its own (BloomModel's ``num_heads``, from which its forward builds the ALiBi slopes)
    takes the pruned count the config now holds; the agreement check judges the result. Not
    called where the attention layers select their kept heads of that constant
    (``materialize_alibi``): it is then built for the original count."""
    attr = next((a for a in HF_HEADS if hasattr(cfg, a)), None)
    if attr is None:  # a config without a head count (ConvNeXt)
        return
    before, after = getattr(cfg, attr, None), getattr(new_cfg, attr, None)
    if before == after:
        return
    for m in tree.modules():
        if any(hasattr(m, a) for a in (*HEAD_DIM, *Q_PROJ, *QKV_PROJ)):
            continue
        for a in HEADS:
            if getattr(m, a, None) == before and not isinstance(getattr(m, a), bool):
                setattr(m, a, after)


_PROVED_BY_CALLER: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "fxprune_tree_proved_by_caller", default=False
)


@contextlib.contextmanager
def proved_by_caller():
    """Within it, :func:`module_tree` returns the rebuilt tree without running it against the
    graph on the example and a fresh draw: for a caller that proves ``result.model`` itself
    against the zeroed dense model on such inputs (``fxprune.stream`` with its per-block proof,
    which fails the block where the tree computes anything else), the run would only repeat a
    weaker check."""
    token = _PROVED_BY_CALLER.set(True)
    try:
        yield
    finally:
        _PROVED_BY_CALLER.reset(token)


def module_tree(work, gm, results, hf_config, args, leaf_modules=None) -> tuple[nn.Module, str]:
    """``(result.model, note)``: ``work`` made the pruned module tree when it computes what
    ``gm`` computes, else ``(gm, why not)``. With ``leaf_modules`` (``gm`` is a torch.fx
    capture made with them) a tree that traces to ``gm``'s very code over ``gm``'s layers is
    proved for every input without running either; otherwise (or where that trace differs)
    both run on the example and a fresh draw."""
    what = type(work).__name__
    try:
        materialize(work, gm, results, hf_config)
    except NotMaterialized as e:
        return gm, str(e)
    if leaf_modules is not None and same_capture(gm, work, leaf_modules):
        return work, ""
    if _PROVED_BY_CALLER.get():  # the caller proves this very tree against the dense model
        return work, ""
    try:
        with without_cache(work):
            ok, msg = agreement(gm, work, args)  # raises only when the graph fails the example
    except Exception as e:  # noqa: BLE001 - a rewrite the fake-tensor check let through
        raise PassError(
            f"the pruned graph does not run on the example ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); the passes left an inconsistent "
            "model, nothing was changed: please report it with the model"
        ) from e
    if ok:
        return work, ""
    where = failing_module(work, args) if msg.startswith("fails") else ""
    made = head_constants(gm)
    if made and not where and not any(isinstance(m, KeptHeads) for m in work.modules()):
        return gm, (
            f"the {what} module tree does not compute what the pruned graph does ({msg}): the "
            f"graph gives each kept head its own slice of a per-head constant the forward builds "
            f"from the head count (at {', '.join(made[:3])}: ALiBi-like slopes), and the {what} "
            "forward rebuilds that constant for its new head count, which gives the kept heads "
            "other values unless they sit where the smaller count puts them; result.model is "
            "the graph module"
        )
    name = where.split(" (")[0]
    tops = stacks(work)
    way = (
        f"; {name} is outside the repeated blocks: ignore=[{name!r}] (or uniform=True) keeps it "
        f"whole, so result.model can be the {what} class"
        if name and tops and not in_stack(name, tops)
        else ""
    )
    return gm, (
        f"the {what} module tree with the pruned layers does not compute what the pruned graph "
        f"does ({msg}{f'; raised in {where}' if where else ''}): its forward must hard-code a "
        f"size the graph rewrote; result.model is the graph module{way}"
    )


@contextlib.contextmanager
def innermost_module(tree: nn.Module):
    """Track which module is running; ``stack[-1]`` is the innermost after an exception."""
    stack: list[str] = []
    handles = []
    for name, m in tree.named_modules():

        def pre(mod, args, name=name):
            stack.append(name or type(tree).__name__)

        def post(mod, args, out):
            if stack:
                stack.pop()

        handles.append(m.register_forward_pre_hook(pre))
        handles.append(m.register_forward_hook(post))
    try:
        yield stack
    finally:
        for h in handles:
            h.remove()


def failing_module(tree: nn.Module, args: tuple) -> str:
    """Run ``tree`` once more to name the innermost module that raises (with its class)."""
    with innermost_module(tree) as stack, torch.no_grad():
        try:
            tree(*args)
        except Exception:  # noqa: BLE001 - we only want the module name
            if stack:
                name = stack[-1]
                with contextlib.suppress(AttributeError):
                    return f"{name} ({type(tree.get_submodule(name)).__name__})"
                return name
    return ""


# registered by class name: torch's own classes (MultiheadAttention), then timm's
from fxprune import materialize_timm, materialize_torch  # noqa: E402,F401

__all__ = [
    "LAYERS",
    "MODULES",
    "NotMaterialized",
    "layer_fix",
    "materialize",
    "module_fix",
    "module_tree",
]
