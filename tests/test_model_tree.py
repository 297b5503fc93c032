"""``result.model``: the user's own class rebuilt smaller keeps what a graph module loses (train
mode, hooks, methods, torch.compile), and a tree that would compute something else is never
offered."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import fxprune
import fxprune.materialize as mat
from tests.conftest import randomize
from tests.transformer_models import build

tv = pytest.importorskip("torchvision")


def _resnet():
    torch.manual_seed(0)
    return randomize(tv.models.resnet18(num_classes=10)), torch.randn(2, 3, 32, 32)


def test_layers_get_their_new_sizes_and_the_tree_trains():
    model, x = _resnet()
    res = fxprune.compile(model, x, channels=0.5, ignore=["fc"])
    tree = res.model
    assert type(tree) is tv.models.ResNet and res.materialized and not res.model_note
    c = tree.layer1[0].conv1
    assert c.out_channels == c.weight.shape[0] == 32 and tree.layer1[0].bn1.num_features == 32
    assert tree.fc.in_features == tree.fc.weight.shape[1] == 256
    # train mode is real: BatchNorm statistics move, gradients reach every layer
    tree.train()
    before = tree.layer1[0].bn1.running_mean.clone()
    tree(x).sum().backward()
    assert not torch.equal(before, tree.layer1[0].bn1.running_mean)
    assert tree.conv1.weight.grad is not None
    tree.eval()
    # hooks registered on it run; torch.compile traces it
    seen = []
    h = tree.layer2.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    with torch.no_grad():
        ref = tree(x)
        torch.testing.assert_close(torch.compile(tree, backend="eager")(x), ref)
    h.remove()
    assert seen and seen[0][1] == 64


def test_dropout_stays_live_in_the_trees_train_mode():
    model, (ids,), _ = build("bert")
    model.config.hidden_dropout_prob = 0.5
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.5
    res = fxprune.compile(model.eval(), ids, heads=0.5, ffn=0.5)
    tree = res.model.train()
    with torch.no_grad():
        a, b = tree(ids).last_hidden_state, tree(ids).last_hidden_state
    assert not torch.equal(a, b)  # dropout draws anew each call
    tree.eval()
    with torch.no_grad():
        torch.testing.assert_close(tree(ids).last_hidden_state, tree(ids).last_hidden_state)


def test_a_missed_attribute_is_caught_not_offered(monkeypatch):
    """Without the head-count fix GPT-2's split_size stays 64 after its heads shrank to 32
    wide: the tree no longer computes what the graph does, so compile keeps the graph module."""
    model, (ids,), _ = build("gpt2")
    monkeypatch.setitem(
        mat.MODULES, "transformers.models.gpt2.modeling_gpt2.GPT2Attention", lambda m, s: None
    )
    res = fxprune.compile(model.eval(), ids, heads=0.5)
    assert res.model is res.module and not res.materialized
    assert "does not compute what the pruned graph does" in res.model_note
    assert "GPT2Attention" in res.model_note  # the innermost module that raised


def test_a_hard_coded_width_falls_back_and_names_the_module():
    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 3)

        def forward(self, x):
            return self.fc(x.reshape(x.shape[0], 8))  # 8 written into the forward

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.head = nn.Linear(6, 8), Head()

        def forward(self, x):
            return self.head(torch.relu(self.a(x)))

    torch.manual_seed(0)
    model, x = Net().eval(), torch.randn(2, 6)
    res = fxprune.compile(model, x, channels=0.5, ignore=["head.fc"])
    assert res.model is res.module
    assert "raised in head (Head)" in res.model_note
    assert fxprune.verify.equivalence(model, res, x).ok  # the graph module itself is exact


def test_a_tree_that_traces_to_the_graph_is_proved_without_running_it(monkeypatch):
    """ResNet's rebuilt tree traces (torch.fx) to the pruned graph's own code over the graph's
    own layers: that holds for every input, so no forward runs. A tree with the same code whose
    layer is another object is run against the graph instead, and a wrong one is caught."""
    model, x = _resnet()
    ran = []
    real = mat.agreement
    monkeypatch.setattr(mat, "agreement", lambda *a, **k: ran.append(1) or real(*a, **k))
    res = fxprune.compile(model, x, channels=0.5, ignore=["fc"])
    assert res.materialized and not ran
    with torch.no_grad():
        torch.testing.assert_close(res.model(x), res.module(x), rtol=0, atol=0)

    build_tree = mat.materialize

    def swapped(tree, gm, results, hf_config=None):
        build_tree(tree, gm, results, hf_config)
        conv = copy.deepcopy(tree.layer1[0].conv1)
        with torch.no_grad():
            conv.weight.mul_(2)
        tree.layer1[0].conv1 = conv  # same code, another layer than the graph's

    monkeypatch.setattr(mat, "materialize", swapped)
    res = fxprune.compile(model, x, channels=0.5, ignore=["fc"])
    assert ran and res.model is res.module and not res.materialized
    assert "does not compute what the pruned graph does" in res.model_note


def test_removed_blocks_leave_the_list():
    torch.manual_seed(0)
    model, x = randomize(tv.models.resnet50(num_classes=10)), torch.randn(1, 3, 64, 64)
    res = fxprune.compile(model, x, blocks=2, calibration=[x])
    assert len(res.passes[0].details["removed"]) == 2
    assert sum(len(getattr(res.model, f"layer{i}")) for i in range(1, 5)) == 16 - 2
    assert fxprune.verify.equivalence(model, res, x, target="model").ok


def test_target_is_checked():
    model, x = _resnet()
    res = fxprune.compile(model, x, channels=0.5, ignore=["fc"])
    with pytest.raises(fxprune.errors.ConfigError, match="target="):
        fxprune.verify.equivalence(model, res, x, target="graph")


class _LoneBottle2neck(nn.Module):
    def __init__(self):
        super().__init__()
        from timm.models import res2net

        self.stem = nn.Conv2d(3, 64, 1)
        self.block = res2net.Bottle2neck(64, 16, norm_layer=nn.BatchNorm2d)
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        return self.head(self.block(self.stem(x)).mean((2, 3)))


def test_split_parts_each_keep_their_share():
    """One timm Bottle2neck alone: conv1's outputs split four ways (three feed convs, the last
    passes by). Parts 0 and 3 come from conv1 alone, so by sources they were one group, and
    channels=0.5 could remove all of part 0 (a 0-wide conv input the fake-tensor check let
    through). Grouped by consumers as well, every part keeps half, and the tree is a
    Bottle2neck of width 3."""
    pytest.importorskip("timm")
    torch.manual_seed(0)
    model = randomize(_LoneBottle2neck()).eval()
    x = torch.randn(2, 3, 8, 8)
    res = fxprune.compile(model, x, channels=0.5)
    block = res.model.block
    assert res.materialized and block.width == 3 and block.conv1.out_channels == 12
    assert [c.in_channels for c in block.convs] == [3, 3, 3]
    assert fxprune.verify.equivalence(model, res, x, target="model").ok


def test_a_pruned_graph_that_fails_its_own_example_is_a_pass_error(monkeypatch):
    """Should the passes ever leave a graph that fails its own example (the fake-tensor check
    missed it), compile raises a PassError naming it, not a raw RuntimeError, and the user's
    model is untouched."""
    pytest.importorskip("timm")
    torch.manual_seed(0)
    model = randomize(_LoneBottle2neck()).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def broken(gm, work, args):
        raise RuntimeError("The size of tensor a (0) must match the size of tensor b (3)")

    monkeypatch.setattr(mat, "agreement", broken)
    monkeypatch.setattr(mat, "same_capture", lambda *a: False)  # the check that runs them
    with pytest.raises(fxprune.errors.PassError, match="does not run on the example"):
        fxprune.compile(model, torch.randn(2, 3, 8, 8), channels=0.5)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


_FSDP_SCRIPT = r"""
import copy, sys, torch, torch.distributed as dist
from torch.distributed.fsdp import fully_shard
import fxprune
from tests.transformer_models import build

dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
model, (ids,), _ = build("llama")
res = fxprune.compile(model.eval(), ids, heads=0.5, ffn=0.5)
tree, plain = res.model, copy.deepcopy(res.model)
with torch.no_grad():
    ref = plain(ids).last_hidden_state
for layer in tree.layers:
    fully_shard(layer)
fully_shard(tree)
# optimizers before any forward, as FSDP asks: they must hold the sharded parameters
opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (tree, plain)]
assert isinstance(tree, type(plain)) and type(tree) is not type(plain)
with torch.no_grad():
    assert torch.equal(tree(ids).last_hidden_state, ref), "sharded forward differs"
# one training step, sharded and plain, lands on the same weights
for m, opt in zip((tree, plain), opts):
    m.train()
    m(ids).last_hidden_state.square().mean().backward()
    opt.step()
    m.eval()
with torch.no_grad():
    after = plain(ids).last_hidden_state
    torch.testing.assert_close(tree(ids).last_hidden_state, after, rtol=1e-5, atol=1e-6)
    assert not torch.equal(after, ref)
dist.destroy_process_group()
print("FSDP OK")
"""


def test_the_tree_wraps_in_fsdp_and_trains(tmp_path):
    """FSDP2 ``fully_shard`` (one CPU process, gloo) wraps the pruned tree per decoder layer:
    the sharded forward equals the plain one, and a training step lands on the same weights.
    A process of its own, so the process group never leaks into other tests."""
    import os
    import subprocess
    import sys

    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run(
        [sys.executable, "-c", _FSDP_SCRIPT, str(tmp_path / "pg")],
        capture_output=True,
        text=True,
        env=env,
        cwd=root,
        timeout=600,
    )
    assert out.returncode == 0 and "FSDP OK" in out.stdout, out.stderr[-3000:]


def test_module_attributes_are_read_as_getattr_reads_them():
    """The fixes probe ~30 names on every module without raising Module.__getattr__'s error
    for each (``_util.module_attr``): a child, a property, an instance attribute and a
    parameter under a probed name are found exactly as ``getattr`` finds them (a parameter or
    buffer, never a module, reads as None)."""
    from fxprune._util import module_attr as _module_attr
    from fxprune.layer_fixes import _first

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(4, 4)
            self.q = nn.Parameter(torch.zeros(2))  # a parameter named like a projection
            self.k_proj = nn.Linear(4, 8)

        @property
        def query(self):  # a property handing out a child
            return self.inner

    m = Attn()
    m.__dict__["wk"] = nn.Linear(4, 2)  # an instance attribute outside _modules
    for name in ("q_proj", "query", "q", "k_proj", "wk", "key", "nothing", "training"):
        want = getattr(m, name, None)
        got = _module_attr(m, name)
        assert got is want if isinstance(want, (nn.Module, bool)) else got is None
    assert _first(m, ("q_proj", "query", "q")) == ("query", m.inner)
    assert _first(m, ("k", "wk", "k_proj")) == ("wk", m.wk)
