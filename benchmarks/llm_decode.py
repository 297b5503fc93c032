"""Decode speed of a real LLM served by ONNX Runtime GenAI: dense vs structured vs 2:4.

SmolLM2-135M-Instruct (benchmarks/_smollm2.py), each pruned model built into an ONNX Runtime
GenAI decoder with a KV cache (fp32, CPU provider) beside the dense one and timed by
``fxprune.verify.latency(..., backend="onnxruntime-genai")``: time to the first token (prefill
of ``--prompt-len`` tokens) and decode tokens/s over ``--new-tokens`` greedy tokens, dense and
pruned interleaved in rounds, with the noise flags. Decode is bandwidth-bound (the seed guide's
roofline section), so the table gives the bytes a decode step reads (pruned / dense, the
embedding table left out: a step gathers one row of it) and efficiency = decode speedup x that
ratio (1.0: the speedup the bytes predict).

Rows: heads (1 of the 3 key/value groups per layer, with their query heads) + FFN 25 %;
FFN 25 %; 4 of 30 blocks removed (cosine on calibration); 2:4 magnitude on every block Linear
(stored dense: no decode gain is expected on the CPU, and none from bytes). Structure decides
speed, not which units were chosen, so the data-driven rows use few calibration windows.

    python benchmarks/llm_decode.py                       # the recorded run
    python benchmarks/llm_decode.py --rows "FFN 25 %" --repeats 5
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import fxprune  # noqa: E402
from benchmarks import _realtext as rt  # noqa: E402
from benchmarks import _smollm2 as sm  # noqa: E402

ROWS = {
    "heads 1/3 + FFN 25 %": {"heads": 1, "ffn": 0.25, "uniform": True},
    "FFN 25 %": {"ffn": 0.25, "uniform": True},
    "blocks 4/30": {"blocks": 4},
    "2:4 magnitude": {"sparsity": "2:4", "sparsity_exclude": ["lm_head"]},
}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=10, help="timed generations per model")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calib", type=int, default=4, help="calibration windows of 256 tokens")
    ap.add_argument("--rows", nargs="*", default=None, help="only these rows")
    return ap.parse_args(argv)


def main(argv=None):
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    dense, tok = sm.load()
    texts = rt.load(tok, log=log)
    calib = rt.calibration(texts, a.calib, 256)
    prompt = rt.evaluation(texts, 1, a.prompt_len)["docs"]  # held-out prose as the prompt
    backend = fxprune.verify.OnnxRuntimeGenai(tokenizer_from=sm.model_dir())
    out = []
    for label, kw in ROWS.items():
        if a.rows and label not in a.rows:
            continue
        t0 = time.perf_counter()
        res = fxprune.compile(dense, calib[0], calibration=calib, **kw)
        log(f"{label}: pruned in {time.perf_counter() - t0:.0f} s")
        rep = fxprune.verify.latency(
            dense,
            res,
            prompt,
            backend=backend,
            batch_sizes=(1,),
            warmup=a.warmup,
            repeats=a.repeats,
            threads=a.threads,
            prompt_len=a.prompt_len,
            new_tokens=a.new_tokens,
        )
        log(rep.table())
        out.append((label, res, rep))
    cmd = "python benchmarks/llm_decode.py " + " ".join(shlex.quote(x) for x in sys.argv[1:])
    print(f"# {cmd}")
    print(
        f"# SmolLM2-135M-Instruct, ONNX Runtime GenAI fp32 CPU, batch 1, prompt {a.prompt_len} + "
        f"{a.new_tokens} new tokens, {a.warmup} warm-up + {a.repeats} timed generations per model, "
        f"{a.threads} threads; {platform.machine()}, torch {torch.__version__}, "
        f"fxprune {fxprune.__version__}"
    )
    print()
    print(
        "| row | params kept | TTFT ms dense / pruned | decode tok/s dense / pruned | decode "
        "speedup [p10-p90] | step bytes ratio | efficiency | tokens differing | noise |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    n0 = sum(p.numel() for p in dense.parameters())
    for label, res, rep in out:
        r = rep.rows[0]
        kept = sum(p.numel() for p in res.model.parameters()) / n0
        print(
            f"| {label} | {kept:.0%} | {r.ttft_dense_ms:.0f} / {r.ttft_pruned_ms:.0f} | "
            f"{r.dense_tokens_s:.1f} / {r.pruned_tokens_s:.1f} | {r.speedup:.2f}x "
            f"[{r.speedup_p10:.2f}-{r.speedup_p90:.2f}] | {r.bytes_ratio:.3f} | {r.efficiency:.2f} | "
            f"{r.parity:.0%} | {'NOISY' if r.noisy else 'quiet'} |"
        )


if __name__ == "__main__":
    main()
