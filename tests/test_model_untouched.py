"""The user's model is never touched (each submodule's training flag, weights, structure), in-place
pruning is all or nothing, hooks are refused by name, and a pruned graph put in train mode
trains like the dense model or refuses with the reason."""

from __future__ import annotations

import collections
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune
from fxprune.errors import ConfigError, PassError, TrainModeError, UnsupportedModelError
from fxprune.verify.proof import zeroed_dense
from tests.conftest import randomize


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(self.drop(self.b(self.a(x)).mean((2, 3))))


class FunctionalDropout(Net):
    def forward(self, x):
        y = self.b(self.a(x)).mean((2, 3))
        return self.fc(F.dropout(y, 0.5, training=self.training))


class TrainBranch(Net):
    def forward(self, x):
        y = self.b(self.a(x)).mean((2, 3))
        if self.training:
            y = y * 2
        return self.fc(y)


class TrainUntraceable(Net):
    def forward(self, x):
        y = self.b(self.a(x)).mean((2, 3))
        if self.training and y.sum() > 0:  # data-dependent: torch.fx cannot trace it
            y = y * 2
        return self.fc(y)


def net(cls=Net):
    torch.manual_seed(0)
    return randomize(cls()), torch.randn(4, 3, 8, 8)


def flags(m):
    return {n: s.training for n, s in m.named_modules()}


@pytest.mark.parametrize(
    "run",
    [
        lambda m, x: fxprune.compile(m, x, channels=0.5, ignore=["fc"]),
        lambda m, x: fxprune.estimate(m, x, structured=0.5, hardware=("cpu",)),
        lambda m, x: fxprune.sensitivity(m, x, lambda mod: float(mod(x).sum()), ratios=(0.5,)),
        lambda m, x: fxprune.iterative_prune(
            m, x, steps=2, channels=0.5, ignore=["fc"], evaluate=lambda mod: 0.0
        ),
    ],
    ids=["compile", "estimate", "sensitivity", "iterative_prune"],
)
def test_each_submodule_keeps_its_own_training_flag(run):
    model, x = net()
    model.train()
    model.a[1].eval()  # a frozen BN inside a training model
    before, state = flags(model), {k: v.clone() for k, v in model.state_dict().items()}
    run(model, x)
    assert flags(model) == before
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_result_mirrors_the_flags_and_trains_like_the_dense_model():
    model, x = net()
    model.train()
    model.a[1].eval()
    res = fxprune.compile(model, x, channels=0.5, ignore=["fc"])
    pruned = res.module
    assert pruned.training and not pruned.get_submodule("a.1").training
    assert pruned.get_submodule("b.1").training
    ref = zeroed_dense(model, res)
    ref.train()
    ref.get_submodule("a.1").eval()
    # dropout is live in the pruned model: two calls differ, as in the dense model
    assert not torch.equal(pruned(x), pruned(x))
    pruned.drop.p = ref.drop.p = 0.0  # its masks cannot match on fewer features: compare BN
    for m in (pruned, ref):  # the calls above moved the running statistics: start both again
        for bn in (m.get_submodule("b.1"),):
            bn.reset_running_stats()
    y, y_ref = pruned(x), ref(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)  # batch statistics, not running
    kept = res.plan.passes[0]["kept"]["b.0"]
    torch.testing.assert_close(
        pruned.get_submodule("b.1").running_mean, ref.get_submodule("b.1").running_mean[kept]
    )
    assert pruned.get_submodule("b.1").num_batches_tracked.item() == 1  # statistics updated
    assert not torch.equal(pruned.eval()(x), y)


@pytest.mark.parametrize("cls", [FunctionalDropout, TrainBranch])
def test_a_graph_that_would_not_train_like_the_model_refuses_train(cls):
    model, x = net(cls)
    model.train()
    res = fxprune.compile(model, x, channels=0.5, ignore=["fc"])
    assert not res.module.training  # put in eval: it cannot honour train mode
    with pytest.raises(TrainModeError, match="in train mode as"):
        res.module.train()
    res.module.eval()  # eval stays fine
    assert flags(model)[""] is True  # the user's model keeps its flag


def test_a_forward_that_does_not_trace_in_train_mode_refuses_train():
    model, x = net(TrainUntraceable)
    res = fxprune.compile(model.eval(), x, channels=0.5, ignore=["fc"])
    with pytest.raises(TrainModeError, match="its forward does not trace in train mode"):
        res.module.train()
    assert flags(model)[""] is False  # the user's model keeps its flag


def test_torch_export_capture_refuses_train():
    model, x = net()
    res = fxprune.compile(model.eval(), x, channels=0.5, ignore=["fc"], mode="export")
    with pytest.raises(TrainModeError, match="torch.export"):
        res.module.train()
    with pytest.raises(TrainModeError):
        nn.Sequential(res.module).train()  # a parent's train() reaches it too


def test_inplace_changes_the_model_fully():
    model, x = net()
    model.train()
    model.a[1].eval()
    before = flags(model)
    res = fxprune.compile(model, x, channels=0.5, ignore=["fc"], inplace=True)
    assert model.a[0].weight.shape[0] == 4 and model.a[0].out_channels == 4
    assert model.a[0] is res.module.get_submodule("a.0")
    assert flags(model) == before
    assert model(x).shape == (4, 3)


def test_inplace_failure_leaves_the_model_as_it_was(monkeypatch):
    model, x = net()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    import fxprune.passes.nm as nm

    def broken(*a, **k):
        raise RuntimeError("boom")

    import dataclasses

    import fxprune.passes as passes

    monkeypatch.setattr(nm, "nm_masks", broken, raising=False)
    spec = passes.BY_CONFIG[nm.NM]  # the N:M pass, as the registry runs it
    monkeypatch.setitem(passes.BY_CONFIG, nm.NM, dataclasses.replace(spec, apply=broken))
    with pytest.raises(PassError):
        fxprune.compile(model, x, channels=0.5, ignore=["fc"], sparsity="2:4", inplace=True)
    assert model.a[0].weight.shape[0] == 8  # the channel pass ran, but only on the copy
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    "opts", [{"channels": 0.5}, {"channels": 0.5, "sparsity": "2:4"}, {"sparsity": "2:4"}]
)
def test_inplace_that_fails_late_leaves_every_tensor_unwritten(monkeypatch, opts):
    """Data-free channel pruning in place works over the model's own storage (no copy of the
    weights); the N:M pass writes its masks into weights, so with it the copy is a real one.
    Either way a compile that fails after the passes leaves every tensor of the model as it was:
    the same objects, the same values, not one in-place write."""
    import fxprune.materialize as mat

    model, x = net()
    model.eval()

    def own(m):
        return {**dict(m.named_parameters()), **dict(m.named_buffers())}

    tensors = {k: (v, v._version, v.clone()) for k, v in own(model).items()}

    def broken(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(mat, "materialize", broken)
    with pytest.raises(RuntimeError, match="boom"):
        fxprune.compile(model, x, ignore=["fc"], inplace=True, **opts)
    for k, v in own(model).items():
        same, version, value = tensors[k]
        assert v is same and v._version == version and torch.equal(v, value), k
    assert model.a[0].out_channels == 8


def test_inplace_under_torch_export_prunes_the_model_itself():
    """The export graph holds its own tensors; the module tree commits them into the model."""
    model, x = net()
    dense = copy.deepcopy(model).eval()
    res = fxprune.compile(model.eval(), x, channels=0.5, ignore=["fc"], inplace=True, mode="export")
    assert res.plan.mode == "export" and res.model is model
    assert model.a[0].weight.shape[0] == 4 and model.a[0].out_channels == 4
    with torch.no_grad():
        assert torch.allclose(model(x), res.module(x), atol=1e-6)
    assert fxprune.verify.equivalence(dense, res, x, target="model").ok


def test_inplace_is_refused_when_the_class_cannot_hold_the_pruned_layers():
    """A forward that hard-codes a width: the model cannot be pruned in place, and stays."""

    class Fixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 3)

        def forward(self, x):
            return self.b(self.a(x).view(-1, 8))

    torch.manual_seed(0)
    model, x = Fixed().eval(), torch.randn(2, 6)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match="inplace=True.*Fixed.*unchanged"):
        fxprune.compile(model, x, channels=0.5, ignore=["b"], inplace=True, mode="export")
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("where", ["", "b.0"])
def test_hooks_are_refused_with_the_module_name(where):
    model, x = net()
    model.get_submodule(where).register_forward_hook(lambda m, i, o: None)
    with pytest.raises(UnsupportedModelError, match=f"forward hook on '{where or 'Net'}'"):
        fxprune.compile(model.eval(), x, channels=0.5, ignore=["fc"])


class _OwnCopy(nn.Linear):
    def __deepcopy__(self, memo):  # a class that copies itself its own way
        new = nn.Linear.__new__(type(self))
        memo[id(self)] = new
        new.__dict__.update(copy.deepcopy(self.__dict__, memo))
        new.copied_its_way = True
        return new


def _layout(root) -> list:
    """Every object reachable from ``root`` (module state, containers) in visiting order: its
    type, atoms by value, tensors by storage and flags, each object named by the index of its
    first visit, so two copies with the same layout make the same objects and the same sharing."""
    index: dict[int, int] = {}
    out: list = []

    def walk(x):
        if isinstance(x, (int, float, str, bytes, type(None), type, torch.dtype)):
            out.append(x)
            return
        if id(x) in index:
            out.append(("seen", index[id(x)]))
            return
        index[id(x)] = len(index)
        out.append(type(x))
        if isinstance(x, torch.Tensor):
            out.append((x.data_ptr(), tuple(x.shape), x.requires_grad))
        elif isinstance(x, dict):
            for k, v in x.items():
                walk(k)
                walk(v)
        elif isinstance(x, (list, tuple, set)):
            for v in x if not isinstance(x, set) else sorted(x, key=repr):
                walk(v)
        elif hasattr(x, "__dict__"):
            walk(x.__dict__)

    walk(root)
    return out


def test_the_shared_copy_makes_what_deepcopy_makes():
    """``shared_copy`` copies the module tree itself (copy's generic path is most of its cost)
    and hands the rest to ``copy.deepcopy``: the objects, their sharing, a class's own
    ``__deepcopy__`` and every container come out as ``copy.deepcopy`` with the same memo makes
    them, and nothing mutable is the original's but the buffers."""
    from fxprune.modelstate import shared_copy

    model = Net()
    shared = nn.Linear(8, 8)
    model.twice = nn.ModuleList([shared, shared, _OwnCopy(8, 2)])
    model.fc.weight.requires_grad_(False)
    model.register_buffer("scale", torch.ones(3), persistent=False)
    model.config = {"sizes": [8, 8], "name": "net", "nested": {"t": (1, [2])}}
    empty = collections.OrderedDict()
    model.a[0].extra = model.b[0].extra = empty  # one empty dict, held twice
    model.a[0].pair = (3, "x")

    def reference(m):
        memo: dict[int, object] = {}
        for p in m.parameters():
            memo[id(p)] = nn.Parameter(p.detach(), requires_grad=p.requires_grad)
        for b in m.buffers():
            memo[id(b)] = b
        return copy.deepcopy(m, memo)

    got, want = shared_copy(model), reference(model)
    assert _layout(got) == _layout(want)
    assert got.twice[2].copied_its_way and got.twice[0] is got.twice[1]
    assert got.a[0].extra is got.b[0].extra and got.a[0].extra is not model.a[0].extra
    assert got.config is not model.config and got.config["sizes"] is not model.config["sizes"]
    for (name, p), q in zip(model.named_parameters(), got.parameters(), strict=True):
        assert q is not p and q.data_ptr() == p.data_ptr(), name
    assert all(b is c for b, c in zip(model.buffers(), got.buffers(), strict=True))
