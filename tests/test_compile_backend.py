"""fxprune inside torch.compile: pruned results compile with inductor, and ``fxprune.backend``
replays a plan (or runs a recipe) on the graphs dynamo captures, graph breaks included."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune
from fxprune.errors import CheckpointError, ConfigError, PlanError, TrainModeError
from fxprune.passes import Channels
from tests.conftest import randomize
from tests.transformer_models import build

tv = pytest.importorskip("torchvision")
dynamo_exc = pytest.importorskip("torch._dynamo.exc")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _hidden(out):
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out


def _raised(call, *args):
    """The fxprune error a backend raised (dynamo wraps it in BackendCompilerFailed)."""
    with pytest.raises(dynamo_exc.BackendCompilerFailed) as info:
        call(*args)
    return info.value.inner_exception


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    m = randomize(tv.models.resnet18())
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return m, x, fxprune.compile(m, x, channels=0.5, ignore=["fc"])


@pytest.fixture(scope="module")
def bert():
    m, x, _ = build("bert")
    return m, x, fxprune.compile(m, x, heads=0.5, ffn=0.5)


class Chain(nn.Module):
    """Three convs and a classifier."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv3 = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        x = F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))
        return self.fc(F.relu(self.conv3(x)).mean((2, 3)))


class Split(Chain):
    """A graph break after the second conv: conv2's channels cross it."""

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        torch._dynamo.graph_break()
        return self.fc(F.relu(self.conv3(x)).mean((2, 3)))


class Inner(nn.Module):
    def __init__(self, cin=8):
        super().__init__()
        self.conv_a, self.conv_b = nn.Conv2d(cin, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        x = self.conv_b(F.relu(self.conv_a(x)))
        torch._dynamo.graph_break()  # inside a submodule: dynamo compiles Inner.forward alone
        return F.relu(x)


class Nested(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.block, self.fc = nn.Conv2d(3, 8, 3), Inner(), nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(self.block(self.stem(x)).mean((2, 3)))


class BlockFirst(nn.Module):
    """The block's frame is the first graph dynamo compiles (nothing runs before it)."""

    def __init__(self):
        super().__init__()
        self.block, self.fc = Inner(3), nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(self.block(x).mean((2, 3)))


def _small(cls, seed=0):
    torch.manual_seed(seed)
    return randomize(cls()), torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(2))


# ---- pruned results under torch.compile (inductor) ---------------------------------------------


@pytest.mark.slow  # four inductor compiles; the backend test below compiles with inductor too
@pytest.mark.parametrize("family", ["resnet", "bert"])
def test_pruned_results_compile_with_inductor(family, request):
    _, x, res = request.getfixturevalue(family)
    x = x if isinstance(x, tuple) else (x,)
    assert res.materialized, res.model_note
    with torch.no_grad():
        for target in (res.model, res.module):
            want = _hidden(target(*x))
            got = _hidden(torch.compile(target)(*x))
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
            torch._dynamo.reset()


# ---- fxprune.backend: exact replay inside dynamo -------------------------------------------------


def test_backend_replays_a_plan_on_resnet18(resnet):
    m, x, res = resnet
    b = fxprune.backend(res.plan, compiler="aot_eager")  # AOT over the pruned get_attr weights
    with torch.no_grad():
        got = torch.compile(m, backend=b)(x)
        torch.testing.assert_close(got, res.module(x), rtol=1e-4, atol=1e-5)
    (g,) = b.report.graphs
    assert g.shapes["layer1.0.conv1.weight"] == [[64, 64, 3, 3], [32, 32, 3, 3]]
    assert g.shapes["fc.weight"] == [[1000, 512], [1000, 256]]
    assert g.params_after == sum(p.numel() for p in res.module.parameters())
    assert g.params_after < 0.3 * g.params_before
    assert sorted(g.layers) == sorted(b.report.plan_layers) and not b.report.missing
    assert "0/0" in b.report.table() and json.loads(b.report.to_json())["graphs"]


def test_backend_hands_the_pruned_graph_to_inductor():
    m, x = _small(Chain)
    res = fxprune.compile(m, x, channels=0.5, ignore=["fc"])
    b = fxprune.backend(res.plan)  # the default compiler: inductor
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(m, backend=b)(x), res.module(x))
    assert b.report.graphs[0].shapes["conv2.weight"] == [[16, 16, 3, 3], [8, 8, 3, 3]]


def test_backend_replays_heads_and_ffn_on_bert(bert):
    m, x, res = bert
    b = fxprune.backend(res.plan, compiler="eager")
    with torch.no_grad():
        got = _hidden(torch.compile(m, backend=b)(*x))
        torch.testing.assert_close(got, _hidden(res.module(*x)), rtol=1e-4, atol=1e-5)
        # another sequence length: dynamo recompiles with a symbolic length, pruned again
        x2 = (torch.randint(0, 100, (3, 11), generator=torch.Generator().manual_seed(3)),)
        got2 = _hidden(torch.compile(m, backend=b)(*x2))
        torch.testing.assert_close(got2, _hidden(res.module(*x2)), rtol=1e-4, atol=1e-5)
    g = b.report.graphs[0]
    q = "encoder.layer.0.attention.self.query.weight"
    assert g.shapes[q] == [[64, 64], [32, 64]]
    assert g.shapes["encoder.layer.1.intermediate.dense.weight"] == [[128, 64], [64, 64]]
    assert g.params_after == sum(p.numel() for p in res.module.parameters())
    assert len(b.report.graphs) == 2 and b.report.graphs[1].compile_id == "0/1"


def test_backend_reads_plan_files_checkpoints_and_results(tmp_path):
    m, x = _small(Chain)
    res = fxprune.compile(m, x, channels=0.5, ignore=["fc"])
    (tmp_path / "p.json").write_text(res.plan.to_json())
    with torch.no_grad():
        for p in res.module.parameters():  # "fine-tuned" pruned weights: only a checkpoint has them
            p.add_(0.01)
    res.save(tmp_path / "c.pt")
    tuned = fxprune.load(tmp_path / "c.pt", m).module
    replayed = fxprune.apply_plan(m, res.plan).module
    with torch.no_grad():
        for source, want in [
            (str(tmp_path / "p.json"), replayed),
            (res.plan.to_json(), replayed),
            (tmp_path / "c.pt", tuned),
            (res, tuned),
        ]:
            torch._dynamo.reset()
            got = torch.compile(m, backend=fxprune.backend(source, compiler="eager"))(x)
            torch.testing.assert_close(got, want(x), rtol=1e-5, atol=1e-6)


def test_backend_runs_a_recipe_or_keywords(tmp_path):
    m, x = _small(Chain)
    want = fxprune.compile(m, x, channels=0.5, ignore=["fc"]).module
    recipe = fxprune.Recipe([Channels(0.5, ignore=("fc",))])
    path = recipe.save(tmp_path / "r.json")
    with torch.no_grad():
        for source, kw in [(recipe, {}), (path, {}), (None, {"channels": 0.5, "ignore": ["fc"]})]:
            torch._dynamo.reset()
            b = fxprune.backend(source, compiler="eager", **kw)
            torch.testing.assert_close(torch.compile(m, backend=b)(x), want(x))
            assert b.report.graphs[0].layers == ["conv1", "conv2", "conv3"]


# ---- graph breaks --------------------------------------------------------------------------------


def test_a_plan_across_a_graph_break_is_refused():
    m, x = _small(Split)
    res = fxprune.compile(m, x, channels=0.5, ignore=["fc"])  # conv2 feeds conv3 after the break
    b = fxprune.backend(res.plan, compiler="eager")
    err = _raised(torch.compile(m, backend=b), x)
    assert isinstance(err, PlanError)
    msg = str(err)
    assert "conv2" in msg and "graph break" in msg and "test_compile_backend.py" in msg
    assert "conv1" not in msg.split("in graph")[0]  # conv1's group stays inside graph 0
    assert b.report.errors and "PlanError" in b.report.errors[0]


def test_each_graph_of_a_split_forward_prunes_its_own_layers():
    m, x = _small(Split)
    res = fxprune.compile(m, x, channels=0.5, ignore=["fc", "conv2"])
    b = fxprune.backend(res.plan, compiler="eager")
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(m, backend=b)(x), res.module(x))
    g0, g1 = b.report.graphs
    assert g0.layers == ["conv1"] and "graph break at test_compile_backend.py" in g0.ends
    assert g1.layers == ["conv3"] and g1.frame.startswith("torch_dynamo_resume_in_forward")
    assert g1.shapes["conv3.weight"] == [[16, 16, 3, 3], [8, 16, 3, 3]]
    # a recipe keeps what crosses the break and says so
    rb = fxprune.backend(channels=0.5, ignore=["fc"], compiler="eager")
    with torch.no_grad():
        torch.compile(m, backend=rb)(x)
    assert rb.report.graphs[0].layers == ["conv1"] and "conv2" in rb.report.graphs[0].kept_at_break


def test_a_break_inside_a_submodule_keeps_the_model_names():
    m, x = _small(Nested)
    # the stem feeds the block's own graph: only conv_a -> conv_b stays inside one graph
    res = fxprune.compile(m, x, channels=0.5, ignore=["fc", "stem", "block.conv_b"])
    b = fxprune.backend(res.plan, compiler="eager")
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(m, backend=b)(x), res.module(x))
    pruned = {la: g.compile_id for g in b.report.graphs for la in g.layers}
    assert pruned == {"block.conv_a": "1/0"}  # Inner.forward's frame, named as in the model
    assert not b.report.missing
    crossing = fxprune.compile(m, x, channels=0.5, ignore=["fc", "block.conv_b"])
    torch._dynamo.reset()
    err = _raised(torch.compile(m, backend=fxprune.backend(crossing.plan, compiler="eager")), x)
    assert isinstance(err, PlanError) and "stem" in str(err)
    first, x = _small(BlockFirst)
    res = fxprune.compile(first, x, channels=0.5, ignore=["fc", "block.conv_b"])
    b = fxprune.backend(res.plan, compiler="eager")
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(first, backend=b)(x), res.module(x))
    assert b.report.pruned_layers == ["block.conv_a"] and not b.report.missing


# ---- refusals ------------------------------------------------------------------------------------


def test_a_plan_for_another_model_is_refused(bert):
    m, x = _small(Split)
    b = fxprune.backend(bert[2].plan, compiler="eager")
    err = _raised(torch.compile(m, backend=b), x)
    assert isinstance(err, PlanError) and "does not have" in str(err)
    assert "encoder.layer.0" in str(err)


def test_refusals_name_the_problem(tmp_path):
    m, x = _small(Split)
    with pytest.raises(ConfigError, match="not a dynamo backend"):
        fxprune.backend(channels=0.5, compiler="no-such-backend")
    with pytest.raises(ConfigError, match="calibration"):
        fxprune.backend(channels=0.5, calibration=[x])
    with pytest.raises(ConfigError, match="without a source"):
        fxprune.backend(fxprune.Recipe([Channels(0.5)]), channels=0.5)
    with pytest.raises(ConfigError, match="is not a file"):
        fxprune.backend(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(CheckpointError):
        fxprune.backend(tmp_path / "junk.pt")
    taylor = fxprune.backend(channels=0.5, importance="taylor", compiler="eager")
    assert "calibration" in str(_raised(torch.compile(m, backend=taylor), x))
    m.train()
    err = _raised(torch.compile(m, backend=fxprune.backend(channels=0.5, compiler="eager")), x)
    assert isinstance(err, TrainModeError) and "eval()" in str(err)
