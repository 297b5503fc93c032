"""Why batch-1 LLM decoding is bandwidth-bound, from fxprune.estimate's roofline.

A LLaMA-style decoder with TinyLlama-1.1B's widths (hidden 2048, FFN 5632, 32 query / 4 KV heads;
2 layers are enough: every layer is the same) is costed at one token (decoding, batch 1) and at
8 x 512 tokens (batched prefill), on the A100, H100 and L4 profiles in fp16. Random weights:
the estimate reads shapes only.

    python benchmarks/estimate_llm_roofline.py
"""

from __future__ import annotations

import torch
import transformers

import fxprune


def main() -> None:
    cfg = transformers.LlamaConfig(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=2,
        num_attention_heads=32,
        num_key_value_heads=4,
        use_cache=False,
    )
    model = transformers.LlamaModel(cfg).eval()
    hw = ["A100", "H100", "L4"]
    print(
        "| tokens (batch x seq) | profile | ridge FLOP/byte | q_proj FLOP/byte | gate_proj "
        "FLOP/byte | memory-bound share | 2:4 speedup | 90 % unstructured speedup |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for b, seq in ((1, 1), (8, 512)):
        ids = torch.randint(0, cfg.vocab_size, (b, seq))
        rep = fxprune.estimate(
            model, ids, sparsity=0.9, structured=None, hardware=hw, batch_sizes=[b]
        )
        for h in hw:
            rows = rep.roofline[h][b]
            ai = {r.layer: r.intensity for r in rows}
            total = sum(r.ms for r in rows)
            mem = sum(r.ms for r in rows if r.bound == "memory") / total
            print(
                f"| {b} x {seq} | {h} | {fxprune.estimator.HARDWARE[h].ridge('fp16'):.0f} "
                f"| {ai['layers.0.self_attn.q_proj']:.1f} | {ai['layers.0.mlp.gate_proj']:.1f} "
                f"| {100 * mem:.0f} % | {rep.scenario('2:4').speedup[h][b]:.2f}x "
                f"| {rep.scenario('unstructured').speedup[h][b]:.2f}x |"
            )


if __name__ == "__main__":
    main()
