"""What channel permutation buys a 2:4 mask: kept weight magnitude before / after, and the time.

ResNet-50 with random weights (30 % channels pruned first, as in the 2:4 hand-off) and the real
all-MiniLM-L6-v2 (its FFN neurons are the permutable groups: heads are not single channels and
the residual stream is a LayerNorm barrier). Both models are checked exact after permutation.

    python benchmarks/nm_permutation.py
"""

from __future__ import annotations

import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import fxprune  # noqa: E402


def models():
    import torchvision

    from tests.conftest import randomize

    torch.manual_seed(0)
    yield (
        "resnet50, random weights, 30 % channels",
        randomize(torchvision.models.resnet50()),
        torch.randn(1, 3, 224, 224),
        {"channels": 0.3},
    )
    try:
        from benchmarks import _minilm as mini
    except ImportError:
        return
    model, tok = mini.load()
    yield "all-MiniLM-L6-v2, real weights", model, mini.encode(tok, mini.eval_sentences()[:8]), {}


def main() -> None:
    print(
        f"# 2:4 kept magnitude with and without channel permutation; {platform.machine()}, "
        f"{os.cpu_count()} cpus, torch {torch.__version__}, fxprune {fxprune.__version__}\n"
    )
    print(
        "| model | groups permuted | kept (permuted groups) before | after | kept (all 2:4 layers) "
        "without | with | permutation s | exact |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, model, x, kw in models():
        plain = fxprune.compile(model, x, sparsity="2:4", **kw)
        t0 = time.perf_counter()
        res = fxprune.compile(model, x, sparsity="2:4", sparsity_permute=True, **kw)
        secs = time.perf_counter() - t0 - plain.seconds
        p = next(r for r in res.passes if r.name == "permute")
        nm0 = plain.passes[-1].details["kept_magnitude"]
        nm1 = res.passes[-1].details["kept_magnitude"]
        ok = fxprune.verify.equivalence(model, res, x).ok
        print(
            f"| {name} | {p.details['groups_permuted']} | {p.details['kept_magnitude_before']:.4f} "
            f"| {p.details['kept_magnitude_after']:.4f} | {nm0:.4f} | {nm1:.4f} | {secs:.1f} "
            f"| {'yes' if ok else 'NO'} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
