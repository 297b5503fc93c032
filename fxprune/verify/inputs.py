"""Inputs and copies the equivalence proof runs on: fresh random draws like the example (another
batch size, and a sequence one shorter for token ids) and float32 / float64 copies of the models
(a half-precision model is compared without its rounding)."""

from __future__ import annotations

import contextlib
import contextvars
import copy

import torch
import torch.fx as fx
import torch.nn as nn


def draw(a, g: torch.Generator, length: int | None):
    """A random tensor drawn like ``a``, one more along dim 0 (and ``length`` along dim 1 of a
    2-D integer input): floats with the example's mean and std (standard normal for an all-zero
    example), integers uniform in the example's [min, max]."""
    if not isinstance(a, torch.Tensor) or a.ndim == 0 or a.is_complex():
        return a
    shape = list(a.shape)
    shape[0] += 1
    if length is not None and a.ndim == 2 and not a.is_floating_point():
        shape[1] = length
    if a.is_floating_point():
        x = a.detach().double()
        mean = float(x.mean()) if x.numel() else 0.0
        std = float(x.std()) if x.numel() > 1 else 0.0
        std = std or abs(mean) or 1.0  # a constant example still gets varied values
        t = torch.randn(shape, generator=g, dtype=torch.float64) * std + mean
    else:
        lo, hi = (int(a.min()), int(a.max())) if a.numel() else (0, 1)
        t = torch.randint(lo, hi + 1, shape, generator=g)
    return t.to(device=a.device, dtype=a.dtype)


def input_sets(args: tuple, fresh: int, seed: int) -> list[tuple[str, tuple, str]]:
    """(label, inputs, kind) for the example and ``fresh`` random draws; kind is ``example``,
    ``batch`` (the first draw: batch + 1) or ``length`` (later draws of a text model: batch + 1
    and a sequence one shorter)."""
    sets = [("the example", args, "example")]
    batch = next((a.shape[0] for a in args if isinstance(a, torch.Tensor) and a.ndim), None)
    if batch is None:
        return sets
    text = [a for a in args if isinstance(a, torch.Tensor) and a.ndim == 2]
    text = [a for a in text if not a.is_floating_point()]
    g = torch.Generator().manual_seed(seed)
    for k in range(fresh):
        length = None
        if k and text:
            seq = text[0].shape[1]
            length = seq - 1 if seq > 1 else seq + 1
        label = f"fresh input {k + 1} (batch {batch + 1}" + (
            f", length {length})" if length else ")"
        )
        sets.append(
            (label, tuple(draw(a, g, length) for a in args), "length" if length else "batch")
        )
    return sets


def cast(a, dtype: torch.dtype):
    return a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a


_POOL: contextvars.ContextVar[dict | None] = contextvars.ContextVar("fxprune_copies", default=None)


@contextlib.contextmanager
def reused_copies():
    """Within it, the proof's cast copies are written into the tensors of the copies an earlier
    proof gave back (:func:`give_back`) where shape, dtype and device match, instead of fresh
    memory: a stream proves blocks of one shape, and filling memory already touched is ~2.7x
    faster than faulting in new pages (bf16 -> float32, 45 M values, one thread: 0.026 against
    0.071 s). The pool holds one proof's copies between proofs and is dropped on exit."""
    token = _POOL.set({})
    try:
        yield
    finally:
        _POOL.reset(token)


def give_back(*copies: torch.nn.Module) -> None:
    """Hand the tensors of cast copies that nothing else will read to the pool of
    :func:`reused_copies` (outside one: nothing happens)."""
    pool = _POOL.get()
    if pool is None:
        return
    seen: set[int] = set()
    for m in copies:
        for t in (*m.parameters(), *m.buffers()):
            if id(t) not in seen and t.is_floating_point() and t.is_contiguous():
                seen.add(id(t))
                pool.setdefault((t.shape, t.dtype, t.device), []).append(t.detach())


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    free = (_POOL.get() or {}).get((t.shape, dtype, t.device))
    if free and t.is_contiguous():
        return free.pop().copy_(t.detach())
    return t.detach().to(dtype, copy=True)


def cast_copy(module: torch.nn.Module, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """A deep copy of ``module`` whose floating parameters and buffers are ``dtype`` (what
    ``copy.deepcopy(module).to(dtype)`` gives, with each tensor copied once instead of copied
    and then cast). Every tensor is a new one, also where it already had ``dtype`` (within
    :func:`reused_copies`, possibly one an earlier proof gave back)."""
    memo: dict[int, object] = {}
    for t in (*module.parameters(), *module.buffers()):
        if id(t) in memo or not (dtype is not None and t.is_floating_point()):
            continue
        new = _cast(t, dtype)
        memo[id(t)] = nn.Parameter(new, t.requires_grad) if isinstance(t, nn.Parameter) else new
    return copy.deepcopy(module, memo)


def cast_module(gm: torch.nn.Module, native: set, dtype: torch.dtype) -> torch.nn.Module:
    """A copy of ``gm`` in ``dtype``. A capture read the model's dtype into the graph (casts,
    ``full(..., dtype=float16)``): those constants follow, as the dense model's would."""
    out = cast_copy(gm, dtype)
    if isinstance(out, fx.GraphModule):

        def swap(a):
            return dtype if isinstance(a, torch.dtype) and a in native else a

        for node in out.graph.nodes:
            node.args = fx.node.map_aggregate(node.args, swap)
            node.kwargs = fx.node.map_aggregate(node.kwargs, swap)
        out.recompile()
    return out
