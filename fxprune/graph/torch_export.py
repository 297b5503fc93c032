"""Capture a model through torch.export (non-strict), keeping free the dims the model allows.

Nodes are ATen-level (``aten.conv2d.default`` with ``get_attr`` weights); lifted tensor constants
become non-persistent buffers so that ``.to(device)`` moves them with the parameters.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from fxprune.graph.inputs import widen


def _symbolic_dims(gm: fx.GraphModule, args: tuple) -> list[list[int]]:
    """Per input, the dims whose size an export graph keeps symbolic (read off its placeholders
    before shape propagation replaces their values with concrete ones)."""
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    out = []
    for i, a in enumerate(args):
        v = inputs[i].meta.get("val") if i < len(inputs) else None
        shape = v.shape if isinstance(a, torch.Tensor) and isinstance(v, torch.Tensor) else ()
        out.append([d for d, s in enumerate(shape) if isinstance(s, torch.SymInt)])
    return out


def _export_program(model: torch.nn.Module, args: tuple, maps: list[dict], user: bool):
    """torch.export with the free dims in ``maps``: (the unlifted module, its symbolic dims).

    Defaults fall back, for a model that cannot take a symbolic length or batch, to the batch
    only, then to static shapes; a user's ``dynamic_shapes`` follows torch.export's rules
    (``Dim.AUTO`` may come out static, a named ``Dim`` must stay free or export fails)."""
    tries = [maps]
    if not user:
        tries += [[{d: v for d, v in m.items() if d == 0} for m in maps], [{} for _ in maps]]
    for k, m in enumerate(tries):
        if k and m == tries[k - 1]:
            continue
        try:
            while True:
                spec = tuple(x or None for x in m) if any(m) else None
                ep = torch.export.export(model, widen(args, m), strict=False, dynamic_shapes=spec)
                stateful = ep.module()
                got = _symbolic_dims(stateful, args)
                # a dim widened from 1 to 2 that came out static has 2 baked in: drop it
                kept = [
                    {d: v for d, v in mi.items() if d in gi or a.shape[d] != 1}
                    for mi, gi, a in zip(m, got, args, strict=True)
                ]
                if kept == m:
                    return stateful, got
                m = kept
        except Exception:  # noqa: BLE001 - the model cannot take these free dims: try fewer
            if user or k == len(tries) - 1:
                raise
    raise AssertionError("unreachable: the static try returns or raises")


def trace_export(
    model: torch.nn.Module, args: tuple, maps: list[dict], user: bool = False
) -> tuple[fx.GraphModule, list[list[int]]]:
    # Free dims stay symbolic where the model allows, so view/reshape sizes stay computed from
    # the input and the pruned graph (and its ONNX export) serves any batch and length.
    stateful, dynamic = _export_program(model, args, maps, user)
    # ep.module() refuses .eval()/.train(); a plain GraphModule over the same graph and
    # submodules behaves like any module (the graph already fixed inference behaviour).
    gm = fx.GraphModule(stateful, stateful.graph, type(model).__name__)
    for attr in ("_in_spec", "_out_spec"):  # read by the pytree codegen of the forward
        if hasattr(stateful, attr):
            setattr(gm, attr, getattr(stateful, attr))
    constants_as_buffers(gm)
    return gm, dynamic


def constants_as_buffers(gm: fx.GraphModule) -> None:
    """Lifted tensor constants are plain attributes; make them (non-persistent) buffers so that
    ``.to(device)`` moves them with the parameters."""
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        owner_name, _, attr = node.target.rpartition(".")
        owner = gm.get_submodule(owner_name) if owner_name else gm
        value = getattr(owner, attr, None)
        if (
            isinstance(value, torch.Tensor)
            and attr not in owner._parameters
            and attr not in owner._buffers
        ):
            delattr(owner, attr)
            owner.register_buffer(attr, value, persistent=False)
