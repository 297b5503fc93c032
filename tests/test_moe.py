"""Mixture-of-experts (issue #22 §1): each expert's FFN neurons (``ffn=``) exact by the proof, and
whole routed experts (``experts=``) removed by how much the router uses them, proved against the
dense model whose router never reaches them; the Hugging Face config's counts follow and
``save_pretrained`` -> ``from_pretrained`` reloads equal. Four families transformers ships:
Mixtral, Qwen3-MoE (``moe_intermediate_size``), Qwen2-MoE (a shared expert beside the routed
ones) and OLMoE; then GPT-OSS and DeepSeek-V3 (latent-attention heads, a group-limited router)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import fxprune
from fxprune.errors import ConfigError, NothingToPruneError
from tests.conftest import assert_equivalent, nontrivial

T = pytest.importorskip("transformers")

SMALL = dict(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)


def _build(cfg_cls, model_cls, **kw):
    torch.manual_seed(0)
    return nontrivial(model_cls(cfg_cls(**SMALL, num_key_value_heads=2, **kw)))


FAMILIES = {
    "mixtral": lambda: _build(
        T.MixtralConfig,
        T.MixtralForCausalLM,
        intermediate_size=96,
        num_local_experts=4,
        num_experts_per_tok=2,
    ),
    "qwen3_moe": lambda: _build(
        T.Qwen3MoeConfig,
        T.Qwen3MoeForCausalLM,
        intermediate_size=96,
        moe_intermediate_size=48,
        num_experts=4,
        num_experts_per_tok=2,
        head_dim=16,
    ),
    "qwen2_moe": lambda: _build(
        T.Qwen2MoeConfig,
        T.Qwen2MoeForCausalLM,
        intermediate_size=96,
        moe_intermediate_size=48,
        shared_expert_intermediate_size=80,
        num_experts=4,
        num_experts_per_tok=2,
    ),
    "olmoe": lambda: _build(
        T.OlmoeConfig,
        T.OlmoeForCausalLM,
        intermediate_size=48,
        num_experts=4,
        num_experts_per_tok=2,
        eos_token_id=1,
        pad_token_id=0,
    ),
}
# (config attribute of the routed experts' width, its dense value)
WIDTH = {
    "mixtral": ("intermediate_size", 96),
    "qwen3_moe": ("moe_intermediate_size", 48),
    "qwen2_moe": ("moe_intermediate_size", 48),
    "olmoe": ("intermediate_size", 48),
}
EXPERTS = {"mixtral": "num_local_experts"}  # the others: num_experts


def _ids(*shape, seed=1):
    return torch.randint(0, 100, shape, generator=torch.Generator().manual_seed(seed))


def _reloads_equal(model, res, tmp_path):
    res.save_pretrained(tmp_path / "out")
    back = type(model).from_pretrained(tmp_path / "out").eval()
    new = _ids(3, 5, seed=7)  # another batch and length
    with torch.no_grad():
        torch.testing.assert_close(back(new).logits, res.model(new).logits)
    return back


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_expert_ffn_neurons_are_exact_and_the_config_width_follows(name, tmp_path):
    model = FAMILIES[name]()
    res, _ = assert_equivalent(model, _ids(2, 8), channels=0.0, ffn=0.25, tree=True, uniform=True)
    attr, dense = WIDTH[name]
    assert getattr(res.model.config, attr) == dense * 3 // 4
    experts = res.model.model.layers[0].mlp.experts
    assert experts.down_proj.shape[-1] == dense * 3 // 4
    back = _reloads_equal(model, res, tmp_path)
    assert getattr(back.config, attr) == dense * 3 // 4
    if name == "qwen2_moe":  # the shared expert has its own width, and its own config field
        assert back.config.shared_expert_intermediate_size == 60
        assert back.config.intermediate_size == 96


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_whole_experts_go_proved_against_the_dense_model_that_never_routes_to_them(name, tmp_path):
    model = FAMILIES[name]()
    calib = [_ids(2, 8, seed=s) for s in range(3)]
    res = fxprune.compile(
        model, _ids(2, 8), experts=0.25, ffn=0.25, uniform=True, calibration=calib
    )
    ex = res.passes[0]
    assert ex.name == "experts" and all(len(v) == 1 for v in ex.removed.values())
    assert len(ex.removed) == 2 and ex.output_deviation > 1e-3  # approximate, and says so
    for target in ("module", "model"):
        rep = fxprune.verify.equivalence(model, res, _ids(2, 8), target=target)
        assert rep.ok and rep.pruning_effect > 1e-3, rep.message
    back = _reloads_equal(model, res, tmp_path)
    assert getattr(back.config, EXPERTS.get(name, "num_experts")) == 3
    assert back.model.layers[1].mlp.experts.gate_up_proj.shape[0] == 3
    again = fxprune.apply_plan(model, res.plan)  # the plan replays the same removal
    with torch.no_grad():
        torch.testing.assert_close(again.module(_ids(2, 8)), res.module(_ids(2, 8)))


def test_the_proof_fails_when_the_reference_routes_to_the_wrong_experts():
    """The reference masks the removed experts' router scores; masking none, or another expert,
    must make the proof fail (it is not vacuous)."""
    model = FAMILIES["mixtral"]()
    res = fxprune.compile(model, _ids(2, 8), experts=1, calibration=[_ids(2, 8)])
    ex = res.passes[0]
    assert fxprune.verify.equivalence(model, res, _ids(2, 8)).ok
    (router, gone), *rest = ex.unrouted.items()
    for wrong in ({}, {router: [(gone[0] + 1) % 4]}):
        bad = dataclasses.replace(ex, unrouted={**dict(rest), **wrong})
        tampered = dataclasses.replace(res, passes=[bad, *res.passes[1:]])
        rep = fxprune.verify.equivalence(model, tampered, _ids(2, 8))
        assert not rep.ok, rep.message


def test_experts_are_scored_by_the_routers_own_choices():
    """``frequency`` counts, per expert, the tokens whose top-k chose it; recomputed here from
    the dense model's router logits, the least chosen expert of each layer is the one removed."""
    model = FAMILIES["mixtral"]()
    batches = [_ids(2, 8, seed=s) for s in range(3)]
    res = fxprune.compile(
        model, batches[0], experts=1, expert_importance="frequency", calibration=batches
    )
    counts = torch.zeros(2, 4)
    with torch.no_grad():
        for b in batches:
            logits = model(b, output_router_logits=True).router_logits
            for layer, lg in enumerate(logits):
                top = torch.topk(torch.softmax(lg.float(), -1), 2, dim=-1).indices
                counts[layer] += torch.bincount(top.reshape(-1), minlength=4)
    ex = res.passes[0]
    for layer in range(2):
        path = f"model.layers.{layer}.mlp"
        assert ex.scores[path] == pytest.approx(counts[layer].tolist())
        assert ex.removed[path] == [int(torch.argmin(counts[layer]))]


def test_experts_refusals_name_the_problem():
    model = FAMILIES["mixtral"]()
    with pytest.raises(ConfigError, match="at least 2 must stay"):
        fxprune.compile(model, _ids(2, 8), experts=3)
    for bad in (True, 1.5, -1):
        with pytest.raises(ConfigError, match="experts="):
            fxprune.compile(model, _ids(2, 8), experts=bad)
    with pytest.raises(NothingToPruneError, match="removes no expert .* at least 0.25"):
        fxprune.compile(model, _ids(2, 8), experts=0.1)
    with pytest.raises(ConfigError, match="expert_importance"):
        fxprune.compile(model, _ids(2, 8), experts=1, expert_importance="l1")
    dense = T.LlamaForCausalLM(T.LlamaConfig(**SMALL, intermediate_size=96)).eval()
    with pytest.raises(NothingToPruneError, match="no mixture-of-experts layer"):
        fxprune.compile(dense, _ids(2, 8), experts=0.25)


def test_the_cli_removes_experts_and_saves_a_folder_transformers_opens(tmp_path):
    from fxprune.cli import main

    model = FAMILIES["qwen3_moe"]()
    model.save_pretrained(tmp_path / "dense")
    out = tmp_path / "pruned"
    argv = ["prune", f"hf:{tmp_path / 'dense'}", "--experts", "1", "--ffn", "0.25"]
    assert main([*argv, "--quiet", "--save-pretrained", str(out)]) == 0
    back = T.AutoModelForCausalLM.from_pretrained(out)
    assert back.config.num_experts == 3 and back.config.moe_intermediate_size == 36


def deepseek_v3():
    """Multi-head latent attention (as released: as many KV heads as heads), a dense first
    layer, then routed experts beside a shared expert whose width the config derives."""
    torch.manual_seed(0)
    cfg = T.DeepseekV3Config(
        **SMALL, num_key_value_heads=4, intermediate_size=96, moe_intermediate_size=48,
        n_routed_experts=4, n_shared_experts=2, num_experts_per_tok=2, n_group=1, topk_group=1,
        first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=32, qk_rope_head_dim=8,
        qk_nope_head_dim=8, v_head_dim=16,
    )  # fmt: skip
    return nontrivial(T.DeepseekV3ForCausalLM(cfg))


def test_deepseek_v3_dense_routed_and_shared_ffn_are_exact_and_reload_equal(tmp_path):
    model = deepseek_v3()
    res, _ = assert_equivalent(model, _ids(2, 8), channels=0.0, ffn=0.25, tree=True, uniform=True)
    mlp = res.model.model.layers[1].mlp
    assert mlp.experts.down_proj.shape[-1] == 36 and mlp.shared_experts.up_proj.out_features == 72
    back = _reloads_equal(model, res, tmp_path)
    assert (back.config.intermediate_size, back.config.moe_intermediate_size) == (72, 36)
    # the dense layer left whole: intermediate_size keeps its value, the MoE width still follows
    res = fxprune.compile(model, _ids(2, 8), ffn=0.25, uniform=True, ignore=["model.layers.0.mlp"])
    assert (res.model.config.intermediate_size, res.model.config.moe_intermediate_size) == (96, 36)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_deepseek_v3_latent_attention_heads_are_exact_and_reload_equal(attn, tmp_path):
    """Multi-head latent attention: a head is q_b_proj's rows of that head (nope and rope),
    kv_b_proj's rows of its k_nope and v, o_proj's columns; the one rotary key every head
    shares (kv_a_proj_with_mqa's last rows, expanded to every head) and the latent stay."""
    model = deepseek_v3()
    model.config._attn_implementation = attn
    res, _ = assert_equivalent(model, _ids(2, 8), channels=0.0, heads=0.5, tree=True, uniform=True)
    dense, attn = model.model.layers[0].self_attn, res.model.model.layers[0].self_attn
    kept = res.plan.passes[0]["kept"]["model.layers.0.self_attn.q_b_proj"]
    heads = sorted({r // 16 for r in kept})
    assert len(heads) == 2 and kept == [h * 16 + i for h in heads for i in range(16)]
    rows = lambda w, per: w.view(4, per, -1)[heads].reshape(-1, w.shape[-1])  # noqa: E731
    assert torch.equal(attn.q_b_proj.weight, rows(dense.q_b_proj.weight, 16))
    assert torch.equal(attn.kv_b_proj.weight, rows(dense.kv_b_proj.weight, 24))
    assert torch.equal(attn.o_proj.weight, rows(dense.o_proj.weight.T, 16).T)
    for name in ("kv_a_proj_with_mqa", "kv_a_layernorm", "q_a_proj"):
        assert torch.equal(getattr(attn, name).weight, getattr(dense, name).weight)
    cfg = res.model.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (2, 2)
    back = _reloads_equal(model, res, tmp_path)
    assert back.model.layers[1].self_attn.kv_b_proj.out_features == 48


def deepseek_v3_grouped(n=8, top_k=2):
    """DeepSeek-V3's group-limited router: ``n`` experts in 2 groups (``n_group``), each scored
    by its top 2, the best group chosen (``topk_group=1``), then the top ``top_k`` of its
    experts; a nonzero ``e_score_correction_bias`` added to the sigmoid scores."""
    torch.manual_seed(0)
    cfg = T.DeepseekV3Config(
        **SMALL, num_key_value_heads=4, intermediate_size=96, moe_intermediate_size=48,
        n_routed_experts=n, n_shared_experts=1, num_experts_per_tok=top_k, n_group=2, topk_group=1,
        first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=32, qk_rope_head_dim=8,
        qk_nope_head_dim=8, v_head_dim=16,
    )  # fmt: skip
    model = nontrivial(T.DeepseekV3ForCausalLM(cfg))
    with torch.no_grad():
        model.model.layers[1].mlp.gate.e_score_correction_bias.normal_(0, 0.3)
    return model


@pytest.mark.parametrize("grouped", [False, True], ids=["one_group", "two_groups"])
def test_deepseek_v3_experts_keep_the_router_groups_and_reload_equal(grouped, tmp_path):
    """Whole experts of DeepSeek-V3's router: its rows, its correction bias entries and the
    experts' weights go; the group views (``(-1, n_group, n // n_group)``, the mask expanded
    back to ``(-1, n)``) take the kept counts; with two groups every group loses as many.
    Proved against the dense model that never routes to them; the deviation is reported."""
    model = deepseek_v3_grouped() if grouped else deepseek_v3()
    n, which = (8, 2) if grouped else (4, 1)
    calib = [_ids(2, 8, seed=s) for s in range(3)]
    res = fxprune.compile(model, _ids(2, 8), experts=which, uniform=True, calibration=calib)
    ex = res.passes[0]
    gone = ex.removed["model.layers.1.mlp"]
    assert len(gone) == which and (not grouped or sorted(e // 4 for e in gone) == [0, 1])
    assert ex.unrouted["model.layers.1.mlp.gate.e_score_correction_bias"] == gone
    gate = res.model.model.layers[1].mlp.gate
    assert gate.weight.shape == (n - which, 64) and gate.e_score_correction_bias.shape == (
        n - which,
    )
    if not grouped:  # approximate, and says so (the two-group router barely used them)
        assert ex.output_deviation > 1e-3
    for target in ("module", "model"):
        assert fxprune.verify.equivalence(model, res, _ids(2, 8), target=target).ok
    back = _reloads_equal(model, res, tmp_path)
    assert (back.config.n_routed_experts, back.config.n_group) == (n - which, 2 if grouped else 1)


def test_deepseek_v3_experts_proof_needs_the_correction_bias_unrouted():
    """The removed experts made the dense model's favourites (bias +2): the pruned model moves
    their tokens (a real deviation), the reference gives their bias -inf and the proof holds;
    a reference that leaves the bias (sigmoid(-inf) = 0, plus the bias, still wins) fails."""
    model = deepseek_v3_grouped()
    calib = [_ids(2, 8, seed=s) for s in range(3)]
    plan = fxprune.compile(model, _ids(2, 8), experts=2, calibration=calib).plan
    gone = plan.passes[0]["removed"]["model.layers.1.mlp"]
    with torch.no_grad():
        model.model.layers[1].mlp.gate.e_score_correction_bias[gone] = 2.0
    res = fxprune.apply_plan(model, plan, (_ids(2, 8),))
    rep = fxprune.verify.equivalence(model, res, _ids(2, 8))
    assert rep.ok and rep.pruning_effect > 1e-3, rep.message
    ex = res.passes[0]
    router = next(k for k in ex.unrouted if "bias" not in k)
    bad = dataclasses.replace(ex, unrouted={router: gone})
    tampered = dataclasses.replace(res, passes=[bad, *res.passes[1:]])
    assert not fxprune.verify.equivalence(model, tampered, _ids(2, 8)).ok


def test_deepseek_v3_experts_refuse_what_would_break_the_groups():
    model = deepseek_v3_grouped()
    with pytest.raises(ConfigError, match="give a multiple of 2"):
        fxprune.compile(model, _ids(2, 8), experts=1)
    with pytest.raises(ConfigError, match="at least 2 must stay in each"):
        fxprune.compile(model, _ids(2, 8), experts=6)
    plan = fxprune.compile(model, _ids(2, 8), experts=2).plan
    plan.passes[0]["removed"]["model.layers.1.mlp"] = [0, 1]  # both from group 0
    with pytest.raises(ConfigError, match=r"removing \[2, 0\] per group would break the groups"):
        fxprune.apply_plan(model, plan, (_ids(2, 8),))
    wide = deepseek_v3_grouped(n=12, top_k=4)  # 3 of 6 left in the one chosen group: not 4
    with pytest.raises(ConfigError, match="routes each token to 4 experts of its 1 best groups"):
        fxprune.compile(wide, _ids(2, 8), experts=6)


class _TwoGroupings(torch.nn.Module):
    """A router whose scores are viewed in groups of 4 and again in groups of 2 before its
    top-k: no single ``n_group`` the removal could keep equal."""

    def __init__(self):
        super().__init__()
        self.gate = torch.nn.Linear(16, 8, bias=False)
        self.w = torch.nn.Parameter(torch.randn(8, 16, 16))

    def forward(self, x):
        s = self.gate(x).sigmoid()
        a = s.view(-1, 2, 4).amax(-1).repeat_interleave(4, -1)
        b = s.view(-1, 4, 2).amax(-1).repeat_interleave(2, -1)
        idx = s.masked_fill(a + b < 1.0, float("-inf")).topk(2).indices
        y = torch.einsum("ti,eio->teo", x, self.w)
        return y.gather(1, idx[..., None].expand(-1, -1, 16)).sum(1)


def test_experts_refuse_a_router_grouped_two_ways():
    model = torch.nn.Sequential(_TwoGroupings()).eval()
    with pytest.raises(ConfigError, match="routing groups the analysis cannot follow"):
        fxprune.compile(model, torch.randn(6, 16), experts=2)


def gpt_oss():
    """Experts stored [experts, in, out] with biases, gate and up interleaved in one tensor
    (``gate_up[..., ::2]`` / ``[..., 1::2]``), a clamped GLU, sinks in the attention."""
    torch.manual_seed(0)
    cfg = T.GptOssConfig(
        **SMALL, num_key_value_heads=2, intermediate_size=96, num_local_experts=4,
        num_experts_per_tok=2, head_dim=16, layer_types=["sliding_attention", "full_attention"],
    )  # fmt: skip
    return nontrivial(T.GptOssForCausalLM(cfg))


def test_gpt_oss_interleaved_expert_neurons_heads_and_experts_reload_equal(tmp_path):
    model = gpt_oss()
    kw = dict(channels=0.0, heads=0.5, ffn=0.25, tree=True, uniform=True)
    res, _ = assert_equivalent(model, _ids(2, 8), **kw)
    experts = res.model.model.layers[0].mlp.experts
    assert experts.gate_up_proj.shape == (4, 64, 144) and experts.down_proj.shape == (4, 72, 64)
    assert res.model.config.intermediate_size == 72
    _reloads_equal(model, res, tmp_path)
    res = fxprune.compile(model, _ids(2, 8), experts=1, uniform=True)
    assert res.model.config.num_local_experts == 3
    assert fxprune.verify.equivalence(model, res, _ids(2, 8), target="model").ok
    _reloads_equal(model, res, tmp_path / "experts")
