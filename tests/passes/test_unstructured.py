"""Unstructured sparsity: exact counts, the right weights, proved, replayed, stored compactly and
priced like the estimator prices it; and the checks fail on a wrong model."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune.checkpoint import compress, expand
from fxprune.errors import CheckpointError, ConfigError, PlanError
from fxprune.passes import Unstructured

tv = pytest.importorskip("torchvision")


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return tv.models.resnet18().eval(), torch.randn(1, 3, 64, 64)


def _weights(model):
    return {
        f"{n}.weight": m.weight.detach().clone()
        for n, m in model.named_modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    }


def test_layer_scope_zeroes_the_smallest_of_every_weight(resnet):
    model, x = resnet
    dense = _weights(model)
    res = fxprune.compile(model, x, unstructured=0.7)
    (p,) = res.passes
    assert p.name == "unstructured" and set(p.layers) == set(dense)
    for name, w0 in dense.items():
        w = res.module.get_parameter(name)
        zero = w == 0
        assert int(zero.sum()) == p.layers[name] == int(w0.numel() * 0.7)
        # every zeroed weight was no larger than every kept one
        assert w0[zero].abs().max() <= w0[~zero].abs().min()
        assert torch.equal(w[~zero], w0[~zero])  # the rest is untouched
    assert res.summary.params_after == res.summary.params_before  # no shape changed
    assert fxprune.verify.equivalence(model, res, x).ok


def test_global_scope_ranks_all_weights_together(resnet):
    model, x = resnet
    dense = _weights(model)
    res = fxprune.compile(model, x, unstructured=0.7, unstructured_scope="global")
    total = sum(w.numel() for w in dense.values())
    zeros = {k: int((res.module.get_parameter(k) == 0).sum()) for k in dense}
    assert sum(zeros.values()) == int(total * 0.7)
    dropped = torch.cat([w[res.module.get_parameter(k) == 0].abs() for k, w in dense.items()])
    kept = torch.cat([w[res.module.get_parameter(k) != 0].abs() for k, w in dense.items()])
    assert dropped.max() <= kept.min()
    fractions = [zeros[k] / dense[k].numel() for k in dense]
    assert max(fractions) - min(fractions) > 0.2  # layers lose different shares
    assert fxprune.verify.equivalence(model, res, x).ok


def test_wanda_ranks_each_row_by_weight_times_input_norm():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    x = torch.randn(32, 16) * torch.linspace(0.1, 10, 16)  # features of very different scale
    res = fxprune.compile(model, x, unstructured=0.5, unstructured_method="wanda", calibration=[x])
    w0 = model[0].weight.detach()
    score = w0.abs() * x.norm(dim=0)
    keep = res.module.get_parameter("0.weight") != 0
    for row in range(8):
        assert int((~keep[row]).sum()) == 8  # half of every row
        assert score[row][~keep[row]].max() <= score[row][keep[row]].min()
    magnitude = fxprune.compile(model, x, unstructured=0.5)
    assert not torch.equal(keep, magnitude.module.get_parameter("0.weight") != 0)
    assert fxprune.verify.equivalence(model, res, x).ok


def test_the_proof_fails_on_a_revived_weight(resnet):
    model, x = resnet
    res = fxprune.compile(model, x, unstructured=0.5)
    with torch.no_grad():
        w = res.module.get_parameter("layer1.0.conv1.weight")
        w[w == 0] = 1e-3  # a "pruned" weight that is not zero
    rep = fxprune.verify.equivalence(model, res, x)
    assert not rep.ok and "non-zeros where its unstructured mask is zero" in rep.message


def test_one_mask_per_weight(resnet):
    model, x = resnet
    with pytest.raises(ConfigError, match="both the nm and the unstructured pass mask"):
        fxprune.compile(model, x, sparsity="2:4", unstructured=0.5)
    res = fxprune.compile(
        model,
        x,
        sparsity="2:4",
        sparsity_exclude=["fc"],
        unstructured=0.9,
        unstructured_include=["fc"],
    )
    assert [p.name for p in res.passes] == ["nm", "unstructured"]
    assert list(res.passes[1].layers) == ["fc.weight"]
    assert fxprune.verify.equivalence(model, res, x).ok


@pytest.mark.parametrize("how", ["bitmask", "csr"])
def test_compressed_checkpoint_restores_exactly_at_the_estimated_size(resnet, how, tmp_path):
    model, x = resnet
    res = fxprune.compile(model, x, unstructured=0.8)
    sizes = res.save(tmp_path / "c.pt", compress=how)
    res.save(tmp_path / "d.pt")
    dense_file, small_file = (tmp_path / "d.pt").stat().st_size, (tmp_path / "c.pt").stat().st_size
    loaded = fxprune.load(tmp_path / "c.pt", model)
    want, got = res.module.state_dict(), loaded.module.state_dict()
    assert all(torch.equal(want[k], got[k]) for k in want)  # bit for bit
    assert fxprune.verify.equivalence(model, loaded, x).ok
    # what the estimator predicts for these weights at this sparsity, in fp32
    est = fxprune.estimate(model, x, sparsity=0.8, nm=None, structured=None, batch_sizes=(1,))
    scenario = next(s for s in est.scenarios if s.name.startswith("unstructured"))
    params = sum(p.numel() for p in model.parameters())
    masked = sum(want[k].numel() for k in res.masks)
    predicted = scenario.bytes["CSR" if how == "csr" else "bitmask"]["fp32"] - 4 * (params - masked)
    assert sizes["dense"] == 4 * masked
    assert sizes["stored"] == pytest.approx(predicted, rel=2e-3)
    ratio = {"bitmask": 0.2 + 1 / 32, "csr": 0.2 * 2}[how]  # of the dense weight bytes
    assert sizes["stored"] / sizes["dense"] == pytest.approx(ratio, rel=0.01)
    assert small_file < dense_file * (ratio + 0.02)


def test_a_corrupt_compressed_weight_is_named(resnet, tmp_path):
    model, x = resnet
    res = fxprune.compile(model, x, unstructured=0.8)
    res.save(tmp_path / "c.pt", compress="bitmask")
    ckpt = torch.load(tmp_path / "c.pt", weights_only=True)
    entry = ckpt["compressed"]["layer1.0.conv1.weight"]
    entry["values"] = entry["values"][:-5]  # a truncated value list
    torch.save(ckpt, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="layer1.0.conv1.weight"):
        fxprune.load(tmp_path / "bad.pt", model)
    with pytest.raises(ConfigError, match="compress='zip'"):
        res.save(tmp_path / "z.pt", compress="zip")


def test_compress_round_trips_odd_shapes():
    t = torch.randn(3, 5, 2, 7)
    t[t.abs() < 1] = 0
    for how in ("bitmask", "csr"):
        assert torch.equal(expand(compress(t, how)), t)
    v = torch.tensor([0.0, 2.0, 0.0])
    assert torch.equal(expand(compress(v, "csr")), v) and torch.equal(
        expand(compress(v, "bitmask")), v
    )


def test_replay_recipe_and_iterative(resnet):
    model, x = resnet
    res = fxprune.compile(model, x, unstructured=0.6, unstructured_scope="global")
    again = fxprune.apply_plan(model, res.plan.to_json())  # magnitude replays from the plan
    for k in res.masks:
        assert torch.equal(again.module.get_parameter(k), res.module.get_parameter(k))
    recipe = fxprune.Recipe.from_dict(json.loads(json.dumps(res.plan.config["recipe"])))
    assert recipe.passes == (Unstructured(0.6, "global"),)
    it = fxprune.iterative_prune(model, x, steps=2, unstructured=0.6)
    assert [round(s.ratios["unstructured"], 3) for s in it.steps] == [0.525, 0.6]
    w = it.module.get_parameter("layer2.0.conv1.weight")
    assert int((w == 0).sum()) == int(w.numel() * 0.6) and all(s.equivalent for s in it.steps)


def test_a_data_driven_plan_needs_its_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    x = torch.randn(8, 16)
    res = fxprune.compile(model, x, unstructured=0.5, unstructured_method="wanda")
    with pytest.raises(PlanError, match="'wanda' on calibration data"):
        fxprune.apply_plan(model, res.plan)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"unstructured": 1.0}, "in \\(0, 1\\)"),
        ({"unstructured": "half"}, "in \\(0, 1\\)"),
        ({"unstructured": 0.5, "unstructured_scope": "model"}, "unstructured_scope='model'"),
        ({"unstructured": 0.5, "unstructured_method": "taylor"}, "unstructured_method='taylor'"),
        (
            {"unstructured": 0.5, "unstructured_method": "wanda", "unstructured_scope": "global"},
            "not comparable across layers",
        ),
        ({"unstructured_scope": "global"}, "needs unstructured=<fraction>"),
        ({"unstructured": 0.5, "unstructured_exclude": ["nope"]}, "nope"),
    ],
)
def test_bad_options_are_named(resnet, kw, match):
    model, x = resnet
    with pytest.raises(ConfigError, match=match):
        fxprune.compile(model, x, **kw)


def test_the_command_line_prunes_and_compresses(tmp_path, capsys):
    from fxprune.cli import main

    common = ["prune", "torchvision:resnet18", "--input-shape", "1", "3", "64", "64"]
    small, dense = tmp_path / "s.pt", tmp_path / "d.pt"
    flags = ["--unstructured", "0.8", "--unstructured-exclude", "fc"]
    assert main([*common, *flags, "--save", str(small), "--compress", "bitmask", "--quiet"]) == 0
    assert main([*common, *flags, "--save", str(dense), "--quiet"]) == 0
    assert small.stat().st_size < 0.3 * dense.stat().st_size
    res = fxprune.load(small, tv.models.resnet18())
    assert [p.name for p in res.passes] == ["unstructured"]  # no channel pruning by default
    assert "fc.weight" not in res.passes[0].layers
    assert main([*common, "--compress", "csr"]) == 2
    assert "--compress csr needs --save" in capsys.readouterr().err


def test_compress_without_a_masked_weight_is_refused(resnet, tmp_path):
    model, x = resnet
    res = fxprune.compile(model, x, channels=0.25, ignore=["fc"])
    with pytest.raises(ConfigError, match="no weight is masked"):
        res.save(tmp_path / "c.pt", compress="bitmask")
    assert not (tmp_path / "c.pt").exists()
