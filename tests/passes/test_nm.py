"""The N:M pass: pattern along the right axis, top-N kept, eligibility, exactness, replay, masks."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune.errors import ConfigError
from fxprune.passes import nm_kernels
from fxprune.passes.nm import NM, apply_nm, is_nm, keep_masks, nm_mask, off_mask
from tests.conftest import assert_equivalent, randomize


def test_mask_keeps_top_n_along_reduction_axis():
    torch.manual_seed(0)
    w = torch.randn(6, 16, 3, 3)
    mask = nm_mask(w, 2, 4, axis=1)
    groups = w.abs().permute(0, 2, 3, 1).reshape(-1, 4, 4)  # [K*R*S, C/4, 4]
    gm = mask.permute(0, 2, 3, 1).reshape(-1, 4, 4)
    assert (gm.sum(-1) == 2).all()
    kept_min = torch.where(gm, groups, torch.inf).amin(-1)
    dropped_max = torch.where(gm, -torch.inf, groups).amax(-1)
    assert (kept_min >= dropped_max).all()  # exactly the 2 largest of each 4 along C
    masked = w * mask
    assert is_nm(masked, 2, 4, axis=1) and not is_nm(w, 2, 4, axis=1)
    assert torch.equal(nm_mask(masked, 2, 4, axis=1) & mask, mask)  # idempotent
    # grouping the flattened weight (the seed's sample) mixes kernel positions: not TensorRT's axis
    flat = nm_mask(w.reshape(6, -1), 2, 4, axis=1).reshape(w.shape)
    assert not torch.equal(flat, mask)
    assert not is_nm(w * flat, 2, 4, axis=1)


@pytest.mark.parametrize("spec,n,m", [("2:4", 2, 4), ("1:4", 1, 4), ("4:8", 4, 8)])
def test_other_ratios(spec, n, m):
    w = torch.randn(8, 32)
    cfg = NM.parse(spec)
    assert (cfg.n, cfg.m) == (n, m)
    assert is_nm(w * nm_mask(w, n, m), n, m)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,axis", [((48, 64), 1), ((64, 48), 0), ((6, 32, 3, 3), 1)])
def test_apply_nm_scaled_block_by_block_is_wanda_on_the_whole_weight(
    dtype, shape, axis, monkeypatch
):
    """Wanda's score made a block at a time inside apply_nm keeps what ranking the whole
    weight's float32 |W| x ||x|| keeps (and differs from magnitude), the weight rewritten."""
    monkeypatch.setattr(nm_kernels, "BLOCK", 200)  # several blocks per weight
    torch.manual_seed(1)
    w = torch.randn(shape).to(dtype)
    scale = torch.rand(shape[axis]) * 10
    view = [1] * w.ndim
    view[axis] = -1
    want = nm_mask(w.abs().float() * scale.reshape(view), 2, 4, axis)
    got = w.clone()
    keep, before, after = apply_nm(got, 2, 4, axis, scale=scale)
    assert torch.equal(keep, want) and not torch.equal(keep, nm_mask(w, 2, 4, axis))
    assert torch.equal(got, w * want) and after < before


@pytest.mark.parametrize("m", [2, 4, 8, 16])
@pytest.mark.parametrize("shape,axis", [((40, 64), 1), ((64, 40), 0), ((6, 32, 3, 3), 1)])
def test_off_mask_and_is_nm_count_like_the_plain_sums(m, shape, axis, monkeypatch):
    """The packed byte sums and the stray count agree with a plain sum over each group, on
    blocks smaller than the weight too; one extra non-zero in one group is caught."""
    monkeypatch.setattr(nm_kernels, "BLOCK", 256)  # several blocks per weight
    torch.manual_seed(m)
    n = m // 2
    for trial in range(4):
        w = torch.randn(shape).bfloat16() * (torch.rand(shape) < 0.4 + 0.1 * trial)
        keep = torch.rand(shape) < 0.7
        groups = (w != 0).movedim(axis, -1).reshape(-1, m).sum(-1)
        want_fits = bool((groups <= n).all())
        want_stray = int(((w != 0) & ~keep).sum())
        assert off_mask(w, keep, n, m, axis) == (want_stray, want_fits)
        assert off_mask(w, keep, None, None, axis) == (want_stray, True)
        assert is_nm(w, n, m, axis) == want_fits
    w = torch.randn(shape) * nm_mask(torch.randn(shape), n, m, axis)
    assert off_mask(w, w != 0, n, m, axis) == (0, True) and is_nm(w, n, m, axis)
    one = w.movedim(axis, -1).clone(memory_format=torch.contiguous_format)
    one.reshape(-1, m)[3] = 1.0  # a whole group non-zero: more than n
    one = one.movedim(-1, axis)
    assert off_mask(one, one != 0, n, m, axis) == (0, False) and not is_nm(one, n, m, axis)
    assert off_mask(one, w != 0, n, m, axis)[0] == m - n


@pytest.mark.parametrize("bad", ["4:2", "2-4", "0:4", "a:b"])
def test_bad_spec(bad):
    with pytest.raises(ConfigError):
        NM.parse(bad)


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)  # C=3: not divisible
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)  # grouped
        self.pw = nn.Conv2d(16, 32, 1)
        self.up = nn.ConvTranspose2d(32, 8, 2, stride=2)  # transposed
        self.fc1, self.fc2 = nn.Linear(8, 64), nn.Linear(64, 5)

    def forward(self, x):
        y = self.up(torch.relu(self.pw(self.dw(self.stem(x))))).mean((2, 3))
        return self.fc2(torch.relu(self.fc1(y)))


def test_eligibility_is_explained():
    torch.manual_seed(0)
    model = randomize(Mixed())
    x = torch.randn(2, 3, 8, 8)
    res = fxprune.compile(model, x, sparsity="2:4", sparsity_exclude=["fc2"])
    d = res.passes[-1].details
    assert d["layers"] == ["pw.weight", "fc1.weight"]
    assert "not divisible by M=4" in d["ineligible"]["stem"]
    assert "grouped" in d["ineligible"]["dw"] and "transposed" in d["ineligible"]["up"]
    assert d["ineligible"]["fc2"] == "in sparsity_exclude"
    assert 0.5 < d["kept_magnitude"] < 1.0
    assert is_nm(res.module.pw.weight, 2, 4) and is_nm(res.module.fc1.weight, 2, 4)
    assert fxprune.verify.equivalence(model, res, x).ok
    assert model.pw.weight.count_nonzero() == model.pw.weight.numel()  # input model untouched


def test_channels_plus_2to4_exact_and_replayed():
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = randomize(tv.models.resnet18())
    x = torch.randn(2, 3, 64, 64)
    res, _ = assert_equivalent(model, x, channels=0.5, round_to=4, sparsity="2:4", ignore=["fc"])
    layers = res.passes[-1].details["layers"]
    assert len(layers) >= 19 and all(is_nm(res.module.get_parameter(p), 2, 4) for p in layers)
    again = fxprune.apply_plan(tv.models.resnet18().eval(), res.plan.to_json())
    assert again.passes[-1].details["layers"] == layers


def test_keep_masks_never_revives_a_pruned_weight():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    res = fxprune.compile(model, torch.randn(4, 16), sparsity="2:4")
    pruned = res.module
    opt = torch.optim.SGD(pruned.parameters(), lr=0.1, momentum=0.9)
    handle = keep_masks(pruned, res.nm_masks, opt)
    for _ in range(5):
        opt.zero_grad()
        pruned(torch.randn(8, 16)).pow(2).sum().backward()
        opt.step()
    for name, mask in res.nm_masks.items():
        w = pruned.get_parameter(name)
        assert (w[~mask] == 0).all() and is_nm(w, 2, 4)
    handle.remove()


def test_ties_go_to_the_earlier_weight_and_large_m_uses_topk():
    w = torch.tensor([[1.0, 1.0, 1.0, 1.0, 3.0, -3.0, 3.0, 0.5]])
    assert nm_mask(w, 2, 4).tolist() == [[True, True, False, False, True, True, False, False]]
    w16 = torch.randn(4, 32)
    mask = nm_mask(w16, 8, 16)
    assert (mask.reshape(4, 2, 16).sum(-1) == 8).all() and is_nm(w16 * mask, 8, 16)


def test_round_to_defaults_to_m_with_sparsity():
    tv = pytest.importorskip("torchvision")
    model = randomize(tv.models.resnet18())
    res = fxprune.compile(
        model, torch.randn(1, 3, 32, 32), channels=0.3, sparsity="2:4", ignore=["fc"]
    )
    assert res.plan.config["round_to"] == 4
    assert list(res.passes[-1].details["ineligible"]) == ["conv1"]  # only the 3-channel stem


def _reference_mask(w, n, m, axis):
    """Rank by |w| in float64, ties to the earlier weight, one group at a time: slow and plain."""
    g = w.detach().double().abs().movedim(axis, -1).reshape(-1, m)
    pos = torch.arange(m)
    beats = (g[:, None, :] > g[:, :, None]) | (
        (g[:, None, :] == g[:, :, None]) & (pos[None, :] < pos[:, None])[None]
    )
    keep = beats.sum(-1) < n  # weight k's rank: how many of its group outrank it
    return keep.reshape(w.movedim(axis, -1).shape).movedim(-1, axis)


@pytest.mark.parametrize("n,m", [(1, 2), (2, 4), (1, 4), (3, 4), (4, 8), (1, 8), (7, 8), (2, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_packed_kernel_equals_a_plain_ranking_across_blocks(monkeypatch, n, m, dtype):
    """The packed-rank kernel, cut into blocks along either axis, equals a one-group-at-a-time
    ranking: ties (equal and opposite-signed values, zeros) included, and so does the rewrite."""
    monkeypatch.setattr(nm_kernels, "BLOCK", 4096)  # many blocks, and a ragged last one
    torch.manual_seed(0)
    for shape, axis in [((37, 24 * m), 1), ((24 * m, 37), 0), ((9, 8 * m, 3, 3), 1)]:
        w = torch.randn(shape).to(dtype)
        flat = w.view(-1)
        flat[::7], flat[::11], flat[::13] = 0.5, -0.5, 0.0
        want = _reference_mask(w, n, m, axis)
        assert torch.equal(nm_mask(w, n, m, axis), want), (shape, axis)
        rewritten = w.clone()
        keep, before, after = apply_nm(rewritten, n, m, axis)
        assert torch.equal(keep, want)
        assert torch.equal(rewritten, w.masked_fill(~want, 0))
        assert is_nm(rewritten, n, m, axis) and not is_nm(w, n, m, axis)
        assert before == pytest.approx(float(w.double().abs().sum()), rel=1e-3)
        assert after == pytest.approx(float(rewritten.double().abs().sum()), rel=1e-3)


def test_rewrite_zeroes_a_dropped_nan_and_keeps_a_kept_one():
    w = torch.tensor([[float("nan"), 1.0, 2.0, 3.0], [0.1, float("nan"), 0.2, 0.0]])
    apply_nm(w, 2, 4)  # NaN's bits rank it above every number: it is kept
    assert w[0, 0].isnan() and w[1, 1].isnan() and int((w == 0).sum()) == 4
    v = torch.tensor([[0.5, 1.0, 2.0, float("nan")]]).bfloat16()
    keep = torch.tensor([[True, False, True, False]])
    nm_kernels._zero_dropped(v, keep)  # a dropped NaN becomes +0.0
    assert v.float().tolist() == [[0.5, 0.0, 2.0, 0.0]]
