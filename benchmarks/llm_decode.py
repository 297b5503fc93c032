"""Decode speed of a real LLM served by ONNX Runtime GenAI: dense vs structured vs 2:4.

SmolLM2-135M-Instruct (benchmarks/_smollm2.py), each pruned model built into an ONNX Runtime
GenAI decoder with a KV cache (fp32, CPU provider) beside the dense one and timed by
``fxprune.verify.latency(..., backend="onnxruntime-genai")``: time to the first token (prefill
of ``--prompt-len`` tokens) and decode tokens/s over ``--new-tokens`` greedy tokens, dense and
pruned interleaved in rounds, with the noise flags. Decode is bandwidth-bound (the seed guide's
roofline section), so the table gives the bytes a decode step reads (pruned / dense, the
embedding table left out: a step gathers one row of it) and efficiency = decode speedup x that
ratio (1.0: the speedup the bytes predict). "tokens differing": the pruned decoder's greedy
tokens against ``generate`` of the pruned PyTorch model (0 %: identical).

Rows: heads (1 of the 3 key/value groups per layer, with their query heads) + FFN 25 %;
FFN 25 %; 4 of 30 blocks removed (cosine on calibration); 2:4 magnitude on every block Linear
(stored dense: no decode gain is expected on the CPU, and none from bytes). Structure decides
speed, not which units were chosen, so the data-driven rows use few calibration windows.

``--shape 0.5B 1B`` (issue #24) times llm_scale's shapes instead (``benchmarks/llm_scale.py``'s
SHAPES and random-weight bf16 checkpoints, written once under ``--work``; Mistral config with
``sliding_window=None``, Llama's computation), loaded in bf16 with a 4096-position context
(Llama-2's; Mistral's default 131072 would put a rotary cache of that length into the
decoder), each pruned by ``fxprune.compile(uniform=True)``: heads 25 % (whole key/value groups
with their query heads) + FFN 25 %, by L1 (no calibration: random weights). The builder reads
the bf16 weights into the same fp32 decoders. Random weights generate garbage text; only the
speed and the token parity mean anything. The tokenizer the builder needs is the 256-byte
alphabet with no merges (the prompts are random token ids, never text).

    python benchmarks/llm_decode.py                       # the recorded run
    python benchmarks/llm_decode.py --rows "FFN 25 %" --repeats 5
    python benchmarks/llm_decode.py --shape 0.5B 1B --repeats 6 --warmup 1
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import shlex
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import fxprune  # noqa: E402
from benchmarks import _realtext as rt  # noqa: E402
from benchmarks import _smollm2 as sm  # noqa: E402
from benchmarks import llm_scale as ls  # noqa: E402

ROWS = {
    "heads 1/3 + FFN 25 %": {"heads": 1, "ffn": 0.25, "uniform": True},
    "FFN 25 %": {"ffn": 0.25, "uniform": True},
    "blocks 4/30": {"blocks": 4},
    "2:4 magnitude": {"sparsity": "2:4", "sparsity_exclude": ["lm_head"]},
}
# --shape: heads 25 % of a GQA model removes whole key/value groups (16/4 -> 12/3 at 0.5B)
SHAPE_ROWS = {"heads 25 % + FFN 25 %": {"heads": 0.25, "ffn": 0.25, "uniform": True}}
CONTEXT = 4096  # max_position_embeddings of the random shapes (Llama-2's)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=10, help="timed generations per model")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calib", type=int, default=4, help="calibration windows of 256 tokens")
    ap.add_argument("--rows", nargs="*", default=None, help="only these rows")
    ap.add_argument(
        "--shape",
        nargs="+",
        default=None,
        choices=list(ls.SHAPES),
        help="random-weight llm_scale shapes instead of SmolLM2 (rows: SHAPE_ROWS)",
    )
    ap.add_argument(
        "--work",
        default=os.path.expanduser("~/.cache/fxprune/llm_decode"),
        help="--shape: where the random checkpoints and the tokenizer go",
    )
    ap.add_argument("--keep", action="store_true", help="--shape: keep the random checkpoints")
    return ap.parse_args(argv)


def byte_tokenizer(folder: Path) -> Path:
    """A byte-level tokenizer (the 256-byte alphabet and ``</s>``, no merges) saved in
    ``folder``: ONNX Runtime GenAI's builder loads one; the random shapes never read text."""
    if (folder / "tokenizer.json").is_file():
        return folder
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["</s>"] = len(vocab)
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="</s>")
    tok.save_pretrained(folder)
    return folder


def time_rows(dense, rows, example, prompt, backend, a, log, **common) -> list:
    """Each row of ``rows`` (compile keyword arguments, with ``common``) pruned on ``example``
    and timed against ``dense``: [(label, result, latency report)]."""
    out = []
    for label, kw in rows.items():
        if a.rows and label not in a.rows:
            continue
        t0 = time.perf_counter()
        res = fxprune.compile(dense, example, **common, **kw)
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
    return out


def print_table(dense, out) -> None:
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


def settings(a) -> str:
    return (
        f"ONNX Runtime GenAI fp32 CPU, batch 1, prompt {a.prompt_len} + {a.new_tokens} new "
        f"tokens, {a.warmup} warm-up + {a.repeats} timed generations per model, {a.threads} "
        f"threads; {platform.machine()}, torch {torch.__version__}, fxprune {fxprune.__version__}"
    )


def smollm2(a, cmd: str, log) -> None:
    """SmolLM2-135M-Instruct: dense vs ROWS."""
    dense, tok = sm.load()
    texts = rt.load(tok, log=log)
    calib = rt.calibration(texts, a.calib, 256)
    prompt = rt.evaluation(texts, 1, a.prompt_len)["docs"]  # held-out prose as the prompt
    backend = fxprune.verify.OnnxRuntimeGenai(tokenizer_from=sm.model_dir())
    out = time_rows(dense, ROWS, calib[0], prompt, backend, a, log, calibration=calib)
    print(f"# {cmd}")
    print(f"# SmolLM2-135M-Instruct, {settings(a)}")
    print()
    print_table(dense, out)


def random_shape(size: str, a, log) -> None:
    """One llm_scale shape, random weights: dense vs SHAPE_ROWS (see the module docstring)."""
    import transformers

    work = Path(a.work)
    src = work / f"mistral-{size}"
    t0 = time.perf_counter()
    nbytes = ls.make_checkpoint(size, src)
    log(f"{size}: checkpoint {src} ready in {time.perf_counter() - t0:.0f} s")
    backend = fxprune.verify.OnnxRuntimeGenai(tokenizer_from=byte_tokenizer(work / "tokenizer"))
    dense = transformers.AutoModelForCausalLM.from_pretrained(
        src, dtype=torch.bfloat16, max_position_embeddings=CONTEXT
    ).eval()
    vocab = dense.config.vocab_size
    ids = torch.randint(0, vocab, (1, 16), generator=torch.Generator().manual_seed(0))
    try:
        out = time_rows(dense, SHAPE_ROWS, ids, ids, backend, a, log)
    finally:
        if not a.keep:
            shutil.rmtree(src, ignore_errors=True)
    h, f, n, heads, kv, _ = ls.SHAPES[size]
    print(
        f"## {size} shape: hidden {h}, FFN {f}, {n} layers, {heads} heads over {kv} key/value "
        f"heads, vocab {vocab}; {nbytes / 2 / 1e6:.1f} M params"
    )
    print()
    print_table(dense, out)
    print()
    for label, res, _ in out:
        c = res.model.config
        print(
            f"{label}: heads {heads}/{kv} -> {c.num_attention_heads}/{c.num_key_value_heads}, "
            f"FFN {f} -> {c.intermediate_size} (uniform across layers)"
        )
    print()
    del dense, out
    gc.collect()


def main(argv=None):
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    args = sys.argv[1:] if argv is None else argv
    cmd = "python benchmarks/llm_decode.py " + " ".join(shlex.quote(x) for x in args)
    if not a.shape:
        smollm2(a, cmd, log)
        return
    print(f"# {cmd}")
    print(
        f"# llm_scale's shapes, random bf16 weights (Mistral config, sliding_window=None), "
        f"context {CONTEXT}: the generated text is garbage, the speed and the token parity are "
        f"what is measured; {settings(a)}"
    )
    print()
    for size in a.shape:
        random_shape(size, a, log)


if __name__ == "__main__":
    main()
