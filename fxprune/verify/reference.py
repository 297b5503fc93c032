"""The reference a pruned model is proved against: a copy of the dense model with every
removed channel zeroed where it is consumed, every removed block bypassed, every removed expert
unreachable (its router score -inf), SparseGPT's new values written into the kept weights and
the N:M zeros placed at the kept positions."""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from fxprune.errors import PassError
from fxprune.verify.inputs import cast_copy


def _bypass(module: torch.nn.Module, path: str) -> None:
    """Make block ``path`` return its hidden-state input (the input with the output's shape)."""

    def hook(mod, args, kwargs, out):
        first = out if isinstance(out, torch.Tensor) else out[0]
        cands = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        x = next((a for a in cands if a.shape == first.shape and a.dtype == first.dtype), None)
        if x is None:
            raise PassError(f"block {path}: no input has its output's shape to bypass it")
        if isinstance(out, torch.Tensor):
            return x
        return type(out)((x, *out[1:])) if isinstance(out, tuple) else out.__class__(x, *out[1:])

    module.get_submodule(path).register_forward_hook(hook, with_kwargs=True)


class _Unrouted(TorchFunctionMode):
    """Every linear layer whose weight is a router's gives its removed experts a score of
    -inf, so no token's top-k picks them: the dense model as a router without them routes."""

    def __init__(self, routers: dict[int, list[int]]):
        super().__init__()
        self.routers = routers

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is F.linear:
            w = args[1] if len(args) > 1 else kwargs.get("weight")
            gone = self.routers.get(id(w))
            if gone:
                out = out.clone()
                out[..., gone] = float("-inf")
        return out


def _unroute(model: torch.nn.Module, routers: dict[str, list[int]]) -> None:
    """Run ``model``'s forward with the removed experts' router scores at -inf; a per-expert
    score bias (1-D: DeepSeek-V3's ``e_score_correction_bias``, added after a sigmoid that
    would turn -inf logits into 0) holds -inf at the removed experts too."""
    ids = {}
    for name, gone in routers.items():
        t = _tensor(model, name)
        if t.ndim == 1:
            with torch.no_grad():
                t[list(gone)] = float("-inf")
        else:
            ids[id(t)] = list(gone)
    forward = model.forward

    @functools.wraps(forward)
    def unrouted(*args, **kwargs):
        with _Unrouted(ids):
            return forward(*args, **kwargs)

    model.forward = unrouted


def _tensor(module: torch.nn.Module, name: str) -> torch.Tensor:
    try:
        return module.get_parameter(name)
    except AttributeError:
        return module.get_buffer(name)


def zeroed_dense(model: torch.nn.Module, result, dtype: torch.dtype | None = None):
    """A copy of the dense model (in ``dtype``: its floating tensors cast once, as ``.to(dtype)``
    would) with every removed channel zeroed where it is consumed and every removed block
    bypassed, every removed expert unreachable."""
    z = cast_copy(model, dtype).eval()
    for r in result.passes:
        for path in r.bypassed:
            _bypass(z, path)
    routers = {k: v for r in result.passes for k, v in r.unrouted.items()}
    if routers:
        _unroute(z, routers)
    with torch.no_grad():
        for name, dims in result.zero_spec.items():
            p = _tensor(z, name)  # a parameter, or a buffer used as a weight (a fixed filter)
            for d, keep in dims.items():
                shape = [1] * p.ndim
                shape[d] = -1
                p.mul_(
                    torch.as_tensor(np.asarray(keep), dtype=p.dtype, device=p.device).reshape(shape)
                )
        index = result.dense_index
        for r in result.passes:  # values a reconstruction (SparseGPT) wrote into kept weights
            for name, val in r.updated.items():
                p = z.get_parameter(name)
                val = val.to(model.get_parameter(name).dtype)  # rounded as the model holds it
                p[_dense_where(p.shape, index.get(name, {}))] = val.to(p.device, p.dtype)
        for name, mask in result.masks.items():  # N:M / unstructured zeros, at kept positions
            p = z.get_parameter(name)
            dense_mask = _to_dense_positions(mask.cpu(), p.shape, index.get(name, {}))
            p.mul_(dense_mask.to(device=p.device, dtype=p.dtype))
    return z


def _to_dense_positions(mask: torch.Tensor, shape, index: dict[int, np.ndarray]) -> torch.Tensor:
    """A mask over a pruned (possibly reordered) weight, scattered into the dense weight's shape
    (ones elsewhere): ``index[d]`` is the dense index of each position along dim ``d``."""
    if not index and mask.shape == torch.Size(shape):  # nothing cut: the mask is in place
        return mask
    full = torch.ones(shape, dtype=torch.bool)
    full[_dense_where(shape, index)] = mask
    return full


def _dense_where(shape, index: dict[int, np.ndarray]) -> tuple:
    """Index selecting, in the dense weight, the positions of the pruned weight: slices where
    at most one dim was cut (a basic or single-tensor index, no broadcast grids), else one
    broadcast index per dim (several advanced indices keep their order only so)."""
    cut = [d for d in range(len(shape)) if d in index]
    if len(cut) <= 1:
        return tuple(
            torch.as_tensor(np.asarray(index[d])) if d in index else slice(None)
            for d in range(len(shape))
        )
    where = []
    for d in range(len(shape)):
        idx = np.asarray(index[d]) if d in index else np.arange(shape[d])
        view = [1] * len(shape)
        view[d] = -1
        where.append(torch.as_tensor(idx).view(view))
    return tuple(where)
