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
  one forward, not sequentially through already-pruned layers as in the paper; ``fxprune.stream``
  calibrates block by block on the pruned blocks' outputs). Linear layers that read the same
  value (q/k/v, gate/up) share one Hessian, one factorisation and one sweep (their rows
  stacked). Precision as in the reference implementation: each batch's ``X^T X`` and the sweep
  in float32 (the sum over batches in float64); the factorisation in float32, float64 where
  that fails.

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
    gm: fx.GraphModule, layers: dict[str, WeightedLayer], batches, hessian: bool
) -> tuple[_Acc, dict[str, str]]:
    """Run ``batches`` through ``gm`` and accumulate input statistics for the weights in
    ``layers`` (param name -> layer). Returns the statistics and, per weight, why SparseGPT
    cannot reconstruct it (those get Wanda scores)."""
    from fxprune.calibration import Capture

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
    # accumulated once, serves them all (SparseGPT's Hessian is [in, in] in fp64)
    key = {
        param: f"{src}:linear" if wl.kind == "linear" and wl.reduce_dim == 1 else param
        for src, uses in want.items()
        for param, _, wl in uses
    }
    acc = _Acc()
    with torch.no_grad():
        for b in ticking(batches, "calibrating (N:M)"):
            cap = Capture(gm, set(want))
            cap.run(*b)
            for src, uses in want.items():
                x = cap.seen.get(src)
                if not isinstance(x, torch.Tensor):
                    continue
                done = set()
                for param, node, wl in uses:
                    if key[param] in done:
                        continue
                    done.add(key[param])
                    _accumulate(
                        acc, gm, param, node, wl, x.detach().float(), hessian, fallback, key[param]
                    )
    for param, k in key.items():  # each weight reads its shared statistics under its own name
        for table in (acc.sq, acc.hess, acc.count):
            if k in table:
                table[param] = table[k]
    for k in set(key.values()) - set(key):
        for table in (acc.sq, acc.hess, acc.count):
            table.pop(k, None)
    return acc, fallback


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


def _as_rows(w: torch.Tensor, wl: WeightedLayer) -> torch.Tensor:
    """The weight as [rows, columns] in SparseGPT's column order."""
    if wl.kind == "linear":
        return w.detach().float().t().clone() if wl.reduce_dim == 0 else w.detach().float().clone()
    return w.detach().float().permute(0, 2, 3, 1).reshape(w.shape[0], -1).clone()


def _from_rows(rows: torch.Tensor, like: torch.Tensor, wl: WeightedLayer) -> torch.Tensor:
    if wl.kind == "linear":
        return rows.t() if wl.reduce_dim == 0 else rows
    k, c, r, s = like.shape
    return rows.reshape(k, r, s, c).permute(0, 3, 1, 2)


def hessian_factor(hess: torch.Tensor, count: int, damp: float = 0.01):
    """SparseGPT's upper Cholesky factor of the damped inverse Hessian ``H = 2 X^T X / n``, and
    the dead columns (never active: their weights are zeroed). Factored in float32, as the
    reference implementation does; float64 where float32's factorisation fails or overflows.

    The reference inverts H from its Cholesky factor and factors the inverse again (~2.7 c^3
    FLOP here). With J the reversal of rows and columns, ``J H J = L L^T`` gives ``H^-1 = U^T
    U`` with ``U = J L^-1 J`` upper triangular with a positive diagonal: the same factor, from
    one Cholesky and one triangular solve (1.5x faster at c = 4096, equal to float32
    rounding; tests/passes/test_nm_methods.py compares it with the reference's)."""
    H = hess.double() * (2.0 / max(count, 1))
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    H.diagonal().add_(damp * torch.mean(torch.diag(H)))
    for dtype in (torch.float32, torch.float64):
        L, info = torch.linalg.cholesky_ex(H.to(dtype).flip(0, 1))
        if int(info) == 0:
            eye = torch.eye(H.shape[0], dtype=dtype, device=H.device)
            U = torch.linalg.solve_triangular(L, eye, upper=False).flip(0, 1)
            if bool(torch.isfinite(U).all()):
                return U.float().contiguous(), dead
    raise torch.linalg.LinAlgError("the damped Hessian is not positive definite")


def sparsegpt_rows(W: torch.Tensor, U: torch.Tensor, n: int, m: int, blocksize: int = 128):
    """The OBS sweep on ``W`` ([rows, columns], float32, changed in place): at the start of every
    group of M columns keep the N weights of largest ``w^2 / U_jj^2``, zero the column's pruned
    weights and push their error onto the columns not yet visited; in blocks of ``blocksize``
    columns, each block's error reaching the later columns in one matrix product. Rows are
    independent, so weights sharing a Hessian (q / k / v, gate / up) are swept as one stack.
    The sweep runs on the transpose, so that a column is contiguous. Returns the pruned
    positions."""
    rows, cols = W.shape
    Wt = W.t().contiguous()  # [columns, rows]
    pruned = torch.zeros_like(Wt, dtype=torch.bool)
    blocksize = max(m, blocksize - blocksize % m)
    d = torch.diag(U)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1, U1, P1 = Wt[i1:i2], U[i1:i2, i1:i2], pruned[i1:i2]
        E1 = torch.empty_like(W1)
        for g in range(0, i2 - i1, m):
            score = W1[g : g + m] ** 2 / d[i1 + g : i1 + g + m].reshape(-1, 1) ** 2
            drop = torch.topk(score, m - n, dim=0, largest=False).indices
            P1[g : g + m].scatter_(0, drop, True)
            for i in range(g, min(g + m, i2 - i1)):
                err = E1[i]
                torch.mul(W1[i], P1[i], out=err).div_(d[i1 + i])  # (w - q) / d
                W1[i:].addr_(U1[i, i:], err, alpha=-1.0)
        W1.masked_fill_(P1, 0.0)
        if i2 < cols:
            Wt[i2:].addmm_(U[i1:i2, i2:].t(), E1, alpha=-1.0)
    W.copy_(Wt.t())
    return pruned.t()


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
    W = _as_rows(w, wl)
    W[:, dead] = 0.0
    pruned = sparsegpt_rows(W, U, n, m, blocksize)
    new = _from_rows(W.to(w.dtype), w, wl).contiguous()
    keep = ~_from_rows(pruned, w, wl).contiguous()
    return new, keep
