"""The proof's measurements, one output leaf at a time: each leaf named by its key path
(``last_hidden_state``, ``[1]``), its error against the reference, and its judgement: on its own
scale (``max|pruned - zeroed| / max|zeroed|``), or, for a leaf whose reference is all zero, on
absolute error against a tolerance that follows its dtype (``zero_atol``)."""

from __future__ import annotations

import torch
from torch.utils import _pytree as pytree

ATOL = {torch.float64: 1e-7}
"""Absolute tolerance of an all-zero reference leaf at the default ``rtol`` (1e-4), by dtype:
``torch.testing.assert_close``'s defaults (1e-5 for the other float dtypes; integers and bools
exact)."""


class Mismatch(Exception):
    """A check failed outright; ``output`` names the output leaf concerned, if any."""

    def __init__(self, message: str, output: str = ""):
        super().__init__(message)
        self.output = output


def _name(path) -> str:
    """``last_hidden_state``, ``[1]``, ``logits``, ``hidden_states[2]``: a leaf's key path."""
    out = ""
    for k in path:
        if isinstance(k, pytree.SequenceKey):
            out += f"[{k.idx}]"
        else:
            key = k.key if isinstance(k, pytree.MappingKey) else getattr(k, "name", k)
            out += f".{key}" if out else str(key)
    return out or "output"


def named_leaves(out) -> list[tuple[str, torch.Tensor]]:
    """The tensors of a model output with their key paths."""
    try:
        flat = pytree.tree_flatten_with_path(out)[0]
    except ValueError:  # a container registered without key paths: number the leaves
        flat = [((pytree.SequenceKey(i),), t) for i, t in enumerate(pytree.tree_leaves(out))]
    return [(_name(p), t) for p, t in flat if isinstance(t, torch.Tensor)]


def leaves(out) -> list[torch.Tensor]:
    """The tensors of a model output, in the order of :func:`named_leaves`."""
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def what(name: str) -> str:
    return "output" if name == "output" else f"output {name}"


def zero_atol(dtype: torch.dtype, rtol: float, default_rtol: float) -> float:
    """The absolute error an all-zero reference leaf of ``dtype`` tolerates: :data:`ATOL`,
    scaled as ``rtol`` is scaled from its default (0 for integer and bool leaves)."""
    if not dtype.is_floating_point:
        return 0.0
    return ATOL.get(dtype, 1e-5) * rtol / default_rtol


def measure(ref, got, orig, where: str) -> list[tuple[str, float, float, float, torch.dtype]]:
    """Per output leaf of one input set: (name, max abs err, max |reference|, max |dense -
    pruned|, the reference's dtype); raises :class:`Mismatch` on a count, shape or finiteness
    mismatch."""
    if len(ref) != len(got):
        raise Mismatch(f"output count differs: dense {len(ref)}, pruned {len(got)}")
    rows = []
    for (name, r), g, o in zip(ref, got, orig, strict=True):
        if r.shape != g.shape:
            raise Mismatch(
                f"{what(name)} shape differs: {tuple(r.shape)} vs {tuple(g.shape)}", name
            )
        dtype = r.dtype
        r, g, o = r.double(), g.double(), o.double()
        if not torch.isfinite(r).all():
            raise Mismatch(
                f"reference {what(name)} has NaN/Inf on {where} (the zeroed dense model is not "
                "finite): the check proves nothing",
                name,
            )
        bad = int((~torch.isfinite(g)).sum())
        if bad:
            raise Mismatch(
                f"NOT equivalent: pruned {what(name)} has {bad} NaN/Inf values on {where} "
                "where the reference is finite",
                name,
            )
        if not r.numel():
            rows.append((name, 0.0, 0.0, 0.0, dtype))
            continue
        eff = float((o - g).abs().max()) if o.shape == g.shape else float("inf")
        eff = float("inf") if eff != eff else eff  # a NaN in the dense model: removal mattered
        rows.append((name, float((r - g).abs().max()), float(r.abs().max()), eff, dtype))
    return rows


def judged(rows, atol):
    """Each measured leaf as (name, abs err, scale, dense effect, relative error, zero tol): a
    leaf with a scale of its own is judged on it (``zero tol`` None); an all-zero one on
    absolute error against ``zero tol = atol(dtype)``, its relative error 0 within it and inf
    beyond, its effect measured on the input set's largest output (its ``scale``)."""
    for leaf_rows in rows:
        top = max((s for _, _, s, _, _ in leaf_rows), default=0.0)
        for name, err, s, e, dtype in leaf_rows:
            if s:
                yield name, err, s, e, err / s, None
            else:
                tol = atol(dtype)
                yield name, err, top, e, (0.0 if err <= tol else float("inf")), tol
