"""Sensitivity-guided vs uniform head + FFN pruning of the real all-MiniLM-L6-v2, at equal budget.

1. ``fxprune.sensitivity`` prunes each layer's heads and each layer's FFN alone at 25 / 50 / 75 %
   and measures the mean cosine between pruned and dense sentence embeddings on the 60
   calibration sentences (the tuning set; the 200 evaluation sentences are never used for it).
2. For each uniform setting (25/25 and 50/50 % heads/FFN in every layer), the parameters it
   removes set the budget; ``ratios_for_target(by="params")`` picks per-layer ratios that remove at
   least as many parameters where the measurements say it costs least.
3. Both models are compiled (one shot, ``importance="activation"``) and compared on the 200
   evaluation sentences: mean / min cosine to the dense embeddings and paraphrase retrieval.

    python benchmarks/minilm_sensitivity.py
"""

from __future__ import annotations

import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import fxprune  # noqa: E402
from benchmarks import _minilm as mini  # noqa: E402


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    t0 = time.perf_counter()
    model, tok = mini.load()
    sents = mini.eval_sentences()
    evals = mini.batches(tok, sents, 50)
    calib = mini.batches(tok, mini.calibration_sentences(), 20)
    dense_eval = mini.embed(model, evals)
    dense_cal = mini.embed(model, calib)
    partner = torch.arange(len(sents)) ^ 1

    def tune_metric(module) -> float:  # on the calibration sentences only
        return float((mini.embed(module, calib) * dense_cal).sum(1).mean())

    common = dict(importance="activation", calibration=calib)
    sens = fxprune.sensitivity(
        model,
        evals[0],
        tune_metric,
        ratios=(0.25, 0.5, 0.75),
        kinds=("heads", "ffn"),
        progress=sys.stderr.isatty(),
        **common,
    )
    print(
        f"# all-MiniLM-L6-v2 (real weights); sensitivity on 60 calibration sentences, evaluation "
        f"on 200 others; {platform.machine()}, torch {torch.__version__}; sensitivity "
        f"{sens.seconds:.0f} s\n"
    )
    print(sens.table())
    print()
    print(
        "| setting | params removed | mean cosine | min cosine | paraphrase retrieval "
        "| per-layer ratios |"
    )
    print("|---|---|---|---|---|---|")
    P = sum(p.numel() for p in model.parameters())
    for h, f in ((0.25, 0.25), (0.5, 0.5)):
        uni = fxprune.compile(model, evals[0], heads=h, ffn=f, **common)
        budget = (P - sum(p.numel() for p in uni.module.parameters())) / P
        guided_kw = sens.ratios_for_target(budget, by="params")
        guided = fxprune.compile(model, evals[0], **guided_kw, **common)
        for name, res, kw in (
            (f"uniform {h:.0%} heads / {f:.0%} FFN", uni, ""),
            ("sensitivity-guided, same budget", guided, guided_kw),
        ):
            assert fxprune.verify.equivalence(model, res, evals[0]).ok
            emb = mini.embed(res.module, evals)
            cos = (emb * dense_eval).sum(1)
            removed = (P - sum(p.numel() for p in res.module.parameters())) / P
            short = "; ".join(
                f"{k.split('_')[0]}: "
                + ", ".join(f"{layer.split('.')[2]}={r:g}" for layer, r in v.items())
                for k, v in (kw or {}).items()
            )
            print(
                f"| {name} | {removed:.3f} | {cos.mean():.4f} | {cos.min():.4f} "
                f"| {(mini.nearest(emb) == partner).float().mean():.3f} | {short} |",
                flush=True,
            )
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
