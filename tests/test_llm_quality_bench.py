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
        ]
    )
    try:
        rows = lq.measure(model, data, args, log=lambda *_: None)
    finally:
        torch.set_num_threads(threads)
    methods = [r.method for r in rows]
    assert methods[0] == "dense"
    for nm, meth in lq.NM_ROWS:
        assert f"{nm} {meth}" in methods
    assert "50 % unstructured" in methods
    assert any(m.startswith("heads 25 %") and "heal" in m for m in methods)
    assert any(m.startswith("heads 25 %") and "one shot" in m for m in methods)
    assert any("blocks removed" in m for m in methods)
    for r in rows:
        if r.method == "50 % unstructured":
            assert r.note.startswith("n/a")
            continue
        assert not r.note, f"{r.method}: {r.note}"
        assert math.isfinite(r.ppl) and r.ppl > 1, r
    text = lq.table(rows)
    assert text.count("\n") == len(rows) + 1
