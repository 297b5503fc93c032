"""Smoke test of benchmarks/llm_quality.py on a tiny random Llama: every row is there and every
number is finite (no training, no cache; the quality ordering is not asserted)."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("transformers")


@pytest.mark.slow
def test_llm_quality_rows_on_random_llama(monkeypatch):
    from transformers import LlamaConfig, LlamaForCausalLM

    from benchmarks import _lmbench as lmbench
    from benchmarks import _tinylm as tl
    from benchmarks import llm_quality as lq

    # every method and both patterns, in fewer captures than the benchmark's six N:M rows
    monkeypatch.setattr(
        lq, "NM_ROWS", (("2:4", "magnitude"), ("2:4", "wanda"), ("4:8", "sparsegpt"))
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=4,  # GQA with 4 KV heads: heads=0.25 removes one
        max_position_embeddings=64,
        tie_word_embeddings=False,
        use_cache=False,
    )
    model = LlamaForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(0)
    data = tl.Data(
        torch.randint(1, 64, (4000,), generator=g), torch.randint(1, 64, (2000,), generator=g), 0
    )
    args = lq.parse_args(
        [
            "--quick",
            "--seq",
            "32",
            "--calib-batches",
            "2",
            "--eval-windows",
            "4",
            "--heal-steps",
            "2",
            "--learned-steps",
            "2",
            "--criteria",
            "l1",
            "taylor",
            "learned",
        ]
    )
    bench = lmbench.tinylm_bench(model, data, args)
    bench.prompt, bench.decode = torch.tensor([[5, 6, 7]]), lambda ids: " ".join(map(str, ids))
    bench.stop = frozenset()  # always the full 20 tokens
    try:
        rows = lq.measure(bench, args, log=lambda *_: None)
    finally:
        torch.set_num_threads(threads)
    methods = [r.method for r in rows]
    assert methods[0] == "dense"
    for nm, meth in lq.NM_ROWS:
        assert f"{nm} {meth}" in methods
    for meth in lq.UNSTRUCTURED_ROWS:
        assert f"50 % unstructured {meth}" in methods
    for crit in ("l1", "taylor", "learned"):
        label = f"heads 25 % + FFN 25 % ({crit})"
        assert label in methods
        assert f"{label}, + 2 heal steps" in methods
    assert any("blocks removed" in m for m in methods)
    assert not any(m.startswith("llm-compressor") for m in methods)  # the peer: smollm2 only
    for r in rows:
        assert not r.note, f"{r.method}: {r.note}"
        assert set(r.ppl) == {"code"}
        assert math.isfinite(r.ppl["code"]) and r.ppl["code"] > 1, r
        assert len(r.raw.get("token_ids", [])) == args.gen_tokens, r
    by = {r.method: r for r in rows}
    # the unstructured rows zero half of every Linear in the blocks, lm_head kept
    dense_n, half = (lq.ev.n_params(model), sum(
        p.numel() for n, p in model.named_parameters() if n.startswith("model.layers.") and p.dim() == 2
    ) // 2)  # fmt: skip
    for meth in lq.UNSTRUCTURED_ROWS:
        assert by[f"50 % unstructured {meth}"].raw["nonzero_params"] == dense_n - half
    assert by["2:4 magnitude"].raw["nm_2_4_conforming"] == 1.0
    assert by["2:4 magnitude"].raw["peak_rss_kib"] > 0
    text = lq.table(rows)
    assert text.count("\n") == len(rows) + 1


def test_budgets_and_labels():
    from benchmarks import llm_quality as lq

    assert lq.parse_budget("1:0.25") == (1, 0.25)
    assert lq.parse_budget("0.25:0.25") == (0.25, 0.25)
    assert lq.budget_label(1, 0.25, 3) == "heads 1 of 3 KV groups + FFN 25 %"
    assert lq.budget_label(0, 0.125, 3) == "FFN 12.5 %"
    a = lq.parse_args(["--model", "smollm2"])
    assert (a.calib_batches, a.eval_windows, a.seq, a.isolate, a.peer) == (32, 8, 512, True, True)
    assert lq.parse_args([]).model == "tinylm"
