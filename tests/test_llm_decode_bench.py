"""Smoke test of benchmarks/llm_decode.py --shape on llm_scale's tiny shape: a random-weight
checkpoint, pruned heads 25 % (a whole key/value group) + FFN 25 %, both built into ONNX Runtime
GenAI decoders and timed; the row has every number, the pruned decoder's tokens are the pruned
model's, and the checkpoint is removed (the speed is not asserted: claims live in
docs/benchmarks.md)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("onnxruntime_genai")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "llm_decode.py"


@pytest.mark.slow
def test_llm_decode_shape_row_on_the_tiny_shape(tmp_path):
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--shape", "tiny", "--repeats", "2", "--warmup", "0",
         "--threads", "1", "--prompt-len", "16", "--new-tokens", "8", "--work", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout
    assert "random bf16 weights" in out and "the generated text is garbage" in out
    assert "## tiny shape: hidden 128, FFN 256, 2 layers, 8 heads over 4 key/value heads" in out
    row = next(r for r in out.splitlines() if r.startswith("| heads 25 % + FFN 25 % |"))
    num = r"\d+(?:\.\d+)?"
    cells = re.fullmatch(
        rf"\| heads 25 % \+ FFN 25 % \| (\d+)% \| {num} / {num} \| ({num}) / ({num}) \| "
        rf"({num})x \[{num}-{num}\] \| ({num}) \| ({num}) \| 0% \| (?:quiet|NOISY) \|",
        row,
    )
    assert cells, row  # 0 %: the pruned decoder's greedy tokens are result.model.generate's
    kept, dense_tok_s, pruned_tok_s, speedup, bytes_ratio, eff = map(float, cells.groups())
    assert 0 < kept < 100 and dense_tok_s > 0 and pruned_tok_s > 0
    assert 0 < bytes_ratio < 1  # the pruned decoder reads fewer weight bytes each step
    assert eff == pytest.approx(speedup * bytes_ratio, abs=0.02)  # both printed rounded
    assert "heads 8/4 -> 6/3, FFN 256 -> 192 (uniform across layers)" in out  # a whole KV group
    assert not (tmp_path / "mistral-tiny").exists()  # the random checkpoint was removed
