"""``fxprune.stream``: a Hugging Face decoder pruned block by block from its safetensors shards
gives the same folder ``compile(..., uniform=True).save_pretrained`` gives (weight criteria),
calibrates sequentially (data-driven ones), proves every block, and refuses bad input without
leaving a half-written folder."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

import fxprune
from fxprune.errors import CheckpointError, ConfigError, PassError, UnsupportedModelError
from fxprune.passes import NM
from fxprune.streaming import Shards, ShardWriter
from tests.conftest import randomize

T = pytest.importorskip("transformers")


def _decoder(kind: str, layers: int = 3, heads: int = 8, kv: int = 4):
    cfg_cls, model_cls = {
        "llama": ("LlamaConfig", "LlamaForCausalLM"),
        "mistral": ("MistralConfig", "MistralForCausalLM"),
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    }[kind]
    extra = {"sliding_window": None} if kind == "mistral" else {}
    cfg = getattr(T, cfg_cls)(
        vocab_size=120,
        hidden_size=64,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        intermediate_size=128,
        max_position_embeddings=64,
        bos_token_id=0,
        eos_token_id=1,
        **extra,
    )
    torch.manual_seed(0)
    return randomize(getattr(T, model_cls)(cfg)).eval()


def _ids(seed, batch=2, seq=12):
    return torch.randint(2, 120, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _source(model, folder, shard=None):
    model.save_pretrained(folder, **({"max_shard_size": shard} if shard else {}))
    (folder / "tokenizer.json").write_text("{}")  # stands for the tokenizer files
    return folder


def _state(folder):
    m = T.AutoModelForCausalLM.from_pretrained(folder).eval()
    return m, m.state_dict()


@pytest.mark.parametrize(
    "kind,kw",
    [
        ("llama", {"heads": 0.5, "ffn": 0.25}),
        ("qwen2", {"heads": 0.25, "sparsity": "2:4"}),
        ("mistral", {"ffn": 0.5, "importance": "l2"}),
    ],
)
def test_stream_writes_what_compile_and_save_pretrained_write(kind, kw, tmp_path):
    dense = _decoder(kind)
    # sharded source (several files + index) and sharded output: both paths of the readers
    src = _source(dense, tmp_path / "src", shard="60KB")
    assert (src / "model.safetensors.index.json").is_file()
    res = fxprune.stream(src, tmp_path / "out", max_shard_bytes=80_000, **kw)
    # N:M covers the blocks' Linears only (lm_head stays dense, as Wanda / SparseGPT do)
    only_blocks = {"sparsity_include": ["model.layers.*"]} if "sparsity" in kw else {}
    ref = fxprune.compile(dense, _ids(0), uniform=True, **kw, **only_blocks)
    ref.save_pretrained(tmp_path / "ref")
    got, want = _state(tmp_path / "out")[1], _state(tmp_path / "ref")[1]
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    ref_cfg = json.loads((tmp_path / "ref" / "config.json").read_text())
    for k in ("num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size"):
        assert cfg[k] == ref_cfg[k] == res.after[k], k
    assert len(list((tmp_path / "out").glob("model-*.safetensors"))) > 1
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    assert len(res.layers) == 3 and all(r.max_rel_err < 1e-4 for r in res.layers)
    assert res.bytes_out < res.bytes_in or kw.get("sparsity")
    assert "streamed 3 blocks" in res.table()


def test_a_streamed_folder_opens_without_fxprune_and_generates(tmp_path):
    dense = _decoder("mistral", layers=2)
    src = _source(dense, tmp_path / "src")
    fxprune.stream(src, tmp_path / "out", heads=0.25, ffn=0.25)
    ref = fxprune.compile(dense, _ids(0), heads=0.25, ffn=0.25, uniform=True)
    fresh = _ids(5, batch=1, seq=6)
    with torch.no_grad():
        logits = ref.model(fresh).logits
        tokens = ref.model.generate(fresh, max_new_tokens=5, do_sample=False)
    torch.save(fresh, tmp_path / "in.pt")
    script = textwrap.dedent(
        f"""
        import sys, torch, transformers
        m = transformers.AutoModelForCausalLM.from_pretrained({str(tmp_path / "out")!r}).eval()
        ids = torch.load({str(tmp_path / "in.pt")!r})
        with torch.no_grad():
            out = (m(ids).logits, m.generate(ids, max_new_tokens=5, do_sample=False))
        torch.save(out, {str(tmp_path / "out.pt")!r})
        assert not any(k.startswith("fxprune") for k in sys.modules), "fxprune was imported"
        """
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    got_logits, got_tokens = torch.load(tmp_path / "out.pt")
    torch.testing.assert_close(got_logits, logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(got_tokens, tokens)


def test_wanda_calibrates_each_block_on_the_pruned_blocks_before_it(tmp_path):
    """Block 1 is masked by Wanda on the hidden states the *pruned* block 0 makes, each of its
    layers on what its layers before it give once pruned (NM.sequential): recomputed here from
    the streamed model's own forward (output_hidden_states), independent of the stream's code,
    the masks agree."""
    dense = _decoder("llama", layers=2)
    src = _source(dense, tmp_path / "src")
    calib = [_ids(10 + i, batch=2, seq=16) for i in range(2)]
    fxprune.stream(
        src, tmp_path / "out", sparsity="2:4", sparsity_method="wanda", calibration=calib
    )
    pruned, state = _state(tmp_path / "out")
    with torch.no_grad():
        into_1 = [pruned(b, output_hidden_states=True).hidden_states[1] for b in calib]
    from fxprune.streaming import Block

    block = Block(dense.model.layers[1], dense.model.rotary_emb).eval()
    sequential = fxprune.Recipe((NM(2, 4, method="wanda", sequential=True),), uniform=True)
    ref = fxprune.compile(block, into_1[0], sequential, calibration=into_1)
    one_pass = fxprune.compile(
        block, into_1[0], sparsity="2:4", sparsity_method="wanda", calibration=into_1
    ).model.layer.state_dict()
    dense_calibrated = fxprune.compile(
        dense, calib[0], sparsity="2:4", sparsity_method="wanda", calibration=calib
    ).model.state_dict()
    differs = within = 0
    for name, w in ref.model.layer.state_dict().items():
        got = state[f"model.layers.1.{name}"]
        assert torch.equal(got != 0, w != 0), name
        differs += int(not torch.equal(got != 0, dense_calibrated[f"model.layers.1.{name}"] != 0))
        within += int(not torch.equal(got != 0, one_pass[name] != 0))
    # calibrating on the dense model's hidden states would have chosen other weights, and so
    # would calibrating the block's later layers on its dense layers' outputs
    assert differs > 0 and within > 0
    assert torch.equal(
        state["model.layers.1.self_attn.q_proj.weight"] != 0,
        one_pass["self_attn.q_proj.weight"] != 0,
    )
    for name, w in state.items():
        if name.startswith("model.layers.") and name.endswith("proj.weight"):
            groups = (w.reshape(w.shape[0], -1, 4) != 0).sum(-1)
            assert int(groups.max()) <= 2, name


def test_every_block_is_proved_and_a_wrong_one_stops_the_run(tmp_path, monkeypatch):
    dense = _decoder("llama", layers=2)
    src = _source(dense, tmp_path / "src")
    import fxprune.api

    real = fxprune.api.compile

    def tampered(*a, **kw):
        res = real(*a, **kw)
        if "capture" in kw:  # the stream's per-block compile
            with torch.no_grad():
                res.model.layer.mlp.down_proj.weight[0, 0] += 1.0
        return res

    monkeypatch.setattr(fxprune.api, "compile", tampered)  # what the stream calls per block
    with pytest.raises(PassError, match="block 0 fails its proof"):
        fxprune.stream(src, tmp_path / "out", ffn=0.25)
    assert not (tmp_path / "out").exists()  # nothing half-written is left


def test_a_tree_unlike_its_graph_fails_the_proof_or_the_agreement_run(tmp_path, monkeypatch):
    """A proved stream skips the run of each block's rebuilt tree against its graph (the proof
    checks result.model itself, on the same kind of inputs): a tree that computes something
    else still stops the run, at the proof; an unproved stream keeps the agreement run, which
    falls back to the graph module, and the stream refuses that block."""
    import fxprune.materialize as mat

    dense = _decoder("llama", layers=2)
    src = _source(dense, tmp_path / "src")
    real, runs = mat.materialize, []

    def off(work, *a, **kw):  # the tree, not the graph, is wrong
        real(work, *a, **kw)
        with torch.no_grad():
            for m in work.modules():
                if hasattr(m, "down_proj"):
                    m.down_proj.weight[0, 0] += 1.0

    monkeypatch.setattr(mat, "materialize", off)
    monkeypatch.setattr(mat, "agreement", lambda *a, **k: runs.append(1) or (False, "differs"))
    with pytest.raises(PassError, match="block 0 fails its proof"):
        fxprune.stream(src, tmp_path / "out", ffn=0.25)
    assert not runs  # proved: no agreement run
    with pytest.raises(UnsupportedModelError, match="cannot be rebuilt as its own class"):
        fxprune.stream(src, tmp_path / "out2", ffn=0.25, prove=False)
    assert runs


def test_bad_input_is_refused_by_name(tmp_path):
    llama = _source(_decoder("llama", layers=1), tmp_path / "llama")
    from tests.test_save_pretrained import llama_checks_head_count

    if llama_checks_head_count():  # transformers 5.24's LlamaConfig; 5.0 takes any count
        with pytest.raises(ConfigError, match="LlamaConfig refuses 6 attention heads.*divides 64"):
            fxprune.stream(llama, tmp_path / "o1", heads=0.25)  # 8 -> 6 heads
        assert not (tmp_path / "o1").exists()
    with pytest.raises(CheckpointError, match="no config.json"):
        fxprune.stream(tmp_path / "nowhere", tmp_path / "o2", ffn=0.5)
    with pytest.raises(ConfigError, match="nothing to do"):
        fxprune.stream(llama, tmp_path / "o3")
    with pytest.raises(ConfigError, match="taylor needs the model's loss"):
        fxprune.stream(llama, tmp_path / "o4", ffn=0.5, importance="taylor")
    with pytest.raises(ConfigError, match="wanda.*give calibration"):
        fxprune.stream(llama, tmp_path / "o5", sparsity="2:4", sparsity_method="wanda")
    padded = {"input_ids": _ids(0), "attention_mask": torch.ones(2, 12, dtype=torch.long)}
    padded["attention_mask"][0, :3] = 0
    with pytest.raises(ConfigError, match="batch 0 is padded"):
        fxprune.stream(
            llama, tmp_path / "o6", ffn=0.5, importance="activation", calibration=[padded]
        )
    with pytest.raises(ConfigError, match="outside \\[0, 120\\)"):
        fxprune.stream(
            llama, tmp_path / "o7", ffn=0.5, importance="activation", calibration=[_ids(0) + 500]
        )
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(ConfigError, match="not an empty folder"):
        fxprune.stream(llama, tmp_path / "full", ffn=0.5)
    gpt2 = T.GPT2LMHeadModel(T.GPT2Config(vocab_size=50, n_embd=32, n_layer=1, n_head=2))
    gpt2.save_pretrained(tmp_path / "gpt2")
    with pytest.raises(UnsupportedModelError, match="model_type 'gpt2'"):
        fxprune.stream(tmp_path / "gpt2", tmp_path / "o8", ffn=0.5)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text((llama / "config.json").read_text())
    with pytest.raises(CheckpointError, match="no safetensors weights"):
        fxprune.stream(tmp_path / "bin", tmp_path / "o9", ffn=0.5)


def test_shard_reader_and_writer_round_trip(tmp_path):
    tensors = {f"t{i}": torch.full((100,), float(i)) for i in range(5)}  # 400 bytes each
    w = ShardWriter(tmp_path, max_bytes=900)
    for k, v in tensors.items():
        w.add(k, v)
    names = w.close()
    assert names == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 2000
    back = Shards(tmp_path).load(tensors)
    assert all(torch.equal(back[k], v) for k, v in tensors.items())


def test_cli_stream(tmp_path, capsys):
    from fxprune.cli import main

    src = _source(_decoder("qwen2", layers=2), tmp_path / "src")
    rc = main(
        [
            "prune",
            f"hf:{src}",
            "--heads",
            "0.25",
            "--stream",
            "--save-pretrained",
            str(tmp_path / "o"),
            "--quiet",
        ]
    )
    assert rc == 0
    assert "streamed 2 blocks" in capsys.readouterr().out
    assert json.loads((tmp_path / "o" / "config.json").read_text())["num_key_value_heads"] == 3
    rc = main(
        [
            "prune",
            f"hf:{src}",
            "--ffn",
            "0.5",
            "--stream",
            "--save-pretrained",
            str(tmp_path / "o2"),
            "--blocks",
            "1",
        ]
    )
    assert rc == 2
    assert "--stream does not take --blocks" in capsys.readouterr().err
    rc = main(["prune", f"hf:{src}", "--ffn", "0.5", "--stream"])
    assert rc == 2
    assert "give --save-pretrained" in capsys.readouterr().err


def test_retarget_reuses_one_capture_and_refuses_another_structure(monkeypatch):
    import importlib

    from fxprune.graph import retarget, trace
    from fxprune.streaming import Block

    dense = _decoder("llama", layers=2)
    rot = dense.model.rotary_emb
    b0, b1 = (Block(layer, rot).eval() for layer in dense.model.layers)
    x = torch.randn(1, 6, 64)
    t0 = trace(b0, x, mode="export")
    t1 = retarget(t0, b1, x)
    with torch.no_grad():
        torch.testing.assert_close(t1.gm(x), b1(x), rtol=0, atol=0)
    assert t1.gm.get_parameter("layer.mlp.up_proj.weight") is b1.layer.mlp.up_proj.weight
    # the template's shapes carry over only for inputs of the traced shapes; others propagate
    tr = importlib.import_module("fxprune.graph.trace")  # the module, not the function
    ran = []
    real = tr.propagate_shapes
    monkeypatch.setattr(tr, "propagate_shapes", lambda gm, a: ran.append(a[0].shape) or real(gm, a))
    free = ({0: torch.export.Dim.AUTO, 1: torch.export.Dim.AUTO},)  # as the stream captures
    td = trace(b0, x, mode="export", dynamic_shapes=free)
    ran.clear()  # the capture's own propagation
    retarget(td, b1, x)
    assert not ran
    y = torch.randn(2, 3, 64)
    t2 = retarget(td, b1, y)
    assert ran == [y.shape]
    holder = next(n for n in t2.gm.graph.nodes if n.op == "placeholder")
    assert tuple(holder.meta["val"].shape) == (2, 3, 64)
    other = Block(_decoder("llama", layers=1, heads=4, kv=2).model.layers[0], rot)
    with pytest.raises(ConfigError, match="retarget: Block.layer.self_attn.head_dim is 16.*8"):
        retarget(t0, other)
    wider = Block(_decoder("llama", layers=1).model.layers[0], rot)
    with torch.no_grad():
        wider.layer.mlp.up_proj.weight = torch.nn.Parameter(torch.zeros(64, 64))
    with pytest.raises(ConfigError, match="'layer.mlp.up_proj.weight' of Block is \\(64, 64\\)"):
        retarget(t0, wider)


def test_prune_streams_by_itself_when_the_whole_model_would_not_fit(tmp_path, capsys, monkeypatch):
    """#24: the plain command was OOM-killed on a 3B checkpoint; when the whole-model path's
    measured multiple of the weights exceeds the memory available, prune streams and says so
    in one line. --no-stream keeps the whole model; a flag the stream refuses keeps it too, and
    the stream refuses by name what it would otherwise ignore."""
    from fxprune import cli_stream
    from fxprune.cli import main

    src = _source(_decoder("llama", layers=2), tmp_path / "src")
    need = cli_stream.plain_peak(src)
    assert need > 7 * sum(f.stat().st_size for f in src.glob("*.safetensors"))
    monkeypatch.setattr(cli_stream, "mem_available", lambda: 2 * need)  # fits
    base = ["prune", f"hf:{src}", "--ffn", "0.5", "--quiet", "--save-pretrained"]
    assert main([*base, str(tmp_path / "plain")]) == 0
    out = capsys.readouterr()
    assert "streaming block by block" not in out.err and "streamed" not in out.out
    monkeypatch.setattr(cli_stream, "mem_available", lambda: need // 2)  # would not fit
    assert main([*base, str(tmp_path / "auto")]) == 0
    out = capsys.readouterr()
    assert "would need about" in out.err and "streaming block by block" in out.err
    assert "streamed 2 blocks" in out.out
    plain = T.AutoModelForCausalLM.from_pretrained(tmp_path / "plain").eval()
    auto = T.AutoModelForCausalLM.from_pretrained(tmp_path / "auto").eval()
    with torch.no_grad():
        torch.testing.assert_close(auto(_ids(5)).logits, plain(_ids(5)).logits)
    for extra in (["--no-stream"], ["--unstructured", "0.5"]):  # the whole-model path
        assert main([*base, str(tmp_path / extra[0].strip("-")), *extra]) == 0
        assert "streaming block by block" not in capsys.readouterr().err
    refused = {
        "--unstructured": ["0.5"],
        "--experts": ["1"],
        "--allow-approximate": [],
        "--no-stream": [],
    }
    for flag, value in refused.items():
        assert main([*base, str(tmp_path / "r"), "--stream", flag, *value]) == 2
        assert flag in capsys.readouterr().err
    assert main(["prune", "torchvision:resnet18", "--channels", "0.25", "--no-stream"]) == 2
    assert "--no-stream applies to hf:DIR" in capsys.readouterr().err
