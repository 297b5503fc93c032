"""Data-aware N:M selection for the N:M pass: Wanda and SparseGPT, both on the reduction axis the
magnitude rule uses (``in_features`` of a Linear, input channels of a conv at every kernel
position), from calibration batches run through the graph being pruned.

- **Wanda** (Sun et al. 2023, "A Simple and Effective Pruning Approach for LLMs"): score
  ``|W_ij| x ||X_j||_2``, the weight times the L2 norm of the input feature it multiplies over
  all calibration tokens (pixels for a conv: the input channel's norm); keep the N largest
  scores of every M. Weights are not changed.
- **SparseGPT** (Frantar & Alistarh 2023): layer-wise reconstruction with the Hessian of the
  layer's squared error, ``H = 2 X^T X / n`` (+ 1 % damping of its mean diagonal): columns are
  visited in order; at the start of every group of M, the N:M choice keeps the weights with the
  largest ``w^2 / [H^-1]_jj^2``; each pruned weight's error is pushed onto the not yet visited
  columns through the inverse Hessian's Cholesky factor, in blocks of 128 columns. **Kept
  weights change**: the pass returns them (``PassResult.updated``) so the proof compares against
  the dense model with those values. Inputs come from the dense model (all layers calibrated in
  one forward), or with ``NM(sequential=True)`` from the layers before, already pruned, as in
  the paper's sequential order (``fxprune.stream`` does that block by block, each block in one
  forward). Linear layers that read the same
  value (q/k/v, gate/up) share one Hessian, one factorisation and one sweep (their rows
  stacked). Precision as in the reference implementation: ``X^T X`` summed over batches and the
  sweep in float32; the factorisation in float32, float64 where that fails. The factor and the
  sweep themselves are :mod:`fxprune.passes.sparsegpt`.

Conv weights ``[K, C, R, S]`` are handled as ``[K, R*S*C]`` (columns ordered kernel position,
then channel) so that every group of M consecutive columns lies along ``C`` (TensorRT's axis
rule); the Hessian is built from unfolded inputs in the same order. Only 2-D convs via
``nn.Conv2d`` / ``conv2d`` with groups 1 are reconstructed; others fall back to Wanda scores
(reported).
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from fxprune._util import ticking
from fxprune.graph.weighted import WeightedLayer, weighted_layer
from fxprune.passes.sparsegpt import hessian_factor, sparsegpt_cols, transposed


def _input_node(node: fx.Node, wl: WeightedLayer) -> fx.Node | None:
    idx = 1 if wl.reduce_dim == 0 else 0  # addmm(bias, x, W) reads x second
    a = node.args[idx] if len(node.args) > idx else None
    return a if isinstance(a, fx.Node) else None


def _conv_geometry(gm: fx.GraphModule, node: fx.Node):
    """(stride, padding, dilation) of a 2-D conv node, or None when not a plain conv2d."""
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        if isinstance(m, nn.Conv2d) and isinstance(m.padding, tuple) and m.padding_mode == "zeros":
            return m.stride, m.padding, m.dilation
        return None  # reflect / circular padding: the zero-padded unfold would be wrong
    name = str(getattr(node.target, "__name__", node.target)).split(".")[-1]
    if name != "conv2d":
        return None
    a = list(node.args) + [None] * 7
    stride = a[3] or node.kwargs.get("stride", 1)
    padding = a[4] if a[4] is not None else node.kwargs.get("padding", 0)
    dilation = a[5] or node.kwargs.get("dilation", 1)
    if isinstance(padding, str):
        return None
    pair = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v, v)  # noqa: E731
    return pair(stride), pair(padding), pair(dilation)


class _Acc:
    """Per weight: sum of squared inputs per reduction feature (Wanda) and, when asked, X^T X
    over the weight's columns in processing order (SparseGPT)."""

    def __init__(self):
        self.sq: dict[str, torch.Tensor] = {}
        self.hess: dict[str, torch.Tensor] = {}
        self.count: dict[str, int] = {}


def calibrate(
    gm: fx.GraphModule, layers: dict[str, WeightedLayer], batches, hessian: bool, on_ready=None
) -> tuple[_Acc, dict[str, str], list | None]:
    """Run ``batches`` through ``gm`` and accumulate input statistics for the weights in
    ``layers`` (param name -> layer). Returns the statistics, per weight why SparseGPT cannot
    reconstruct it (those get Wanda scores), and the graph's outputs (sequential only).

    With ``on_ready`` (a sequential calibration) every batch runs through the graph together
    (:class:`fxprune.calibration.Lockstep`) and ``on_ready(params, stats)`` is called as soon as the
    statistics of the weights ``params`` are complete, before any of them runs: it may prune
    them, so each later layer calibrates on what the pruned layers before it give, in one
    forward; the outputs returned are the pruned graph's, one per batch."""
    from fxprune.calibration import Capture, Lockstep

    want: dict[str, list[tuple[str, fx.Node, WeightedLayer]]] = {}
    fallback: dict[str, str] = {}
    for node in gm.graph.nodes:
        wl = weighted_layer(gm, node)
        if wl is None or wl.param not in layers:
            continue
        src = _input_node(node, wl)
        if src is None:
            fallback[wl.param] = "its input is not a graph value"
            continue
        want.setdefault(src.name, []).append((wl.param, node, wl))
    # Linear layers reading one value (q/k/v, gate/up) have the same statistics: one copy,
    # accumulated once, serves them all (SparseGPT's Hessian is [in, in])
    key = {
        param: f"{src}:linear" if wl.kind == "linear" and wl.reduce_dim == 1 else param
        for src, uses in want.items()
        for param, _, wl in uses
    }
    acc = _Acc()

    def seen(src: str, xs) -> None:  # src's value in one batch, or a list: one per batch
        xs = [x.detach() for x in (xs if isinstance(xs, list) else [xs]) if torch.is_tensor(x)]
        done, rows, x32 = set(), None, None
        for param, node, wl in want[src]:
            if key[param] in done or not xs:
                continue
            done.add(key[param])
            if wl.kind == "linear" and wl.reduce_dim == 1:
                if rows is None:  # every batch's tokens as rows of one matrix: one product
                    rows = torch.cat([x.reshape(-1, x.shape[-1]).float() for x in xs])
                _accumulate(acc, gm, param, node, wl, rows, hessian, fallback, key[param])
            else:
                x32 = x32 or [x.float() for x in xs]  # cast once for every conv reading src
                for x in x32:
                    _accumulate(acc, gm, param, node, wl, x, hessian, fallback, key[param])

    def share(src: str) -> None:  # each weight reads its shared statistics under its own name
        for param, _, _ in want[src]:
            for table in (acc.sq, acc.hess, acc.count):
                if key[param] in table:
                    table[param] = table[key[param]]

    def after(node: fx.Node, values: list) -> None:
        if node.name in want:
            seen(node.name, values)
            share(node.name)
            on_ready([param for param, _, _ in want[node.name]], acc)

    outputs = None
    with torch.no_grad():
        if on_ready is not None:
            outputs = Lockstep(gm, batches).run(after)
        else:
            for b in ticking(batches, "calibrating (N:M)"):  # each input used as it is made
                Capture(gm, set(want), on_value=seen).run(*b)
            for src in want:
                share(src)
    for k in set(key.values()) - set(key):
        for table in (acc.sq, acc.hess, acc.count):
            table.pop(k, None)
    return acc, fallback, outputs


def _accumulate(acc, gm, param, node, wl, x, hessian, fallback, key=None) -> None:
    key = key or param
    if wl.kind == "linear":
        cols = x.reshape(-1, x.shape[-1])  # [tokens, in]
        sq = cols.pow(2).sum(0)
    else:
        sq = x.pow(2).sum(dim=[d for d in range(x.ndim) if d != 1])  # per input channel
        cols = None
        if hessian and param not in fallback:
            geo = _conv_geometry(gm, node) if x.ndim == 4 and wl.groups == 1 else None
            if geo is None:
                fallback[param] = "only 2-D convs with groups=1 and zero padding are reconstructed"
            else:
                w = gm.get_parameter(param)
                k = tuple(w.shape[2:])
                u = F.unfold(x, k, dilation=geo[2], padding=geo[1], stride=geo[0])
                n, _, L = u.shape
                c = x.shape[1]  # (c, r, s) -> (r, s, c): groups of M run along channels
                u = u.reshape(n, c, k[0] * k[1], L).permute(0, 2, 1, 3).reshape(n, -1, L)
                cols = u.permute(0, 2, 1).reshape(-1, u.shape[1])
    acc.sq[key] = acc.sq.get(key, 0) + sq
    acc.count[key] = acc.count.get(key, 0) + (cols.shape[0] if cols is not None else 1)
    if hessian and cols is not None and param not in fallback:
        if key in acc.hess:  # summed in float32, as the reference does (no float64 copy a batch)
            acc.hess[key].addmm_(cols.T, cols)
        else:
            acc.hess[key] = cols.T @ cols


def wanda_scores(w: torch.Tensor, wl: WeightedLayer, sq: torch.Tensor) -> torch.Tensor:
    """|W| times the input feature norm, broadcast along the reduction axis."""
    norm = sq.to(w.device).float().sqrt()
    shape = [1] * w.ndim
    shape[wl.reduce_dim] = -1
    return w.detach().abs().float() * norm.reshape(shape)


def _as_cols(w: torch.Tensor, wl: WeightedLayer) -> torch.Tensor:
    """A float32 copy of the weight as [columns, rows] in SparseGPT's column order (one pass)."""
    if wl.kind == "linear" and wl.reduce_dim == 1 and w.ndim == 2:
        return transposed(w.detach(), torch.float32)
    if wl.kind == "linear":
        view = w.detach().t() if wl.reduce_dim == 1 else w.detach()
    else:
        view = w.detach().permute(2, 3, 1, 0).reshape(-1, w.shape[0])
    return torch.empty(view.shape, dtype=torch.float32, device=w.device).copy_(view)


def _from_cols(cols: torch.Tensor, like: torch.Tensor, wl: WeightedLayer, dtype) -> torch.Tensor:
    """``cols`` ([columns, rows]) back in ``like``'s layout as a new contiguous ``dtype`` tensor."""
    if wl.kind == "linear" and wl.reduce_dim == 1 and like.ndim == 2:
        return transposed(cols, dtype)
    if wl.kind == "linear":
        view = cols.t() if wl.reduce_dim == 1 else cols
    else:
        k, c, r, s = like.shape
        view = cols.reshape(r, s, c, k).permute(3, 2, 0, 1)
    return torch.empty(like.shape, dtype=dtype, device=like.device).copy_(view)


def sparsegpt(
    w: torch.Tensor,
    wl: WeightedLayer,
    hess: torch.Tensor,
    count: int,
    n: int,
    m: int,
    damp: float = 0.01,
    blocksize: int = 128,
    factor=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(new weight, keep mask) for one layer; both in ``w``'s shape (``factor``: this Hessian's
    :func:`hessian_factor`, when already computed for a layer sharing it)."""
    U, dead = factor if factor is not None else hessian_factor(hess.to(w.device), count, damp)
    Wt = _as_cols(w, wl)
    Wt[dead] = 0.0
    kept = sparsegpt_cols(Wt, U, n, m, blocksize)
    return _from_cols(Wt, w, wl, w.dtype), _from_cols(kept, w, wl, torch.bool)
