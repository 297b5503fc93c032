"""What ``fxprune.stream`` and the ``hf:`` source do with a model folder that is broken or asks
for trust: a truncated or garbled shard, an index naming the wrong shard, a ``config.json`` that
does not describe the shards (a count key left to a default the weights contradict, no
``model_type``, fewer or more layers than the shards hold), an ``auto_map`` that needs the
folder's code, a pickle beside safetensors that are not the model's. Each is a typed error
before anything is written, and in the CLI one line on stderr with exit status 2."""

from __future__ import annotations

import json

import pytest
import torch

import fxprune
from fxprune.cli import main
from fxprune.errors import CheckpointError, ConfigError, UnsupportedModelError
from fxprune.models import load_hf
from fxprune.streaming import FAMILIES, Family

T = pytest.importorskip("transformers")


def _folder(path, layers=2, kv=4, shard=None):
    """A tiny random Llama saved by save_pretrained (safetensors)."""
    cfg = T.LlamaConfig(
        vocab_size=120,
        hidden_size=64,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=kv,
        intermediate_size=128,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(path, **({"max_shard_size": shard} if shard else {}))
    return model


def _edit_config(folder, drop=(), **set_):
    cfg = json.loads((folder / "config.json").read_text())
    for k in drop:
        del cfg[k]
    cfg.update(set_)
    (folder / "config.json").write_text(json.dumps(cfg))


def _cli_error(capsys, *argv) -> str:
    """Run the CLI, expect exit 2 and one line on stderr, return that line."""
    capsys.readouterr()
    rc = main(list(argv))
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("fxprune: error: "), err
    return lines[0]


def _refused(tmp_path, capsys, src, error, match):
    """``stream`` raises ``error`` matching ``match`` and writes nothing; ``prune --stream``
    says the same in one line and exits 2."""
    with pytest.raises(error, match=match):
        fxprune.stream(src, tmp_path / "out", ffn=0.5)
    assert not (tmp_path / "out").exists()
    line = _cli_error(
        capsys,
        *("prune", f"hf:{src}", "--ffn", "0.5", "--stream", "--quiet"),
        *("--save-pretrained", str(tmp_path / "cli")),
    )
    assert not (tmp_path / "cli").exists()
    return line


@pytest.mark.parametrize("how", ["truncated", "garbled header", "truncated last shard"])
def test_a_broken_shard_is_refused_by_name_before_anything_is_written(how, tmp_path, capsys):
    src = tmp_path / "src"
    _folder(src, shard="40KB" if how == "truncated last shard" else None)
    shard = sorted(src.glob("model*.safetensors"))[-1]
    data = bytearray(shard.read_bytes())
    if how == "garbled header":
        data[8:40] = b"x" * 32
    else:
        data = data[: len(data) - 100]
    shard.write_bytes(bytes(data))
    line = _refused(tmp_path, capsys, src, CheckpointError, "truncated or corrupt")
    assert shard.name in line


def test_an_index_naming_the_wrong_shard_is_refused(tmp_path, capsys):
    src = tmp_path / "src"
    _folder(src, shard="40KB")
    index = json.loads((src / "model.safetensors.index.json").read_text())
    key = "model.layers.1.input_layernorm.weight"
    right = index["weight_map"][key]
    wrong = next(f for f in sorted(set(index["weight_map"].values())) if f != right)
    index["weight_map"][key] = wrong
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    line = _refused(
        tmp_path, capsys, src, CheckpointError, f"maps {key} to {wrong}, which does not hold it"
    )
    assert f"it is in {right}" in line


@pytest.mark.parametrize(
    "key,default,held",
    [("num_key_value_heads", 8, 4), ("intermediate_size", 11008, 128), ("hidden_size", 4096, 64)],
)
def test_a_config_key_whose_default_the_weights_contradict_is_named(
    key, default, held, tmp_path, capsys
):
    src = tmp_path / "src"
    _folder(src)
    _edit_config(src, drop=[key])
    line = _refused(
        tmp_path,
        capsys,
        src,
        CheckpointError,
        f"gives no {key}; LlamaConfig defaults it to {default}, but the weights hold {held}",
    )
    assert f'add "{key}": {held}' in line


def test_a_missing_num_key_value_heads_the_weights_agree_with_means_one_per_head(tmp_path):
    """transformers reads a config without num_key_value_heads as multi-head attention (one KV
    head per head): weights of that shape stream as before."""
    src = tmp_path / "src"
    _folder(src, kv=8)
    _edit_config(src, drop=["num_key_value_heads"])
    res = fxprune.stream(src, tmp_path / "out", ffn=0.5)
    assert res.before["num_key_value_heads"] == 8
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_key_value_heads"] == 8


def test_a_config_without_model_type_is_refused(tmp_path, capsys):
    src = tmp_path / "src"
    _folder(src)
    _edit_config(src, drop=["model_type"])
    _refused(tmp_path, capsys, src, CheckpointError, "names no model_type")
    with pytest.raises(CheckpointError, match="names no model_type"):
        load_hf(str(src))


@pytest.mark.parametrize("layers,said", [(3, 2), (2, 3)])
def test_a_layer_count_other_than_the_shards_hold_is_refused(layers, said, tmp_path, capsys):
    src = tmp_path / "src"
    _folder(src, layers=layers)
    _edit_config(src, num_hidden_layers=said)
    _refused(
        tmp_path,
        capsys,
        src,
        CheckpointError,
        f"says num_hidden_layers={said}, but the shards hold {layers} blocks",
    )


def _remote(tmp_path, model_type: str):
    """A folder whose config.json's auto_map builds the model with the folder's code, which
    leaves a file ``ran`` behind when it runs."""
    src = tmp_path / f"remote_{model_type}"
    _folder(src, layers=1)
    _edit_config(
        src,
        model_type=model_type,
        auto_map={
            "AutoConfig": "configuration_x.XConfig",
            "AutoModelForCausalLM": "modeling_x.XModel",
        },
    )
    (src / "configuration_x.py").write_text(
        f"import pathlib\n\nfrom transformers import LlamaConfig\n\n"
        f"pathlib.Path({str(tmp_path / 'ran')!r}).touch()\n\n\n"
        f"class XConfig(LlamaConfig):\n    model_type = {model_type!r}\n"
    )
    (src / "modeling_x.py").write_text(
        "from transformers import LlamaForCausalLM\n\nfrom .configuration_x import XConfig\n\n\n"
        "class XModel(LlamaForCausalLM):\n    config_class = XConfig\n"
    )
    return src


def test_remote_code_is_refused_without_trust_and_run_with_it(tmp_path, capsys, monkeypatch):
    src = _remote(tmp_path, "xllama")
    needs = "auto_map builds the model with the folder's code .*needs --trust"
    line = _refused(tmp_path, capsys, src, ConfigError, needs)
    assert "configuration_x.py, modeling_x.py" in line
    with pytest.raises(ConfigError, match=needs):
        load_hf(str(src))
    line = _cli_error(capsys, "prune", f"hf:{src}", "--heads", "0.5", "--quiet")
    assert "--trust" in line
    assert not (tmp_path / "ran").exists()  # nothing ran

    model, _ = load_hf(str(src), trust=True)  # trust: transformers' trust_remote_code
    assert type(model).__name__ == "XModel" and (tmp_path / "ran").exists()
    with pytest.raises(UnsupportedModelError, match="model_type 'xllama'"):
        fxprune.stream(src, tmp_path / "o1", ffn=0.5, trust=True)
    monkeypatch.setitem(FAMILIES, "xllama", Family())  # laid out as a Llama
    fxprune.stream(src, tmp_path / "o2", ffn=0.5, trust=True)
    assert (tmp_path / "o2" / "modeling_x.py").is_file()  # the auto_map resolves in the output
    out = T.AutoModelForCausalLM.from_pretrained(tmp_path / "o2", trust_remote_code=True)
    assert type(out).__name__ == "XModel" and out.config.intermediate_size == 64


def test_an_auto_map_beside_a_known_model_type_is_not_run_without_trust(tmp_path):
    """transformers builds a model_type it knows with its own classes unless trusted: so do
    load_hf and stream, and neither runs the folder's code."""
    src = _remote(tmp_path, "llama")
    model, _ = load_hf(str(src))
    assert type(model) is T.LlamaForCausalLM
    fxprune.stream(src, tmp_path / "out", ffn=0.5)
    assert not (tmp_path / "ran").exists()


def test_a_pickle_beside_unrelated_safetensors_is_not_loaded_silently(tmp_path, capsys):
    src = tmp_path / "src"
    model = _folder(src, layers=1)
    (src / "model.safetensors").rename(src / "adapter_model.safetensors")
    torch.save(model.state_dict(), src / "pytorch_model.bin")
    with pytest.raises(ConfigError, match="pytorch_model.bin is a pickle; pass --trust"):
        load_hf(str(src))
    assert "pass --trust" in _cli_error(capsys, "prune", f"hf:{src}", "--heads", "0.5", "--quiet")
    trusted, _ = load_hf(str(src), trust=True)
    torch.testing.assert_close(trusted.state_dict(), model.state_dict(), rtol=0, atol=0)
    _refused(tmp_path, capsys, src, CheckpointError, "pytorch_model.bin, a pickle; stream reads")

    (src / "pytorch_model.bin").unlink()  # safetensors that are not the model's weights only
    with pytest.raises(CheckpointError, match="holds adapter_model.safetensors but none of"):
        load_hf(str(src))
    _refused(tmp_path, capsys, src, CheckpointError, "adapter_model.safetensors: not the model")


def test_stream_reads_the_model_weights_not_other_safetensors_beside_them(tmp_path):
    src = tmp_path / "src"
    model = _folder(src, layers=1)
    from safetensors.torch import save_file

    stray = {"model.embed_tokens.weight": torch.zeros(120, 64)}  # sorts after model.safetensors
    save_file(stray, str(src / "zz_stray.safetensors"))
    fxprune.stream(src, tmp_path / "out", ffn=0.5)
    out = T.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    torch.testing.assert_close(
        out.model.embed_tokens.weight, model.model.embed_tokens.weight, rtol=0, atol=0
    )


def test_shards_without_their_index_are_refused_as_from_pretrained_refuses_them(tmp_path, capsys):
    src = tmp_path / "src"
    _folder(src, shard="40KB")
    (src / "model.safetensors.index.json").unlink()
    _refused(tmp_path, capsys, src, CheckpointError, "copy model.safetensors.index.json too")
