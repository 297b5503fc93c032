"""``uniform=True`` gives a model its Hugging Face config can hold (issue #22): the task head
around the repeated layers (BERT's pooler, a classifier's ``dense``, an attention pool) has no
config field and is kept whole; a single key/value head is one unit, never an FFN."""

from __future__ import annotations

import pytest
import torch

import fxprune
import fxprune.api
from fxprune.errors import ConfigError
from tests.conftest import nontrivial

transformers = pytest.importorskip("transformers")

ENC = dict(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
           intermediate_size=128, num_labels=3)  # fmt: skip
CLASSIFIERS = {
    "bert": ("BertConfig", "BertForSequenceClassification", ENC, "bert.pooler.dense"),
    "roberta": ("RobertaConfig", "RobertaForSequenceClassification", ENC, "classifier.dense"),
    "electra": ("ElectraConfig", "ElectraForSequenceClassification", ENC, "classifier.dense"),
    "deberta_v2": ("DebertaV2Config", "DebertaV2ForSequenceClassification", ENC, "pooler.dense"),
    "distilbert": (
        "DistilBertConfig",
        "DistilBertForSequenceClassification",
        dict(vocab_size=100, dim=64, n_layers=2, n_heads=4, hidden_dim=128, num_labels=3),
        "pre_classifier",
    ),
}


def classifier(name):
    cfg_cls, cls, kw, _ = CLASSIFIERS[name]
    torch.manual_seed(0)
    model = getattr(transformers, cls)(getattr(transformers, cfg_cls)(**kw))
    return nontrivial(model), torch.randint(0, 100, (2, 8))


@pytest.mark.parametrize("name", sorted(CLASSIFIERS))
def test_the_task_head_stays_whole_and_save_pretrained_reloads_equal(name, tmp_path):
    model, ids = classifier(name)
    head = CLASSIFIERS[name][3]
    res = fxprune.compile(model, ids, ffn=0.25, uniform=True)
    assert type(res.model) is type(model)
    assert head in res.plan.config["uniform_kept_whole"]
    assert res.model.get_submodule(head).out_features == 64  # the head: whole
    cfg = res.model.config
    assert getattr(cfg, "intermediate_size", getattr(cfg, "hidden_dim", None)) == 96
    assert fxprune.verify.equivalence(model, res, ids, target="model").ok
    res.save_pretrained(tmp_path)
    back = type(model).from_pretrained(tmp_path).eval()
    new = torch.randint(0, 100, (3, 5))  # another batch and length
    with torch.no_grad():
        assert torch.equal(back(new).logits, res.model(new).logits)


def test_without_the_scope_the_uniform_check_fails(monkeypatch):
    """What the scope fixes: the pooler's 64 neurons lose 16 and the MLP's 128 lose 32."""
    monkeypatch.setattr(fxprune.api, "uniform_scope", lambda model, passes: (passes, ()))
    model, ids = classifier("bert")
    with pytest.raises(ConfigError, match=r"uniform=True: the ffn pass left layers with different"):
        fxprune.compile(model, ids, ffn=0.25, uniform=True)


def llm(cls: str, cfg_cls: str, kv: int, **kw):
    torch.manual_seed(0)
    cfg = getattr(transformers, cfg_cls)(
        vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=kv, head_dim=16, **kw,
    )  # fmt: skip
    return nontrivial(getattr(transformers, cls)(cfg)), torch.randint(0, 100, (1, 16))


def test_gemma2_one_kv_head_left_is_a_head_not_ffn_neurons(tmp_path):
    """Gemma2's eager attention reads v through a matmul; with one KV head left its dims once
    formed an FFN group, and ffn= narrowed v_proj (exact, but no config holds it)."""
    model, ids = llm("Gemma2ForCausalLM", "Gemma2Config", kv=2)
    res = fxprune.compile(model, ids, heads=0.5, ffn=0.25, uniform=True)
    ffn = next(r for r in res.passes if r.name == "ffn")
    assert all(layer.endswith("mlp") for layer in ffn.units), sorted(ffn.units)
    assert res.model.config.num_key_value_heads == 1 and res.model.config.intermediate_size == 96
    assert fxprune.verify.equivalence(model, res, ids, target="model").ok
    res.save_pretrained(tmp_path)
    back = transformers.Gemma2ForCausalLM.from_pretrained(tmp_path).eval()
    new = torch.randint(0, 100, (2, 7))
    with torch.no_grad():
        assert torch.equal(back(new).logits, res.model(new).logits)


def test_multi_query_attention_dims_are_one_unit():
    """One key/value head from the start (eager attention): its 16 dims stay together."""
    model, ids = llm("LlamaForCausalLM", "LlamaConfig", kv=1, attn_implementation="eager")
    res = fxprune.compile(model, ids, ffn=0.25)
    assert res.model.model.layers[0].self_attn.v_proj.out_features == 16
    assert res.model.model.layers[0].mlp.up_proj.out_features == 96
    assert fxprune.verify.equivalence(model, res, ids).ok


def test_one_kv_head_expanded_for_sdpa_stays_and_query_heads_prune(tmp_path):
    """One key/value head that ``repeat_kv`` expands to every query head before SDPA was
    coupled to all of them (no heads to prune); it is shared: it stays, the query heads go one
    by one, exact on LlamaForCausalLM and after save_pretrained."""
    model, ids = llm("LlamaForCausalLM", "LlamaConfig", kv=1)
    res = fxprune.compile(model, ids, heads=0.5, uniform=True)
    attn = res.model.model.layers[0].self_attn
    assert (attn.q_proj.out_features, attn.k_proj.out_features) == (32, 16)
    assert (res.model.config.num_attention_heads, res.model.config.num_key_value_heads) == (2, 1)
    assert fxprune.verify.equivalence(model, res, ids, target="model").ok
    res.save_pretrained(tmp_path)
    back = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    new = torch.randint(0, 100, (2, 7))
    with torch.no_grad():
        assert torch.equal(back(new).logits, res.model(new).logits)


def test_an_attention_pool_outside_the_blocks_names_the_way_to_the_users_class():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    kw = dict(pretrained=False, depth=2, img_size=64)
    model = nontrivial(timm.create_model("vit_pe_core_tiny_patch16_384", **kw))
    x = torch.randn(2, 3, 64, 64)
    res = fxprune.compile(model, x, heads=0.5, ffn=0.25)
    assert isinstance(res.model, torch.fx.GraphModule)  # its forward reshapes to the input width
    assert "attn_pool is outside the repeated blocks: ignore=['attn_pool']" in res.model_note
    for kw in ({"ignore": ["attn_pool"]}, {"uniform": True}):
        res = fxprune.compile(model, x, heads=0.5, ffn=0.25, **kw)
        assert type(res.model) is type(model) and not res.model_note
        assert res.model.blocks[0].attn.qkv.out_features < 3 * 192
        assert fxprune.verify.equivalence(model, res, x, target="model").ok
        with torch.no_grad():
            res.model(torch.randn(1, 3, 64, 64))


def test_a_removed_blocks_mlp_is_not_a_layer_left_whole():
    """The FFN width goes into the config when every remaining layer's MLP kept the same count;
    the MLP of a block the blocks pass removed is not one left whole."""
    model, ids = llm("LlamaForCausalLM", "LlamaConfig", kv=2)
    res = fxprune.compile(model, ids, blocks=1, ffn=0.25, uniform=True, calibration=[ids])
    assert "hf_config_notes" not in res.plan.config
    assert (res.model.config.num_hidden_layers, res.model.config.intermediate_size) == (1, 96)
    res = fxprune.compile(model, ids, ffn=0.25, uniform=True, ignore=["model.layers.1.mlp"])
    assert res.plan.config["hf_config_notes"]["ffn"].startswith("differs per layer")
    assert res.model.config.intermediate_size == 128
