"""SparseGPT's solver (Frantar & Alistarh 2023): the Hessian's factor and the column sweep, the
arithmetic of the 2:4 reconstruction, kept near the machine's matrix-product rate.

- **Factor.** The sweep reads ``U``, the upper Cholesky factor of the damped inverse Hessian.
  The reference inverts H from its Cholesky factor and factors the inverse again (~1.7 c^3
  FLOP). With J the reversal of rows and columns, ``J H J = L L^T`` gives ``H^-1 = U^T U`` with
  ``U = J L^-1 J``: one Cholesky and one triangular inverse (~0.7 c^3), the inverse taken by
  halves so that its work is matrix products (LAPACK's triangular solve against the identity
  does c^3 and runs below the product rate).
- **Sweep.** Columns are visited in order; at the start of every group of M the N:M choice
  keeps the N weights of largest ``w^2 / U_jj^2``; each pruned weight's error goes onto the
  columns not yet visited. Three levels of blocking: inside a sub-block of 16 columns column
  by column (a rank-1 update each; one product per group of 4 was no faster on one thread and
  far slower on two threads of a busy machine), one product per sub-block onto the rest of
  its block of 128, one product per block onto the columns after it (the reference's lazy
  batch update). The weights are held
  transposed ([columns, rows]) so a column is contiguous; the N:M choice of M = 4 is a network
  of minimum / maximum (2:4: the second smallest in 7 operations; topk plus scatter along that
  short strided axis measured ~5x slower: 310 against 60 us for a group of 4 x 11264), with
  topk where a group has tied scores or M is another size.

Every level computes what the textbook column loop computes (float64: equal to rounding;
tests/passes/test_nm_methods.py).
"""

from __future__ import annotations

import torch

SUB = 16  # columns per sub-block inside a 128-column block


def transposed(src: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``src.t()`` of a 2-D tensor as a new contiguous tensor (in ``dtype``), copied in bands
    of 128 rows of ``src`` so each band's reads and writes stay in cache: 5632 x 2048 bf16 to
    float32, one thread, 0.12 s as one strided copy, 0.044 s so."""
    out = torch.empty(src.shape[1], src.shape[0], dtype=dtype or src.dtype, device=src.device)
    for j in range(0, src.shape[0], 128):
        out[:, j : j + 128].copy_(src[j : j + 128].t())
    return out


def lower_inverse(L: torch.Tensor, base: int = 512) -> torch.Tensor:
    """``L^-1`` of a lower triangular ``L`` by halves: ``[[A, 0], [B, C]]^-1 = [[A^-1, 0],
    [-C^-1 B A^-1, C^-1]]``, the off-diagonal block one product and one triangular solve."""
    n = L.shape[0]
    if n <= base:
        eye = torch.eye(n, dtype=L.dtype, device=L.device)
        return torch.linalg.solve_triangular(L, eye, upper=False)
    k = (n // 2 + 63) // 64 * 64
    out = torch.zeros_like(L)
    A_inv = lower_inverse(L[:k, :k], base)
    out[:k, :k] = A_inv
    out[k:, k:] = lower_inverse(L[k:, k:], base)
    rhs = L[k:, :k] @ A_inv
    out[k:, :k] = torch.linalg.solve_triangular(L[k:, k:], rhs, upper=False).neg_()
    return out


def hessian_factor(hess: torch.Tensor, count: int, damp: float = 0.01):
    """SparseGPT's upper Cholesky factor of the damped inverse Hessian ``H = 2 X^T X / n``, and
    the dead columns (never active: their weights are zeroed). Float32, as the reference
    implementation factors; float64 where float32's factorisation fails or overflows."""
    for dtype in (torch.float32, torch.float64):
        H = hess.to(dtype) * (2.0 / max(count, 1))  # a new tensor: hess may be shared
        dead = torch.diag(H) == 0
        H[dead, dead] = 1.0
        H.diagonal().add_(damp * torch.mean(torch.diag(H)))
        L, info = torch.linalg.cholesky_ex(H.flip(0, 1))
        if int(info) == 0:
            U = lower_inverse(L).flip(0, 1)
            if bool(U.sum().isfinite()):  # any inf / nan reaches the sum
                return U.float().contiguous(), dead
    raise torch.linalg.LinAlgError("the damped Hessian is not positive definite")


def _exchange(x: list, i: int, j: int) -> None:
    x[i], x[j] = torch.minimum(x[i], x[j]), torch.maximum(x[i], x[j])


def keep_nm(score: torch.Tensor, n: int, keep: torch.Tensor) -> torch.Tensor:
    """``keep`` ([M, rows], float, written): 1 at the N largest scores of each column, else 0."""
    m = score.shape[0]
    if m == 4:  # keep what lies above the (4 - N)-th smallest of the four rows
        a, b, c, d = score.unbind(0)
        if n == 2:  # the second smallest: min(min(max(a, b), max(c, d)), max(min(a, b), min(c, d)))
            t = torch.minimum(torch.maximum(a, b), torch.maximum(c, d))
            t = torch.minimum(t, torch.maximum(torch.minimum(a, b), torch.minimum(c, d)))
        else:  # sort the four rows
            x = [a, b, c, d]
            for i, j in ((0, 1), (2, 3), (0, 2), (1, 3), (1, 2)):
                _exchange(x, i, j)
            t = x[m - n - 1]
        torch.sub(score, t, out=keep).sign_().clamp_(min=0.0)
        if not bool(keep.sum(0).ne(n).any()):  # a tie at the threshold: topk decides
            return keep
    drop = torch.topk(score, m - n, dim=0, largest=False).indices
    return keep.fill_(1.0).scatter_(0, drop, 0.0)


def sparsegpt_cols(Wt: torch.Tensor, U: torch.Tensor, n: int, m: int, blocksize: int = 128):
    """The OBS sweep on ``Wt`` ([columns, rows], float32, changed in place). Returns the keep
    mask (float 0 / 1, ``Wt``'s shape)."""
    cols = Wt.shape[0]
    keep = torch.empty_like(Wt)
    blocksize = max(m, blocksize - blocksize % m)
    sub = max(m, SUB - SUB % m)
    d = torch.diag(U)
    inv_d, inv_d2 = (1.0 / d).reshape(-1, 1), (1.0 / d**2).reshape(-1, 1)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1, U1, K1 = Wt[i1:i2], U[i1:i2, i1:i2], keep[i1:i2]
        E1 = torch.empty_like(W1)
        for j1 in range(0, i2 - i1, sub):
            j2 = min(j1 + sub, i2 - i1)
            for g in range(j1, j2, m):
                a, h = i1 + g, min(g + m, j2)
                Wg = W1[g:h]
                kept = keep_nm(Wg.square().mul_(inv_d2[a : a + h - g]), n, K1[g:h])
                # (w - q) / d of each column: the weight where pruned, else 0
                scale = torch.sub(1.0, kept).mul_(inv_d[a : a + h - g])
                for t in range(h - g):  # each column's error onto the sub-block's later ones
                    e = torch.mul(Wg[t], scale[t], out=E1[g + t])
                    if g + t + 1 < j2:
                        W1[g + t + 1 : j2].addr_(U1[g + t, g + t + 1 : j2], e, alpha=-1.0)
            if j2 < i2 - i1:
                W1[j2:].addmm_(U1[j1:j2, j2:].t(), E1[j1:j2], alpha=-1.0)
        W1.mul_(K1)
        if i2 < cols:
            Wt[i2:].addmm_(U[i1:i2, i2:].t(), E1, alpha=-1.0)
    return keep


def sparsegpt_rows(W: torch.Tensor, U: torch.Tensor, n: int, m: int, blocksize: int = 128):
    """:func:`sparsegpt_cols` on ``W`` held as [rows, columns] (changed in place); returns the
    pruned positions (bool, ``W``'s shape)."""
    Wt = W.t().contiguous()
    keep = sparsegpt_cols(Wt, U, n, m, blocksize)
    W.copy_(Wt.t())
    return keep.t() == 0
