"""Fidelity of one-shot head + FFN pruning on the real all-MiniLM-L6-v2 sentence encoder.

For each importance criterion: prune 25 % of the heads and 25 % of the FFN neurons of every
layer in one shot (no fine-tuning), embed 200 fixed sentences (100 paraphrase pairs) with the
dense and the pruned model, and report the mean and minimum cosine similarity between the two
embeddings of each sentence, nearest-neighbour agreement (the pruned model's nearest other
sentence is the dense model's), and paraphrase retrieval (a sentence's nearest neighbour is its
pair) for both models. Data-driven criteria see 60 separate calibration sentences; "learned"
trains a soft gate per head / neuron on them (``--learned-steps`` Adam steps, lr
``--learned-lr``, loss 1 - cosine to the dense embedding, fxprune's default L1 on the gates),
once per pass, and removes the lowest gates.

    python benchmarks/minilm_fidelity.py
    python benchmarks/minilm_fidelity.py --heads 0.5 --ffn 0.5
    python benchmarks/minilm_fidelity.py --criteria activation learned --learned-steps 60
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import fxprune  # noqa: E402
from benchmarks import _minilm as mini  # noqa: E402
from fxprune.gates import L1  # noqa: E402

CRITERIA = ["l1", "l2", "taylor", "activation", "entropy", "confidence", "learned", "random"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--heads", type=float, default=0.25)
    ap.add_argument("--ffn", type=float, default=0.25)
    ap.add_argument("--criteria", nargs="*", default=CRITERIA)
    ap.add_argument("--learned-steps", type=int, default=30, help="gate training steps per pass")
    ap.add_argument("--learned-lr", type=float, default=0.2)
    a = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    model, tok = mini.load()
    sents = mini.eval_sentences()
    evals = mini.batches(tok, sents, 50)
    calib = mini.batches(tok, mini.calibration_sentences(), 20)
    dense = mini.embed(model, evals)
    nn_dense = mini.nearest(dense)
    partner = torch.arange(len(sents)) ^ 1  # 2i <-> 2i + 1
    print(
        f"# all-MiniLM-L6-v2 (real weights), {len(sents)} sentences, max {mini.MAX_LEN} tokens; "
        f"heads {a.heads:.0%} + FFN {a.ffn:.0%} per layer, one shot; {platform.machine()}, "
        f"torch {torch.__version__}, fxprune {fxprune.__version__}\n"
    )
    print(
        f"dense model: paraphrase retrieval {(nn_dense == partner).float().mean():.3f}, "
        f"params {sum(p.numel() for p in model.parameters()):,}\n"
    )
    print(
        "| criterion | mean cosine | min cosine | NN agreement | paraphrase retrieval "
        "| params ratio | MACs ratio | exact vs zeroed dense | compile s | notes |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for crit in a.criteria:
        t0 = time.perf_counter()
        train_fn = None
        if crit == "learned":
            train_fn = mini.distill(model, calib, a.learned_steps, a.learned_lr)
        res = fxprune.compile(
            model,
            evals[0],
            heads=a.heads,
            ffn=a.ffn,
            importance=crit,
            calibration=calib,
            train_fn=train_fn,
        )
        secs = time.perf_counter() - t0
        rep = fxprune.verify.equivalence(model, res, evals[0])
        emb = mini.embed(res.module, evals)
        cos = (emb * dense).sum(1)
        nn_p = mini.nearest(emb)
        loss = {
            "taylor": "Taylor loss: default proxy, mean squared output",
            "learned": f"{a.learned_steps} Adam steps lr {a.learned_lr} per pass, 1 - cosine "
            f"to dense, L1 {L1}",
        }.get(crit, "")
        print(
            f"| {crit} | {cos.mean():.4f} | {cos.min():.4f} | {(nn_p == nn_dense).float().mean():.3f} "
            f"| {(nn_p == partner).float().mean():.3f} | {res.summary.params_ratio:.3f} "
            f"| {res.summary.macs_ratio:.3f} | {'yes' if rep.ok else 'NO'} ({rep.max_rel_err:.1e}) "
            f"| {secs:.1f} | {loss} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
