"""The ONNX Runtime GenAI export: a pruned Llama becomes a decoder folder with its KV cache
whose greedy tokens equal ``result.model.generate``'s; a decoder that computes something else,
a missing package, a model that is not a causal LM and bad options are refused with typed
errors, and no folder (nor staging folder) is left behind."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import fxprune
from fxprune.errors import (
    ConfigError,
    ExportError,
    FileAccessError,
    MissingExtraError,
    UnsupportedModelError,
)
from tests.genai_models import VOCAB, llama, llama_folder, pruned_llama

pytest.importorskip("transformers")
pytest.importorskip("onnxruntime_genai")

from fxprune.exporters import genai  # noqa: E402
from fxprune.exporters.genai import HANDOFF, TokenParityError, read_handoff  # noqa: E402
from fxprune.exporters.genai_build import (  # noqa: E402
    GenaiDecoder,
    build_genai,
    hf_folder,
    hf_greedy,
    random_prompts,
    weight_bytes,
)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The tiny Llama pruned (heads 4/2 -> 2/1, FFN 128 -> 96) and exported once, fp32."""
    base = tmp_path_factory.mktemp("genai")
    dense, ids, res = pruned_llama(llama_folder(base / "dense"))
    report = res.export(base / "out" / "llama-genai", format="genai")
    return dense, res, report


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_the_decoder_generates_what_the_pruned_model_generates(exported, tmp_path):
    dense, res, rep = exported
    out = rep.path
    assert rep.parity["tokens_equal"] and rep.parity["prompts"] == 3
    assert {"genai_config.json", "model.onnx", "tokenizer.json", HANDOFF} <= set(rep.files)
    cfg = json.loads((out / "genai_config.json").read_text())["model"]["decoder"]
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (2, 1)  # pruned counts
    assert _leftovers(out.parent) == []  # the staging folder went with the rename
    # checked again, independently: other prompts, other lengths, a batch of two
    ids = random_prompts(VOCAB, 2, 9, seed=7)
    got, first_s, rest_s = GenaiDecoder(out, threads=1).generate(ids, 12)
    assert got == hf_greedy(res.model, ids, 12) and first_s > 0 and rest_s > 0
    assert got != hf_greedy(dense, ids, 12)  # the dense model says something else
    # the weights are the pruned ones: the bytes of the pruned shapes, and a decode step reads
    # all of them but the embedding table (512 x 64 fp32, gathered a row at a time)
    assert 0 < rep.weight_bytes == weight_bytes(out)
    assert weight_bytes(out) - weight_bytes(out, per_step=True) == VOCAB * 64 * 4
    kept = sum(p.numel() for p in res.model.parameters()) * 4
    assert rep.weight_bytes <= kept + VOCAB * 64 * 4  # lm_head may be stored beside the table
    assert "all equal on the fp32 build" in rep.table()


def test_the_handoff_record_says_what_was_removed(exported, tmp_path):
    _, res, rep = exported
    rec = read_handoff(rep.path)
    assert rec["digest_ok"] and rec["plan"] == res.plan.to_dict()
    assert rec["removed"]["heads"]["units_kept"] < rec["removed"]["heads"]["units_before"]
    assert rec["removed"]["ffn"] == {"groups": 2, "units_before": 256, "units_kept": 192}
    g = rec["genai"]
    assert (g["precision"], g["execution_provider"]) == ("fp32", "cpu")
    assert g["parity"]["tokens_equal"] and g["onnxruntime_genai"]
    # a plan edited after the export no longer matches its digest
    copy = tmp_path / "edited"
    shutil.copytree(rep.path, copy)
    raw = json.loads((copy / HANDOFF).read_text())
    raw["plan"]["passes"][0]["kept"] = {}
    (copy / HANDOFF).write_text(json.dumps(raw))
    assert read_handoff(copy)["digest_ok"] is False
    (copy / HANDOFF).write_text("[1, 2]")
    with pytest.raises(ExportError, match="not a JSON object"):
        read_handoff(copy)
    with pytest.raises(FileAccessError, match="cannot read"):
        read_handoff(tmp_path)


def _tamper(good: Path):
    """A stand-in for the builder: the good build, then the LM head's weights negated (the
    greedy token becomes the least likely one)."""
    import onnx
    from onnx import numpy_helper

    def build(hf_dir, out_dir, precision, cache_dir):
        shutil.copytree(good, out_dir)
        (out_dir / HANDOFF).unlink()
        path = out_dir / "model.onnx"
        model = onnx.load(str(path), load_external_data=True)
        (w,) = [t for t in model.graph.initializer if t.name.startswith("lm_head")]
        w.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(w), w.name))
        (out_dir / "model.onnx.data").unlink()
        onnx.save(model, str(path), save_as_external_data=True, location="model.onnx.data")

    return build


def test_a_tampered_decoder_fails_parity_and_leaves_nothing(exported, tmp_path, monkeypatch):
    _, res, rep = exported
    monkeypatch.setattr(genai, "build_genai", _tamper(rep.path))
    target = tmp_path / "tampered"
    with pytest.raises(TokenParityError, match="prompt 0, new token 0: .* nothing was written"):
        res.export(target, format="genai")
    assert not target.exists() and _leftovers(tmp_path) == []
    monkeypatch.setattr(genai, "build_genai", lambda h, o, p, c: shutil.copytree(rep.path, o))
    res.export(target, format="genai")  # the untouched build passes the same check
    assert (target / "model.onnx").is_file()


def test_missing_package_names_the_extra(exported, tmp_path, monkeypatch):
    _, res, _ = exported
    monkeypatch.setitem(sys.modules, "onnxruntime_genai", None)  # import raises ImportError
    with pytest.raises(MissingExtraError, match=r"pip install 'fxprune\[genai\]'"):
        res.export(tmp_path / "out", format="genai")
    assert list(tmp_path.iterdir()) == []


def test_models_that_are_not_causal_lms_are_refused(tmp_path):
    from tests.transformer_models import encoder_config

    transformers = pytest.importorskip("transformers")
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    res = fxprune.compile(net.eval(), torch.randn(2, 8), channels=0.5)
    with pytest.raises(UnsupportedModelError, match="Sequential is not a Hugging Face model"):
        res.export(tmp_path / "a", format="genai")
    bert = transformers.BertModel(encoder_config(), add_pooling_layer=False).eval()
    ids = torch.randint(0, 100, (2, 8))
    res = fxprune.compile(bert, ids, ffn=0.25, uniform=True)
    with pytest.raises(UnsupportedModelError, match="BertModel is not a causal language model"):
        res.export(tmp_path / "b", format="genai")
    with pytest.raises(UnsupportedModelError, match="not a Hugging Face model"):
        hf_folder(net, tmp_path / "c")
    assert list(tmp_path.iterdir()) == []


def test_bad_options_are_refused_before_any_build(exported, tmp_path, monkeypatch):
    _, res, rep = exported

    def no_build(*a):
        raise AssertionError("the builder ran")

    monkeypatch.setattr(genai, "build_genai", no_build)
    cases = [
        ({"precision": "fp16"}, ConfigError, "fp16.*CPU execution provider"),
        ({"precision": "int8"}, ConfigError, r"choose one of \('fp32', 'int4'\)"),
        ({"prompts": 0}, ConfigError, "prompts=0"),
        ({"new_tokens": 300}, ConfigError, "context is 256 positions"),
        ({"tokenizer_from": tmp_path / "none"}, ConfigError, "is not a folder"),
    ]
    for options, error, words in cases:
        with pytest.raises(error, match=words):
            res.export(tmp_path / "x", format="genai", **options)
    with pytest.raises(ExportError, match="format='tflite': no such exporter; known: .*genai"):
        res.export(tmp_path / "x", format="tflite")
    with pytest.raises(ExportError, match="or format= one of \\['genai'\\] for a folder"):
        res.export(tmp_path / "x")
    (tmp_path / "file").write_text("")
    with pytest.raises(FileAccessError, match="is a file"):
        res.export(tmp_path / "file", format="genai")
    with pytest.raises(FileAccessError, match="not empty: pass overwrite=True"):
        res.export(rep.path.parent, format="genai")
    with pytest.raises(ConfigError, match="exports a compile result"):
        fxprune.exporters.export(res.module, (), tmp_path / "x", format="genai")
    # a model from no folder has no tokenizer: the builder would fail, so it never runs
    model = llama()
    ids = torch.randint(2, VOCAB, (2, 8))
    bare = fxprune.compile(model, ids, ffn=0.25, uniform=True)
    with pytest.raises(ConfigError, match="no tokenizer for LlamaForCausalLM.*tokenizer_from"):
        bare.export(tmp_path / "x", format="genai")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_a_failing_builder_is_a_typed_error_with_its_reason(tmp_path, monkeypatch):
    fake = tmp_path / "python"
    fake.write_text(
        "#!/bin/sh\necho 'Traceback (most recent call last):' >&2\n"
        "echo 'NotImplementedError: The GPT2 model is not currently supported.' >&2\nexit 1\n"
    )
    fake.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(fake))
    with pytest.raises(ExportError, match="builder failed .*: NotImplementedError: The GPT2"):
        build_genai(tmp_path, tmp_path / "out", "fp32", tmp_path / "cache")


@pytest.mark.slow
def test_int4_is_checked_through_an_fp32_build_and_overwrites(exported, tmp_path):
    _, res, rep = exported
    target = tmp_path / "int4"
    shutil.copytree(rep.path, target)
    (target / "stale.txt").write_text("from before")
    q = res.export(target, format="genai", precision="int4", overwrite=True)
    assert not (target / "stale.txt").exists() and _leftovers(tmp_path) == []
    p = read_handoff(target)["genai"]["parity"]
    assert p["checked_precision"] == "fp32" and len(p["quantized_common_prefix"]) == 3
    assert q.weight_bytes < rep.weight_bytes / 2  # 4-bit weights (embeddings stay fp32)
    ids = random_prompts(VOCAB, 1, 8, seed=3)
    tokens = GenaiDecoder(target).generate(ids, 5)[0]
    assert np.array(tokens).shape == (1, 5)


def test_swap_in_puts_the_old_folder_back_when_the_last_rename_fails(tmp_path, monkeypatch):
    """overwrite=True renames the old folder aside before the new one goes in; if that last
    rename fails, the old folder is renamed back, whole (a reviewer found it could be lost)."""
    import os

    from fxprune import atomic

    old, new = tmp_path / "out", tmp_path / "staged"
    old.mkdir()
    (old / "model.onnx").write_text("old")
    new.mkdir()
    (new / "model.onnx").write_text("new")
    real = os.replace

    def failing(src, dst):
        if os.fspath(src) == os.fspath(new):
            raise OSError("disk full")
        return real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", failing)
    monkeypatch.setattr(atomic, "exchange", lambda a, b: False)  # the two-rename path
    with pytest.raises(OSError, match="disk full"):
        atomic.swap_in(new, old, tmp_path / "aside")
    assert (old / "model.onnx").read_text() == "old"
    monkeypatch.setattr(atomic.os, "replace", real)
    atomic.swap_in(new, old, tmp_path / "aside")
    assert (old / "model.onnx").read_text() == "new" and not new.exists()
