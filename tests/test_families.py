"""Current Hugging Face families beyond the eleven the suite builds everywhere (issue #22): each on
a tiny random config, its biases and norm gains non-trivial, proved exact like the rest."""

from __future__ import annotations

import pytest
import torch

import fxprune
from tests.conftest import assert_equivalent, nontrivial, randomize

transformers = pytest.importorskip("transformers")


def bloom():
    torch.manual_seed(0)
    cfg = transformers.BloomConfig(vocab_size=100, hidden_size=64, n_layer=2, n_head=4)
    return nontrivial(transformers.BloomForCausalLM(cfg)), torch.randint(0, 100, (2, 8))


def test_bloom_ffn_is_exact():
    """Bloom's ALiBi slopes are ``pow(tensor, arange)``: a two-tensor pow once crashed the graph
    build with an untyped IndexError; it broadcasts like any binary op now."""
    model, ids = bloom()
    res, _ = assert_equivalent(model, ids, channels=0.0, ffn=0.25, tree=True)
    assert res.model.transformer.h[0].mlp.dense_h_to_4h.out_features == 192
    with torch.no_grad():  # a new batch and sequence length run
        res.model(torch.randint(0, 100, (3, 5)))
    assert fxprune.verify.equivalence(model, res, ids, target="model").ok


def _causal(cfg_cls, model_cls, **kw):
    torch.manual_seed(0)
    return nontrivial(model_cls(cfg_cls(**kw))), torch.randint(0, 100, (2, 8))


HEAD_LAYOUTS = {
    # rotary applied to every other pair of dims: rotate_every_two's stack((-x2, x1), -1)
    "gptj": lambda: _causal(
        transformers.GPTJConfig,
        transformers.GPTJForCausalLM,
        vocab_size=100,
        n_embd=64,
        n_layer=2,
        n_head=4,
        rotary_dim=8,
        n_positions=64,
    ),
    # the same rotary behind a fused qkv projection
    "codegen": lambda: _causal(
        transformers.CodeGenConfig,
        transformers.CodeGenForCausalLM,
        vocab_size=100,
        n_embd=64,
        n_layer=2,
        n_head=4,
        rotary_dim=8,
        n_positions=64,
        n_ctx=64,
    ),
    # interleaved rotary, grouped KV heads, a LayerNorm without bias
    "cohere": lambda: _causal(
        transformers.CohereConfig,
        transformers.CohereForCausalLM,
        vocab_size=100,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
    # per-head q / k RMS norms (Gemma3's q_norm / k_norm over head_dim): the aten type_as
    # after them had no rule
    "gemma3": lambda: _causal(
        transformers.Gemma3TextConfig,
        transformers.Gemma3ForCausalLM,
        vocab_size=100,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
    ),
}


@pytest.mark.parametrize("name", sorted(HEAD_LAYOUTS))
def test_heads_of_these_attention_layouts_are_exact(name, tmp_path):
    """``heads`` found through ``torch.stack`` and aten ``type_as`` (neither had a coupling rule:
    "no prunable attention heads found"); exact on the graph and on the user's class, a new batch and length run, and
    save_pretrained reloads equal or is refused by name where the config cannot hold the count."""
    model, ids = HEAD_LAYOUTS[name]()
    res, _ = assert_equivalent(
        model, ids, channels=0.0, heads=0.5, ffn=0.25, tree=True, uniform=True
    )
    heads = res.passes[0]
    assert heads.name == "heads" and all(k == u // 2 for u, k in heads.units.values())
    new = torch.randint(0, 100, (3, 5))
    with torch.no_grad():
        res.model(new)
    try:
        res.save_pretrained(tmp_path / "out")
    except fxprune.errors.ConfigError as e:
        assert "head" in str(e), e  # a config deriving head size from hidden_size / heads
        return
    back = type(model).from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(new).logits, res.model(new).logits)


def test_olmo2_heads_are_refused_naming_its_norm_and_pruned_approximately_on_request():
    """OLMo2's q_norm / k_norm normalise over all heads at once: removing a head changes their
    statistics, so the refusal names the norm; allow_approximate=True prunes (the norm's gain
    sliced with its heads) and the proof reports the deviation as expected, not as exact."""
    model, ids = _causal(
        transformers.Olmo2Config, transformers.Olmo2ForCausalLM, vocab_size=100, hidden_size=64,
        intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    )  # fmt: skip
    with pytest.raises(fxprune.errors.ConfigError) as e:
        fxprune.compile(model, ids, heads=0.5)
    msg = str(e.value)
    assert "self_attn.q_norm (Olmo2RMSNorm)" in msg and "allow_approximate=True" in msg
    res = fxprune.compile(model, ids, heads=0.5, allow_approximate=True)
    attn = res.model.model.layers[0].self_attn
    assert res.approximate and type(res.model) is type(model)
    assert attn.q_proj.out_features == 32 and attn.q_norm.weight.shape == (32,)
    assert attn.k_norm.weight.shape == (16,)
    rep = fxprune.verify.equivalence(model, res, ids)
    assert not rep.ok and rep.approximate and "approximate groups were pruned" in rep.message
    assert 0 < rep.max_rel_err < 1
    with torch.no_grad():
        res.model(torch.randint(0, 100, (3, 5)))


def test_falcon_linear_written_as_matmul_is_a_layer(tmp_path):
    """FalconLinear computes ``x @ self.weight.T``: captured as a matmul with a transposed
    parameter, it was no layer at all (no FFN group, every channel kept); the capture rewrites it
    into the Linear it is, so ``ffn`` is exact on the graph and on the user's class, and
    FalconConfig's ``ffn_hidden_size`` follows, so save_pretrained reloads equal."""
    model, ids = _causal(
        transformers.FalconConfig, transformers.FalconForCausalLM, vocab_size=100, hidden_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_kv_heads=2, new_decoder_architecture=True,
    )  # fmt: skip
    res, _ = assert_equivalent(model, ids, channels=0.0, ffn=0.25, tree=True)
    assert res.model.transformer.h[0].mlp.dense_h_to_4h.out_features == 192
    new = torch.randint(0, 100, (3, 5))
    with torch.no_grad():
        res.model(new)
    res.save_pretrained(tmp_path / "out")
    back = transformers.FalconForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert back.config.ffn_hidden_size == 192
    with torch.no_grad():
        torch.testing.assert_close(back(new).logits, res.model(new).logits)


def _llama_24_of_32():
    """A Llama whose LlamaConfig refuses most pruned head counts: 8 query heads of 16 over 4
    KV heads, hidden 128 (a multiple of 8 and 4 heads, not of 6 or 2 x 3)."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=100, hidden_size=128, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=4, head_dim=16,
    )  # fmt: skip
    return nontrivial(transformers.LlamaForCausalLM(cfg)), torch.randint(0, 100, (2, 8))


def test_a_head_count_the_config_refuses_is_known_at_compile_time(tmp_path):
    """uniform=True: heads=0.25 would keep 6 of 8 heads, which LlamaConfig refuses (128 % 6):
    refused before pruning, naming the counts it accepts (the config class's own validation);
    heads_round='config' rounds to the nearest and the report says so; save_pretrained then
    reloads equal. Mistral's config takes any count and is left alone."""
    model, ids = _llama_24_of_32()
    with pytest.raises(fxprune.errors.ConfigError) as e:
        fxprune.compile(model, ids, heads=0.25, uniform=True)
    msg = str(e.value)
    assert "keeps 6 heads (3 of 4 key/value units), which LlamaConfig refuses" in msg
    assert "counts it accepts: 2, 4, 8 heads" in msg and "heads_round='config'" in msg
    res = fxprune.compile(model, ids, heads=0.25, uniform=True, heads_round="config")
    assert (
        res.model.config.num_attention_heads == 4
    )  # 6 is refused; 4 and 8 are as near, 8 prunes nothing
    assert "rounded to" in res.plan.config["heads_round"] and "rounded to" in res.report()
    assert fxprune.verify.equivalence(model, res, ids).ok
    res.save_pretrained(tmp_path / "out")
    back = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, res.model(ids).logits)
    with pytest.raises(fxprune.errors.ConfigError, match="needs heads=, uniform=True"):
        fxprune.compile(model, ids, ffn=0.25, heads_round="config")
    cfg = transformers.MistralConfig(**{**model.config.to_dict(), "model_type": "mistral"})
    mistral = nontrivial(transformers.MistralForCausalLM(cfg))
    got = fxprune.compile(mistral, ids, heads=0.25, uniform=True)
    assert got.model.config.num_attention_heads == 6


def _t5(cls):
    torch.manual_seed(0)
    cfg = transformers.T5Config(
        vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
        num_heads=4,
    )  # fmt: skip
    return nontrivial(cls(cfg))


def test_t5_relative_position_bias_moves_with_its_heads(tmp_path):
    """T5's relative_attention_bias (an Embedding with one column per head) feeds the attention
    mask: its columns are coupled to the heads and sliced with them (the pruned graph did not
    run). The bias is shared by every layer of a stack, so each stack loses the same heads.
    The decoder's cross-attention mask is built in forward from the head count (zeros((1,
    n_heads, ...))): it is indexed with the kept heads."""
    enc = _t5(transformers.T5EncoderModel)
    ids = torch.randint(0, 100, (2, 8))
    res, _ = assert_equivalent(enc, ids, channels=0.0, heads=0.5, tree=True)
    attn = res.model.encoder.block[0].layer[0].SelfAttention
    assert attn.n_heads == 2 and attn.relative_attention_bias.weight.shape == (32, 2)
    with torch.no_grad():
        res.model(torch.randint(0, 100, (3, 5)))
    seq2seq = _t5(transformers.T5ForConditionalGeneration)
    x = (ids, torch.ones_like(ids), torch.randint(0, 100, (2, 5)))
    res, _ = assert_equivalent(seq2seq, x, channels=0.0, heads=0.5, tree=True)
    cross = res.model.decoder.block[0].layer[1].EncDecAttention
    assert cross.n_heads == 2 and cross.q.out_features == 16


@pytest.mark.parametrize("cls", ["T5EncoderModel", "T5ForConditionalGeneration"])
def test_t5_heads_and_ffn_save_pretrained_reloads_equal(cls, tmp_path):
    """T5's heads are one group per stack (the shared bias table), named by the stack: the
    config's num_heads follows when that group covers every layer, and d_ff holds the FFN."""
    model = _t5(getattr(transformers, cls))
    ids = torch.randint(0, 100, (2, 8))
    x = (ids,) if cls == "T5EncoderModel" else (ids, torch.ones_like(ids), ids[:, :5])
    res = fxprune.compile(model, x, heads=0.5, ffn=0.25, uniform=True)
    assert (res.model.config.num_heads, res.model.config.d_ff) == (2, 48)
    res.save_pretrained(tmp_path)
    back = getattr(transformers, cls).from_pretrained(tmp_path).eval()
    new = torch.randint(0, 100, (3, 6))
    y = (new,) if cls == "T5EncoderModel" else (new, torch.ones_like(new), new[:, :4])
    with torch.no_grad():
        a, b = back(*y), res.model(*y)
    key = "last_hidden_state" if cls == "T5EncoderModel" else "logits"
    assert torch.equal(getattr(a, key), getattr(b, key))


class _PerHeadConstantMask(torch.nn.Module):
    """ALiBi-like: a per-head additive mask built in forward from the head count."""

    def __init__(self, d=32, h=4):
        super().__init__()
        self.h, self.qkv, self.o = h, torch.nn.Linear(d, 3 * d), torch.nn.Linear(d, d)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4)
        slopes = torch.arange(1, self.h + 1, dtype=x.dtype).view(1, self.h, 1, 1) * 0.5
        bias = slopes * torch.arange(n, dtype=x.dtype).view(1, 1, 1, n)
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.o(y.transpose(1, 2).reshape(b, n, d)) + x


@pytest.mark.parametrize("mode", ["fx", "export"])
def test_a_per_head_mask_made_in_forward_keeps_each_heads_slice(mode):
    """Each kept head keeps its own slope (not the first ones): exact only if the mask is
    indexed with the kept heads' positions."""
    torch.manual_seed(0)
    m, x = _PerHeadConstantMask().eval(), torch.randn(2, 6, 32)
    with torch.no_grad():  # heads 0 and 1 the weakest: heads 2 and 3 (slopes 1.5, 2) stay
        for t in range(3):
            m.qkv.weight[t * 32 : t * 32 + 16] *= 0.01
    res = fxprune.compile(m, x, heads=0.5, mode=mode, importance="l1")
    assert res.module.get_parameter("qkv.weight").shape == (48, 32)
    assert fxprune.verify.equivalence(m, res, x).ok


def test_deberta_v2_and_hf_swin_heads_are_exact():
    """DeBERTa-v2's disentangled relative attention and Hugging Face Swin's per-window relative
    position bias tables (one column per head): heads exact on the graph and the user's class."""
    torch.manual_seed(0)
    cfg = transformers.DebertaV2Config(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64,
    )  # fmt: skip
    deberta = nontrivial(transformers.DebertaV2Model(cfg))
    assert_equivalent(deberta, torch.randint(0, 100, (2, 8)), channels=0.0, heads=0.5, tree=True)
    cfg = transformers.SwinConfig(
        image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 4], window_size=4
    )
    swin = nontrivial(transformers.SwinModel(cfg))
    res, _ = assert_equivalent(swin, torch.randn(1, 3, 32, 32), channels=0.0, heads=0.5, tree=True)
    tables = {
        k: tuple(v.shape)
        for k, v in res.model.state_dict().items()
        if k.endswith("relative_position_bias_table")
    }
    assert sorted(s[1] for s in tables.values()) == [1, 2]  # 2 -> 1 and 4 -> 2 head columns


def test_a_hugging_face_config_without_a_head_count_materializes():
    """HF ConvNeXt's config has no num_attention_heads: the head-count follower once raised an
    untyped TypeError (getattr(cfg, None)) on every prune of it (found by the breadth table)."""
    torch.manual_seed(0)
    cfg = transformers.ConvNextConfig(num_stages=2, hidden_sizes=[16, 32], depths=[1, 1])
    model = randomize(transformers.ConvNextForImageClassification(cfg)).eval()
    assert_equivalent(model, torch.randn(2, 3, 64, 64), channels=0.5, tree=True)


def test_eva02_heads_are_exact_and_its_attention_says_why_the_class_cannot_hold_them():
    """EVA-02's qkv bias is cat(q_bias, zeros, v_bias), made in forward (no heads were found);
    its forward reshapes to its input width after attention, so pruned heads stay in the graph
    module, and result.model_note names the class."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    kw = dict(pretrained=False, depth=2, img_size=56, num_classes=10)
    model = nontrivial(randomize(timm.create_model("eva02_tiny_patch14_224", **kw)))
    x = torch.randn(2, 3, 56, 56)
    res, _ = assert_equivalent(model, x, channels=0.0, heads=0.5)
    assert res.module.get_parameter("blocks.0.attn.q_bias").numel() == 128  # 2 of 3 heads
    assert "EvaAttention.num_heads: its forward takes head_dim as C // num_heads" in res.model_note
    res, _ = assert_equivalent(model, x, channels=0.0, ffn=0.25, uniform=True, tree=True)
    with torch.no_grad():
        res.model(torch.randn(1, 3, 56, 56))


def test_beit_relative_position_bias_table_is_sliced_in_the_users_class():
    """BEiT resizes its per-head bias table with a bilinear interpolate before use: the table's
    elements are mixed within each head's column, so the column goes with its head (the
    resize blocked it, the graph kept the whole table, and BeitForImageClassification could
    not hold the pruned heads)."""
    torch.manual_seed(0)
    cfg = transformers.BeitConfig(
        image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, use_relative_position_bias=True, num_labels=10,
    )  # fmt: skip
    model = nontrivial(transformers.BeitForImageClassification(cfg))
    with torch.no_grad():  # zeros at init: give the table values, so a wrong slice shows
        for layer in model.beit.layers:
            table = layer.relative_position_bias.relative_position_bias_table
            table.copy_(torch.randn_like(table))
    x = torch.randn(2, 3, 32, 32)
    res, _ = assert_equivalent(model, x, channels=0.0, heads=0.5, ffn=0.25, tree=True)
    bias = res.model.beit.layers[0].relative_position_bias
    assert bias.relative_position_bias_table.shape == (52, 2)
    with torch.no_grad():
        res.model(torch.randn(3, 3, 32, 32))
