"""N:M rewrite throughput: fxprune's vectorised mask vs a straightforward per-block loop.

    python benchmarks/nm_throughput.py                 # 1e9 weights (60 x 4096x4096 Linear)
    python benchmarks/nm_throughput.py --weights 2e8   # a quicker run

Both rewrite fp32 Linear weights in place to 2:4 along the input-feature axis. The per-block loop
is the seed guide's shape (a Python loop over blocks of 4), timed on a slice small enough to finish,
and reported in the same unit (GB of weights rewritten per second).

The last rows time the N:M pass itself (``prune_nm`` on the dependency graph of a traced stack of
Linear layers, as ``fxprune.compile`` runs it: masks, the kept-magnitude statistic, the in-place
rewrite) in fp32 and bf16, so the pass can be held to the kernel's speed.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from fxprune.passes.nm import NM, apply_nm, is_nm, prune_nm  # noqa: E402


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
    apply_nm(w, n, m, axis=1)  # the kernel the pass runs: mask, rewrite, L1 before / after
    return w


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
        f"| fxprune apply_nm (vectorised) | {total:,} | {t_vec:.2f} | {gb_vec:.3f} | "
        f"{total / t_vec:.3g} |"
    )
    print(
        f"| per-block Python loop | {small.numel():,} | {t_loop:.2f} | {gb_loop:.6f} | "
        f"{small.numel() / t_loop:.3g} |"
    )
    for dtype in (torch.float32, torch.bfloat16):
        secs, n = in_pass(a.rows, a.cols, count, dtype)
        size = torch.finfo(dtype).bits // 8
        print(
            f"| N:M pass (prune_nm), {str(dtype).removeprefix('torch.')} | {n:,} | {secs:.2f} | "
            f"{n * size / 1e9 / secs:.3f} | {n / secs:.3g} |"
        )
    print(f"\nvectorised / per-block throughput: {gb_vec / gb_loop:,.0f}x")


def in_pass(rows: int, cols: int, count: int, dtype) -> tuple[float, int]:
    """Seconds the N:M pass takes over as many weights as ``count`` rows x cols layers, as
    square Linear(cols, cols) layers (so they chain) in traced stacks of 8, and the weights it
    rewrote."""
    from fxprune.graph import build_graph, trace

    secs, total = 0.0, 0
    count = max(1, round(count * rows / cols))
    for start in range(0, count, 8):
        k = min(8, count - start)
        stack = torch.nn.Sequential(*(torch.nn.Linear(cols, cols, bias=False) for _ in range(k)))
        stack = stack.to(dtype).eval()
        x = torch.randn(1, cols, dtype=dtype)
        graph = build_graph(trace(stack, x, mode="fx").gm)
        t0 = time.perf_counter()
        res = prune_nm(graph, NM(2, 4), (x,))
        secs += time.perf_counter() - t0
        total += sum(m.numel() for m in res.masks.values())
    return secs, total


if __name__ == "__main__":
    main()
