"""2:4 Wanda / SparseGPT on a real LM: one pass on dense activations vs sequential calibration.

``fxprune.compile(..., sparsity_method=...)`` calibrates every layer on the DENSE model's
activations in one forward pass; llm-compressor (and the SparseGPT / Wanda papers' reference
code) runs the calibration sequentially, each block seeing the outputs of the blocks already
pruned before it. fxprune offers the sequential mode too: ``fxprune.stream(src, out,
sparsity="2:4", sparsity_method=..., calibration=...)`` prunes a checkpoint block by block and
feeds block i the hidden states the pruned blocks before it produced. This script measures both
on SmolLM2-135M-Instruct with the same calibration windows and the same held-out evaluation as
benchmarks/llm_quality.py.

    python benchmarks/llm_sequential.py                 # 32 calibration, 8 held-out windows of 512
    python benchmarks/llm_sequential.py --methods wanda --calib 8
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import fxprune  # noqa: E402
from benchmarks import _lmeval as ev  # noqa: E402
from benchmarks import _realtext as rt  # noqa: E402
from benchmarks import _smollm2 as sm  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="*", default=["wanda", "sparsegpt"])
    ap.add_argument("--calib", type=int, default=32)
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    return ap.parse_args(argv)


def main(argv=None):
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    from transformers import LlamaForCausalLM

    dense, tok = sm.load()
    texts = rt.load(tok, log=log)
    calib = rt.calibration(texts, a.calib, a.seq)
    evals = rt.evaluation(texts, a.eval_windows, a.seq)
    rows = [("dense", "-", ev.perplexities(dense, evals, 1), 0.0)]
    log(f"dense: {rows[0][2]}")
    for method in a.methods:
        t0 = time.perf_counter()
        res = fxprune.compile(
            dense,
            calib[0],
            sparsity="2:4",
            sparsity_method=method,
            sparsity_exclude=["lm_head"],
            calibration=calib,
            calibration_batches=len(calib),
        )
        secs = time.perf_counter() - t0
        rows.append(
            (
                method,
                "one pass, dense activations (compile)",
                ev.perplexities(res.model, evals, 1),
                secs,
            )
        )
        log(f"{rows[-1]}")
        del res
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            fxprune.stream(
                sm.model_dir(),
                os.path.join(tmp, "out"),
                sparsity="2:4",
                sparsity_method=method,
                calibration=calib,
                calibration_batches=len(calib),
            )
            secs = time.perf_counter() - t0
            seq = LlamaForCausalLM.from_pretrained(os.path.join(tmp, "out"), dtype=torch.float32)
            rows.append(
                (
                    method,
                    "sequential, pruned inputs (stream)",
                    ev.perplexities(seq.eval(), evals, 1),
                    secs,
                )
            )
            log(f"{rows[-1]}")
    cmd = "python benchmarks/llm_sequential.py " + " ".join(shlex.quote(x) for x in sys.argv[1:])
    print(f"# {cmd}")
    print(
        f"# SmolLM2-135M-Instruct, 2:4 on every block Linear (lm_head dense), {a.calib} calibration "
        f"and {a.eval_windows} held-out windows of {a.seq} tokens per text; {platform.machine()}, "
        f"torch {torch.__version__}, {a.threads} threads, fxprune {fxprune.__version__}"
    )
    print()
    print("| method | calibration | docs ppl | code ppl | seconds |")
    print("|---|---|---|---|---|")
    for method, how, ppl, secs in rows:
        print(f"| {method} | {how} | {ppl['docs']:.2f} | {ppl['code']:.2f} | {secs:.0f} |")


if __name__ == "__main__":
    main()
