"""The decode latency backend (``onnxruntime-genai``): rows with the time to the first token,
decode tokens/s, the weight-bytes efficiency, token parity and the noise reading, in the table
and the JSON; wrong inputs are refused before anything is built. No timing is asserted beyond
presence and sign (speed claims live in benchmarks/)."""

from __future__ import annotations

import json

import pytest

import fxprune
from fxprune.errors import ConfigError, UnsupportedModelError
from fxprune.verify.latency import OnnxRuntimeGenai
from tests.genai_models import llama_folder, pruned_llama

pytest.importorskip("transformers")
pytest.importorskip("onnxruntime_genai")


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    return pruned_llama(llama_folder(tmp_path_factory.mktemp("decode") / "dense"))


def test_decode_rows_have_ttft_tokens_per_second_noise_and_efficiency(llm):
    dense, ids, res = llm
    rep = fxprune.verify.latency(
        dense,
        res,
        ids,
        backend="onnxruntime-genai",
        batch_sizes=(1, 2),
        warmup=1,
        repeats=4,
        threads=1,
        prompt_len=16,
        new_tokens=8,
    )
    assert rep.mode == "decode" and (rep.prompt_len, rep.new_tokens) == (16, 8)
    assert [r.batch for r in rep.rows] == [1, 2]
    for r in rep.rows:
        assert r.ttft_dense_ms > 0 and r.ttft_pruned_ms > 0
        assert r.dense_tokens_s > 0 and r.pruned_tokens_s > 0
        assert r.dense_tokens_s == pytest.approx(r.batch * 1e3 / r.dense_ms)
        assert r.speedup == pytest.approx(r.dense_ms / r.pruned_ms)
        assert 0 < r.bytes_ratio < 1  # the pruned decoder holds fewer weight bytes
        assert r.efficiency == pytest.approx(r.speedup * r.bytes_ratio)
        assert r.parity == 0.0  # the pruned decoder's tokens are result.model.generate's
        assert r.round_spread is not None and r.noisy == bool(r.noise) and r.verdict
    assert (
        rep.cpu_source
        and rep.timed_s > 0
        and rep.noisy == (bool(rep.noise) or any(r.noisy for r in rep.rows))
    )
    table = rep.table()
    for words in ("TTFT ms dense / pruned", "decode tok/s", "bytes ratio", "note: noise:"):
        assert words in table
    assert "pruned: ONNX Runtime GenAI fp32 decoder" in table
    row = json.loads(rep.to_json())["rows"][0]
    for k in ("ttft_dense_ms", "pruned_tokens_s", "bytes_ratio", "efficiency", "noisy"):
        assert row[k] is not None


def test_wrong_inputs_are_refused_before_any_build(llm, pruned, tmp_path):
    dense, ids, res = llm
    genai = {"backend": "onnxruntime-genai", "workdir": tmp_path}
    cases = [
        ({"new_tokens": 1}, ConfigError, "new_tokens=1: give an integer >= 2"),
        ({"prompt_len": 0}, ConfigError, "prompt_len=0"),
        ({"prompt_len": 250, "new_tokens": 8}, ConfigError, "exceed the dense model's context"),
    ]
    for options, error, words in cases:
        with pytest.raises(error, match=words):
            fxprune.verify.latency(dense, res, ids, repeats=2, **genai, **options)
    m, x, cnn = pruned  # a CNN is not a causal LM
    with pytest.raises(UnsupportedModelError, match="Net is not a Hugging Face model"):
        fxprune.verify.latency(m, cnn, x, repeats=2, **genai)
    with pytest.raises(ConfigError, match="prompt_len / new_tokens time generation"):
        fxprune.verify.latency(m, cnn, x, backend="torch", repeats=2, new_tokens=8)
    with pytest.raises(ConfigError, match="fp16"):
        OnnxRuntimeGenai(precision="fp16")
    assert list(tmp_path.iterdir()) == []  # nothing was built


def test_parity_counts_the_tokens_from_the_first_difference_on():
    from fxprune.verify.decode import _differing

    assert _differing([[1, 2, 3], [4, 5, 6]], [[1, 2, 3], [4, 5, 6]], 3) == 0.0
    assert _differing([[1, 2, 3], [4, 5, 6]], [[1, 9, 3], [4, 5, 6]], 3) == pytest.approx(2 / 6)
    assert _differing([[1, 2, 3]], [[1]], 3) == pytest.approx(2 / 3)  # it stopped early
