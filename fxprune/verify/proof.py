"""Proof that a pruned model computes what the dense model computes with the removed parts zeroed."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils import _pytree as pytree

from fxprune._util import eval_mode
from fxprune.graph.trace import as_args

RTOL = 1e-4


@dataclass
class EquivalenceReport:
    """Outcome of :func:`equivalence`.

    ``max_rel_err`` is ``max|pruned - zeroed| / max|zeroed|`` over all outputs (scale-aware, so
    near-zero outputs do not inflate it). ``pruning_effect`` is the same measure against the dense
    model *without* zeroing: it shows the removed channels mattered, so a pass is not vacuous.
    """

    ok: bool
    max_abs_err: float
    max_rel_err: float
    pruning_effect: float
    reference_scale: float
    approximate: bool
    tolerance: float
    message: str

    def __str__(self) -> str:
        return self.message


def _bypass(module: torch.nn.Module, path: str) -> None:
    """Make block ``path`` return its hidden-state input (the input with the output's shape)."""

    def hook(mod, args, kwargs, out):
        first = out if isinstance(out, torch.Tensor) else out[0]
        cands = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        x = next((a for a in cands if a.shape == first.shape and a.dtype == first.dtype), None)
        if x is None:
            raise RuntimeError(f"block {path}: no input has its output's shape to bypass it")
        if isinstance(out, torch.Tensor):
            return x
        return type(out)((x, *out[1:])) if isinstance(out, tuple) else out.__class__(x, *out[1:])

    module.get_submodule(path).register_forward_hook(hook, with_kwargs=True)


def zeroed_dense(model: torch.nn.Module, result) -> torch.nn.Module:
    """A copy of the dense model with every removed channel zeroed where it is consumed and
    every removed block bypassed."""
    z = copy.deepcopy(model).eval()
    for r in result.passes:
        for path in r.bypassed:
            _bypass(z, path)
    with torch.no_grad():
        for name, dims in result.zero_spec.items():
            p = z.get_parameter(name)
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
                p[_dense_where(p.shape, index.get(name, {}))] = val.to(p.device, p.dtype)
        for name, mask in result.nm_masks.items():  # N:M zeros, placed at the kept positions
            p = z.get_parameter(name)
            dense_mask = _to_dense_positions(mask.cpu(), p.shape, index.get(name, {}))
            p.mul_(dense_mask.to(device=p.device, dtype=p.dtype))
    return z


def _to_dense_positions(mask: torch.Tensor, shape, index: dict[int, np.ndarray]) -> torch.Tensor:
    """A mask over a pruned (possibly reordered) weight, scattered into the dense weight's shape
    (ones elsewhere): ``index[d]`` is the dense index of each position along dim ``d``."""
    full = torch.ones(shape, dtype=torch.bool)
    full[_dense_where(shape, index)] = mask
    return full


def _dense_where(shape, index: dict[int, np.ndarray]) -> tuple:
    """Advanced index selecting, in the dense weight, the positions of the pruned weight."""
    where = []
    for d in range(len(shape)):
        idx = np.asarray(index[d]) if d in index else np.arange(shape[d])
        view = [1] * len(shape)
        view[d] = -1
        where.append(torch.as_tensor(idx).view(view))
    return tuple(where)


def _leaves(out) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def equivalence(
    model: torch.nn.Module, result, example_inputs, rtol: float = RTOL
) -> EquivalenceReport:
    """Compare ``result.module`` with the zeroed dense ``model`` on ``example_inputs`` (fp32, eval).

    Args:
        model: the dense model ``result`` was compiled from (not modified).
        result: a :class:`fxprune.plan.CompileResult`.
        example_inputs: a tensor or tuple of tensors (use real data where you have it).
        rtol: pass threshold on ``max_rel_err``.

    Returns:
        An :class:`EquivalenceReport`; ``ok`` is False when the error exceeds ``rtol`` or when the
        outputs are all zero (the check would prove nothing).

    Example:
        >>> rep = fxprune.verify.equivalence(model, result, x)
        >>> assert rep.ok, rep
    """
    args = as_args(example_inputs)
    z = zeroed_dense(model, result)
    # eval forwards change nothing, so the user's own model serves as the unzeroed reference
    with torch.no_grad(), eval_mode(result.module) as pruned, eval_mode(model) as dense:
        ref = _leaves(z(*args))
        got = _leaves(pruned(*args))
        orig = _leaves(dense(*args))

    def failed(msg: str) -> EquivalenceReport:
        inf = float("inf")
        return EquivalenceReport(False, inf, inf, 0.0, 0.0, result.approximate, rtol, msg)

    if len(ref) != len(got):
        return failed(f"output count differs: dense {len(ref)}, pruned {len(got)}")
    abs_err, scale, effect = 0.0, 0.0, 0.0
    for r, g, o in zip(ref, got, orig, strict=True):
        if r.shape != g.shape:
            return failed(f"output shape differs: {tuple(r.shape)} vs {tuple(g.shape)}")
        r, g, o = r.double(), g.double(), o.double()
        abs_err = max(abs_err, (r - g).abs().max().item() if r.numel() else 0.0)
        scale = max(scale, r.abs().max().item() if r.numel() else 0.0)
        effect = max(effect, (o - g).abs().max().item() if o.numel() else 0.0)
    rel = abs_err / scale if scale > 0 else (0.0 if abs_err == 0 else float("inf"))
    eff = effect / scale if scale > 0 else 0.0
    if scale == 0:
        ok, msg = False, "outputs are all zero: the check proves nothing (use real weights/data)"
    else:
        ok = rel <= rtol
        msg = (
            f"{'equivalent' if ok else 'NOT equivalent'}: max_rel_err={rel:.2e} "
            f"(tolerance {rtol:.0e}), max_abs_err={abs_err:.2e}, pruning changed the dense "
            f"output by {eff:.2e} relative"
        )
        if result.approximate:
            msg += "; approximate groups were pruned, so a difference is expected"
        gone = [b for r in result.passes for b in r.bypassed]
        if gone:
            msg += (
                f"; reference has the {len(gone)} removed blocks bypassed (the removal itself "
                "changes the output: see pruning_effect)"
            )
    return EquivalenceReport(ok, abs_err, rel, eff, scale, result.approximate, rtol, msg)
