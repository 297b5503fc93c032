"""Capture a model as an FX graph and give every node its output shape, without arithmetic.

Two capture paths yield the same thing, an ``fx.GraphModule`` whose parameters keep their original
qualified names:

* ``"fx"``: :func:`torch.fx.symbolic_trace` with a tracer that remembers which submodule it was in
  when tracing fails, so the error can say which part to mark as a leaf. Nodes are module-level
  (``call_module`` on ``nn.Conv2d``) plus torch functions and tensor methods.
* ``"export"``: :func:`torch.export.export` (non-strict), for models with Python control flow on
  shapes. Nodes are ATen-level (``aten.conv2d.default`` with ``get_attr`` weights).

Shapes come from running the graph under a ``FakeTensorMode``: every node gets ``meta["val"]`` (a
fake tensor) without touching real memory, so analysis of a large model is fast and cheap.
"""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils import _pytree as pytree

from fxprune.errors import ConfigError, TraceError, UnsupportedModelError

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
    ep = torch.export.export(model, args, strict=False)
    return ep.module()


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


# Modules whose output has the input's shape: running them under fake tensors costs dispatch and
# (for BatchNorm) a decomposition, so the interpreter checks their parameter sizes and passes the
# input's fake tensor through instead. This keeps shape propagation fast on large CNNs.
_SAME_SHAPE = (
    torch.nn.modules.batchnorm._BatchNorm,
    torch.nn.ReLU, torch.nn.ReLU6, torch.nn.SiLU, torch.nn.GELU, torch.nn.Hardswish,
    torch.nn.Hardsigmoid, torch.nn.Sigmoid, torch.nn.Tanh, torch.nn.Dropout, torch.nn.Identity,
    torch.nn.LeakyReLU, torch.nn.Mish, torch.nn.ELU,
)  # fmt: skip


def _conv_linear_shape(target: str, m: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Output of a Conv/Linear from shape formulas, after checking the weight fits the input."""
    w = m.weight
    if isinstance(m, torch.nn.Linear):
        if x.ndim < 1 or x.shape[-1] != w.shape[1]:
            raise RuntimeError(
                f"{target}: Linear expects {w.shape[1]} input features, got shape {tuple(x.shape)}"
            )
        return x.new_empty((*x.shape[:-1], w.shape[0]))
    k = w.ndim - 2
    cd = x.ndim - k - 1
    if cd not in (0, 1) or x.shape[cd] != w.shape[1] * m.groups or isinstance(m.padding, str):
        if cd in (0, 1) and x.shape[cd] != w.shape[1] * m.groups:
            raise RuntimeError(
                f"{target}: conv expects {w.shape[1] * m.groups} input channels, "
                f"got shape {tuple(x.shape)}"
            )
        return m(x)  # 'same'/'valid' padding strings: let the real op work it out
    spatial = [
        (x.shape[cd + 1 + i] + 2 * m.padding[i] - m.dilation[i] * (w.shape[2 + i] - 1) - 1)
        // m.stride[i]
        + 1
        for i in range(k)
    ]
    return x.new_empty((*x.shape[:cd], w.shape[0], *spatial))


_BATCH_NORM_FNS = (
    torch.nn.functional.batch_norm,
    torch.batch_norm,
    torch.ops.aten.batch_norm.default,
)


class _FakeInterpreter(fx.Interpreter):
    def call_module(self, target, args, kwargs):
        m = self.fetch_attr(target)
        x = args[0] if args else None
        if (
            type(m).forward is not None
            and isinstance(m, _SAME_SHAPE)
            and len(args) == 1
            and not kwargs
            and isinstance(x, torch.Tensor)
        ):
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                n = m.running_mean if m.running_mean is not None else m.weight
                if n is not None and (x.ndim < 2 or n.shape[0] != x.shape[1]):
                    raise RuntimeError(
                        f"{target}: {type(m).__name__} has {n.shape[0]} features, input has "
                        f"shape {tuple(x.shape)}"
                    )
            return x
        if type(m) in (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Linear) and (
            len(args) == 1 and not kwargs and isinstance(x, torch.Tensor)
        ):
            return _conv_linear_shape(target, m, x)
        return super().call_module(target, args, kwargs)

    def call_function(self, target, args, kwargs):
        # Functional batch norm (timm's BatchNormAct, export graphs) decomposes under fake
        # tensors too; its output has the input's shape once the statistics fit.
        if target in _BATCH_NORM_FNS and args and isinstance(args[0], torch.Tensor):
            x = args[0]
            stats = [a for a in args[1:5] if isinstance(a, torch.Tensor)]
            if x.ndim >= 2 and all(t.shape == (x.shape[1],) for t in stats):
                return x
        return super().call_function(target, args, kwargs)

    def run_node(self, n: fx.Node):
        try:
            out = super().run_node(n)
        except Exception as e:  # noqa: BLE001
            raise RuntimeError(f"{n.format_node()}: {type(e).__name__}: {e}") from e
        n.meta["val"] = out
        return out


def propagate_shapes(gm: fx.GraphModule, args: tuple) -> None:
    """Run ``gm`` on fake copies of ``args`` and store each node's fake output in ``meta["val"]``.

    Parameters stay real; the fake mode converts them to fake tensors on use, so no arithmetic
    runs and no activation memory is allocated. Raises UnsupportedModelError when an output leaf
    is not a tensor.
    """
    was_training = gm.training
    _set_training(gm, False)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    try:
        with mode:
            fake_args = tuple(
                mode.from_tensor(a) if isinstance(a, torch.Tensor) else copy.deepcopy(a)
                for a in args
            )
            out = _FakeInterpreter(gm).run(*fake_args)
    finally:
        _set_training(gm, was_training)
    leaves, _ = pytree.tree_flatten(out)
    for i, leaf in enumerate(leaves):
        if not isinstance(leaf, torch.Tensor) and leaf is not None:
            raise UnsupportedModelError(
                f"model output #{i} is a {type(leaf).__name__}, not a tensor: fxprune compares "
                "and exports tensor outputs only; return tensors (or a tuple/dict of tensors)"
            )


def _set_training(gm: torch.nn.Module, mode: bool) -> None:
    # torch.export's graph modules refuse .eval()/.train(); their graph already fixed the mode.
    for m in gm.modules():
        m.training = mode


def tensor_meta(node) -> torch.Tensor | None:
    """The fake tensor a node produced, or None when it is not a tensor."""
    if not isinstance(node, fx.Node):
        return None
    v = node.meta.get("val")
    return v if isinstance(v, torch.Tensor) else None
