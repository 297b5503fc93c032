"""importance="learned": soft gates trained by the user's train_fn remove the units nothing
reads, for heads, FFN neurons and channels; the model and the copy pruned stay untouched."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune
from fxprune import gates
from fxprune.errors import ConfigError
from fxprune.graph import build_graph, trace
from tests.conftest import assert_equivalent, randomize
from tests.passes.test_data_importance import Block  # attention (4 heads of 8) + MLP (16)


class Convs(nn.Module):
    """conv -> BN -> ReLU -> conv -> ReLU -> conv: two channel groups of 8."""

    def __init__(self):
        super().__init__()
        self.a, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.b, self.c = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.bn(self.a(x))))))


def distill(model, x, steps=40, lr=0.1, calls=None, l1=None):
    """A train_fn: Adam on the gates towards the dense model's output, the squared error
    relative to the output's variance (the L1 penalty is added by fxprune; ``l1`` sets its
    strength)."""
    with torch.no_grad():
        target = model(x)

    def train_fn(gated):
        if calls is not None:
            calls.append(gated.logits.numel())
        if l1 is not None:
            gated.l1 = l1
        opt = torch.optim.Adam(gated.parameters(), lr=lr)
        for _ in range(steps):
            opt.zero_grad()
            (F.mse_loss(gated(x), target) / target.var()).backward()  # of order 1
            opt.step()

    return train_fn


@pytest.fixture
def block():
    torch.manual_seed(0)
    m = Block().eval()
    with torch.no_grad():
        m.o.weight[:, 8:16] = 0  # head 1's output: read by nothing
        m.down.weight[:, [5, 9]] = 0  # neurons 5 and 9: read by nothing ...
        m.up.weight[[5, 9]] *= 20  # ... but the largest MLP weights (l1 keeps them)
    return m, torch.randn(4, 12, 32)


def _gone(kept: list[int], n: int, width: int = 1) -> list[int]:
    return sorted({i // width for i in range(n)} - {i // width for i in kept})


def test_learned_removes_the_head_and_the_neurons_nothing_reads(block):
    m, x = block
    before = {k: v.clone() for k, v in m.state_dict().items()}
    calls = []
    kw = {"importance": "learned", "train_fn": distill(m, x, calls=calls)}
    res = fxprune.compile(m, x, heads=1, ffn=2 / 16, **kw)
    heads, ffn = res.plan.passes
    assert _gone(heads["kept"]["q"], 32, 8) == [1]
    assert _gone(ffn["kept"]["up"], 16) == [5, 9]
    assert calls == [4, 16]  # one training per pass, on exactly the units it prunes
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
    assert all(p.grad is None for p in m.parameters())
    l1 = fxprune.compile(m, x, ffn=2 / 16, importance="l1")
    assert _gone(l1.plan.passes[0]["kept"]["up"], 16) != [5, 9]  # magnitude keeps them
    recipe = res.plan.config["recipe"]
    assert [p["importance"] for p in recipe["passes"]] == ["learned", "learned"]
    assert "train_fn" not in str(recipe)  # runtime data, never in a recipe
    again = fxprune.apply_plan(m, res.plan, x)  # replay: the kept indices, no training
    assert again.plan.passes == res.plan.passes
    # removing what matters too (a real effect): still proved exact
    res, _ = assert_equivalent(m, x, channels=0.0, heads=2, ffn=0.5, **kw)
    assert 1 in _gone(res.plan.passes[0]["kept"]["q"], 32, 8)
    assert {5, 9} <= set(_gone(res.plan.passes[1]["kept"]["up"], 16))


def test_learned_removes_the_channels_nothing_reads():
    torch.manual_seed(0)
    m, x = randomize(Convs().eval()), torch.randn(8, 3, 6, 6)
    with torch.no_grad():
        m.b.weight[:, [2, 5]] = 0  # a's channels 2 and 5: read by nothing
        m.a.weight[[2, 5]] *= 10
        m.c.weight[:, [1, 6]] = 0  # and b's 1 and 6
    graph = build_graph(trace(m, x).gm)
    assert {g.kind for g in graph.groups} == {"channels"}
    kw = {"importance": "learned", "train_fn": distill(m, x, steps=60, l1=1e-2)}
    kept = fxprune.compile(m, x, channels=0.25, **kw).plan.passes[0]["kept"]
    assert _gone(kept["a"], 8) == [2, 5]
    assert _gone(kept["b"], 8) == [1, 6]
    res, _ = assert_equivalent(m, x, channels=0.5, **kw)
    assert {2, 5} <= set(_gone(res.plan.passes[0]["kept"]["a"], 8))


def test_global_ranking_compares_gates_across_groups(block):
    m, x = block
    res = fxprune.compile(
        m, x, ffn=2 / 16, importance="learned", global_ranking=True, train_fn=distill(m, x)
    )
    assert _gone(res.plan.passes[0]["kept"]["up"], 16) == [5, 9]
    assert fxprune.verify.equivalence(m, res, x).ok


def test_training_touches_neither_the_model_nor_the_copy_pruned(block):
    m, x = block
    graph = build_graph(trace(m, x).gm)
    gm = graph.gm
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    flags = {k: p.requires_grad for k, p in gm.named_parameters()}
    seen = {}

    def train_fn(gated):
        seen["params"] = [n for n, _ in gated.named_parameters()]
        seen["start"] = torch.equal(gated(x), gm(x))  # a gate at its start: the dense model
        distill(m, x, steps=5)(gated)
        gated.train()  # the model still runs as captured (eval)

    heads = [g for g in graph.groups if g.kind == "heads"]
    scores = gates.learn(graph, heads, train_fn)
    assert set(scores) == set(heads[0].units) and all(0 < s < 1 for s in scores.values())
    assert seen == {"params": ["logits"], "start": True}
    for k, v in gm.state_dict().items():
        assert torch.equal(v, before[k]), k
    for k, p in gm.named_parameters():
        assert p.grad is None and p.requires_grad == flags[k], k
    assert not gm.training


def test_the_l1_penalty_needs_no_term_in_the_loss(block):
    m, x = block
    graph = build_graph(trace(m, x).gm)
    ffn = [g for g in graph.groups if g.kind == "ffn"]

    def no_task(l1):
        def train_fn(gated):
            gated.l1 = l1
            opt = torch.optim.SGD(gated.parameters(), lr=10.0)
            for _ in range(3):
                opt.zero_grad()
                (0 * gated(x).sum()).backward()  # the loss says nothing: only the penalty acts
                opt.step()

        return train_fn

    scores = gates.learn(graph, ffn, no_task(1.0))
    start = float(torch.sigmoid(torch.tensor(gates.START)))
    assert all(s < start for s in scores.values())
    assert len({round(s, 9) for s in scores.values()}) == 1  # the same penalty on every gate
    with pytest.raises(ConfigError, match="did not update the gates"):
        gates.learn(graph, ffn, no_task(0.0))


def test_a_missing_or_idle_train_fn_is_an_error_naming_it(block):
    m, x = block
    with pytest.raises(ConfigError, match="train_fn"):
        fxprune.compile(m, x, heads=1, importance="learned")
    with pytest.raises(ConfigError, match="callable"):
        fxprune.compile(m, x, heads=1, importance="learned", train_fn=3)

    def forgot_the_gates(gated):
        w = nn.Parameter(torch.zeros(1))
        opt = torch.optim.Adam([w], lr=0.1)
        for _ in range(2):
            opt.zero_grad()
            (gated(x).sum() + w.sum()).backward()
            opt.step()

    with pytest.raises(ConfigError, match=r"optimizer take gated\.parameters\(\)"):
        fxprune.compile(m, x, ffn=0.25, importance="learned", train_fn=forgot_the_gates)


def test_hugging_face_bert_heads_and_ffn():
    """Heads and FFN of a tiny Hugging Face BERT (torch.fx capture): the unread head goes.
    (Its random FFN neurons are no test of ranking: in the first steps the loss pushes the
    half whose output opposes the FFN's sum down faster than an unread neuron; the MLP block
    above checks the FFN pass.)"""
    from tests.transformer_models import build

    model, (ids,), _ = build("bert")
    model.eval()
    with torch.no_grad():
        model.encoder.layer[0].attention.output.dense.weight[:, 16:32] = 0  # head 1: unread
    torch.manual_seed(1)
    batches = [torch.randint(0, 100, (4, 8)) for _ in range(2)]
    with torch.no_grad():
        targets = [model(b)[0] for b in batches]
    calls = []

    def train_fn(gated):
        calls.append(gated.logits.numel())
        opt = torch.optim.Adam(gated.parameters(), lr=0.1)
        for i in range(20):
            opt.zero_grad()
            out, t = gated(batches[i % 2]).last_hidden_state, targets[i % 2]
            (F.mse_loss(out, t) / t.var()).backward()
            opt.step()

    kw = {"importance": "learned", "train_fn": train_fn}
    res = fxprune.compile(model, ids, heads=0.25, ffn=0.25, **kw)
    assert calls == [8, 256]  # 2 layers x 4 heads, then 2 x 128 neurons
    rep = fxprune.verify.equivalence(model, res, ids)
    assert rep.ok and rep.pruning_effect > 1e-3, rep.message
    heads = res.plan.passes[0]["kept"]
    assert _gone(heads["encoder.layer.0.attention.self.query"], 64, 16) == [1]
