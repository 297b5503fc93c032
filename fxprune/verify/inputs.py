"""Inputs and copies the equivalence proof runs on: fresh random draws like the example (another
batch size, and a sequence one shorter for token ids) and float32 / float64 copies of the models
(a half-precision model is compared without its rounding)."""

from __future__ import annotations

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


def cast_copy(module: torch.nn.Module, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """A deep copy of ``module`` whose floating parameters and buffers are ``dtype`` (what
    ``copy.deepcopy(module).to(dtype)`` gives, with each tensor copied once instead of copied
    and then cast). Every tensor is a new one, also where it already had ``dtype``."""
    memo: dict[int, object] = {}
    for t in (*module.parameters(), *module.buffers()):
        if id(t) in memo or not (dtype is not None and t.is_floating_point()):
            continue
        new = t.detach().to(dtype, copy=True)
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
