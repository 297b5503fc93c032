"""``result.model`` where the pruned graph gives each kept head its own slice of a per-head
constant the model builds in forward from its head count (ALiBi slopes).

Bloom and Falcon with ``alibi=True`` build the ALiBi bias once per forward, in the model
(``BloomModel`` / ``FalconModel``), from the head count it copied at init (``num_heads``), and
hand it to every attention layer: Bloom as the ``alibi`` argument, ``(batch * heads, 1, keys)``;
Falcon added into the ``attention_mask``, ``(batch, heads, queries, keys)``. The pruned graph
indexes that constant with each layer's kept heads (``graph.attention.slice_per_head``), so a
kept head keeps its own slope. The stock classes cannot follow: rebuilt for the smaller count the
slopes are others (the 2 slopes of 2 heads are those of heads 1 and 3 of 4), and Falcon also
divides the bias by ``sqrt(hidden_size / num_heads)``.

So the model keeps building the constant at its original count (its ``num_heads`` stays; see
``materialize.follow_head_count``) and each attention layer the graph indexes selects its own
kept heads from what it receives: that instance's class becomes ``KeptHeads<Class>``, a subclass
made here whose ``forward`` indexes the argument and then runs the class's own forward. The
indices are the ones the graph uses there (read from the graph: the consumer's module), in a
non-persistent buffer ``kept_heads``, so the state_dict is the stock one. Only the pruned copy's
instances change; the class and the user's model do not. ``CONSTANTS`` names, per attention class
(by name: transformers is not imported here), the argument that holds the constant and its head
axis. ``save_pretrained`` refuses such a tree (``hf.check_heads_reload``): the stock class
rebuilds the constant from the config's count, and no config field it reads says which heads were
kept. The agreement check in ``materialize.module_tree`` judges the result, as for every fix.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn

from fxprune.graph.trace import tensor_meta

aten = torch.ops.aten
PREFIX = "_fxprune_heads_"  # graph.attention.slice_per_head names its index buffers so


@dataclass(frozen=True)
class Constant:
    """Where an attention class receives the per-head constant: ``arg`` (its forward's argument
    name), ``dim`` (its head axis) and ``merged`` (that axis is ``batch * heads``, batch-major)."""

    arg: str
    dim: int
    merged: bool = False


CONSTANTS: dict[str, Constant] = {}  # "module.Class" of an attention layer -> its Constant


def per_head_constant(name: str, arg: str, dim: int, merged: bool = False) -> None:
    CONSTANTS[name] = Constant(arg, dim, merged)


per_head_constant("transformers.models.bloom.modeling_bloom.BloomAttention", "alibi", 0, True)
per_head_constant("transformers.models.falcon.modeling_falcon.FalconAttention", "attention_mask", 1)


def constant_of(m: nn.Module) -> tuple[type, Constant] | None:
    """``(the registered class, its Constant)`` for ``m``, by its class or a base."""
    for cls in type(m).__mro__:
        c = CONSTANTS.get(f"{cls.__module__}.{cls.__qualname__}")
        if c is not None:
            return cls, c
    return None


class KeptHeads:
    """Mixed in before an attention class: its forward gets only the kept heads
    (``kept_heads``, positions among the ``heads_of_constant`` the model builds the constant
    for) of the per-head constant in argument ``constant.arg``, then runs the class's forward."""

    selects_kept_heads = True  # hf.check_heads_reload refuses to save such a layer
    constant: Constant
    position: int  # the argument's position when passed positionally
    heads_of_constant: int

    def forward(self, *args, **kwargs):
        c = self.constant
        if c.arg in kwargs:
            kwargs[c.arg] = self.select_kept(kwargs[c.arg])
        elif len(args) > self.position:
            args = (
                *args[: self.position],
                self.select_kept(args[self.position]),
                *args[self.position + 1 :],
            )
        return super().forward(*args, **kwargs)

    def select_kept(self, t):
        c, h = self.constant, self.heads_of_constant
        if t is None:
            return t
        if c.merged:  # (batch * heads, ...): the kept heads of every batch
            return (
                t.unflatten(c.dim, (-1, h))
                .index_select(c.dim + 1, self.kept_heads)
                .flatten(c.dim, c.dim + 1)
            )
        return t.index_select(c.dim, self.kept_heads) if t.shape[c.dim] == h else t  # 1: broadcast


MADE: dict[str, type] = {}  # "KeptHeads<Class>" -> the class made for it


def kept_heads_class(base: type, c: Constant) -> type:
    """``KeptHeads<base>``, made once; ``__module__`` is this module, whose ``__getattr__``
    makes it again by name, so a pickled model loads in a fresh process."""
    name = f"KeptHeads{base.__name__}"
    if name not in MADE:
        params = list(inspect.signature(base.forward).parameters)
        MADE[name] = type(
            name,
            (KeptHeads, base),
            {
                "__module__": __name__,
                "__qualname__": name,
                "__doc__": f"{base.__name__} selecting its kept heads of {c.arg!r} ({__name__}).",
                "constant": c,
                "position": params.index(c.arg) - 1,  # without self
            },
        )
    return MADE[name]


def __getattr__(name: str):
    for path in CONSTANTS:
        module, _, cls = path.rpartition(".")
        if name == f"KeptHeads{cls}":
            return kept_heads_class(getattr(importlib.import_module(module), cls), CONSTANTS[path])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------- from the graph


def _module_path(node: fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1]
    return path[0] if isinstance(path, tuple) else None


def indexed_constants(gm: fx.GraphModule) -> dict[str, tuple[torch.Tensor, int]] | None:
    """``{module path: (kept head positions, heads the constant has there)}``: each per-head
    constant the pruned graph indexes with the kept heads, by the module the indexed op runs in.
    None where one cannot be placed (no module, two in one module)."""
    found: dict[str, tuple[torch.Tensor, int]] = {}
    for node in gm.graph.nodes:
        if node.op != "get_attr" or not str(node.target).startswith(PREFIX):
            continue
        for sel in node.users:
            if sel.target is not aten.index_select.default:
                return None
            src, dim = sel.args[0], sel.args[1]
            meta = tensor_meta(src)
            user = sel
            while (
                user.target in (aten.flatten.using_ints, aten.index_select.default)
                and len(user.users) == 1
            ):
                user = next(iter(user.users))
            path = _module_path(user)
            if meta is None or path is None or path in found:
                return None
            found[path] = (getattr(gm, node.target).detach().clone(), int(meta.shape[dim]))
    return found


def keep_head_constants(tree: nn.Module, gm: fx.GraphModule) -> list[str]:
    """Make each attention layer whose per-head constant the graph indexes select its kept heads
    (see the module docstring); the paths of those layers. Changes nothing and returns ``[]``
    where the graph indexes none, or one in a module without a ``CONSTANTS`` entry."""
    found = indexed_constants(gm)
    if not found:
        return []
    layers = {}
    for path in found:
        try:
            m = tree.get_submodule(path)
        except AttributeError:
            return []
        hit = constant_of(m)
        if hit is None or (isinstance(m, KeptHeads) and len(m.kept_heads) != found[path][1]):
            return []
        layers[path] = (m, hit)
    for path, (m, (base, c)) in layers.items():
        idx, heads = found[path]
        if isinstance(m, KeptHeads):  # pruned again: positions among the heads it kept before
            m.kept_heads = m.kept_heads[idx.to(m.kept_heads.device)]
            continue
        m.__class__ = kept_heads_class(base, c)
        m.heads_of_constant = heads
        device = next((t.device for t in m.parameters()), idx.device)
        m.register_buffer("kept_heads", idx.to(device), persistent=False)
    return sorted(layers)


__all__ = ["CONSTANTS", "Constant", "KeptHeads", "keep_head_constants", "per_head_constant"]
