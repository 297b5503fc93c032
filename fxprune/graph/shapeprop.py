"""Shape propagation on fake tensors: every node gets ``meta["val"]``, no arithmetic runs.

The graph runs in an ``fx.Interpreter`` under ``FakeTensorMode(allow_non_fake_inputs=True)``:
parameters stay real and are converted to fake tensors on use. Fake dispatch costs about a
millisecond per op and BatchNorm/LayerNorm decompose on the way, so common modules use shape
formulas instead, after checking that their parameters fit their input. The same routine validates
a pruned graph, so those checks are real checks.
"""

from __future__ import annotations

import copy
import operator

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily
from torch.utils import _pytree as pytree

from fxprune._util import eval_mode
from fxprune.errors import UnsupportedModelError

# Modules whose output has the input's shape: running them under fake tensors costs dispatch and
# (for BatchNorm) a decomposition, so the interpreter checks their parameter sizes and passes the
# input's fake tensor through instead. This keeps shape propagation fast on large CNNs.
_SAME_SHAPE = (
    torch.nn.modules.batchnorm._BatchNorm,
    torch.nn.ReLU, torch.nn.ReLU6, torch.nn.SiLU, torch.nn.GELU, torch.nn.Hardswish,
    torch.nn.Hardsigmoid, torch.nn.Sigmoid, torch.nn.Tanh, torch.nn.Dropout, torch.nn.Identity,
    torch.nn.LeakyReLU, torch.nn.Mish, torch.nn.ELU,
)  # fmt: skip


def _norm_fits(m: torch.nn.Module, x) -> bool:
    """The input and the norm's affine tensors fit each other (else the real op decides)."""
    if not isinstance(x, torch.Tensor):
        return False
    if isinstance(m, torch.nn.LayerNorm):
        k, want = len(m.normalized_shape), tuple(m.normalized_shape)
        ok = tuple(x.shape[x.ndim - k :]) == want
    else:
        want = (m.num_channels,)
        ok = x.ndim >= 2 and x.shape[1] == m.num_channels and m.num_channels % m.num_groups == 0
    return ok and all(t is None or tuple(t.shape) == want for t in (m.weight, m.bias))


def _mha_fits(m: torch.nn.MultiheadAttention, x: torch.Tensor) -> bool:
    """Self-attention's packed projections fit the input and each other (else the real op
    decides, under fake tensors)."""
    e, out = m.embed_dim, m.out_proj
    shapes = [(m.in_proj_weight, (3 * e, e)), (m.in_proj_bias, (3 * e,))]
    shapes += [(out.weight, (out.out_features, e)), (out.bias, (out.out_features,))]
    return (
        x.shape[-1] == e
        and m._qkv_same_embed_dim
        and all(t is None or tuple(t.shape) == want for t, want in shapes)
    )


def _empty(x: torch.Tensor, shape: tuple) -> torch.Tensor:
    """``x.new_empty(shape)``: what a layer's shape formula returns. For a fake ``x`` with
    static sizes, the fake tensor is built from a meta tensor directly (as the fake mode builds
    its own outputs), a fifth of a fake dispatch's cost; same dtype, device, strides, mode."""
    mode = getattr(x, "fake_mode", None)
    static = all(type(s) is int for s in shape)
    if type(x) is not FakeTensor or mode is None or mode.shape_env is not None or not static:
        return x.new_empty(shape)
    with unset_fake_temporarily():
        meta = torch.empty(shape, dtype=x.dtype, device="meta")
    return mode.fake_tensor_converter.from_meta_and_device(mode, meta, x.device)


def _conv_linear_shape(target: str, m: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Output of a Conv/Linear from shape formulas, after checking the weight fits the input."""
    w, b = m.weight, m.bias
    if b is not None and tuple(b.shape) != (w.shape[0],):
        raise RuntimeError(f"{target}: bias has shape {tuple(b.shape)}, weight {tuple(w.shape)}")
    if isinstance(m, torch.nn.Linear):
        if x.ndim < 1 or x.shape[-1] != w.shape[1]:
            raise RuntimeError(
                f"{target}: Linear expects {w.shape[1]} input features, got shape {tuple(x.shape)}"
            )
        return _empty(x, (*x.shape[:-1], w.shape[0]))
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
    return _empty(x, (*x.shape[:cd], w.shape[0], *spatial))


def _check_stats(target: str, m: torch.nn.Module, x: torch.Tensor) -> None:
    """Each of a batch norm's per-channel tensors has the input's channel count (the real op
    would fail on any one of them)."""
    for attr in ("weight", "bias", "running_mean", "running_var"):
        t = getattr(m, attr, None)
        if t is not None and (x.ndim < 2 or tuple(t.shape) != (x.shape[1],)):
            raise RuntimeError(
                f"{target}: {type(m).__name__}.{attr} has shape {tuple(t.shape)}, input has "
                f"shape {tuple(x.shape)}"
            )


def _plain(ts) -> bool:
    """Fake tensors of static sizes, one dtype and device, laid out contiguously with the
    canonical strides, none requiring grad: what an elementwise op or a cat of them gives is
    the same plain layout, so its fake output can be built (``_empty``) instead of dispatched."""
    a = ts[0]
    for t in ts:
        if type(t) is not FakeTensor or t.fake_mode is not a.fake_mode or t.requires_grad:
            return False
        if t.dtype != a.dtype or t.device != a.device or t.fake_mode.shape_env is not None:
            return False
        if t.stride() != _contiguous_strides(t.shape):
            return False
    return True


def _contiguous_strides(shape) -> tuple:
    out, step = [], 1
    for n in reversed(shape):
        out.append(step)
        step *= max(n, 1)
    return tuple(reversed(out))


def _join(target, args, kwargs):
    """``a + b`` of same-shaped plain fake tensors (a residual; torch.fx traces ``+=`` so
    too), or ``torch.cat`` of plain fake tensors that agree off the cat dim (DenseNet's 60
    concatenations): the output a fake dispatch would give, a fifth of its cost; None for
    anything else (shapes that differ: broadcasting, promotion, a misfit the real op judges)."""
    if target is operator.add and len(args) == 2 and not kwargs:
        a, b = args
        return _empty(a, tuple(a.shape)) if _plain((a, b)) and a.shape == b.shape else None
    if target is not torch.cat or not args or len(args) + len(kwargs) > 2 or set(kwargs) - {"dim"}:
        return None
    ts = args[0]
    dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
    if not isinstance(ts, (list, tuple)) or not ts or type(dim) is not int or not _plain(ts):
        return None
    nd = ts[0].ndim
    if nd == 0 or not -nd <= dim < nd or any(t.ndim != nd for t in ts):
        return None
    dim %= nd
    shape = list(ts[0].shape)
    if any(
        t.shape[:dim] != ts[0].shape[:dim] or t.shape[dim + 1 :] != ts[0].shape[dim + 1 :]
        for t in ts
    ):
        return None
    shape[dim] = sum(t.shape[dim] for t in ts)
    return _empty(ts[0], tuple(shape))


_BATCH_NORM_FNS = (
    torch.nn.functional.batch_norm,
    torch.batch_norm,
    torch.ops.aten.batch_norm.default,
)


class _FakeInterpreter(fx.Interpreter):
    def fetch_attr(self, target: str):
        """A called module from the name -> module map the Interpreter built (walking the
        dotted path with hasattr + getattr per level was a third of a module node's cost);
        anything else, or a name a class attribute of the root could shadow, the usual way."""
        m = self.submodules.get(target)
        if m is None or hasattr(type(self.module), target.partition(".")[0]):
            return super().fetch_attr(target)
        return m

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
                _check_stats(target, m, x)
            return x
        if isinstance(m, (torch.nn.LayerNorm, torch.nn.GroupNorm)) and _norm_fits(m, x):
            return x
        if (
            isinstance(m, torch.nn.MultiheadAttention)
            and kwargs.get("need_weights") is False
            and isinstance(x, torch.Tensor)
            and _mha_fits(m, x)
        ):
            return _empty(x, (*x.shape[:-1], m.out_proj.out_features)), None
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
        out = _join(target, args, kwargs)
        return super().call_function(target, args, kwargs) if out is None else out

    def run_lean(self, *args):
        """Interpreter.run without its per-node bookkeeping (a third of the cost here)."""
        env: dict[fx.Node, object] = {}
        it = iter(args)
        lookup = env.__getitem__
        for n in self.graph.nodes:
            try:
                if n.op == "placeholder":
                    v = next(it)
                elif n.op == "output":
                    return fx.node.map_arg(n.args[0], lookup)
                else:
                    a = fx.node.map_arg(n.args, lookup)
                    kw = fx.node.map_arg(n.kwargs, lookup)
                    v = getattr(self, n.op)(n.target, a, kw)
            except Exception as e:  # noqa: BLE001
                raise RuntimeError(f"{n.format_node()}: {type(e).__name__}: {e}") from e
            n.meta["val"] = v
            env[n] = v
        return None


def propagate_shapes(gm: fx.GraphModule, args: tuple) -> None:
    """Run ``gm`` on fake copies of ``args`` and store each node's fake output in ``meta["val"]``.

    Parameters stay real; the fake mode converts them to fake tensors on use, so no arithmetic
    runs and no activation memory is allocated. Raises UnsupportedModelError when an output leaf
    is not a tensor.
    """
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with eval_mode(gm), mode:
        fake_args = tuple(
            mode.from_tensor(a) if isinstance(a, torch.Tensor) else copy.deepcopy(a) for a in args
        )
        out = _FakeInterpreter(gm).run_lean(*fake_args)
    leaves, _ = pytree.tree_flatten(out)
    for i, leaf in enumerate(leaves):
        if not isinstance(leaf, torch.Tensor) and leaf is not None:
            raise UnsupportedModelError(
                f"model output #{i} is a {type(leaf).__name__}, not a tensor: fxprune compares "
                "and exports tensor outputs only; return tensors (or a tuple/dict of tensors)"
            )
