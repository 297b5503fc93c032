"""Capture a model as an FX graph and give every node its output shape, without arithmetic.

Two capture paths yield the same thing, an ``fx.GraphModule`` whose parameters keep their original
qualified names:

* ``"fx"``: :func:`torch.fx.symbolic_trace` with a tracer that remembers which submodule it was in
  when tracing fails, so the error can say which part to mark as a leaf. Nodes are module-level
  (``call_module`` on ``nn.Conv2d``) plus torch functions and tensor methods.
* ``"export"``: :func:`torch.export.export` (non-strict), for models with Python control flow on
  shapes. Nodes are ATen-level (``aten.conv2d.default`` with ``get_attr`` weights).

Shapes come from ``shapeprop.propagate_shapes``: every node gets ``meta["val"]`` (a fake tensor)
without touching real memory, so analysis of a large model is fast and cheap.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.fx as fx

from fxprune.errors import ConfigError, TraceError, UnsupportedModelError
from fxprune.graph.shapeprop import propagate_shapes

MODES = ("auto", "fx", "export")


@dataclass
class Traced:
    """A captured model: the graph module and how it was captured."""

    gm: fx.GraphModule
    mode: str  # "fx" or "export"
    fx_error: str | None = None  # why symbolic tracing failed, when mode == "export"


class _PathTracer(fx.Tracer):
    """A tracer that keeps user leaf modules opaque and remembers the module it is inside."""

    def __init__(self, leaf_modules: Sequence[str | type] = ()):
        super().__init__()
        self.leaf_names = [x for x in leaf_modules if isinstance(x, str)]
        self.leaf_types = tuple(x for x in leaf_modules if isinstance(x, type))
        self.stack: list[str] = []

    def is_leaf_module(self, m: torch.nn.Module, qualname: str) -> bool:
        if self.leaf_types and isinstance(m, self.leaf_types):
            return True
        if any(fnmatch.fnmatchcase(qualname, pat) for pat in self.leaf_names):
            return True
        return super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        name = self.path_of_module(m)
        self.stack.append(name)
        out = super().call_module(m, forward, args, kwargs)
        self.stack.pop()
        return out


def as_args(example_inputs) -> tuple:
    """Normalise ``example_inputs`` (a tensor or a tuple/list of them) to a tuple."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise ConfigError(
        f"example_inputs must be a tensor or a tuple of tensors, got {type(example_inputs).__name__}"
    )


def _trace_fx(model: torch.nn.Module, leaf_modules) -> fx.GraphModule:
    tracer = _PathTracer(leaf_modules)
    try:
        graph = tracer.trace(model)
    except Exception as e:  # noqa: BLE001 - any tracing failure is reported with its location
        where = tracer.stack[-1] if tracer.stack else "<top-level forward>"
        e.fxprune_where = where  # type: ignore[attr-defined]
        raise
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


def _trace_export(model: torch.nn.Module, args: tuple) -> fx.GraphModule:
    # Let export keep the batch dim symbolic where the model allows it, so view/reshape sizes
    # stay computed from the input and the pruned graph (and its ONNX export) serves any batch.
    dims = tuple(
        {0: torch.export.Dim.AUTO} if isinstance(a, torch.Tensor) and a.ndim else None for a in args
    )
    # export specialises a dim of size 1 to the constant 1 (the "0/1 specialisation"): trace
    # a batch of 1 as a batch of 2 (rows repeated) so the graph still serves every batch size
    wide = tuple(
        a.repeat(2, *([1] * (a.ndim - 1)))
        if isinstance(a, torch.Tensor) and a.ndim and a.shape[0] == 1
        else a
        for a in args
    )
    try:
        ep = torch.export.export(model, wide, strict=False, dynamic_shapes=dims)
    except Exception:  # noqa: BLE001 - a model that cannot take a symbolic batch: keep it static
        ep = torch.export.export(model, args, strict=False)
    stateful = ep.module()
    # ep.module() refuses .eval()/.train(); a plain GraphModule over the same graph and
    # submodules behaves like any module (the graph already fixed inference behaviour).
    gm = fx.GraphModule(stateful, stateful.graph, type(model).__name__)
    for attr in ("_in_spec", "_out_spec"):  # read by the pytree codegen of the forward
        if hasattr(stateful, attr):
            setattr(gm, attr, getattr(stateful, attr))
    _constants_as_buffers(gm)
    return gm


def _constants_as_buffers(gm: fx.GraphModule) -> None:
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


def trace(
    model: torch.nn.Module,
    example_inputs,
    mode: str = "auto",
    leaf_modules: Sequence[str | type] = (),
) -> Traced:
    """Capture ``model`` as a GraphModule with fake-tensor shapes on every node.

    Args:
        model: the module to capture; it is not modified (tracing reads it only).
        example_inputs: a tensor or tuple of tensors with the shapes the model is used with.
        mode: ``"fx"``, ``"export"`` or ``"auto"`` (fx first, torch.export when fx fails).
        leaf_modules: submodule names (globs allowed) or types that fx must not trace into.

    Returns:
        A :class:`Traced` whose ``gm`` nodes carry ``meta["val"]``.

    Raises:
        TraceError: no capture path worked; the message names the submodule where fx failed and
            the export error, and suggests ``leaf_modules=``.
    """
    if mode not in MODES:
        raise ConfigError(f"trace mode must be one of {MODES}, got {mode!r}")
    args = as_args(example_inputs)
    fx_err = None
    if mode in ("auto", "fx"):
        try:
            gm = _trace_fx(model, leaf_modules)
            propagate_shapes(gm, args)
            return Traced(gm, "fx")
        except UnsupportedModelError:
            raise
        except Exception as e:  # noqa: BLE001
            where = getattr(e, "fxprune_where", None)
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            fx_err = f"{type(e).__name__} in {where or 'shape propagation'}: {first}"
            if mode == "fx":
                raise TraceError(
                    f"torch.fx could not trace {type(model).__name__}: {fx_err}. "
                    f"Mark that submodule as a leaf (leaf_modules=['{where}']) or use mode='export'."
                ) from e
    try:
        gm = _trace_export(model, args)
        propagate_shapes(gm, args)
        return Traced(gm, "export", fx_error=fx_err)
    except UnsupportedModelError:
        raise
    except Exception as e:  # noqa: BLE001
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        msg = f"could not capture {type(model).__name__}: "
        if fx_err:
            msg += f"torch.fx failed ({fx_err}); "
        msg += f"torch.export failed ({type(e).__name__}: {first}). "
        msg += "Mark the failing submodule as a leaf with leaf_modules=[...] or fix the forward."
        raise TraceError(msg) from e


def tensor_meta(node) -> torch.Tensor | None:
    """The fake tensor a node produced, or None when it is not a tensor."""
    if not isinstance(node, fx.Node):
        return None
    v = node.meta.get("val")
    return v if isinstance(v, torch.Tensor) else None
