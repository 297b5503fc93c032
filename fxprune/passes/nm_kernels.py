"""The N:M tensor kernels: each weight's mask (the N largest of every M along its reduction
axis, or of a score such as Wanda's), the in-place rewrite with its L1 norms, and the pattern
checks the proof runs. Vectorised over all groups, block by block so every temporary stays in
cache: a billion weights take seconds on a CPU. No graph here: :mod:`fxprune.passes.nm` is the
pass that picks the layers."""

from __future__ import annotations

import math
import sys

import torch


def magnitude_order(w: torch.Tensor) -> torch.Tensor:
    """A tensor that orders like ``|w|``: for IEEE floats the bit pattern with the sign cleared
    (integer ops, no float ``abs``), as int32 (16-bit floats are widened: a CPU compares int32
    columns ~1.7x faster than int16 ones), else ``w.abs()``."""
    w = w.detach()
    if w.dtype == torch.float32:
        return w.view(torch.int32) & 0x7FFFFFFF
    if w.dtype in (torch.bfloat16, torch.float16):
        return w.view(torch.int16).to(torch.int32).bitwise_and_(0x7FFF)
    return w.abs()


BLOCK = 1 << 20
"""Elements per block of the N:M kernels: a block's temporaries (magnitude bits, ranks, mask)
stay in cache and the allocator reuses them, where whole-tensor temporaries are fresh pages each
time; 1M elements measured fastest on a 2-core CPU (fp32 4096x4096: 29 ms against 75 ms)."""

_PACKED = {2: torch.int16, 4: torch.int32, 8: torch.int64} if sys.byteorder == "little" else {}
"""Group sizes whose ranks pack one byte per weight into one integer per group."""


def _blocks(shape: torch.Size, axis: int):
    """Index tuples cutting a tensor into blocks of about :data:`BLOCK` elements along a dim
    other than ``axis`` (so every group of M stays whole)."""
    numel = math.prod(shape)
    if len(shape) < 2 or numel <= BLOCK:
        yield (slice(None),)
        return
    dim = 0 if axis % len(shape) != 0 else 1
    step = max(1, BLOCK * shape[dim] // numel)
    for start in range(0, shape[dim], step):
        yield (slice(None),) * dim + (slice(start, start + step),)


def _mask_block(w: torch.Tensor, n: int, m: int, axis: int, order=None) -> torch.Tensor:
    """The N:M keep mask of one block of ``w``, ranked by ``|w|`` or by ``order`` (a tensor of
    ``w``'s shape that orders like the score: a non-negative float32 score's own bits)."""
    moved = (magnitude_order(w) if order is None else order).movedim(axis, -1)  # [..., C]
    groups = moved.reshape(-1, m)  # one row per group of M along the reduction axis
    if m in _PACKED:
        # Byte k of a group's integer is weight k's rank (how many of its group outrank it).
        # Each pair (i, j) is compared once: a later j that is larger moves one count from
        # byte j (which starts out assuming every earlier weight outranks it) to byte i, so
        # ties go to the earlier weight. Bytes stay in 0..M-1 (no carry crosses a byte).
        cols = groups.unbind(1)
        start = sum(j << (8 * j) for j in range(m))
        rank = torch.full((groups.shape[0],), start, dtype=_PACKED[m], device=w.device)
        for i in range(m):
            for j in range(i + 1, m):
                rank.add_(cols[j] > cols[i], alpha=(1 << (8 * i)) - (1 << (8 * j)))
        ones = sum(1 << (8 * k) for k in range(m))
        # rank + 8 - n (at most 14) sets a byte's bit 3 iff rank >= n: shift, NOT, AND leave
        # 1 where kept. No byte ever passes 15, so nothing carries or overflows.
        rank.add_((8 - n) * ones).bitwise_right_shift_(3).bitwise_not_().bitwise_and_(ones)
        keep = rank.view(torch.uint8).view(torch.bool)
    elif m <= 8:
        cols = groups.unbind(1)
        rank = [torch.zeros(groups.shape[0], dtype=torch.uint8, device=w.device) for _ in cols]
        for i in range(m):
            for j in range(i + 1, m):
                later = cols[j] > cols[i]  # j outranks i; otherwise i (larger or equal, earlier)
                rank[i] += later
                rank[j] += ~later
        keep = torch.stack([r < n for r in rank], 1)
    else:
        top = groups.topk(n, dim=-1).indices
        keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, top, True)
    return keep.reshape(moved.shape).movedim(-1, axis)


def _zero_dropped(w: torch.Tensor, keep: torch.Tensor) -> None:
    """``w.masked_fill_(~keep, 0)``, as an AND with an all-ones / all-zeros integer mask for
    IEEE floats (+0.0 either way, NaN included; ~10x faster than ``masked_fill_`` on a CPU)."""
    bits = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
    if w.dtype in bits and w.is_contiguous():
        w.view(bits[w.dtype]).bitwise_and_(keep.to(bits[w.dtype]).neg_())
    else:
        w.masked_fill_(~keep, 0)


def nm_mask(w: torch.Tensor, n: int, m: int, axis: int = 1) -> torch.Tensor:
    """Boolean mask keeping the ``n`` largest-magnitude of every ``m`` consecutive weights along
    ``axis`` (``w.shape[axis]`` must be divisible by ``m``). Ties go to the earlier weight.

    Vectorised: for small M (2:4, 4:8) each weight's rank in its group comes from the
    M*(M-1)/2 pairwise comparisons of the groups' columns (each decides both ranks), on the
    magnitude bits (:func:`magnitude_order`): no float ``abs`` copy, half the comparisons of
    ranking each weight on its own, and ~2x the rate of ``topk`` over a size-4 dim on a CPU
    (a copy transposing the groups into contiguous rows measured no faster). The work runs in
    blocks of :data:`BLOCK` elements (2.5x faster than whole-tensor temporaries). Larger M
    uses ``topk``.
    """
    parts = list(_blocks(w.shape, axis))
    if len(parts) == 1:
        return _mask_block(w, n, m, axis)
    keep = torch.empty(w.shape, dtype=torch.bool, device=w.device)
    for idx in parts:
        keep[idx] = _mask_block(w[idx], n, m, axis)
    return keep


def apply_nm(
    w: torch.Tensor, n: int, m: int, axis: int = 1, scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, float, float]:
    """Zero ``w`` in place to N:M along ``axis``, ranked by ``|w|`` or, with ``scale`` (one
    factor per index of ``axis``: Wanda's input norms), by ``|w| * scale`` in float32; block by
    block so each block's score, mask, rewrite and statistics read it while it is in cache (no
    whole-weight float32 score). Returns the mask and ``w``'s L1 norm before and after."""
    keep = torch.empty(w.shape, dtype=torch.bool, device=w.device)
    if scale is not None:
        view = [1] * w.ndim
        view[axis] = -1
        scale = scale.to(w.device, torch.float32).abs().reshape(view)  # ranks by |w x scale|
    before = after = 0.0
    with torch.no_grad():
        for idx in _blocks(w.shape, axis):
            part = w[idx]
            order = None
            if scale is not None:  # |w| x scale >= 0: its float32 bits order like it
                order = part.to(torch.float32, copy=True).abs_().mul_(scale).view(torch.int32)
            mask = _mask_block(part, n, m, axis, order)
            keep[idx] = mask
            before += float(part.abs().sum(dtype=torch.float32))
            _zero_dropped(part, mask)
            after += float(part.abs().sum(dtype=torch.float32))
    return keep, before, after


def _too_many(nz: torch.Tensor, n: int, m: int) -> bool:
    """Whether a group of ``m`` consecutive entries of the last dim of the contiguous bool
    ``nz`` holds more than ``n`` True. For M = 2 / 4 / 8 a group's bytes are one integer and
    shifted adds sum them into its low byte (no sum over a size-M dim, several times slower on
    a CPU; every byte is 0 / 1, so no sum passes 8 and nothing carries); else columns added."""
    if m in _PACKED:
        g = nz.view(torch.uint8).reshape(-1, m).view(_PACKED[m])
        shift = 8
        while shift < 8 * m:
            g = g + (g >> shift)
            shift *= 2
        return bool(g.bitwise_and_(0xFF).gt_(n).any())
    cols = nz.reshape(-1, m).unbind(1)
    count = cols[0].to(torch.uint8)
    for c in cols[1:]:
        count += c
    return bool((count > n).any())


def is_nm(w: torch.Tensor, n: int, m: int, axis: int = 1) -> bool:
    """True when every group of ``m`` along ``axis`` has at most ``n`` non-zeros (False when
    the axis is not a multiple of ``m``), block by block."""
    if w.shape[axis] % m:
        return False
    for idx in _blocks(w.shape, axis):
        if _too_many((w[idx].detach() != 0).movedim(axis, -1).contiguous(), n, m):
            return False
    return True


def off_mask(
    w: torch.Tensor, keep: torch.Tensor, n: int | None = None, m: int | None = None, axis: int = 1
) -> tuple[int, bool]:
    """How many non-zeros ``w`` has where ``keep`` is False, and (with ``n`` / ``m``) whether
    every group of ``m`` along ``axis`` has at most ``n`` non-zeros: both from one comparison
    of each block with zero while it is in cache (the proof's check of every masked weight)."""
    fits = n is None or w.shape[axis] % m == 0
    stray = 0
    for idx in _blocks(w.shape, axis):
        nz = (w[idx].detach() != 0).movedim(axis, -1).contiguous()
        stray += int(nz.logical_and(keep[idx].movedim(axis, -1).logical_not()).count_nonzero())
        if fits and n is not None:
            fits = not _too_many(nz, n, m)
    return stray, fits
