"""N:M rewrite throughput: fxprune's vectorised mask vs a straightforward per-block loop.

    python benchmarks/nm_throughput.py                 # 1e9 weights (60 x 4096x4096 Linear)
    python benchmarks/nm_throughput.py --weights 2e8   # a quicker run

Both rewrite fp32 Linear weights in place to 2:4 along the input-feature axis. The per-block loop
is the seed guide's shape (a Python loop over blocks of 4), timed on a slice small enough to finish,
and reported in the same unit (GB of weights rewritten per second).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from fxprune.passes.nm import is_nm, nm_mask  # noqa: E402


def per_block(w: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """The straightforward version: one Python iteration per group of M weights."""
    flat = w.view(w.shape[0], -1, m)
    for r in range(flat.shape[0]):
        for g in range(flat.shape[1]):
            block = flat[r, g]
            drop = block.abs().argsort()[: m - n]
            block[drop] = 0
    return w


def vectorised(w: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    return w.mul_(nm_mask(w, n, m, axis=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--weights", type=float, default=1e9)
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=4096)
    a = ap.parse_args()
    torch.manual_seed(0)
    per = a.rows * a.cols
    count = max(1, round(a.weights / per))
    print(
        f"# N:M rewrite throughput, 2:4, fp32; {platform.machine()}, {os.cpu_count()} cpus, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads\n"
    )
    w = torch.randn(a.rows, a.cols)
    vectorised(w.clone())  # warm-up
    total, t_vec = 0, 0.0
    for _ in range(count):  # fresh weights each time, one layer in memory at a time
        w = torch.randn(a.rows, a.cols)
        t0 = time.perf_counter()
        vectorised(w)
        t_vec += time.perf_counter() - t0
        total += w.numel()
    assert is_nm(w, 2, 4)
    small = torch.randn(64, 256)
    t0 = time.perf_counter()
    per_block(small)
    t_loop = time.perf_counter() - t0
    assert is_nm(small, 2, 4)
    gb_vec = total * 4 / 1e9 / t_vec
    gb_loop = small.numel() * 4 / 1e9 / t_loop
    print("| implementation | weights rewritten | seconds | GB/s | weights/s |")
    print("|---|---|---|---|---|")
    print(
        f"| fxprune nm_mask (vectorised) | {total:,} | {t_vec:.2f} | {gb_vec:.3f} | "
        f"{total / t_vec:.3g} |"
    )
    print(
        f"| per-block Python loop | {small.numel():,} | {t_loop:.2f} | {gb_loop:.6f} | "
        f"{small.numel() / t_loop:.3g} |"
    )
    print(f"\nvectorised / per-block throughput: {gb_vec / gb_loop:,.0f}x")


if __name__ == "__main__":
    main()
