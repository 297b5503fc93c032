"""Capture a model as an FX graph and give every node its output shape, without arithmetic.

Two capture paths yield the same thing, an ``fx.GraphModule`` whose parameters keep their original
qualified names:

* ``"fx"``: :func:`torch.fx.symbolic_trace` with a tracer that remembers which submodule it was in
  when tracing fails, so the error can say which part to mark as a leaf. Nodes are module-level
  (``call_module`` on ``nn.Conv2d``) plus torch functions and tensor methods.
* ``"export"``: :func:`torch.export.export` (non-strict), for models with Python control flow on
  shapes. Nodes are ATen-level (``aten.conv2d.default`` with ``get_attr`` weights). That path
  lives in ``torch_export``.

Shapes come from ``shapeprop.propagate_shapes``: every node gets ``meta["val"]`` (a fake tensor)
without touching real memory, so analysis of a large model is fast and cheap.

Shapes stay dynamic where the model allows: by default the batch dim of every input and the
sequence dim of integer 2-D inputs (token ids, attention masks), so the pruned graph serves padded,
variable-length batches; ``dynamic_shapes=`` (torch.export's spelling) names other dims. Example
inputs and those dims are normalised in ``inputs`` (re-exported here).

:func:`retarget` binds one capture to another module of the same structure.
"""

from __future__ import annotations

import collections
import copy
import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from fxprune.errors import ConfigError, TraceError, UnsupportedModelError
from fxprune.graph.inputs import (
    as_args,
    bind_keywords,
    default_dynamic_dims,
    dims_spec,
    spec_maps,
    widen,
)
from fxprune.graph.shapeprop import propagate_shapes
from fxprune.graph.torch_export import constants_as_buffers, trace_export

# the public names, with those from ``inputs`` that callers import from here (re-exported)
__all__ = [
    "DYNAMIC_DIMS",
    "MODES",
    "Retrace",
    "Traced",
    "as_args",
    "bind_keywords",
    "default_dynamic_dims",
    "dims_spec",
    "retarget",
    "signature",
    "symbolic",
    "tensor_meta",
    "trace",
    "widen",
]

MODES = ("auto", "fx", "export")
# ``gm.meta`` key holding ``Traced.dynamic``: the exporters read it to name the same dims dynamic
DYNAMIC_DIMS = "fxprune_dynamic_dims"


@dataclass
class Traced:
    """A captured model: the graph module and how it was captured.

    ``dynamic`` lists, per example input, the dims the graph leaves free: under torch.export the
    dims whose size stayed symbolic; under torch.fx (which never fixes a size itself) the dims
    asked for. Also stored in ``gm.meta[DYNAMIC_DIMS]``.
    """

    gm: fx.GraphModule
    mode: str  # "fx" or "export"
    dynamic: list[list[int]] = field(default_factory=list)
    # each submodule's type and plain attributes (num_heads, head_dim, ...) when captured: the
    # graph bakes them in, so :func:`retarget` refuses a module whose attributes differ
    signature: dict = field(default_factory=dict, repr=False)


PLAIN = (int, float, bool, str, type(None))
# attributes that differ between blocks of one stack without changing the captured graph: the
# train flag (the capture is of eval mode) and Hugging Face's ``layer_idx`` (read by the KV
# cache only, which capture turns off)
VARYING = frozenset({"training", "layer_idx"})


def signature(model: torch.nn.Module) -> dict:
    """``{submodule name: (type name, {attribute: value})}`` for the plain attributes a forward
    may read (ints, floats, bools, strings and tuples of them)."""
    out = {}
    for name, m in model.named_modules():
        attrs = {
            k: v
            for k, v in vars(m).items()
            if not k.startswith("_")
            and k not in VARYING
            and (
                isinstance(v, PLAIN)
                or (isinstance(v, tuple) and all(isinstance(x, PLAIN) for x in v))
            )
        }
        out[name] = (type(m).__qualname__, attrs)
    return out


class _ModuleStack(collections.OrderedDict):
    """The tracer's module stack, which it copies into every node's ``nn_module_stack``: the
    same plain OrderedDict, made by its constructor instead of ``copy.copy``'s generic reduce
    (a tenth of the cost, a millisecond or two a trace of ResNet-50)."""

    def __copy__(self) -> collections.OrderedDict:
        return collections.OrderedDict(self)


class _PathTracer(fx.Tracer):
    """A tracer that keeps user leaf modules opaque and remembers the module it is inside."""

    def __init__(self, leaf_modules: Sequence[str | type] = ()):
        super().__init__()
        self.module_stack = _ModuleStack()
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


def _graph(tracer: _PathTracer, model: torch.nn.Module) -> fx.Graph:
    try:
        return tracer.trace(model)
    except Exception as e:  # noqa: BLE001 - any tracing failure is reported with its location
        where = tracer.stack[-1] if tracer.stack else "<top-level forward>"
        e.fxprune_where = where  # type: ignore[attr-defined]
        raise


def _trace_fx(model: torch.nn.Module, leaf_modules) -> fx.GraphModule:
    tracer = _PathTracer(leaf_modules)
    graph = _graph(tracer, model)
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


class Retrace:
    """A torch.fx trace kept as its graph over the traced module itself: the ``graph``,
    ``get_parameter`` and ``code`` a :class:`fx.GraphModule` would have, without building one
    (a copy of the module hierarchy and a compiled forward, a third of a trace's cost, which a
    check that only compares code never uses). ``canonicalize`` rewrites it like a capture."""

    def __init__(self, root: torch.nn.Module, graph: fx.Graph):
        self.root, self.graph = root, graph
        graph.owning_module = root  # dead-code elimination asks it which modules are impure

    def get_parameter(self, target: str) -> torch.nn.Parameter:
        return self.root.get_parameter(target)

    def recompile(self) -> None:
        """Nothing to compile: :attr:`code` is generated from the graph when read."""

    @property
    def code(self) -> str:
        """The forward's source, as ``fx.GraphModule.recompile`` generates it."""
        return self.graph.python_code(root_module="self").src


def symbolic(model: torch.nn.Module, leaf_modules: Sequence[str | type] = ()) -> Retrace:
    """``model``'s forward as torch.fx traces it, without running it (no shapes on the nodes)
    and without building a GraphModule: enough to compare the code two modes of one model, or
    a model and a capture, trace to."""
    tracer = _PathTracer(leaf_modules)
    graph = _graph(tracer, model)
    return Retrace(tracer.root, graph)


def trace(
    model: torch.nn.Module,
    example_inputs,
    mode: str = "auto",
    leaf_modules: Sequence[str | type] = (),
    dynamic_shapes=None,
) -> Traced:
    """Capture ``model`` as a GraphModule with fake-tensor shapes on every node.

    Args:
        model: the module to capture; it is not modified (tracing reads it only).
        example_inputs: a tensor or tuple of tensors with the shapes the model is used with.
        mode: ``"fx"``, ``"export"`` or ``"auto"`` (fx first, torch.export when fx fails).
        leaf_modules: submodule names (globs allowed) or types that fx must not trace into.
        dynamic_shapes: the dims that stay free, spelled as for ``torch.export.export`` (one
            entry per example input, or a dict keyed by the forward's argument names). Default:
            batch and sequence length of integer 2-D inputs, the batch of every other input,
            each as ``Dim.AUTO`` (static where the model fixes it).

    Returns:
        A :class:`Traced` whose ``gm`` nodes carry ``meta["val"]``; ``dynamic`` says which dims
        stayed free.

    Raises:
        ConfigError: ``dynamic_shapes`` does not fit the example inputs.
        TraceError: no capture path worked; the message names the submodule where fx failed and
            the export error, and suggests ``leaf_modules=``.

    Example:
        >>> t = trace(model, (ids, mask))  # two (batch, sequence) integer inputs
        >>> t.dynamic
        [[0, 1], [0, 1]]
    """
    if mode not in MODES:
        raise ConfigError(f"trace mode must be one of {MODES}, got {mode!r}")
    args = as_args(example_inputs)
    maps = spec_maps(dynamic_shapes, model, args)
    fx_err = None
    if mode in ("auto", "fx"):
        try:
            gm = _trace_fx(model, leaf_modules)
            propagate_shapes(gm, args)
            dynamic = [sorted(m) for m in maps]  # a symbolic trace fixes no size itself
            gm.meta[DYNAMIC_DIMS] = dynamic
            return Traced(gm, "fx", dynamic=dynamic, signature=signature(model))
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
        gm, dynamic = trace_export(model, args, maps, user=dynamic_shapes is not None)
        propagate_shapes(gm, args)
        gm.meta[DYNAMIC_DIMS] = dynamic
        return Traced(gm, "export", dynamic=dynamic, signature=signature(model))
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


def _lookup(root: torch.nn.Module, target: str):
    owner_name, _, attr = target.rpartition(".")
    owner = root.get_submodule(owner_name) if owner_name else root
    return owner, attr, getattr(owner, attr)


def retarget(traced: Traced, model: torch.nn.Module, example_inputs=None) -> Traced:
    """The same capture over ``model``, a module of the same structure (a repeated block of a
    decoder stack): the graph is copied, every parameter, buffer and submodule it names is
    ``model``'s own (shared, not copied), constants the capture lifted are copied from
    ``traced``. Tracing once and retargeting is how a stack of identical blocks is captured
    at the cost of one.

    Raises:
        ConfigError: ``model`` lacks a tensor the graph reads, or holds it in another shape or
            dtype (it is not the same structure).
    """
    if traced.signature:
        _same_signature(traced.signature, signature(model), type(model).__name__)
    src = traced.gm
    root: dict = {}
    buffers: dict[str, bool] = {}  # target -> persistent
    for node in src.graph.nodes:
        if node.op not in ("get_attr", "call_module") or node.target in root:
            continue
        t = node.target
        _, _, old = _lookup(src, t)
        try:
            owner, attr, new = _lookup(model, t)
        except AttributeError:
            stateful = isinstance(old, torch.nn.Parameter) or (
                isinstance(old, torch.nn.Module) and any(True for _ in old.parameters())
            )
            if stateful:
                raise ConfigError(
                    f"retarget: {type(model).__name__} has no {t!r}, which the captured graph "
                    "reads; it is not the same structure as the module that was traced"
                ) from None
            # what the capture added (a lifted constant, torch.export's guard module)
            root[t] = copy.deepcopy(old)
            continue
        if isinstance(old, torch.Tensor) != isinstance(new, torch.Tensor) or (
            isinstance(old, torch.Tensor) and (old.shape != new.shape or old.dtype != new.dtype)
        ):
            what = f"{tuple(new.shape)} {new.dtype}" if isinstance(new, torch.Tensor) else type(new)
            raise ConfigError(
                f"retarget: {t!r} of {type(model).__name__} is {what}, the captured graph "
                f"read {tuple(old.shape)} {old.dtype}"
                if isinstance(old, torch.Tensor)
                else f"retarget: {t!r} of {type(model).__name__} is {what}, not a tensor"
            )
        if node.op == "call_module" and type(new) is not type(old):
            raise ConfigError(
                f"retarget: {t!r} of {type(model).__name__} is a {type(new).__name__}, the "
                f"captured graph calls a {type(old).__name__}"
            )
        root[t] = new
        if attr in owner._buffers:
            buffers[t] = attr not in owner._non_persistent_buffers_set
    gm = fx.GraphModule(root, copy.deepcopy(src.graph), src.__class__.__name__)
    for t, persistent in buffers.items():  # GraphModule sets plain attributes from a dict
        owner, attr, value = _lookup(gm, t)
        delattr(owner, attr)
        owner.register_buffer(attr, value, persistent=persistent)
    constants_as_buffers(gm)
    for attr in ("_in_spec", "_out_spec"):
        if hasattr(src, attr):
            setattr(gm, attr, getattr(src, attr))
    gm.meta.update(src.meta)
    if example_inputs is not None and not _same_inputs(gm, as_args(example_inputs)):
        propagate_shapes(gm, as_args(example_inputs))
    dynamic = [list(d) for d in traced.dynamic]
    return Traced(gm, traced.mode, dynamic, traced.signature)


def _same_inputs(gm: fx.GraphModule, args: tuple) -> bool:
    """Do ``args`` have the shapes and dtypes the graph's shapes were propagated with? Then the
    copied ``meta["val"]`` of every node already hold (retarget checked every tensor the graph
    reads has the traced shape and dtype), and propagating again would give them anew."""
    holders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(holders) != len(args):
        return False
    for node, a in zip(holders, args, strict=True):
        val = node.meta.get("val")
        if not isinstance(a, torch.Tensor) or not isinstance(val, torch.Tensor):
            return False
        if tuple(val.shape) != tuple(a.shape) or val.dtype != a.dtype:
            return False
    return all("val" in n.meta for n in gm.graph.nodes if n.op not in ("output", "placeholder"))


def _same_signature(want: dict, got: dict, what: str) -> None:
    for name in want.keys() | got.keys():
        if name not in got or name not in want:
            which = "lacks" if name not in got else "has an extra"
            raise ConfigError(
                f"retarget: {what} {which} submodule {name!r}; it is not the same structure "
                "as the module that was traced"
            )
        (t0, a0), (t1, a1) = want[name], got[name]
        if t0 != t1:
            raise ConfigError(f"retarget: {what}.{name} is a {t1}, the traced module's a {t0}")
        diff = sorted(k for k in a0.keys() | a1.keys() if a0.get(k, ...) != a1.get(k, ...))
        if diff:
            k = diff[0]
            raise ConfigError(
                f"retarget: {what}.{name or '<root>'}.{k} is {a1.get(k)!r}, the traced module's "
                f"{a0.get(k)!r}: the captured graph bakes it in"
            )


def tensor_meta(node) -> torch.Tensor | None:
    """The fake tensor a node produced, or None when it is not a tensor."""
    if not isinstance(node, fx.Node):
        return None
    v = node.meta.get("val")
    return v if isinstance(v, torch.Tensor) else None
