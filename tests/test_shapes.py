"""Shapes stay dynamic: a pruned model serves other batch sizes and sequence lengths (eager, after
replay, in ONNX Runtime), honours a padded attention mask, and the command line builds its
example from --input-shape / --seq-len / --batch."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.export import Dim
from torch.utils import _pytree as pytree

import fxprune
from fxprune.cli import main
from fxprune.errors import ConfigError
from fxprune.graph import trace
from fxprune.verify.proof import zeroed_dense
from tests.conftest import randomize
from tests.transformer_models import build, encoder_config

TEXT = ["bert", "roberta", "gpt2", "llama", "qwen2"]


def _leaves(out) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def _assert_same(pruned, reference, *args, where=None):
    """Every output of ``pruned(*args)`` equals ``reference(*args)`` (at ``where``: a mask)."""
    with torch.no_grad():
        got, ref = _leaves(pruned(*args)), _leaves(reference(*args))
    assert got and len(got) == len(ref)
    for g, r in zip(got, ref, strict=True):
        if where is not None:  # (batch, sequence) mask over (batch, sequence, hidden) outputs
            g, r = g[where.bool()], r[where.bool()]
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


def _axes(path) -> dict[str, list]:
    """The input axes of an ONNX file: a name for a dynamic axis, the size for a fixed one."""
    onnx = pytest.importorskip("onnx")
    return {
        i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
        for i in onnx.load(str(path)).graph.input
    }


def _ids(shape, seed=1):
    return torch.randint(3, 100, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", TEXT)
def test_text_models_run_at_other_lengths_and_batch_sizes(name):
    model, x, info = build(name)  # traced at (2, 8)
    res = fxprune.compile(model, x, heads=0.5, ffn=0.5)
    assert res.plan.config["dynamic_shapes"] == [[0, 1]]
    heads = next(p for p in res.passes if p.name == "heads")
    n = info["heads"]
    assert list(heads.details["units"].values())[0] == [n, n - n // 2]
    z = zeroed_dense(model, res)
    for shape in [(3, 5), (1, 11)]:
        _assert_same(res.module, z, _ids(shape))


def test_image_batch_is_dynamic_and_spatial_dims_static():
    model, x, _ = build("hf_vit")  # (2, 3, 32, 32)
    res = fxprune.compile(model, x, heads=0.5, ffn=0.5)
    assert res.plan.config["dynamic_shapes"] == [[0]]
    z = zeroed_dense(model, res)
    for b in (3, 1):
        _assert_same(res.module, z, torch.randn(b, 3, 32, 32))


def test_batch_and_sequence_of_one_are_not_baked_in():
    model, _, _ = build("bert")
    ids = _ids((1, 1))  # export would specialise both sizes to the constant 1
    res = fxprune.compile(model, (ids,), heads=0.5, ffn=0.5)
    assert res.plan.config["dynamic_shapes"] == [[0, 1]]
    assert res.plan.inputs[0]["shape"] == [1, 1]  # the example, not the widened trace
    z = zeroed_dense(model, res)
    _assert_same(res.module, z, ids)
    _assert_same(res.module, z, _ids((3, 6)))


def test_replay_and_user_dynamic_shapes():
    model, x, _ = build("bert")
    res = fxprune.compile(model, x, heads=0.5)
    again = fxprune.apply_plan(model, res.plan.to_json())
    assert again.plan.config["dynamic_shapes"] == [[0, 1]]
    again.module.load_state_dict(res.module.state_dict())
    _assert_same(again.module, res.module, _ids((3, 5)))

    # the sequence fixed on request: the pruned module then takes the traced length only
    fixed = fxprune.compile(model, x, heads=0.5, dynamic_shapes=({0: Dim.AUTO},))
    assert fixed.plan.config["dynamic_shapes"] == [[0]]
    _assert_same(fixed.module, res.module, _ids((3, 8)))
    with pytest.raises(Exception, match="Guard failed"):
        fixed.module(_ids((2, 5)))
    replayed = fxprune.apply_plan(model, fixed.plan.to_dict())
    assert replayed.plan.config["dynamic_shapes"] == [[0]]


def test_trace_takes_dynamic_shapes_as_torch_export_spells_them():
    model, x, _ = build("bert")
    ids = x[0]
    mask = torch.ones_like(ids)
    b, s = Dim("b"), Dim("s", max=32)  # named: shared by both inputs, like torch.export's
    by_name = {"input_ids": (b, s), "attention_mask": {0: b, 1: s}}
    t = trace(model, (ids, mask), dynamic_shapes=by_name)
    assert t.mode == "export" and t.dynamic == [[0, 1], [0, 1]]
    assert t.gm.meta["fxprune_dynamic_dims"] == t.dynamic
    assert trace(model, (ids, mask)).dynamic == [[0, 1], [0, 1]]  # the default
    with pytest.raises(ConfigError, match="one entry per example input"):
        trace(model, (ids, mask), dynamic_shapes=({0: Dim.AUTO},))
    with pytest.raises(ConfigError, match="not among the forward's first 2 arguments"):
        trace(model, (ids, mask), dynamic_shapes={"pixel_values": None})
    with pytest.raises(ConfigError, match="dim 2 is not a dim of a 2-D input"):
        trace(model, (ids, mask), dynamic_shapes=({2: Dim.AUTO}, None))


class Block(nn.Module):
    """Attention whose view sizes are computed from ``x.size()`` (fx keeps them symbolic)."""

    def __init__(self, dim=32, heads=4, hidden=16):
        super().__init__()
        self.h = heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.up, self.down = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        b, s, c = x.size()
        d = c // self.h

        def split(t):
            return t.view(b, s, self.h, d).transpose(1, 2)

        a = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)))
        x = x + self.o(a.transpose(1, 2).reshape(b, s, self.h * d))
        return x + self.down(F.relu(self.up(x)))


def test_fx_capture_with_sizes_from_the_input_runs_at_other_lengths():
    torch.manual_seed(0)
    model = nn.Sequential(Block(), Block()).eval()
    res = fxprune.compile(model, torch.randn(2, 6, 32), heads=0.5, ffn=0.5, mode="fx")
    assert res.plan.mode == "fx"
    assert [list(p.details["units"].values())[0] for p in res.passes] == [[4, 2], [16, 8]]
    z = zeroed_dense(model, res)
    for shape in [(3, 5, 32), (1, 11, 32)]:
        _assert_same(res.module, z, torch.randn(shape))


def _padded(shape, lengths, seed=2):
    """Token ids and a left-padded mask (a causal model's real tokens then follow padding)."""
    ids = _ids(shape, seed)
    mask = (torch.arange(shape[1]) >= shape[1] - torch.tensor(lengths)[:, None]).long()
    return ids, mask


@pytest.mark.parametrize("name", ["bert", "roberta", "llama", "qwen2"])
def test_padded_attention_mask_is_honoured(name):
    model, _, _ = build(name)
    ids, mask = _padded((2, 8), [8, 5])
    # BERT and RoBERTa take (input_ids, attention_mask, token_type_ids), LLaMA / Qwen2 (input_ids,
    # attention_mask, position_ids): a tuple maps onto the leading positional parameters
    extra = (torch.zeros_like(ids),) if name in ("bert", "roberta") else ()
    res = fxprune.compile(model, (ids, mask, *extra), heads=0.5, ffn=0.5)
    assert res.plan.config["dynamic_shapes"] == [[0, 1]] * (2 + len(extra))
    z = zeroed_dense(model, res)
    ids, mask = _padded((3, 7), [7, 4, 2], seed=3)
    args = (ids, mask, *(torch.zeros_like(ids) for _ in extra))
    _assert_same(res.module, z, *args, where=mask)
    with torch.no_grad():  # the mask is read, not baked in: unmasked, the short rows change
        unmasked = _leaves(res.module(ids, torch.ones_like(mask), *args[2:]))[0]
        masked = _leaves(res.module(*args))[0]
    assert (unmasked[1, -4:] - masked[1, -4:]).abs().max() > 1e-3


def _bert_1layer():
    transformers = pytest.importorskip("transformers")
    cfg = encoder_config(positions=32)
    cfg.num_hidden_layers = 1
    torch.manual_seed(0)
    return randomize(transformers.BertModel(cfg, add_pooling_layer=False))


def test_onnx_has_named_batch_and_sequence_axes_and_runs_at_other_lengths(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model = _bert_1layer()
    ids, mask = _padded((2, 8), [8, 6])
    res = fxprune.compile(model, (ids, mask), heads=0.5, ffn=0.5)
    rep = res.export(tmp_path / "bert.onnx")
    assert rep.dynamic_batch
    assert _axes(tmp_path / "bert.onnx") == {
        "input_ids": ["batch", "sequence"],
        "attention_mask": ["batch", "sequence"],
    }
    sess = ort.InferenceSession(str(tmp_path / "bert.onnx"), providers=["CPUExecutionProvider"])
    for shape, lengths in [((2, 5), [5, 3]), ((3, 13), [13, 1, 9])]:
        ids, mask = _padded(shape, lengths, seed=shape[1])
        got = sess.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
        with torch.no_grad():
            ref = _leaves(res.module(ids, mask))
        assert len(got) == len(ref) and got[0].shape == (*shape, 64)
        for g, r in zip(got, ref, strict=True):
            torch.testing.assert_close(torch.from_numpy(g), r, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_latency_from_a_batch_of_one_runs_onnxruntime_at_batch_8(tmp_path):
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = tv.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=1, num_heads=4, hidden_dim=64, mlp_dim=128
    )
    model = randomize(model)
    x = torch.randn(1, 3, 32, 32)
    res = fxprune.compile(model, x, heads=0.5)
    timing = dict(backend="onnxruntime", batch_sizes=(1, 8), warmup=0, repeats=2)
    rep = fxprune.verify.latency(model, res, x, workdir=tmp_path, **timing)
    assert [r.batch for r in rep.rows] == [1, 8]
    assert all(r.parity < 1e-4 for r in rep.rows)
    for tag in ("dense", "pruned"):  # both files: a batch axis, not the example's batch of 1
        assert list(_axes(tmp_path / f"{tag}.onnx").values()) == [["batch", 3, 32, 32]]


@pytest.fixture
def hf_dirs(tmp_path):
    """Tiny Hugging Face configs saved to folders (random weights; nothing downloaded)."""
    transformers = pytest.importorskip("transformers")
    dirs = {}
    configs = {
        "bert": encoder_config(hidden=32, ffn=64, positions=16),
        "gpt2": transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=1, n_head=4),
        "llama": transformers.LlamaConfig(
            vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
        ),
        "vit": transformers.ViTConfig(
            image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=1,
            num_attention_heads=4, intermediate_size=64,
        ),
    }  # fmt: skip
    for name, cfg in configs.items():
        cfg.save_pretrained(tmp_path / name)
        dirs[name] = f"hf:{tmp_path / name}"
    return dirs


def test_hf_source_makes_the_inputs_the_forward_takes(hf_dirs):
    from fxprune.models import load_model

    _, x = load_model(hf_dirs["bert"])  # input_ids, attention_mask, token_type_ids
    assert [tuple(t.shape) for t in x] == [(1, 16)] * 3
    assert int(x[1].min()) == 1 and int(x[2].max()) == 0
    _, x = load_model(hf_dirs["llama"])  # input_ids, attention_mask (then position_ids)
    assert [tuple(t.shape) for t in x] == [(1, 32)] * 2
    _, x = load_model(hf_dirs["gpt2"])  # the second positional is the cache: ids alone
    assert isinstance(x, torch.Tensor) and x.shape == (1, 128)


def _json_out(capsys) -> dict:
    return json.loads(capsys.readouterr().out)


def test_cli_seq_len_and_batch_reach_the_plan_and_the_onnx_axes(hf_dirs, tmp_path, capsys):
    out = tmp_path / "b.onnx"
    args = ["prune", hf_dirs["bert"], "--heads", "0.5", "--seq-len", "12", "--batch", "2"]
    assert main([*args, "--json", "--export", str(out)]) == 0
    got = _json_out(capsys)
    assert got["equivalence"]["ok"]
    assert [i["shape"] for i in got["plan"]["inputs"]] == [[2, 12]] * 3
    assert got["plan"]["config"]["dynamic_shapes"] == [[0, 1]] * 3
    assert list(_axes(out).values()) == [["batch", "sequence"]] * 3


def test_cli_input_shape_and_example_batches(hf_dirs, capsys):
    bert = hf_dirs["bert"]
    vit = ["prune", hf_dirs["vit"], "--heads", "0.5", "--json"]
    assert main([*vit, "--input-shape", "3", "3", "16", "16"]) == 0
    assert _json_out(capsys)["plan"]["inputs"][0]["shape"] == [3, 3, 16, 16]
    assert main(["inspect", bert, "--seq-len", "4", "--batch", "2", "--json"]) == 0
    assert _json_out(capsys)["mode"] == "export"
    verify = ["verify", bert, "--heads", "0.5", "--backend", "torch", "--batch", "3", "1"]
    assert main([*verify, "--seq-len", "6", "--repeats", "2", "--warmup", "0", "--json"]) == 0
    got = _json_out(capsys)
    assert got["equivalence"]["ok"] and [r["batch"] for r in got["rows"]] == [3, 1]


def test_cli_shape_flags_that_do_not_fit_are_named(hf_dirs, capsys):
    assert main(["inspect", hf_dirs["bert"], "--seq-len", "99"]) == 2
    assert "--seq-len 99 exceeds max_position_embeddings (16)" in capsys.readouterr().err
    assert main(["inspect", hf_dirs["bert"], "--input-shape", "1", "2", "3"]) == 2
    assert "give 2 sizes, or use --batch and --seq-len" in capsys.readouterr().err
    assert main(["inspect", hf_dirs["vit"], "--seq-len", "8"]) == 2
    assert "no token-id input" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("name", ["bert", "roberta", "gpt2", "llama", "mistral", "qwen2"])
def test_every_hf_text_family_exports_dynamic_axes_that_ort_runs(name, tmp_path):
    """Heads + FFN pruned, exported once, run by ONNX Runtime at two other (batch, length)."""
    ort = pytest.importorskip("onnxruntime")
    from tests.transformer_models import build

    model, x, info = build(name)
    res = fxprune.compile(model, x, heads=0.5, ffn=0.5)
    assert list(res.passes[0].details["units"].values())[0] == [info["heads"], info["heads"] // 2]
    res.export(tmp_path / "m.onnx")
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    assert [i.shape for i in sess.get_inputs()] == [["batch", "sequence"]]
    for shape in [(3, 5), (1, 13)]:
        ids = torch.randint(3, 100, shape, generator=torch.Generator().manual_seed(shape[1]))
        got = sess.run(None, {sess.get_inputs()[0].name: ids.numpy()})
        with torch.no_grad():
            ref = _leaves(res.module(ids))
        torch.testing.assert_close(torch.from_numpy(got[0]), ref[0], rtol=1e-4, atol=1e-5)


def test_ort_parity_runs_another_batch_and_length(tmp_path, monkeypatch):
    """The exporter's parity check feeds ONNX Runtime twice the batch and one token fewer."""
    ort = pytest.importorskip("onnxruntime")
    seen = []
    real = ort.InferenceSession

    class Spy(real):
        def run(self, names, feeds, *a, **k):
            seen.append({n: v.shape for n, v in feeds.items()})
            return super().run(names, feeds, *a, **k)

    monkeypatch.setattr(ort, "InferenceSession", Spy)
    model = _bert_1layer()
    ids, mask = _padded((2, 8), [8, 6])
    res = fxprune.compile(model, (ids, mask), heads=0.5, ffn=0.5)
    res.export(tmp_path / "bert.onnx")
    assert {"input_ids": (4, 7), "attention_mask": (4, 7)} in seen


@pytest.mark.slow
def test_gpt2_takes_a_mask_after_a_none_cache_positional(tmp_path):
    """GPT-2's second positional is the cache: (ids, None, mask) passes the mask. The pruned
    module honours it at other shapes; an ONNX file is written only if ORT agrees with it."""
    from fxprune.errors import ExportError
    from tests.transformer_models import build

    model, (ids,), _ = build("gpt2")
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    res = fxprune.compile(model, (ids, None, mask), heads=0.5, ffn=0.5)
    assert res.plan.inputs[1] == {"none": True}
    assert fxprune.verify.equivalence(model, res, (ids, None, mask)).ok
    ref = zeroed_dense(model, res)
    ids2 = torch.randint(0, 100, (3, 5), generator=torch.Generator().manual_seed(1))
    mask2 = torch.ones_like(ids2)
    mask2[0, :2] = 0
    with torch.no_grad():
        got = res.module(ids2, None, mask2).last_hidden_state
        torch.testing.assert_close(got, ref(ids2, None, mask2).last_hidden_state)
        unmasked = res.module(ids2, None, torch.ones_like(ids2)).last_hidden_state
    assert (got - unmasked).abs().max() > 1e-3  # the mask is used
    again = fxprune.apply_plan(model, res.plan.to_json())  # None replays as None
    with torch.no_grad():
        torch.testing.assert_close(again.module(ids2, None, mask2).last_hidden_state, got)
    # ONNX Runtime agrees on every real token; padded positions are undefined (all of a left-
    # padded row's keys are masked) and torch.onnx exports the dense model differently there too
    res.export(tmp_path / "gpt2.onnx")
    import onnxruntime as ort

    sess = ort.InferenceSession(str(tmp_path / "gpt2.onnx"), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    (out,) = sess.run(None, {names[0]: ids2.numpy(), names[1]: mask2.numpy()})
    real = mask2.bool().numpy()
    np.testing.assert_allclose(out[real], got.numpy()[real], rtol=1e-4, atol=1e-5)
    # the padded-position exclusion hides nothing else: a tampered weight in the file fails
    import onnx
    from onnx import numpy_helper

    import fxprune.exporters.onnx as onnx_exp

    real_export = onnx_exp.write_onnx

    def tampered(module, args, dest, opset, dynamic_batch):
        external = real_export(module, args, dest, opset, dynamic_batch)
        m = onnx.load(str(dest))
        init = max(m.graph.initializer, key=lambda t: int(np.prod(t.dims)))
        init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 1.5, init.name))
        onnx.save(m, str(dest))
        return external

    onnx_exp.write_onnx = tampered
    try:
        with pytest.raises(ExportError, match="differs"):
            res.export(tmp_path / "bad.onnx")
    finally:
        onnx_exp.write_onnx = real_export
    assert not (tmp_path / "bad.onnx").exists()
