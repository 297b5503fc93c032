"""compile / apply_plan / load: options, the plan round trip and clear errors on bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune.errors import ConfigError, TraceError, UnsupportedModelError
from tests.conftest import assert_equivalent, randomize

tv = pytest.importorskip("torchvision")


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return randomize(tv.models.resnet18()), torch.randn(2, 3, 64, 64)


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def unchanged(model, snap):
    return all(torch.equal(v, snap[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5, "half"])
def test_ratio_out_of_range(resnet, bad):
    with pytest.raises(ConfigError, match="channels"):
        fxprune.compile(resnet[0], resnet[1], channels=bad)


def test_unknown_ignore_name_is_named(resnet):
    snap = snapshot(resnet[0])
    with pytest.raises(ConfigError, match="'layer9.conv'"):
        fxprune.compile(resnet[0], resnet[1], channels=0.5, ignore=["layer9.conv"])
    assert unchanged(resnet[0], snap)


@pytest.mark.parametrize(
    "kw",
    [
        {"importance": "taylor2"},
        {"round_to": 0},
        {"min_channels": 0},
        {"layer_ratios": {"layer1.*": 1.2}},
        {"mode": "jit"},
    ],
)
def test_bad_options(resnet, kw):
    with pytest.raises(ConfigError):
        fxprune.compile(resnet[0], resnet[1], channels=0.5, **kw)


def test_untraceable_model_names_the_part():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Sequential(nn.Conv2d(3, 4, 1))
            self.gate = Gate()

        def forward(self, x):
            return self.gate(self.inner(x))

    model = DataDependent()
    with pytest.raises(TraceError, match="gate") as e:
        fxprune.compile(model, torch.randn(1, 3, 4, 4), channels=0.5)
    assert "leaf_modules" in str(e.value)


class Gate(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: neither fx nor export can capture it
            return x * 2
        return x


def test_tied_weights_refused():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(self.a(x))

    with pytest.raises(UnsupportedModelError, match="a.weight.*b.weight"):
        fxprune.compile(Tied(), torch.randn(1, 4), channels=0.5)


def test_non_tensor_output_refused():
    class Stringy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)

        def forward(self, x):
            return self.a(x), "label"

    with pytest.raises(UnsupportedModelError, match="output #1 is a str"):
        fxprune.compile(Stringy(), torch.randn(1, 4), channels=0.5)


def test_plan_roundtrip_and_load(resnet, tmp_path):
    model, x = resnet
    res, _ = assert_equivalent(model, x, channels=0.5, ignore=["fc"])
    plan = json.loads(res.plan.to_json())
    assert plan["version"] == 1 and plan["passes"][0]["name"] == "channels"
    assert len(plan["passes"][0]["kept"]["layer1.0.conv1"]) == 32
    again = fxprune.apply_plan(tv.models.resnet18(), res.plan.to_json())
    assert again.summary.params_after == res.summary.params_after
    path = tmp_path / "pruned.pt"
    res.save(path)
    loaded = fxprune.load(path, tv.models.resnet18().eval())  # the module keeps its mode
    torch.testing.assert_close(loaded.module(x), res.module(x), rtol=0, atol=0)


def test_plan_for_other_model_is_refused(resnet):
    res = fxprune.compile(resnet[0], resnet[1], channels=0.5, ignore=["fc"])
    with pytest.raises(fxprune.errors.PlanError):
        fxprune.apply_plan(tv.models.mobilenet_v2(), res.plan)


def test_options_shape_the_result(resnet):
    model, x = resnet
    r8, _ = assert_equivalent(model, x, channels=0.3, round_to=8, ignore=["fc"])
    for name, m in r8.module.named_modules():
        if isinstance(m, nn.Conv2d) and name != "conv1":
            assert m.out_channels % 8 == 0, name
    rg, _ = assert_equivalent(model, x, channels=0.5, global_ranking=True)
    assert 0.2 < rg.summary.params_ratio < 0.6
    rl, _ = assert_equivalent(model, x, channels=0.5, layer_ratios={"layer4.*": 0.1})
    assert rl.module.get_submodule("layer4.0.conv1").out_channels == 461  # 512 - floor(0.1 * 512)
    ri, _ = assert_equivalent(model, x, channels=0.5, ignore=["layer1.0.conv1"])
    assert ri.module.get_submodule("layer1.0.conv1").out_channels == 64
    for imp in ("l2", "bn_scale", "random"):
        assert_equivalent(model, x, channels=0.5, importance=imp)


def test_importance_keeps_the_strong_channels():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1)

        def forward(self, x):
            return self.b(self.a(x))

    m = Two()
    with torch.no_grad():
        m.a.weight.mul_(torch.tensor([0.01, 10.0, 0.01, 10.0]).view(4, 1, 1, 1))
    res = fxprune.compile(m, torch.randn(1, 3, 4, 4), channels=0.5)
    assert res.plan.passes[0]["kept"]["a"] == [1, 3]


def test_inplace_prunes_the_given_model(resnet):
    model = randomize(tv.models.resnet18())
    res = fxprune.compile(model, resnet[1], channels=0.5, inplace=True)
    assert model.layer1[0].conv1.out_channels == 32
    assert res.module.get_submodule("layer1.0.conv1") is model.layer1[0].conv1


@pytest.mark.slow
def test_cli_prune_and_errors(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "fxprune.cli",
        "prune",
        "torchvision:resnet18",
        "--channels",
        "0.5",
        "--ignore",
        "fc",
        "--json",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["equivalence"]["ok"] and data["summary"]["params_after"] < 4_000_000
    bad = subprocess.run(
        [sys.executable, "-m", "fxprune.cli", "prune", "torchvision:nope"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2 and "unknown torchvision model 'nope'" in bad.stderr


def test_import_is_lean():
    code = (
        "import sys, fxprune; bad = [m for m in ('torchvision', 'onnx', 'onnxruntime', "
        "'tensorrt', 'transformers', 'timm', 'torch_pruning', 'onnxruntime_genai') "
        "if m in sys.modules]; "
        "print(bad); assert not bad"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_failed_rewrite_rolls_back_inplace(monkeypatch):
    """A pass that breaks the graph leaves even an in-place model exactly as it was."""
    from fxprune.graph import rewrite

    model = randomize(tv.models.resnet18())
    snap = snapshot(model)
    widths = {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}

    def broken(gm, args):
        raise RuntimeError("simulated shape failure")

    monkeypatch.setattr(rewrite, "propagate_shapes", broken)
    with pytest.raises(fxprune.errors.PassError, match="nothing was changed"):
        fxprune.compile(model, torch.randn(1, 3, 32, 32), channels=0.5, inplace=True)
    assert unchanged(model, snap)
    assert widths == {
        n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)
    }


def test_ignore_a_norm_or_a_container_keeps_its_channels(resnet):
    model, x = resnet
    r, _ = assert_equivalent(model, x, channels=0.5, ignore=["layer1.0.bn2"])
    assert r.module.get_submodule("layer1.0.conv2").out_channels == 64  # bn2 holds conv2's outputs
    r, _ = assert_equivalent(model, x, channels=0.5, ignore=["layer2"])
    assert r.module.get_submodule("layer2.1.conv1").out_channels == 128
    assert r.module.get_submodule("layer3.1.conv1").out_channels == 128  # outside: pruned
    r, _ = assert_equivalent(model, x, channels=0.5, ignore=[nn.Linear])
    assert r.module.get_submodule("layer1.0.conv1").out_channels == 32  # fc only consumes


@pytest.mark.slow
def test_cli_heads_ffn_blocks_from_a_factory_file(tmp_path):
    src = tmp_path / "vit.py"
    src.write_text(
        "import torch, torchvision\n"
        "def build():\n"
        "    torch.manual_seed(0)\n"
        "    m = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=3,\n"
        "        num_heads=4, hidden_dim=64, mlp_dim=128)\n"
        "    torch.nn.init.normal_(m.heads.head.weight)\n"
        "    return m.eval(), torch.randn(2, 3, 32, 32)\n"
    )
    cmd = [sys.executable, "-m", "fxprune.cli", "prune", f"{src}:build", "--heads", "2"]
    cmd += ["--trust", "--ffn", "0.5", "--blocks", "1", "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["equivalence"]["ok"]
    names = [p["name"] for p in data["plan"]["passes"]]
    assert names == ["blocks", "heads", "ffn"]  # --channels defaults to 0 with these
    kept = data["plan"]["passes"][1]["kept"]  # packed in_proj: 3 x 4 heads x 16 -> 3 x 2 x 16
    assert kept and all(len(k) == 96 for k in kept.values())
