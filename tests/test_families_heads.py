"""Attention heads of Falcon's fused layouts and of Bloom's ALiBi attention (issue #22 §2-3):
each on a tiny random config, proved exact on the graph and, where its forward allows, on the
user's class; what cannot be the user's class is refused by name."""

from __future__ import annotations

import pickle

import pytest
import torch

import fxprune
from fxprune import materialize_alibi
from fxprune.materialize_alibi import KeptHeads
from fxprune.verify.proof import agreement
from fxprune.verify.reference import zeroed_dense
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


def _alibi_heads(res) -> list[list[int]]:
    """The head positions each layer's ALiBi bias is indexed with in the pruned graph."""
    return [b.tolist() for n, b in sorted(res.module.named_buffers()) if "_fxprune_heads_" in n]


def _tree_heads(res) -> list[list[int]]:
    """The heads each attention layer of ``result.model`` selects from the model's ALiBi bias."""
    return [b.tolist() for n, b in sorted(res.model.named_buffers()) if n.endswith("kept_heads")]


def _padded(batch=3, length=5):
    """Token ids and an attention mask with left padding (row 0) and right padding (row 1)."""
    ids = torch.randint(0, 100, (batch, length), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    mask[1, -1] = 0
    return ids, mask


def _check_alibi_tree(model, res, layer_cls: str, n_heads: int = 4):
    """``result.model`` is the user's class; each attention layer selects the heads the graph
    indexes the bias with, the model builds the bias for every head; it equals the graph module
    on a new batch and length, and the zeroed dense model with padding in the attention mask."""
    assert res.materialized, res.model_note
    assert type(res.model) is type(model) and res.model.transformer.num_heads == n_heads
    attn = [m for m in res.model.modules() if isinstance(m, KeptHeads)]
    assert attn and {type(m).__name__ for m in attn} == {f"KeptHeads{layer_cls}"}
    assert all(type(m).__mro__[2].__name__ == layer_cls for m in attn)
    assert _tree_heads(res) == _alibi_heads(res)
    assert not any(isinstance(m, KeptHeads) for m in model.modules())  # the user's: untouched
    new = torch.randint(0, 100, (3, 5))
    dense = zeroed_dense(model, res)
    ids, mask = _padded()
    with torch.no_grad():
        torch.testing.assert_close(res.model(new).logits, res.module(new)["logits"])
        got = res.model(ids, attention_mask=mask).logits
        want = dense(ids, attention_mask=mask).logits
        stock = model(ids, attention_mask=mask).logits
    keep = mask.bool()  # padded positions' logits are not compared
    torch.testing.assert_close(got[keep], want[keep], rtol=1e-4, atol=1e-5)
    assert (got[keep] - stock[keep]).abs().max() > 1e-3  # pruning changed the output


def test_falcon_alibi_heads_are_exact_on_its_class(tmp_path):
    """Falcon with ``alibi=True`` adds per-head slopes, built in FalconModel from its head count,
    into the attention mask: the graph gives each kept head its own slope. FalconForCausalLM
    rebuilt for the smaller count would give them others (and divide by another
    ``sqrt(hidden / heads)``); instead the model keeps building the bias for all 4 heads and each
    attention layer selects its kept heads (``KeptHeadsFalconAttention``), exact on the example,
    a new batch and length, and a padded attention mask. save_pretrained is refused by name."""
    model, ids = _falcon(new_decoder_architecture=True, num_kv_heads=2, alibi=True)
    res, _ = assert_equivalent(model, ids, channels=0.0, heads=0.5, uniform=True, tree=True)
    assert all(h in ([0, 1], [2, 3]) for h in _alibi_heads(res))  # a KV group's query heads
    _check_alibi_tree(model, res, "FalconAttention")
    with pytest.raises(fxprune.errors.ConfigError, match="ALiBi slopes"):
        res.save_pretrained(tmp_path / "out")


def test_bloom_heads_keep_their_alibi_slopes():
    """Bloom's fused ``query_key_value`` is viewed ``(heads, 3, head_dim)``; its ALiBi bias is
    added by ``baddbmm`` over ``batch x heads`` and its slopes are computed from the head count
    in BloomModel's forward. The graph indexes the bias with each layer's kept heads in every
    batch, so each kept head keeps its own slope. Layer 1 keeps heads 0 and 2, not those whose
    slopes 2 heads would get (``_get_alibi_slopes(2)`` are the slopes of heads 1 and 3 of 4,
    which layer 0 keeps), so BloomModel keeps building the slopes for 4 heads and each attention layer
    selects its own (``KeptHeadsBloomAttention``): ``result.model`` is BloomForCausalLM, exact
    on the example, a new batch and length, a padded attention mask, and generate() (the cache's
    longer keys)."""
    model, ids = _bloom()
    res, _ = assert_equivalent(
        model, ids, channels=0.0, heads=0.5, ffn=0.25, uniform=True, importance="l1", tree=True
    )
    kept = [
        sorted({int(r) // 48 for r in _kept_rows(res, f"h.{i}.self_attention.query_key_value")})
        for i in range(2)
    ]
    assert _alibi_heads(res) == kept == [[1, 3], [0, 2]]  # layer 1's: not 2 heads' slopes
    _check_alibi_tree(model, res, "BloomAttention")
    assert res.model.config.n_head == 2 and res.model.transformer.h[0].self_attention.num_heads == 2
    assert "kept_heads" not in "".join(res.model.state_dict())  # the stock state_dict
    ids, mask = _padded(2, 4)
    mask[1] = 1  # generate pads on the left
    with torch.no_grad():
        out = res.model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
        want = zeroed_dense(model, res).generate(
            ids, attention_mask=mask, max_new_tokens=4, do_sample=False
        )
    assert torch.equal(out, want)


def test_a_tree_with_the_wrong_alibi_heads_fails_the_check(monkeypatch):
    """The checks have teeth: ``result.model`` with a layer selecting other heads, with the
    selection removed (the stock forward, the bias of 4 heads for 2), or with the stock class's
    own rebuild for 2 heads (the fallback this replaced) is refused by the proof; and a compile
    whose selection reads other rows than the graph's keeps the graph module, by the
    agreement check, and says why."""
    model, ids = _bloom()
    res = fxprune.compile(model, ids, channels=0.0, heads=0.5, uniform=True, importance="l1")
    assert fxprune.verify.equivalence(model, res, ids, target="model").ok
    attn = res.model.transformer.h[0].self_attention
    right = attn.kept_heads.clone()
    attn.kept_heads = torch.tensor([h for h in range(4) if h not in right.tolist()])
    assert not fxprune.verify.equivalence(model, res, ids, target="model").ok
    attn.kept_heads = right.flip(0)  # the right heads, each with the other's slope
    assert not fxprune.verify.equivalence(model, res, ids, target="model").ok
    attn.kept_heads = right
    assert fxprune.verify.equivalence(model, res, ids, target="model").ok
    for block in res.model.transformer.h:  # the selection removed
        block.self_attention.__class__ = type(block.self_attention).__mro__[2]
    assert not fxprune.verify.equivalence(model, res, ids, target="model").ok
    res.model.transformer.num_heads = 2  # the stock rebuild for 2 heads: the old fallback
    assert not fxprune.verify.equivalence(model, res, ids, target="model").ok
    assert not agreement(res.module, res.model, (ids,))[0]

    real = materialize_alibi.indexed_constants
    monkeypatch.setattr(
        materialize_alibi,
        "indexed_constants",
        lambda gm: {p: (i.flip(0), h) for p, (i, h) in real(gm).items()},
    )
    wrong = fxprune.compile(model, ids, channels=0.0, heads=0.5, uniform=True, importance="l1")
    assert not wrong.materialized and "does not compute what the pruned graph" in wrong.model_note
    assert fxprune.verify.equivalence(model, wrong, ids).ok  # the graph module itself is exact


def test_bloom_tree_with_kept_alibi_heads_saves_pickles_and_prunes_again(monkeypatch, tmp_path):
    """The fxprune checkpoint (``result.save``) loads back to the same tree, each layer with its
    kept heads; ``KeptHeadsBloomAttention`` is found by name in ``fxprune.materialize_alibi``
    (made again there in a fresh process), so torch.save / pickle of ``result.model`` loads;
    pruning ``result.model`` again composes its kept heads with the new ones, exact on its
    class."""
    model, ids = _bloom()
    res = fxprune.compile(model, ids, channels=0.0, heads=0.5, uniform=True, importance="l1")
    res.save(tmp_path / "bloom.pt")
    loaded = fxprune.load(tmp_path / "bloom.pt", _bloom()[0])
    assert loaded.materialized and _tree_heads(loaded) == _tree_heads(res) == [[1, 3], [0, 2]]
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids).logits, res.model(ids).logits)
    blob = pickle.dumps(res.model)
    monkeypatch.setattr(materialize_alibi, "MADE", {})  # as in a process that made none yet
    back = pickle.loads(blob)
    assert type(back.transformer.h[0].self_attention).__name__ == "KeptHeadsBloomAttention"
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, res.model(ids).logits)
    first = _tree_heads(res)
    again, _ = assert_equivalent(
        res.model, ids, channels=0.0, heads=0.5, uniform=True, importance="l1", tree=True
    )
    assert _tree_heads(res) == first  # the model pruned again is untouched
    assert [len(h) for h in _tree_heads(again)] == [1, 1]
    assert all(set(b) <= set(a) for a, b in zip(first, _tree_heads(again), strict=True))


def test_bloom_module_tree_is_exact_when_the_kept_heads_have_the_smaller_counts_slopes(tmp_path):
    """ALiBi slopes of H heads are ``2^(-8 i / H)``: those of 2 heads are the slopes of heads 1
    and 3 of 4. Keeping exactly those, the tree selects them from the slopes of 4 like any other
    kept heads (one rule; BloomModel keeps ``num_heads`` 4, its attention layers 2, the config
    n_head 2), exact. save_pretrained is refused by name: the stock class rebuilds the slopes
    from n_head, and no BloomConfig field says which heads were kept (here those 2 heads' slopes
    happen to be the kept ones', but the config cannot hold 2 heads of 16 either)."""
    model, ids = _bloom()
    with torch.no_grad():  # heads 0 and 2 the weakest in every layer
        for block in model.transformer.h:
            for h in (0, 2):
                block.self_attention.query_key_value.weight[h * 48 : (h + 1) * 48] *= 0.01
    res, _ = assert_equivalent(
        model, ids, channels=0.0, heads=0.5, tree=True, uniform=True, importance="l1"
    )
    assert _alibi_heads(res) == [[1, 3], [1, 3]] == _tree_heads(res)
    assert res.model.transformer.num_heads == 4 and res.model.config.n_head == 2
    why = r"ALiBi slopes .* transformer.h.0.self_attention \(\+1 more\) selects its kept heads"
    with pytest.raises(fxprune.errors.ConfigError, match=why):
        res.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()


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
