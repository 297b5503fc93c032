"""Hugging Face in, Hugging Face out: ``result.model`` is the user's class, and
``result.save_pretrained`` writes a folder ``from_pretrained`` opens in a process that never
imports fxprune, equal to ``result.model`` on fresh inputs and in greedy tokens."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import fxprune
from fxprune.errors import ConfigError, FileAccessError, UnsupportedModelError
from tests.conftest import randomize

T = pytest.importorskip("transformers")

HIDDEN, FFN = 64, 128


def _decoder(cfg_name, cls_name, kv=2, **extra):
    cfg = getattr(T, cfg_name)(
        vocab_size=100,
        hidden_size=HIDDEN,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=kv,
        intermediate_size=FFN,
        max_position_embeddings=64,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        **extra,
    )  # use_cache stays at its default (True): capture turns it off, the result keeps it
    return getattr(T, cls_name)(cfg)


FAMILIES = {
    "llama": lambda: _decoder("LlamaConfig", "LlamaForCausalLM"),  # GQA: 8 heads, 2 KV
    "qwen2": lambda: _decoder("Qwen2Config", "Qwen2ForCausalLM"),
    "mistral": lambda: _decoder("MistralConfig", "MistralForCausalLM", sliding_window=None),
    "gpt2": lambda: T.GPT2LMHeadModel(
        T.GPT2Config(
            vocab_size=100,
            n_embd=HIDDEN,
            n_layer=4,
            n_head=4,
            n_positions=64,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    ),  # fmt: skip
    "bert": lambda: T.BertModel(
        T.BertConfig(
            vocab_size=100,
            hidden_size=HIDDEN,
            num_hidden_layers=4,
            num_attention_heads=4,
            intermediate_size=FFN,
            max_position_embeddings=64,
        ),
        add_pooling_layer=False,
    ),
}


# configs that derive head_dim from hidden_size / heads: fewer heads cannot be saved
NO_HEAD_DIM = ("gpt2", "bert")


def _ids(seed, batch=2, seq=10):
    return torch.randint(2, 100, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _main(out):
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Each family pruned (heads 50 % where its config holds head_dim, FFN 25 %, one block), saved from a folder with a
    tokenizer file; returns {name: (result, folder, fresh ids, outputs, greedy tokens)}."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for name, make in FAMILIES.items():
        torch.manual_seed(0)
        dense = randomize(make())
        src = root / f"{name}-dense"
        dense.save_pretrained(src)
        (src / "vocab.txt").write_text("tokens\n")  # stands for the tokenizer files
        dense = type(dense).from_pretrained(src).eval()
        heads = 0.0 if name in NO_HEAD_DIM else 0.5
        res = fxprune.compile(
            dense, _ids(0), heads=heads, ffn=0.25, blocks=1, uniform=True, calibration=[_ids(1)]
        )
        folder = res.save_pretrained(root / f"{name}-pruned")
        fresh = _ids(2, batch=3, seq=7)
        with torch.no_grad():
            logits = _main(res.model(fresh))
            tokens = None
            if name != "bert":  # the causal LMs
                tokens = res.model.generate(fresh[:1], max_new_tokens=6, do_sample=False)
        out[name] = (dense, res, folder, fresh, logits, tokens)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FAMILIES))
def test_result_model_is_the_users_class_with_new_counts(saved, name):
    dense, res, folder, *_ = saved[name]
    assert type(res.model) is type(dense) and res.materialized
    cfg = json.loads((folder / "config.json").read_text())
    layers = cfg.get("num_hidden_layers", cfg.get("n_layer"))
    assert layers == 3
    heads = cfg.get("num_attention_heads", cfg.get("n_head"))
    assert heads == (4 if name not in NO_HEAD_DIM else 4)
    if name in ("llama", "qwen2", "mistral"):
        assert cfg["num_key_value_heads"] == 1 and cfg["head_dim"] == 8
        assert cfg["intermediate_size"] == 96 and cfg["use_cache"] is True
        assert [m.self_attn.layer_idx for m in res.model.model.layers] == [0, 1, 2]
    assert (folder / "vocab.txt").read_text() == "tokens\n"
    assert any(folder.glob("*.safetensors"))
    rep = fxprune.verify.equivalence(dense, res, _ids(3), target="model")
    assert rep.ok, rep.message


@pytest.mark.slow
def test_greedy_generate_with_the_kv_cache_matches_the_graph(saved):
    """generate() runs the pruned attention through the KV cache; the graph module, captured
    without a cache, recomputes every step: the same tokens."""
    _, res, _, fresh, _, tokens = saved["llama"]
    seq = fresh[:1]
    with torch.no_grad():
        for _ in range(6):
            nxt = _main(res.module(seq))[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
    assert torch.equal(seq, tokens)
    assert res.model.config.use_cache is True


@pytest.mark.slow
def test_from_pretrained_in_a_process_without_fxprune(saved, tmp_path):
    """The saved folders open with transformers alone, equal on fresh inputs and in tokens."""
    jobs = {}
    for name, (dense, _res, folder, fresh, _, _) in saved.items():
        torch.save(fresh, tmp_path / f"{name}.in.pt")
        jobs[name] = (str(folder), type(dense).__name__)
    script = textwrap.dedent(
        f"""
        import sys, torch, transformers
        jobs = {jobs!r}
        for name, (folder, cls) in jobs.items():
            model = getattr(transformers, cls).from_pretrained(folder).eval()
            ids = torch.load({str(tmp_path)!r} + f"/{{name}}.in.pt")
            with torch.no_grad():
                out = model(ids)
                main = out.logits if hasattr(out, "logits") else out.last_hidden_state
                gen = model.generate(ids[:1], max_new_tokens=6, do_sample=False) if hasattr(
                    model, "generate") and "LM" in cls else None
            torch.save((main, gen), {str(tmp_path)!r} + f"/{{name}}.out.pt")
        assert not any(m.startswith("fxprune") for m in sys.modules), "fxprune was imported"
        """
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    for name, (_, _, _, _, logits, tokens) in saved.items():
        main, gen = torch.load(tmp_path / f"{name}.out.pt")
        torch.testing.assert_close(main, logits, rtol=1e-5, atol=1e-5)
        if tokens is not None:
            assert torch.equal(gen, tokens), name


@pytest.mark.parametrize("name", NO_HEAD_DIM)
def test_heads_a_config_cannot_describe_are_refused_before_writing(name, tmp_path):
    torch.manual_seed(0)
    model = randomize(FAMILIES[name]()).eval()
    res = fxprune.compile(model, _ids(0), heads=0.5)
    assert res.materialized  # the module tree runs; only the config cannot say it
    with pytest.raises(ConfigError, match="cannot describe fewer heads"):
        res.save_pretrained(tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_uneven_counts_are_refused_with_the_way_out(tmp_path):
    torch.manual_seed(0)
    model = randomize(FAMILIES["llama"]()).eval()
    only_first = {"model.layers.0.self_attn.q_proj": 0.5}
    res = fxprune.compile(model, _ids(0), head_ratios=only_first)
    assert res.plan.config["hf_config_notes"]["heads"].startswith("differs per layer")
    with pytest.raises(ConfigError, match="differs per layer.*uniform=True.*result.save"):
        res.save_pretrained(tmp_path / "x")
    for kw in ({"head_ratios": only_first}, {"heads": 0.5, "global_ranking": True}):
        with pytest.raises(ConfigError, match="uniform=True keeps one count"):
            fxprune.compile(model, _ids(0), uniform=True, **kw)


def test_graph_only_result_cannot_save_pretrained(tmp_path, monkeypatch):
    import fxprune.materialize as mat

    torch.manual_seed(0)
    model = randomize(FAMILIES["bert"]()).eval()
    monkeypatch.setattr(mat, "agreement", lambda *a, **k: (False, "max_rel_err=1.00e+00"))
    res = fxprune.compile(model, _ids(0), heads=0.5)
    assert res.model is res.module and "does not compute" in res.model_note
    with pytest.raises(UnsupportedModelError, match="save_pretrained needs result.model"):
        res.save_pretrained(tmp_path / "x")


def test_a_non_hf_model_is_told_to_use_save(tmp_path):
    tv = pytest.importorskip("torchvision")
    m = tv.models.resnet18(num_classes=10).eval()
    res = fxprune.compile(m, torch.randn(1, 3, 32, 32), channels=0.5, ignore=["fc"])
    with pytest.raises(ConfigError, match="not a Hugging Face model.*result.save"):
        res.save_pretrained(tmp_path / "x")


def test_uniform_post_check_names_two_layers_that_differ():
    """The check that runs after the passes (layers of different sizes) fails, naming both."""
    from types import SimpleNamespace

    from fxprune.uniform import check_uniform

    even = SimpleNamespace(name="heads", units={"a": [4, 2], "b": [4, 2]})
    check_uniform([even])  # equal counts pass
    uneven = SimpleNamespace(name="ffn", units={"a": [8, 4], "b": [6, 3]})
    with pytest.raises(
        ConfigError, match=r"ffn pass left layers with different counts \(a: 8 -> 4, b: 6 -> 3\)"
    ):
        check_uniform([even, uneven])


@pytest.mark.slow
def test_a_missing_tokenizer_folder_is_an_error(saved, tmp_path):
    _, res, *_ = saved["llama"]
    with pytest.raises(ConfigError, match="tokenizer_from=.*not a folder"):
        res.save_pretrained(tmp_path / "x", tokenizer_from=tmp_path / "nope")


def test_a_head_count_the_config_class_refuses_is_a_clear_error(tmp_path):
    """transformers' LlamaConfig validates hidden_size % num_attention_heads even with head_dim
    set: 8 -> 6 heads of a 64-wide Llama has no Llama config (Qwen2 / Mistral configs take it)."""
    torch.manual_seed(0)
    model = randomize(_decoder("LlamaConfig", "LlamaForCausalLM", kv=8)).eval()
    if not llama_checks_head_count():  # transformers before the @strict validators (5.0)
        res = fxprune.compile(model, _ids(0), heads=0.25, uniform=True)
        back = T.LlamaForCausalLM.from_pretrained(res.save_pretrained(tmp_path / "x")).eval()
        assert back.config.num_attention_heads == 6
        return
    # known at compile time now (#22), before anything is pruned
    with pytest.raises(ConfigError, match="keeps 6 heads .*which LlamaConfig refuses"):
        fxprune.compile(model, _ids(0), heads=0.25, uniform=True)
    # and save_pretrained still refuses a config that does not validate (no uniform= check)
    res = fxprune.compile(model, _ids(0), heads=0.25, head_ratios=None)
    res.model.config.num_attention_heads = res.model.config.num_key_value_heads = 6
    with pytest.raises(ConfigError, match="LlamaConfig refuses 6 attention heads.*divides 64"):
        res.save_pretrained(tmp_path / "x")
    assert not (tmp_path / "x").exists()


def llama_checks_head_count() -> bool:
    """Whether this transformers' LlamaConfig refuses heads that do not divide hidden_size."""
    try:
        cfg = T.LlamaConfig(hidden_size=64, num_attention_heads=6, head_dim=8)
        getattr(cfg, "validate", lambda: None)()
    except Exception:  # noqa: BLE001 - whatever the validator raises
        return True
    return False


# ---- atomic saves, the files a save owns, the folder it was loaded from ----------------------


def _files(folder) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny Llama loaded from a folder (with a tokenizer file), FFN pruned 25 % uniformly."""
    src = tmp_path_factory.mktemp("llama") / "dense"
    torch.manual_seed(0)
    randomize(FAMILIES["llama"]()).save_pretrained(src)
    (src / "vocab.txt").write_text("tokens\n")
    dense = T.LlamaForCausalLM.from_pretrained(src).eval()
    res = fxprune.compile(dense, _ids(0), ffn=0.25, uniform=True, calibration=[_ids(1)])
    return src, res


# where the save dies (the child's patch), over an older checkpoint
KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    from types import SimpleNamespace
    import transformers, transformers.modeling_utils as mu
    import fxprune.atomic as atomic, fxprune.hf as hf
    config = transformers.AutoConfig.from_pretrained(sys.argv[1])
    config.intermediate_size = 96
    model = transformers.LlamaForCausalLM(config)  # another model of the saved one's shape
    point = sys.argv[3]
    if point == "staged":
        atomic.carry_over = lambda old, new, owned: os.kill(os.getpid(), signal.SIGKILL)
    else:
        def save_file(tensors, filename, metadata=None):
            if point == "half":
                open(filename, "wb").write(b"\\x00" * 1000)
            os.kill(os.getpid(), signal.SIGKILL)
        mu.safe_save_file = save_file
    result = SimpleNamespace(model=model, module=None, plan=SimpleNamespace(config={}))
    hf.save_pretrained(result, Path(sys.argv[2]))
    """
)


@pytest.mark.parametrize(
    "point",
    [
        "half",  # half the weights written
        pytest.param("config", marks=pytest.mark.slow),  # config.json written, no weights yet
        pytest.param("staged", marks=pytest.mark.slow),  # all written, before the swap
    ],
)
def test_a_killed_save_leaves_the_old_folder_whole(llama, tmp_path, point):
    """kill -9 during a save over an older checkpoint: the folder keeps every old byte and
    loads; the next save removes the staging folder the kill left."""
    src, res = llama
    folder = tmp_path / "ckpt"
    res.save_pretrained(folder)
    (folder / "notes.txt").write_text("mine\n")
    before = _files(folder)
    cmd = [sys.executable, "-c", KILL_SCRIPT, str(src), str(folder), point]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == -9, run.stderr[-2000:]
    assert _files(folder) == before
    staged = [p for p in tmp_path.iterdir() if p.name.startswith(".ckpt.")]
    assert len(staged) == 1 and (staged[0] / "config.json").is_file()  # the kill came late
    assert T.LlamaForCausalLM.from_pretrained(folder).config.intermediate_size == 96
    res.save_pretrained(folder)  # the next save cleans up after the killed one
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_a_sharded_save_replaces_a_single_file_one_and_keeps_the_users_files(llama, tmp_path):
    import stat

    src, res = llama
    folder = tmp_path / "out"
    T.LlamaForCausalLM.from_pretrained(src).save_pretrained(folder)  # the older, dense save
    (folder / "notes.txt").write_text("mine\n")
    (folder / "runs").mkdir()
    (folder / "runs" / "log.txt").write_text("epoch 1\n")
    (folder / "pytorch_model.bin").write_bytes(b"weights of an older transformers")
    folder.chmod(0o750)
    res.save_pretrained(folder, max_shard_size="200KB")
    files = sorted(p.name for p in folder.iterdir())
    shards = [f for f in files if f.startswith("model-")]
    assert len(shards) > 1 and "model.safetensors" not in files
    assert "pytorch_model.bin" not in files  # a save owns its weight files, every format
    assert (folder / "notes.txt").read_text() == "mine\n"
    assert (folder / "runs" / "log.txt").read_text() == "epoch 1\n"
    assert (folder / "vocab.txt").read_text() == "tokens\n"  # copied from the source folder
    assert stat.S_IMODE(folder.stat().st_mode) == 0o750  # the folder keeps its permissions
    back = T.LlamaForCausalLM.from_pretrained(folder).eval()
    ids = _ids(5)
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, res.model(ids).logits, rtol=0, atol=0)
    res.save_pretrained(folder)  # and back to one file: the shards and the index go
    assert sorted(p.name for p in folder.iterdir() if "safetensors" in p.name) == [
        "model.safetensors"
    ]
    assert not [p for p in tmp_path.iterdir() if p.name != "out"]  # no staging folder left


def test_a_new_folder_gets_the_usual_permissions(llama, tmp_path):
    import stat

    _, res = llama
    umask = os.umask(0o022)
    try:
        res.save_pretrained(tmp_path / "new" / "out")
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "new" / "out").stat().st_mode) == 0o755


def test_saving_over_the_folder_the_model_came_from_needs_overwrite(llama, tmp_path):
    src, res = llama
    folder = tmp_path / "dense"
    shutil.copytree(src, folder)
    dense = T.LlamaForCausalLM.from_pretrained(folder).eval()
    again = fxprune.compile(dense, _ids(0), ffn=0.25, uniform=True, calibration=[_ids(1)])
    before = _files(folder)
    with pytest.raises(FileAccessError, match=r"dense is the folder the model was loaded from"):
        again.save_pretrained(folder)
    with pytest.raises(FileAccessError, match="overwrite=True"):
        again.save_pretrained(f"{folder}/.")  # the same folder spelled another way
    assert _files(folder) == before
    again.save_pretrained(folder, overwrite=True)
    assert json.loads((folder / "config.json").read_text())["intermediate_size"] == 96
    assert (folder / "vocab.txt").read_text() == "tokens\n"
    assert T.LlamaForCausalLM.from_pretrained(folder).config.intermediate_size == 96


def test_a_mount_point_is_written_in_place_with_a_warning(llama, tmp_path, monkeypatch):
    """A folder that is a mount point cannot be swapped: the save goes in place (saying so),
    still replacing the files a save owns and keeping the user's."""
    _, res = llama
    folder = tmp_path / "mnt"
    res.save_pretrained(folder)
    (folder / "notes.txt").write_text("mine\n")
    monkeypatch.setattr(os.path, "ismount", lambda p: str(p) == str(folder))
    with pytest.warns(UserWarning, match="mnt is a mount point .* writing in place"):
        res.save_pretrained(folder, max_shard_size="200KB")
    files = sorted(p.name for p in folder.iterdir())
    assert "model.safetensors" not in files and "model.safetensors.index.json" in files
    assert (folder / "notes.txt").read_text() == "mine\n" and not [f for f in files if f[0] == "."]
    back = T.LlamaForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(_ids(5)).logits, res.model(_ids(5)).logits)
