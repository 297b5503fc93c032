"""Attention heads of Falcon's fused layouts and of Bloom's ALiBi attention (issue #22 §2-3):
each on a tiny random config, proved exact on the graph and, where its forward allows, on the
user's class; what cannot be the user's class is refused by name."""

from __future__ import annotations

import pytest
import torch

import fxprune
from tests.conftest import assert_equivalent, nontrivial

transformers = pytest.importorskip("transformers")


def _falcon(**kw):
    torch.manual_seed(0)
    cfg = transformers.FalconConfig(
        vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, **kw
    )
    return nontrivial(transformers.FalconForCausalLM(cfg)), torch.randint(0, 100, (2, 8))


def _bloom():
    torch.manual_seed(0)
    cfg = transformers.BloomConfig(vocab_size=100, hidden_size=64, n_layer=2, n_head=4)
    return nontrivial(transformers.BloomForCausalLM(cfg)), torch.randint(0, 100, (2, 8))


def _kept_rows(res, layer):
    return next(
        torch.tensor(kept) for name, kept in res.plan.passes[0]["kept"].items() if layer in name
    )


# layout -> (config, units before -> after per layer, query heads and KV heads kept, the fused
# projection's kept rows as blocks of 16 (head_dim))
FALCON = {
    # view(B, S, kv groups, q per group + 2, D): a unit is a KV group with its query heads
    "grouped": (dict(new_decoder_architecture=True, num_kv_heads=2), (2, 1), (2, 1), 4),
    # view(B, S, heads + 2, D), the last two the one key and value head every query shares:
    # the query heads are the units, the key / value rows stay
    "multi_query": ({}, (4, 2), (2, 1), 1),
    # view(B, S, heads, 3, D): q, k and v of each head side by side
    "per_head": (dict(multi_query=False), (4, 2), (2, 2), 3),
}


@pytest.mark.parametrize("layout", sorted(FALCON))
def test_falcon_heads_are_exact_in_each_fused_layout(layout, tmp_path):
    """Falcon's fused ``query_key_value`` split three ways read as three varying dims and the
    key slot indexed by ``[-2]`` coupled every head into one: no heads were found. The head is
    now the split dim the forward does not take apart by position; a multi-query layout's one
    key / value head is shared and kept. Exact on the graph and on FalconForCausalLM (its
    ``num_heads`` / ``num_kv_heads`` follow), a new batch and length run, and save_pretrained
    is refused by name (FalconConfig derives head_dim from hidden_size / heads)."""
    kw, units, (n_q, n_kv), block = FALCON[layout]
    model, ids = _falcon(**kw)
    res, _ = assert_equivalent(
        model, ids, channels=0.0, heads=0.5, ffn=0.25, tree=True, uniform=True
    )
    heads = res.passes[0]
    assert heads.name == "heads" and {tuple(u) for u in heads.units.values()} == {units}
    attn = res.model.transformer.h[0].self_attention
    assert (attn.num_heads, attn.num_kv_heads) == (n_q, n_kv)
    assert attn.query_key_value.out_features == (n_q + 2 * n_kv) * 16
    assert attn.dense.in_features == n_q * 16
    rows = _kept_rows(res, "h.0.self_attention.query_key_value")
    assert (rows.view(-1, 16 * block) % (16 * block) == torch.arange(16 * block)).all()  # whole
    if layout == "multi_query":
        assert rows[-32:].tolist() == list(range(64, 96))  # the shared key and value rows stay
    new = torch.randint(0, 100, (3, 5))
    with torch.no_grad():
        torch.testing.assert_close(res.model(new).logits, res.module(new)["logits"])
    heads_only = fxprune.compile(model, ids, channels=0.0, heads=0.5, uniform=True)
    with pytest.raises(fxprune.errors.ConfigError, match="derives the head size"):
        heads_only.save_pretrained(tmp_path / "out")


def test_falcon_alibi_heads_are_exact_on_the_graph_and_refused_on_its_class():
    """Falcon with ``alibi=True`` adds per-head slopes built from the head count in forward:
    the graph gives each kept head its own slope (exact); FalconForCausalLM would rebuild the
    slopes for the smaller count, so ``result.model`` is the graph module and says why."""
    model, ids = _falcon(new_decoder_architecture=True, num_kv_heads=2, alibi=True)
    res, _ = assert_equivalent(model, ids, channels=0.0, heads=0.5, uniform=True)
    assert not res.materialized and "per-head constant" in res.model_note
    assert "ALiBi" in res.model_note


def _alibi_heads(res) -> list[list[int]]:
    """The head positions each layer's ALiBi bias is indexed with in the pruned graph."""
    return [b.tolist() for n, b in sorted(res.module.named_buffers()) if "_fxprune_heads_" in n]


def test_bloom_heads_keep_their_alibi_slopes():
    """Bloom's fused ``query_key_value`` is viewed ``(heads, 3, head_dim)``; its ALiBi bias is
    added by ``baddbmm`` over ``batch x heads`` and its slopes are computed from the head count
    in forward. The graph indexes the bias with the kept heads in every batch, so each kept head
    keeps its own slope: exact, also on a new batch and length. BloomForCausalLM rebuilds the
    slopes from n_head (``_get_alibi_slopes(2)`` are the slopes of heads 1 and 3 of 4), so
    ``result.model`` is the graph module, and the note says why."""
    model, ids = _bloom()
    res, _ = assert_equivalent(
        model, ids, channels=0.0, heads=0.5, ffn=0.25, uniform=True, importance="l1"
    )
    kept = [
        sorted({int(r) // 48 for r in _kept_rows(res, f"h.{i}.self_attention.query_key_value")})
        for i in range(2)
    ]
    assert _alibi_heads(res) == kept and kept != [[1, 3], [1, 3]]
    assert not res.materialized and "per-head constant the forward builds" in res.model_note
    with torch.no_grad():
        out = res.module(torch.randint(0, 100, (3, 5)))
    assert out["logits"].shape == (3, 5, 100)


def test_bloom_module_tree_is_exact_when_the_kept_heads_have_the_smaller_counts_slopes(tmp_path):
    """ALiBi slopes of H heads are ``2^(-8 i / H)``: those of 2 heads are the slopes of heads 1
    and 3 of 4. Keeping exactly those, BloomForCausalLM (its ``num_heads`` follows the config)
    rebuilds the slopes the kept heads had and is exact; save_pretrained is refused by name
    (BloomConfig derives head_dim from hidden_size / n_head)."""
    model, ids = _bloom()
    with torch.no_grad():  # heads 0 and 2 the weakest in every layer
        for block in model.transformer.h:
            for h in (0, 2):
                block.self_attention.query_key_value.weight[h * 48 : (h + 1) * 48] *= 0.01
    res, _ = assert_equivalent(
        model, ids, channels=0.0, heads=0.5, tree=True, uniform=True, importance="l1"
    )
    assert _alibi_heads(res) == [[1, 3], [1, 3]]
    assert res.model.transformer.num_heads == 2 and res.model.config.n_head == 2
    with pytest.raises(fxprune.errors.ConfigError, match="derives the head size"):
        res.save_pretrained(tmp_path / "out")


class _BatchHeadsBias(torch.nn.Module):
    """Bloom-like: scores ``bias.baddbmm(q, k^T)`` over ``batch * heads``, the per-head bias
    built in forward from the head count (``heads_major``: laid out ``heads * batch``)."""

    def __init__(self, d=32, h=4, heads_major=False):
        super().__init__()
        self.h, self.heads_major = h, heads_major
        self.qkv, self.o = torch.nn.Linear(d, 3 * d), torch.nn.Linear(d, d)

    def forward(self, x):
        b, n, d = x.shape
        hd = d // self.h
        qkv = self.qkv(x).view(b, n, 3, self.h, hd).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        slopes = torch.arange(1, self.h + 1, dtype=x.dtype).view(1, self.h, 1, 1) * 0.5
        bias = (slopes * torch.arange(n, dtype=x.dtype).view(1, 1, 1, n)).expand(b, -1, -1, -1)
        if self.heads_major:
            q, k, v, bias = (t.transpose(0, 1) for t in (q, k, v, bias))
        q, k, v = (t.reshape(b * self.h, n, hd) for t in (q, k, v))
        scores = bias.reshape(b * self.h, 1, n).baddbmm(q, k.transpose(1, 2), alpha=0.25)
        y = torch.bmm(scores.softmax(-1), v)
        if self.heads_major:
            y = y.view(self.h, b, n, hd).transpose(0, 1)
        else:
            y = y.view(b, self.h, n, hd)
        return self.o(y.transpose(1, 2).reshape(b, n, d)) + x


@pytest.mark.parametrize("mode", ["fx", "export"])
def test_a_batch_heads_bias_keeps_each_heads_slice(mode):
    """Heads 0 and 1 the weakest: heads 2 and 3 stay with their own slopes (1.5 and 2), in
    every batch of the merged ``batch * heads`` dim (the proof runs batch + 1 too); a bias laid
    out ``heads * batch`` cannot be indexed that way and keeps its heads, naming the op."""
    torch.manual_seed(0)
    m, x = _BatchHeadsBias().eval(), torch.randn(2, 6, 32)
    with torch.no_grad():
        for t in range(3):
            m.qkv.weight[t * 32 : t * 32 + 16] *= 0.01
    res = fxprune.compile(m, x, heads=0.5, mode=mode, importance="l1")
    assert res.module.get_parameter("qkv.weight").shape == (48, 32)
    assert _alibi_heads(res) == [[2, 3]]
    assert fxprune.verify.equivalence(m, res, x).ok
    major = _BatchHeadsBias(heads_major=True).eval()
    with pytest.raises(fxprune.errors.ConfigError, match="not batch-major"):
        fxprune.compile(major, x, heads=0.5, mode=mode)


class _FusedSlots(torch.nn.Module):
    """Falcon's attention as transformers 5.25 writes it, without transformers: the fused
    projection viewed ``(slots, D)``; with ``kv`` groups viewed again ``(kv, q per group + 2,
    D)``, the query slots sliced and the key / value slots selected; with one key / value head
    split off ``[heads, 1, 1]``. ``repeat_kv``'s expand + reshape gives every query head its key
    / value head before ``scaled_dot_product_attention`` (``as_query``: ``k.expand_as(q)``)."""

    def __init__(self, d=64, h=4, kv=1, as_query=False):
        super().__init__()
        self.h, self.kv, self.hd, self.as_query = h, kv, d // h, as_query
        self.qkv, self.o = torch.nn.Linear(d, (h + 2 * kv) * self.hd), torch.nn.Linear(d, d)

    def forward(self, x):
        b, n, _ = x.shape
        qkv = self.qkv(x).view(b, n, -1, self.hd)
        if self.kv > 1:
            g = qkv.view(b, n, self.kv, -1, self.hd)
            q, k, v = g[..., :-2, :].flatten(-3, -2), g[..., -2, :], g[..., -1, :]
        else:
            q, k, v = qkv.split([self.h, 1, 1], dim=-2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        rep = self.h // self.kv
        if self.as_query:  # the head count read off q at run time
            k, v = k.expand_as(q), v.expand_as(q)
        else:
            k, v = (
                t[:, :, None].expand(b, self.kv, rep, n, self.hd).reshape(b, self.h, n, self.hd)
                for t in (k, v)
            )
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(b, n, -1)) + x


@pytest.mark.parametrize("mode", ["fx", "export"])
@pytest.mark.parametrize("kv", [1, 2])
def test_heads_split_again_and_a_key_head_expanded_to_every_query_head(kv, mode):
    """Whole heads viewed again ``(kv groups, q per group + 2, D)`` keep the group, the dim the
    forward does not take apart (a unit is a group with its query heads); one key / value head
    expanded to every query head stays, and the pruned graph indexes it with the kept query
    heads. The weakest half goes, exact (the proof runs batch + 1 too)."""
    torch.manual_seed(0)
    m, x = _FusedSlots(kv=kv).eval(), torch.randn(2, 6, 64)
    weak = [0, 1, 2, 3] if kv == 2 else [0, 2]  # group 0's slots, or query heads 0 and 2
    with torch.no_grad():
        for s in weak:
            m.qkv.weight[s * 16 : (s + 1) * 16] *= 0.01
    res = fxprune.compile(m, x, heads=0.5, mode=mode, importance="l1")
    kept = list(range(64, 128)) if kv == 2 else [*range(16, 32), *range(48, 96)]
    assert res.plan.passes[0]["kept"]["qkv"] == kept
    shared = [n for n, _ in res.module.named_buffers() if "_fxprune_shared_" in n]
    assert len(shared) == (2 if kv == 1 else 0)  # the key's and the value's kept positions
    assert fxprune.verify.equivalence(m, res, x).ok


def test_a_key_head_expanded_as_the_query_follows_the_kept_heads():
    """``k.expand_as(q)`` traced by fx reads the head count off q at run time: the shared key /
    value head follows the kept query heads by itself and is not indexed again."""
    torch.manual_seed(0)
    m, x = _FusedSlots(as_query=True).eval(), torch.randn(2, 6, 64)
    with torch.no_grad():
        for s in (0, 2):
            m.qkv.weight[s * 16 : (s + 1) * 16] *= 0.01
    res = fxprune.compile(m, x, heads=0.5, mode="fx", importance="l1")
    assert res.plan.passes[0]["kept"]["qkv"] == [*range(16, 32), *range(48, 96)]
    assert not [n for n, _ in res.module.named_buffers() if "_fxprune_shared_" in n]
    assert fxprune.verify.equivalence(m, res, x).ok


class _Latent(torch.nn.Module):
    """Multi-head latent attention (DeepSeek-V2 / V3) without transformers: q per head, its
    nope and rope parts side by side; ``kv_b`` gives each head's k_nope and v from the latent;
    ``kv_a`` gives the latent and ONE rotary key, expanded to every head (its count read off
    k_nope at run time) and put after k_nope along head_dim. ``layout``: ``"cat"``; ``"filled"``
    as transformers 5.25's ``expand_kv`` (``new_empty``, each part ``copy_``-ed into a slice).
    Layouts the rule must refuse: ``"scaled"`` (the key scaled after the cat: no cat reaches the
    attention), ``"nested"`` (one cat part holds per-head and shared channels together),
    ``"param_key"`` (k_nope a learned per-head tensor: channels that differ along head_dim).
    ``eager``: attention written out, ``softmax(q @ k^T) @ v``."""

    def __init__(self, d=32, h=4, nope=8, rope=4, dv=8, rank=16, layout="cat", eager=False):
        super().__init__()
        self.h, self.nope, self.rope, self.dv, self.layout = h, nope, rope, dv, layout
        self.eager = eager
        self.q = torch.nn.Linear(d, h * (nope + rope), bias=False)
        self.kv_a = torch.nn.Linear(d, rank + rope, bias=False)
        self.kv_b = torch.nn.Linear(rank, h * (nope + dv), bias=False)
        self.o = torch.nn.Linear(h * dv, d, bias=False)
        self.scale = torch.nn.Parameter(torch.rand(nope + rope) + 0.5)
        self.k_param = torch.nn.Parameter(torch.randn(1, h, 1, nope))

    def key(self, k_nope, k_rot):
        rot = k_rot.expand(-1, k_nope.shape[1], -1, -1)
        if self.layout == "filled":
            key = k_nope.new_empty(*k_nope.shape[:-1], self.nope + self.rope)
            key[..., : self.nope].copy_(k_nope)
            key[..., self.nope :].copy_(rot)
            return key
        if self.layout == "nested":
            half = self.nope // 2
            inner = torch.cat([k_nope[..., half:], rot], dim=-1)
            return torch.cat([k_nope[..., :half], inner], dim=-1)
        if self.layout == "param_key":
            k_nope = self.k_param.expand(k_nope.shape[0], -1, k_nope.shape[2], -1)
        key = torch.cat([k_nope, rot], dim=-1)
        return key * self.scale if self.layout == "scaled" else key

    def forward(self, x):
        b, n, _ = x.shape
        q = self.q(x).view(b, n, -1, self.nope + self.rope).transpose(1, 2)
        latent, k_rot = self.kv_a(x).split([self.kv_b.in_features, self.rope], dim=-1)
        kv = self.kv_b(latent).view(b, n, -1, self.nope + self.dv).transpose(1, 2)
        k_nope, v = kv.split([self.nope, self.dv], dim=-1)
        k_rot = torch.sin(k_rot.view(b, 1, n, self.rope))  # stands for the rotary embedding
        k = self.key(k_nope, k_rot)
        if self.eager:
            y = torch.softmax(torch.matmul(q, k.transpose(2, 3)) * 0.25, dim=-1) @ v
        else:
            y = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.o(y.transpose(1, 2).reshape(b, n, -1)) + x


@pytest.mark.parametrize("eager", [False, True], ids=["sdpa", "eager"])
@pytest.mark.parametrize(
    ("layout", "mode"), [("cat", "fx"), ("cat", "export"), ("filled", "export")]
)
def test_latent_attention_heads_go_and_the_shared_rotary_key_stays(layout, mode, eager):
    """Heads 0 and 2 the weakest: q's rows of heads 1 and 3 (nope and rope), kv_b's k_nope and
    v rows of heads 1 and 3 and o's columns of heads 1 and 3 stay; kv_a (the latent and the
    one rotary key every head shares) is untouched. The expanded rotary key is indexed with the
    kept heads where the capture baked its head count in (export), and follows k_nope by
    itself where fx reads the count at run time. Exact (the proof runs batch + 1 too), through
    scaled_dot_product_attention or a written-out ``q @ k^T``."""
    torch.manual_seed(0)
    m, x = _Latent(layout=layout, eager=eager).eval(), torch.randn(2, 6, 32)
    with torch.no_grad():
        for h in (0, 2):
            m.q.weight[h * 12 : (h + 1) * 12] *= 0.3
            m.kv_b.weight[h * 16 : (h + 1) * 16] *= 0.3
    res = fxprune.compile(m, x, heads=0.5, mode=mode, importance="l1")
    kept = res.plan.passes[0]["kept"]
    assert kept["q"] == [*range(12, 24), *range(36, 48)]
    assert kept["kv_b"] == [*range(16, 32), *range(48, 64)]
    assert res.module.get_parameter("kv_a.weight").shape == (20, 32)
    assert res.module.get_parameter("o.weight").shape == (32, 16)
    shared = [n for n, _ in res.module.named_buffers() if "_fxprune_shared_key_" in n]
    assert len(shared) == (1 if mode == "export" else 0)
    rep = fxprune.verify.equivalence(m, res, x)
    assert rep.ok and rep.pruning_effect > 1e-3, rep.message


@pytest.mark.parametrize("eager", [False, True], ids=["sdpa", "eager"])
@pytest.mark.parametrize("layout", ["scaled", "nested", "param_key"])
def test_latent_attention_refuses_a_key_it_cannot_split_into_heads_and_a_shared_part(layout, eager):
    torch.manual_seed(0)
    m, x = _Latent(layout=layout, eager=eager).eval(), torch.randn(2, 6, 32)
    with pytest.raises(fxprune.errors.ConfigError, match="no prunable attention heads"):
        fxprune.compile(m, x, heads=0.5, mode="fx")
