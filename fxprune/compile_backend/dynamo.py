"""What dynamo hands a backend, read for fxprune: which graph inputs are the model's tensors,
how a graph ends, and the graph rebuilt as a module with those tensors as named attributes.

Dynamo (torch 2.x, ``inline_inbuilt_nn_modules``) lifts every parameter and buffer to a
placeholder named after its source (``L_self_modules_layer1_modules_0_..._weight_``) and passes
the live tensors at each call. Names are not read off those strings: each placeholder's example
is looked up by identity among the model's own tensors, so a graph of a submodule's frame (after
a graph break inside it) or of a resume function still names ``layer1.0.conv1.weight``.
"""

from __future__ import annotations

import operator
import re
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.fx as fx
import torch.nn as nn

from fxprune.errors import ConfigError
from fxprune.graph import build_graph, propagate_shapes
from fxprune.graph.canonical import canonicalize

aten = torch.ops.aten
RESUME = re.compile(r"torch_dynamo_resume_in_(\w+?)_at_(\d+)")
ROOT = re.compile(r"^[LG]\[['\"][^'\"]+['\"]\]\.?")  # "L['self']." of nn_module_stack paths


def state_root(source) -> tuple[str, str] | None:
    """``("L" | "G", name)`` of the frame variable a parameter / buffer source starts from
    (``L['self']._modules['conv1']._parameters['weight']`` -> ``("L", "self")``), or None when
    the source is not a module's parameter or buffer."""
    s, through = source, False
    while s is not None:
        through |= getattr(s, "member", None) in ("_parameters", "_buffers")
        if hasattr(s, "local_name") and through:
            return "L", s.local_name
        if hasattr(s, "global_name") and through:
            return "G", s.global_name
        s = getattr(s, "base", None)
    return None


def frame_object(kind: str, name: str):
    """The object a variable of the frame dynamo is compiling holds."""
    from torch._dynamo.symbolic_convert import InstructionTranslator

    try:
        tx = InstructionTranslator.current_tx()
    except Exception as e:  # noqa: BLE001 - outside a dynamo compile there is no frame
        raise ConfigError("fxprune.backend runs inside torch.compile only") from e
    return (tx.f_locals if kind == "L" else tx.f_globals).get(name)


def compiled_module(obj):
    """The model ``obj`` belongs to: the module of the innermost ``torch.compile(model)`` being
    called when it holds ``obj`` (a graph of a submodule's own frame, after a graph break in
    it, still names its tensors from the model), else ``obj`` itself."""
    from torch._dynamo.eval_frame import OptimizedModule

    f = sys._getframe(1)
    while f is not None:
        wrapper = f.f_locals.get("self")
        if isinstance(wrapper, OptimizedModule) and isinstance(wrapper._orig_mod, nn.Module):
            model = wrapper._orig_mod
            if any(m is obj for m in model.modules()):
                return model
        f = f.f_back
    return obj


def graph_end(gm: fx.GraphModule) -> tuple[str, str, bool]:
    """(the function dynamo compiled, how the graph ends, whether it runs to that frame's return
    without a break, and is not a resume function)."""
    why = getattr(gm, "compile_subgraph_reason", None)
    stack = list(getattr(why, "user_stack", None) or [])
    frame = stack[-1].name if stack else "?"
    if why is None or not why.graph_break:
        ends = "return"
    else:
        fs = stack[-1] if stack else None
        at = f"{Path(fs.filename).name}:{fs.lineno}" if fs else "?"
        ends = f"graph break at {at} ({why.reason.strip().splitlines()[0]})"
    whole = ends == "return" and len(stack) <= 1 and not RESUME.fullmatch(frame)
    return frame, ends, whole


def module_scalar(n: fx.Node, t) -> bool:
    """A 0-d tensor input that is an object's attribute read only through ``.item()``: a
    module's float (``eps``, ``p``) that ``dynamic=True`` made a graph input."""
    arg = n.meta.get("grapharg")
    return (
        isinstance(t, torch.Tensor)
        and t.ndim == 0
        and getattr(getattr(arg, "source", None), "member", None) is not None
        and all(u.op == "call_method" and u.target == "item" for u in n.users)
    )


def symbolic_slices(g: fx.Graph) -> None:
    """``x[:, 0:s]`` with a symbolic bound (a dynamic sequence length) as ``aten.slice`` calls,
    the form torch.export records and fxprune's slice rule reads."""
    for n in list(g.find_nodes(op="call_function", target=operator.getitem)):
        idx = n.args[1] if isinstance(n.args[1], tuple) else (n.args[1],)
        bounds = [b for i in idx if isinstance(i, slice) for b in (i.start, i.stop, i.step)]
        if not all(isinstance(i, slice) for i in idx) or not any(
            isinstance(b, fx.Node) for b in bounds
        ):
            continue
        with g.inserting_before(n):
            cur = n.args[0]
            for d, i in enumerate(idx):
                if i != slice(None):
                    step = 1 if i.step is None else i.step
                    cur = g.call_function(aten.slice.Tensor, (cur, d, i.start, i.stop, step))
        n.replace_all_uses_with(cur)
        g.erase_node(n)


def prefixes(names) -> set[str]:
    """Every tensor name and every module path above it."""
    out = set()
    for n in names:
        parts = n.split(".")
        out.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return out


def _attach(root: nn.Module, name: str, t: torch.Tensor) -> None:
    """A copy of ``t`` at ``name`` under ``root`` (a parameter stays a parameter, frozen)."""
    owner, _, leaf = name.rpartition(".")
    mod = root
    for part in owner.split(".") if owner else ():
        if part not in mod._modules:
            mod.add_module(part, nn.Module())
        mod = mod._modules[part]
    copy = t.detach().clone()
    if isinstance(t, nn.Parameter):
        mod.register_parameter(leaf, nn.Parameter(copy, requires_grad=False))
    else:
        mod.register_buffer(leaf, copy)


def rebuild(gm: fx.GraphModule, example_inputs: list, name_of: Callable[[object], str | None]):
    """``gm`` with each input ``name_of`` names as a ``get_attr`` of a copy of that tensor, and
    shapes propagated: ``(graph module, indices of the inputs it keeps, concrete examples of
    them)``; the module is None when no input is the model's (nothing to prune)."""
    root, g, env = nn.Module(), fx.Graph(), {}
    keep, args, consts = [], [], {}
    placeholders = gm.graph.find_nodes(op="placeholder")
    for i, (n, t) in enumerate(zip(placeholders, example_inputs, strict=True)):
        name = name_of(t)
        if name is not None:
            _attach(root, name, t)
            env[n] = g.get_attr(name)
        elif module_scalar(n, t):
            consts[n] = t.item()  # read once, as fxprune's own captures bake it in
        else:
            env[n] = g.placeholder(n.name, type_expr=n.type)
            env[n].meta = dict(n.meta)
            keep.append(i)
            args.append(t.node.hint if isinstance(t, torch.SymInt) else t)
    if len(keep) + len(consts) == len(example_inputs):
        return None, keep, tuple(args)
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            continue
        if n.op == "call_method" and n.args[0] in consts:
            env[n] = consts[n.args[0]]
            continue
        env[n] = g.node_copy(n, env.__getitem__)
        stack = n.meta.get("nn_module_stack")
        if stack:  # "L['self'].layer1.0" -> "layer1.0", as fxprune's own captures name them
            env[n].meta["nn_module_stack"] = {
                k: (ROOT.sub("", v[0]), *v[1:]) for k, v in stack.items()
            }
    symbolic_slices(g)
    new = fx.GraphModule(root, g, "DynamoGraph")
    canonicalize(new)  # the rewrite fxprune's own capture makes: the same layers, same plan
    propagate_shapes(new, tuple(args))
    return new, keep, tuple(args)


def leaving(gm: fx.GraphModule) -> list[str]:
    """Layers whose channels reach the graph's output (for a part of the forward: they are used
    after a graph break)."""
    out = next(iter(gm.graph.find_nodes(op="output")))
    rows = build_graph(gm).barrier_report()
    return sorted({la for r in rows if r["node"] == out.name for la in r["layers"]})
