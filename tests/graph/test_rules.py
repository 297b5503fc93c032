"""Each coupling rule on a tiny model: exact prune (pruned == zeroed dense) or a named barrier."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune
from fxprune.errors import NothingToPruneError
from fxprune.graph import build_graph, trace
from tests.conftest import assert_equivalent, randomize


def cbr(i, o, k=3, g=1):
    return nn.Sequential(nn.Conv2d(i, o, k, padding=k // 2, groups=g), nn.BatchNorm2d(o), nn.ReLU())


class Concat(nn.Module):  # concat offsets: the second part starts at 8
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = cbr(3, 8), cbr(3, 16), nn.Conv2d(24, 4, 1)

    def forward(self, x):
        return self.c(torch.cat([self.a(x), self.b(x)], dim=1))


class SplitSlice(nn.Module):  # chunk + slicing with offsets along channels
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = cbr(3, 16), nn.Conv2d(8, 4, 1), nn.Conv2d(6, 4, 1)

    def forward(self, x):
        y = self.a(x)
        p, q = y.chunk(2, dim=1)
        return self.b(p) + self.c(q[:, 2:])


class Grouped(nn.Module):  # grouped + depthwise convs and GroupNorm remove whole groups
    def __init__(self):
        super().__init__()
        self.a = cbr(3, 16)
        self.g = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.gn = nn.GroupNorm(4, 16)
        self.dw = nn.Conv2d(16, 32, 3, padding=1, groups=16)
        self.out = nn.Conv2d(32, 5, 1)

    def forward(self, x):
        return self.out(F.relu(self.dw(self.gn(self.g(self.a(x))))))


class FlattenLinear(nn.Module):  # flatten [C, H, W] into a Linear: columns go in blocks of H*W
    def __init__(self):
        super().__init__()
        self.a, self.fc = cbr(3, 8), nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.a(x), 4), 1))


class Shuffle(nn.Module):  # ShuffleNet-style split, concat and view/transpose shuffle
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = cbr(3, 16), cbr(8, 8, 1), nn.Conv2d(16, 4, 1)

    def forward(self, x):
        y = self.a(x)
        p, q = y.chunk(2, dim=1)
        y = torch.cat([p, self.b(q)], dim=1)
        n, c, h, w = y.shape
        y = y.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        return self.c(y)


class SE(nn.Module):  # squeeze-excitation: the scale couples the excitation FC to the channels
    def __init__(self):
        super().__init__()
        self.a = cbr(3, 16)
        self.fc1, self.fc2 = nn.Conv2d(16, 4, 1), nn.Conv2d(4, 16, 1)
        self.out = nn.Conv2d(16, 3, 1)

    def forward(self, x):
        y = self.a(x)
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(y, 1)))))
        return self.out(y * s + y)


class ChannelsLast(nn.Module):  # ConvNeXt-style permute, Linear on channels, layer scale
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 16)
        self.gamma = nn.Parameter(torch.rand(16) + 0.5)
        self.out = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        y = self.a(x)
        z = y.permute(0, 2, 3, 1)
        z = self.gamma * self.fc2(F.gelu(self.fc1(z)))
        return self.out(y + z.permute(0, 3, 1, 2))


class Misc(nn.Module):  # PReLU, InstanceNorm, ConvTranspose, interpolate, Conv1d via reshape
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.p = nn.PReLU(8)
        self.inorm = nn.InstanceNorm2d(8, affine=True)
        self.up = nn.ConvTranspose2d(8, 6, 2, stride=2)
        self.out = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        y = self.inorm(self.p(self.a(x)))
        y = F.interpolate(self.up(y), scale_factor=0.5)
        return self.out(y)


class Embed(nn.Module):
    def __init__(self):
        super().__init__()
        self.e, self.fc1, self.fc2 = nn.Embedding(20, 16), nn.Linear(16, 24), nn.Linear(24, 3)

    def forward(self, ids):
        return self.fc2(F.relu(self.fc1(self.e(ids)))).sum(1)


CASES = [Concat, SplitSlice, Grouped, FlattenLinear, Shuffle, SE, ChannelsLast, Misc]


@pytest.mark.parametrize("cls", CASES, ids=[c.__name__ for c in CASES])
@pytest.mark.parametrize("mode", ["fx", "export"])
def test_rule_exact(cls, mode):
    torch.manual_seed(0)
    model = randomize(cls())
    x = torch.randn(2, 3, 16, 16)
    assert_equivalent(model, x, channels=0.5, mode=mode)


def test_embedding_source_exact():
    torch.manual_seed(0)
    model = Embed().eval()
    ids = torch.randint(0, 20, (2, 7))
    res, _ = assert_equivalent(model, ids, channels=0.5)
    assert res.module.e.embedding_dim == 8


def test_grouped_removes_whole_groups():
    torch.manual_seed(0)
    model = randomize(Grouped())
    res, _ = assert_equivalent(model, torch.randn(1, 3, 16, 16), channels=0.5)
    g, gn = res.module.g, res.module.gn
    assert g.groups == 2 and g.in_channels == 8 and g.out_channels == 8
    assert gn.num_groups == 2 and gn.num_channels == 8


def test_concat_offsets_and_flatten_columns():
    torch.manual_seed(0)
    res, _ = assert_equivalent(randomize(Concat()), torch.randn(1, 3, 8, 8), channels=0.5)
    assert res.module.c.in_channels == 12
    res, _ = assert_equivalent(randomize(FlattenLinear()), torch.randn(1, 3, 8, 8), channels=0.5)
    assert res.module.fc.in_features == 4 * 16


class SoftmaxOverChannels(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 1)

    def forward(self, x):
        return self.b(torch.softmax(self.a(x), dim=1))


def barriers(model, x):
    return build_graph(trace(model, x).gm).barrier_report()


def test_barrier_names_node_and_layers():
    model, x = SoftmaxOverChannels(), torch.randn(1, 3, 4, 4)
    rows = [b for b in barriers(model, x) if b["layers"] == ["a"]]
    assert rows and "softmax" in rows[0]["node"] and "dim 1" in rows[0]["reason"]
    # nothing else is prunable: asking for channels says why instead of succeeding silently
    with pytest.raises(NothingToPruneError, match=r"softmax \(softmax: mixes values along dim 1"):
        fxprune.compile(model, x, channels=0.5)


def test_unknown_op_is_a_barrier():
    class Weird(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)

        def forward(self, x):
            return self.b(torch.fft.fft(self.a(x), dim=1).real)

    rows = barriers(Weird(), torch.randn(1, 3, 4, 4))
    assert any("no coupling rule" in b["reason"] and b["layers"] == ["a"] for b in rows)
    with pytest.raises(NothingToPruneError, match="no coupling rule"):
        fxprune.compile(Weird(), torch.randn(1, 3, 4, 4), channels=0.5)


class Conv1d3d(nn.Module):  # 1-d and 3-d convs, depthwise 1-d, BatchNorm1d/3d, GroupNorm in 3-d
    def __init__(self):
        super().__init__()
        self.c1 = nn.Sequential(nn.Conv1d(3, 8, 3, padding=1), nn.BatchNorm1d(8), nn.ReLU())
        self.dw = nn.Conv1d(8, 8, 3, padding=1, groups=8)
        self.c3 = nn.Sequential(nn.Conv3d(3, 8, 3, padding=1), nn.BatchNorm3d(8), nn.ReLU())
        self.gn = nn.GroupNorm(2, 8)
        self.out1, self.out3 = nn.Conv1d(8, 2, 1), nn.Conv3d(8, 2, 1)

    def forward(self, x1, x3):
        return self.out1(self.dw(self.c1(x1))).mean(), self.out3(self.gn(self.c3(x3)))


@pytest.mark.parametrize("mode", ["fx", "export"])
def test_conv1d_conv3d_exact(mode):
    torch.manual_seed(0)
    model = randomize(Conv1d3d())
    x = (torch.randn(2, 3, 10), torch.randn(2, 3, 4, 4, 4))
    res, _ = assert_equivalent(model, x, channels=0.5, mode=mode)
    if mode == "fx":
        assert res.module.get_submodule("c3.0").out_channels == 4
        assert res.module.gn.num_groups == 1


class GroupedTransposed(nn.Module):  # grouped ConvTranspose: weight is [Cin, Cout/groups, k, k]
    def __init__(self):
        super().__init__()
        self.a = cbr(3, 8)
        self.up = nn.ConvTranspose2d(8, 12, 2, stride=2, groups=4)
        self.out = nn.Conv2d(12, 2, 1)

    def forward(self, x):
        return self.out(F.relu(self.up(self.a(x))))


@pytest.mark.parametrize("mode", ["fx", "export"])
def test_grouped_transposed_conv(mode):
    torch.manual_seed(0)
    res, _ = assert_equivalent(
        randomize(GroupedTransposed()), torch.randn(2, 3, 8, 8), channels=0.5, mode=mode
    )
    if mode == "fx":
        up = res.module.up
        assert (up.groups, up.in_channels, up.out_channels) == (2, 4, 6)


def test_unique_is_numpys_unique():
    """``depgraph_atoms.unique`` (one sort; NumPy's bare ``np.unique`` hashes, slower here)
    gives exactly ``np.unique``: the sorted distinct values, same dtype, empty stays empty."""
    import numpy as np

    from fxprune.graph.depgraph_atoms import unique

    rng = np.random.default_rng(0)
    cases = [np.zeros(0, dtype=np.int64), np.array([3]), np.full((2, 3), -1)]
    cases += [rng.integers(-1, n, (n,)) for n in (2, 9, 300, 5000)]
    for a in cases:
        got, want = unique(a), np.unique(a)
        assert got.dtype == want.dtype and np.array_equal(got, want)


def test_a_conv_weight_cut_on_both_channel_dims_is_gathered_exactly():
    """``rewrite._gather`` takes a 3x3 conv's kept (out, in) kernels in one pass: the very
    tensor two ``index_select`` calls give, contiguous."""
    import numpy as np

    from fxprune.graph.rewrite import _gather

    rng = np.random.default_rng(0)
    for shape in [(8, 6, 3, 3), (5, 4, 1, 1), (6, 1, 3, 3), (4, 6, 2, 3, 3), (7, 6)]:
        w = torch.randn(shape)
        dims = {d: rng.random(shape[d]) < 0.6 for d in (0, 1)}
        for d in dims:
            dims[d][0] = True
        want = w
        for d in (0, 1):
            want = want.index_select(d, torch.as_tensor(np.flatnonzero(dims[d])))
        got = _gather(w, dims)
        assert torch.equal(got, want) and got.is_contiguous()
        assert torch.equal(_gather(w, {1: dims[1]}), w[:, torch.as_tensor(dims[1])])
