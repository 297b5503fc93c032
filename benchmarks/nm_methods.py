"""2:4 one shot: magnitude vs Wanda vs SparseGPT, on real weights and real data.

- all-MiniLM-L6-v2 (real weights): every Linear 2:4 (embeddings and norms dense); calibration
  on the 60 calibration sentences; mean / min cosine of the 200 evaluation sentences' embeddings
  to the dense ones.
- digits ResNet (trained from scratch here, seed 0): every conv / linear whose input channels
  divide by 4 made 2:4 (the 1-channel stem stays dense); calibration on 512 training images;
  held-out accuracy, one shot and after 3 epochs of fine-tuning with the masks fixed.

    python benchmarks/nm_methods.py
"""

from __future__ import annotations

import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import fxprune  # noqa: E402
from benchmarks import _digits as dg  # noqa: E402
from benchmarks import _minilm as mini  # noqa: E402
from fxprune.passes.nm import keep_masks  # noqa: E402

METHODS = ("magnitude", "wanda", "sparsegpt")


def minilm() -> None:
    model, tok = mini.load()
    evals = mini.batches(tok, mini.eval_sentences(), 50)
    calib = mini.batches(tok, mini.calibration_sentences(), 20)
    dense = mini.embed(model, evals)
    print("| MiniLM, every Linear 2:4 | mean cosine | min cosine | kept magnitude | seconds |")
    print("|---|---|---|---|---|")
    for meth in METHODS:
        t0 = time.perf_counter()
        res = fxprune.compile(
            model, evals[0], sparsity="2:4", sparsity_method=meth, calibration=calib
        )
        secs = time.perf_counter() - t0
        assert fxprune.verify.equivalence(model, res, evals[0]).ok
        cos = (mini.embed(res.module, evals) * dense).sum(1)
        nm = res.passes[-1].details
        print(
            f"| {meth} | {cos.mean():.4f} | {cos.min():.4f} | {nm['kept_magnitude']:.3f} "
            f"| {secs:.1f} |",
            flush=True,
        )


def digits() -> None:
    model, (xtr, ytr, xte, yte) = dg.trained_model(0, 30)
    print(f"\ndense digits ResNet: {dg.accuracy(model, xte, yte):.2f} % held-out accuracy")
    print("| digits ResNet, 2:4 | one-shot acc % | fine-tuned 3 epochs, masks fixed | seconds |")
    print("|---|---|---|---|")
    for meth in METHODS:
        t0 = time.perf_counter()
        res = fxprune.compile(
            model, xtr[:2], sparsity="2:4", sparsity_method=meth, calibration=[xtr[:512]]
        )
        secs = time.perf_counter() - t0
        assert fxprune.verify.equivalence(model, res, xtr[:2]).ok
        one = dg.accuracy(res.module, xte, yte)
        mk = res.nm_masks
        dg.train(
            res.module,
            xtr,
            ytr,
            3,
            lr=1e-3,
            masks_hook=lambda opt, r=res, mk=mk: keep_masks(r.module, mk, opt),
        )
        print(f"| {meth} | {one:.2f} | {dg.accuracy(res.module, xte, yte):.2f} | {secs:.1f} |")


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    print(f"# 2:4 selection methods; {platform.machine()}, torch {torch.__version__}\n")
    minilm()
    digits()


if __name__ == "__main__":
    main()
