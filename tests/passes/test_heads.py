"""Head and FFN passes on every transformer family the project claims: exact, runnable as it
comes out (eager, a new batch size, torch.export), and replayable from the plan."""

from __future__ import annotations

import pytest
import torch

import fxprune
from fxprune.errors import ConfigError, NothingToPruneError
from tests.conftest import assert_equivalent
from tests.transformer_models import FAMILIES, HF, build, encoder_config

pytest.importorskip("transformers")


def _first(out):
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    return next(t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor))


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=[pytest.mark.slow] if n == "tv_swin_t" else []) for n in FAMILIES],
)
def test_heads_and_ffn_are_exact_and_run(name):
    model, x, info = build(name)
    # torchvision's shifted_window_attention computes head_dim = C // num_heads from the model
    # width: its module tree cannot hold fewer heads, so result.model stays the graph module
    tree = name != "tv_swin_t"
    res, rep = assert_equivalent(model, x, channels=0.0, heads=0.5, ffn=0.5, tree=tree)
    if not tree:
        assert res.model is res.module and "ShiftedWindowAttention" in res.model_note
    heads, ffn = res.passes[0], res.passes[1]
    assert heads.name == "heads" and ffn.name == "ffn"
    counts = list(heads.details["units"].values())
    n = info["heads"]
    assert counts and counts[0] == [n, n - n // 2]
    assert list(ffn.details["units"].values())[0] == [info["ffn"], info["ffn"] // 2]
    if x[0].shape[0] > 1:  # runs as it comes out on a batch size it was not traced with
        x3 = tuple(torch.cat([a, a[:1]]) for a in x)
        with torch.no_grad():
            assert _first(res.module(*x3)).shape[0] == 3
    ep = torch.export.export(res.module, x, strict=False)
    with torch.no_grad():
        torch.testing.assert_close(_first(ep.module()(*x)), _first(res.module(*x)))


def test_gqa_removes_a_kv_head_with_its_query_heads():
    model, x, _ = build("llama")
    res, _ = assert_equivalent(model, x, channels=0.0, heads=0.5)
    q = res.module.get_parameter("layers.0.self_attn.q_proj.weight")
    k = res.module.get_parameter("layers.0.self_attn.k_proj.weight")
    o = res.module.get_parameter("layers.0.self_attn.o_proj.weight")
    # 8 query heads in 2 KV groups of head_dim 8: one group (4 query heads, 1 KV head) goes
    assert q.shape == (32, 64) and k.shape == (8, 64) and o.shape == (64, 32)


def test_fused_qkv_rows_follow_their_head():
    model, x, _ = build("gpt2")
    res, _ = assert_equivalent(model, x, channels=0.0, heads=1)
    kept = res.plan.passes[0]["kept"]["h.0.attn.c_attn"]
    # c_attn's 192 outputs are [q | k | v] x 4 heads x 16: 3 heads stay in each third
    assert len(kept) == 144
    per_third = [sum(1 for i in kept if t * 64 <= i < (t + 1) * 64) for t in range(3)]
    assert per_third == [48, 48, 48]
    heads_kept = {i // 16 % 4 for i in kept}
    assert len(heads_kept) == 3
    for h in heads_kept:  # a kept head keeps its q, k and v rows
        for t in range(3):
            assert all(t * 64 + h * 16 + d in kept for d in range(16))


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=[pytest.mark.slow] if n in ("qwen2", "mistral") else []) for n in HF],
)
def test_hf_save_pretrained_and_replay_the_plan(name, tmp_path):
    model, x, info = build(name)
    res = fxprune.compile(model, x, heads=0.5, ffn=0.25)
    model.save_pretrained(tmp_path / "dense")
    kw = info.get("load_kw", {})
    again = type(model).from_pretrained(tmp_path / "dense", **kw).eval()
    replay = fxprune.apply_plan(again, res.plan.to_json())
    with torch.no_grad():
        torch.testing.assert_close(_first(replay.module(*x)), _first(res.module(*x)))
    res.save(tmp_path / "pruned.pt")
    loaded = fxprune.load(
        tmp_path / "pruned.pt", type(model).from_pretrained(tmp_path / "dense", **kw)
    )
    with torch.no_grad():
        torch.testing.assert_close(_first(loaded.module(*x)), _first(res.module(*x)))


def test_heads_ffn_and_channels_compose_in_one_call():
    pytest.importorskip("timm")
    model, x, _ = build("timm_vit_tiny")
    res, rep = assert_equivalent(model, x, heads=1, ffn=0.5, channels=0.0)
    assert [p.name for p in res.passes if p.changed] == ["heads", "ffn"]
    # the residual stream is a LayerNorm barrier, so a channel pass would find nothing left:
    # asked for, that is an error naming the barrier, not a silent success
    with pytest.raises(NothingToPruneError, match="LayerNorm"):
        fxprune.compile(model, x, heads=1, ffn=0.5, channels=0.5)


def test_global_head_ranking_keeps_a_head_per_layer():
    model, x, _ = build("bert")
    res, _ = assert_equivalent(model, x, channels=0.0, heads=0.7, global_ranking=True)
    for before, after in res.passes[0].details["units"].values():
        assert before == 4 and 1 <= after < 4


def test_head_count_larger_than_a_layer_is_named():
    model, x, _ = build("bert")
    snap = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=r"encoder\.layer\.0\.attention\.self has 4 heads"):
        fxprune.compile(model, x, heads=4)
    with pytest.raises(ConfigError, match="every head"):
        fxprune.compile(model, x, heads=1.0)
    assert all(torch.equal(v, snap[k]) for k, v in model.state_dict().items())


def test_no_visible_attention_is_a_clear_error():
    tv = pytest.importorskip("torchvision")
    with pytest.raises(ConfigError, match="no prunable attention heads"):
        fxprune.compile(tv.models.resnet18(), torch.randn(1, 3, 64, 64), heads=0.5)


def test_mha_module_as_fx_leaf_is_named():
    model, x, _ = build("tv_vit")
    with pytest.raises(ConfigError, match="MultiheadAttention"):
        fxprune.compile(model, x, heads=0.5, mode="fx")


@pytest.mark.slow
def test_pruned_model_runs_under_torch_compile():
    model, x, _ = build("llama")
    res = fxprune.compile(model, x, heads=0.5, ffn=0.5)
    compiled = torch.compile(res.module)  # inductor, C++ codegen on this CPU
    with torch.no_grad():
        torch.testing.assert_close(_first(compiled(*x)), _first(res.module(*x)))


@pytest.mark.parametrize("name", ["bert", "llama", "gpt2", "tv_vit", "timm_vit_tiny"])
def test_block_removal_is_exact_against_the_bypassed_dense_model(name):
    model, x, _ = build(name)
    res, rep = assert_equivalent(model, x, channels=0.0, blocks=1, heads=0.5, tree=True)
    blocks = res.passes[0]
    assert blocks.name == "blocks" and len(blocks.details["removed"]) == 1
    assert blocks.details["output_deviation"] > 1e-3  # removal is approximate and says so
    gone = blocks.details["removed"][0]
    assert not any(k.startswith(gone + ".") for k in res.module.state_dict())
    assert "bypassed" in rep.message


def test_blocks_by_index_and_l2_on_calibration_batches():
    model, x, _ = build("bert")
    calib = [torch.randint(0, 100, (3, 8)) for _ in range(2)]
    res = fxprune.compile(model, x, blocks=[0], block_importance="l2", calibration=calib)
    assert res.passes[0].details["removed"] == ["encoder.layer.0"]
    res = fxprune.compile(model, x, blocks=1, block_importance="l2", calibration=calib)
    scores = res.passes[0].details["scores"]
    assert set(scores) == {"encoder.layer.0", "encoder.layer.1"}
    assert res.passes[0].details["removed"] == [min(scores, key=scores.get)]
    again = fxprune.apply_plan(build("bert")[0], res.plan)
    with torch.no_grad():
        torch.testing.assert_close(_first(again.module(*x)), _first(res.module(*x)))


def test_resnet_blocks_skip_downsampling_stages():
    tv = pytest.importorskip("torchvision")
    from tests.conftest import randomize

    model, x = randomize(tv.models.resnet50()), torch.randn(1, 3, 64, 64)
    res, _ = assert_equivalent(model, x, channels=0.3, blocks=3)
    removed = res.passes[0].details["removed"]
    assert len(removed) == 3 and not any(b.endswith(".0") for b in removed)


@pytest.mark.parametrize(
    "blocks,match",
    [(2, "at least 1 must stay"), ([5], "index 5 is out of range"), (["encoder.foo"], "not one")],
)
def test_bad_blocks_are_named(blocks, match):
    model, x, _ = build("bert")
    with pytest.raises(ConfigError, match=match):
        fxprune.compile(model, x, blocks=blocks)


def test_hf_config_follows_uniform_counts():
    model, x, _ = build("llama")  # 8 query heads, 2 KV heads, head_dim 8, FFN 128, 2 layers
    res = fxprune.compile(model, x, heads=0.5, ffn=0.5)
    c = res.config
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (4, 1, 8)
    assert c.intermediate_size == 64 and c.num_hidden_layers == 2
    assert model.config.num_attention_heads == 8  # the user's config is untouched
    res = fxprune.compile(model, x, blocks=1)
    assert res.config.num_hidden_layers == 1
    gpt, gx, _ = build("gpt2")
    c = fxprune.compile(gpt, gx, heads=1, ffn=0.25).config
    assert (c.n_head, c.head_dim, c.n_inner) == (3, 16, 192)


def test_non_uniform_counts_stay_in_the_plan():
    model, x, _ = build("bert")
    res = fxprune.compile(model, x, heads=0.6, global_ranking=True)
    assert res.plan.passes[0]["units"] == {
        "encoder.layer.0.attention.self": [4, 2],
        "encoder.layer.1.attention.self": [4, 1],
    }
    assert res.config.num_attention_heads == 4  # not uniform: left, and the plan says why
    assert "heads" in res.plan.config["hf_config_notes"]
    assert fxprune.compile(build("tv_vit")[0], build("tv_vit")[1], heads=1).config is None


def test_lm_heads_tied_to_embeddings_and_taylor_lm_loss():
    T = pytest.importorskip("transformers")
    c = T.GPT2Config(
        vocab_size=100, n_embd=64, n_layer=2, n_head=4, n_positions=32, use_cache=False
    )
    torch.manual_seed(0)
    lm = T.GPT2LMHeadModel(c).eval()  # lm_head.weight is wte.weight: tied, never sliced here
    x = (torch.randint(0, 100, (2, 8)),)
    res, _ = assert_equivalent(lm, x, channels=0.0, heads=0.5, ffn=0.5, importance="taylor")
    assert res.passes[0].details["taylor_loss"] == "causal LM loss"
    m = res.module
    assert m.get_parameter("lm_head.weight") is m.get_parameter("transformer.wte.weight")
    c = encoder_config(hidden=64, ffn=128, positions=32)
    mlm = T.BertForMaskedLM(c).eval()
    res = fxprune.compile(mlm, x, heads=0.5, importance="taylor")
    assert res.passes[0].details["taylor_loss"] == "masked LM loss on the input tokens"
    assert fxprune.verify.equivalence(mlm, res, x).ok


def test_block_output_deviation_is_measured_against_the_dense_outputs():
    """``output_deviation`` is max |pruned - dense| / max |dense| over every calibration batch's
    outputs (computed one batch at a time): recomputed here from the two models, it agrees."""
    model, x, _ = build("llama")
    calib = [x, (torch.randint(0, 100, (3, 7)),)]
    res = fxprune.compile(model, x, blocks=1, channels=0.0, calibration=calib)
    blocks = res.passes[0]
    dev = scale = 0.0
    with torch.no_grad():
        for b in calib:
            ref, got = _first(model(*b)).double(), _first(res.module(*b)).double()
            scale, dev = (
                max(scale, ref.abs().max().item()),
                max(dev, (got - ref).abs().max().item()),
            )
    assert blocks.output_deviation > 1e-3
    assert blocks.output_deviation == pytest.approx(dev / scale, rel=1e-4)
