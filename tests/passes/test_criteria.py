"""FPGM and LAMP on fxprune's units: FPGM removes the filter at the geometric median even when
magnitude would not; LAMP keeps l2's order inside a group and is scale-free across groups."""

import copy

import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune.graph import build_graph, trace
from fxprune.importance import unit_scores


class Two(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(4, 8, 3, padding=1, bias=False)
        self.b = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.c = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def _model():
    torch.manual_seed(0)
    m = Two().eval()
    with torch.no_grad():
        centre = torch.randn(4, 3, 3) * 3
        for i in range(8):  # every filter = centre + noise; filter 5 is the centre itself
            m.a.weight[i] = centre + (0 if i == 5 else 1.0) * torch.randn(4, 3, 3)
        m.b.weight[:, 5] *= 10  # its consumer columns are large: magnitude would keep it
    return m, torch.randn(1, 4, 8, 8)


def test_fpgm_removes_the_filter_at_the_geometric_median():
    m, x = _model()
    res = fxprune.compile(
        m, x, channels=0.125, importance="fpgm", ignore=["c"], layer_ratios={"b": 0.0}
    )
    assert res.plan.passes[0]["kept"]["a"] == [0, 1, 2, 3, 4, 6, 7]
    assert fxprune.verify.equivalence(m, res, x).ok
    l1 = fxprune.compile(
        m, x, channels=0.125, importance="l1", ignore=["c"], layer_ratios={"b": 0.0}
    )
    assert 5 in l1.plan.passes[0]["kept"]["a"]


def test_lamp_keeps_l2_order_in_a_group_and_is_scale_free():
    m, x = _model()
    g = build_graph(trace(m, x).gm)
    lamp, l2 = unit_scores(g, "lamp"), unit_scores(g, "l2")
    for grp in g.groups:
        assert sorted(grp.units, key=lamp.get) == sorted(grp.units, key=l2.get)
        assert max(lamp[u] for u in grp.units) == pytest.approx(1.0)  # the largest: 1
    # by definition: its squared l2 over the squared l2 of the units at least as large
    grp = g.groups[0]
    sq = {u: l2[u] ** 2 for u in grp.units}
    for u in grp.units:
        tail = sum(v for v in sq.values() if v >= sq[u])
        assert lamp[u] == pytest.approx(sq[u] / tail)


@pytest.mark.parametrize("importance", [pytest.param("fpgm", marks=pytest.mark.slow), "lamp"])
def test_new_criteria_are_exact_on_resnet(importance):
    torchvision = pytest.importorskip("torchvision")
    m, x = torchvision.models.resnet18().eval(), torch.randn(1, 3, 64, 64)
    res = fxprune.compile(
        m,
        x,
        channels=0.5,
        importance=importance,
        ignore=["fc"],
        global_ranking=importance == "lamp",
    )
    assert fxprune.verify.equivalence(m, res, x).ok and res.summary.macs_ratio < 0.8


@pytest.mark.parametrize("importance", ["l1", "l2"])
def test_half_precision_weights_score_like_their_float32_values(importance):
    """bf16 weights are cast into the float32 scratch buffer, not copied: the same scores."""
    m, x = _model()
    half = copy.deepcopy(m).to(torch.bfloat16)
    ref = copy.deepcopy(half).float()  # the bf16 values, in float32
    scores = []
    for net, inp in ((half, x.to(torch.bfloat16)), (ref, x)):
        graph = build_graph(trace(net, (inp,)).gm)
        scores.append(unit_scores(graph, importance))
    assert scores[0].keys() == scores[1].keys()
    for u in scores[0]:
        assert scores[0][u] == pytest.approx(scores[1][u], rel=1e-6)


@pytest.mark.parametrize("criterion", ["l1", "l2", "fpgm", "lamp", "random"])
def test_scoring_some_groups_reads_only_their_weights(criterion, monkeypatch):
    """A heads / FFN pass scores its own groups: the embedding and every other hidden-size
    weight are never read, and the scores equal those of a whole-graph scoring."""
    from tests.transformer_models import build

    model, (ids,), _ = build("llama")
    graph = build_graph(trace(model.eval(), ids, mode="export").gm)
    wanted = [g for g in graph.groups if g.kind in ("heads", "ffn")][:2]
    read = []
    real = graph.gm.get_parameter
    monkeypatch.setattr(graph.gm, "get_parameter", lambda n: read.append(n) or real(n))
    full = unit_scores(graph, criterion)
    everything, read[:] = set(read), []
    some = unit_scores(graph, criterion, groups=wanted)
    assert some == {u: full[u] for g in wanted for u in g.units}
    if criterion != "random":
        assert read and all(n.startswith("layers.0.") for n in read), read  # layer 0's groups
        assert any("embed" in n for n in everything) or criterion == "fpgm"


def _inverted():
    """A user criterion: the larger a unit's l1, the less important (removes the largest)."""
    from fxprune.importance import Criterion, unit_scores

    class InvertedL1(Criterion):
        name = "inverted_l1"

        def score(self, graph, groups, stats=None, seed=0):
            return {u: -s for u, s in unit_scores(graph, "l1", groups=groups).items()}

    return InvertedL1


def test_a_user_criterion_works_by_instance_and_by_registered_name(monkeypatch):
    from fxprune import importance as imp

    m, x = _model()
    kw = {"channels": 0.25, "ignore": ["c"], "layer_ratios": {"b": 0.0}}
    cls = _inverted()
    res = fxprune.compile(m, x, importance=cls(), **kw)
    kept = res.plan.passes[0]["kept"]["a"]
    l1 = fxprune.compile(m, x, importance="l1", **kw).plan.passes[0]["kept"]["a"]
    gone, gone_l1 = set(range(8)) - set(kept), set(range(8)) - set(l1)
    assert len(gone) == len(gone_l1) == 2 and not gone & gone_l1  # the largest, not the smallest
    assert (
        res.plan.config["importance"] == "inverted_l1" and fxprune.verify.equivalence(m, res, x).ok
    )
    monkeypatch.setitem(imp.REGISTRY, "inverted_l1", cls())
    again = fxprune.compile(m, x, importance="inverted_l1", **kw)
    assert again.plan.passes[0]["kept"]["a"] == kept
    with pytest.raises(fxprune.errors.ConfigError, match="inverted_l1"):  # the list names it
        fxprune.compile(m, x, importance="no_such", **kw)


def test_the_decorator_registers_and_a_data_criterion_gets_its_statistics(monkeypatch):
    from fxprune import importance as imp

    seen = []
    monkeypatch.setattr(imp, "REGISTRY", dict(imp.REGISTRY))

    @imp.criterion("loud")
    class Loud(imp.Criterion):
        needs = "activation"

        def score(self, graph, groups, stats=None, seed=0):
            seen.append(stats.activation.shape)
            return imp.REGISTRY["activation"].score(graph, groups, stats, seed)

    m, x = _model()
    res = fxprune.compile(m, x, channels=0.25, importance="loud", ignore=["c"])
    act = fxprune.compile(m, x, channels=0.25, importance="activation", ignore=["c"])
    assert seen and res.plan.passes[0]["kept"] == act.plan.passes[0]["kept"]
    with pytest.raises(fxprune.errors.ConfigError, match="Criterion subclass"):
        imp.criterion("bad")(object)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "shape,tracked",
    [
        ((40, 24), [0]),
        ((24, 40), [1]),
        ((16, 8, 3, 3), [0]),
        ((16, 8, 3, 3), [1]),
        ((16, 8, 3, 3), [0, 1]),
        ((16, 8, 1, 1), [0, 1]),
        ((40, 24), [0, 1]),
        ((9,), [0]),
    ],
)
def test_magnitude_sums_slab_by_slab_equal_the_whole_weights(dtype, shape, tracked, monkeypatch):
    """The L1 / L2 sums behind magnitude importance, made a slab of dim 0 at a time (several
    slabs here), equal the whole-weight float32 sums; the weight itself is not changed."""
    from fxprune import weight_norms as importance

    monkeypatch.setattr(importance, "_SLAB", 60)
    monkeypatch.setattr(importance, "_CHUNK", 50)
    torch.manual_seed(0)
    w = torch.randn(shape).to(dtype)
    keep = w.clone()
    rest = [k for k in range(w.ndim) if k not in tracked]
    for power in (1, 2):
        x = w.float().abs() if power == 1 else w.float().square()
        want = x.sum(dim=rest) if rest else x
        for slab in (60, 10**6):  # several slabs, and one piece
            monkeypatch.setattr(importance, "_SLAB", slab)
            scratch = torch.full((importance.slab(w)[1],), float("nan"))
            torch.testing.assert_close(importance.reduced(w, tracked, power, scratch), want)
    assert torch.equal(w, keep)
