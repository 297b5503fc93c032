"""``fxprune.Recipe``: the passes and capture options as data. The keyword call and the recipe
call are one code path (same plan), a recipe survives JSON, and a bad one is named."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune.errors import ConfigError, FileAccessError
from fxprune.passes import FFN, NM, Channels, Heads
from tests.conftest import randomize
from tests.transformer_models import build

tv = pytest.importorskip("torchvision")


def _resnet():
    torch.manual_seed(0)
    return randomize(tv.models.resnet18(num_classes=10)).eval(), torch.randn(2, 3, 32, 32)


def _same_plan(a, b):
    assert a.plan.passes == b.plan.passes and a.plan.mode == b.plan.mode


@pytest.mark.parametrize(
    "kw",
    [
        {"channels": 0.5, "ignore": ["fc"]},
        {"channels": 0.3, "ignore": ["fc"], "sparsity": "2:4", "sparsity_permute": True},
        {"channels": 0.5, "ignore": ["fc"], "layer_ratios": {"layer4": 0.25}, "round_to": 8},
    ],
)
def test_the_keyword_call_and_its_recipe_make_the_same_plan(kw):
    m, x = _resnet()
    by_kw = fxprune.compile(m, x, **kw)
    recipe = fxprune.Recipe.from_dict(json.loads(json.dumps(by_kw.plan.config["recipe"])))
    by_recipe = fxprune.compile(m, x, recipe)
    _same_plan(by_kw, by_recipe)
    assert fxprune.verify.equivalence(m, by_recipe, x).ok
    assert by_recipe.plan.config["recipe"] == by_kw.plan.config["recipe"]


def test_data_driven_passes_get_the_calibration_at_run_time():
    model, (ids,), _ = build("llama")
    torch.manual_seed(1)
    batches = [torch.randint(0, 100, ids.shape) for _ in range(2)]
    kw = {"heads": 0.5, "ffn": 0.5, "importance": "activation"}
    by_kw = fxprune.compile(model, ids, calibration=batches, **kw)
    recipe = fxprune.Recipe(
        [Heads(0.5, importance="activation"), FFN(0.5, importance="activation")]
    )
    assert "calibration" not in json.dumps(recipe.to_dict())  # runtime data stays out
    by_recipe = fxprune.compile(model, ids, recipe, calibration=batches)
    _same_plan(by_kw, by_recipe)
    uncalibrated = fxprune.compile(model, ids, recipe)  # the example input instead
    assert uncalibrated.plan.passes != by_recipe.plan.passes


def test_importance_auto_ranks_heads_and_ffn_by_activation_when_data_is_given():
    """The default ``importance="auto"``: activation for heads / FFN with calibration (what kept
    a real LM usable, docs/accuracy.md), l1 without, l1 for channels; the recipe records the
    criterion that ran, and it picks what the explicit name picks."""
    model, (ids,), _ = build("llama")
    torch.manual_seed(1)
    batches = [torch.randint(0, 100, ids.shape) for _ in range(2)]

    def used(res):
        return {e["pass"]: e["importance"] for e in res.plan.config["recipe"]["passes"]}

    auto = fxprune.compile(model, ids, heads=0.5, ffn=0.5, calibration=batches)
    assert used(auto) == {"heads": "activation", "ffn": "activation"}
    assert auto.plan.config["importance"] == "auto"
    explicit = fxprune.compile(
        model, ids, heads=0.5, ffn=0.5, importance="activation", calibration=batches
    )
    _same_plan(auto, explicit)
    free = fxprune.compile(model, ids, heads=0.5, ffn=0.5)
    assert used(free) == {"heads": "l1", "ffn": "l1"}
    _same_plan(free, fxprune.compile(model, ids, heads=0.5, ffn=0.5, importance="l1"))
    assert free.plan.passes != auto.plan.passes  # the data changed the choice
    chans = fxprune.compile(model, ids, channels=0.25, calibration=batches)
    assert set(used(chans).values()) == {"l1"}
    kept = fxprune.compile(model, ids, ffn=0.5, importance="l2", calibration=batches)
    assert used(kept) == {"ffn": "l2"}


def test_save_load_and_the_errors_name_what_is_wrong(tmp_path):
    recipe = fxprune.Recipe([Channels(0.5, ignore=("fc",), round_to=4), NM(2, 4)], mode="fx")
    path = recipe.save(tmp_path / "r.json")
    assert fxprune.Recipe.load(path) == recipe
    d = recipe.to_dict()
    for bad, match in [
        ({**d, "version": 9}, "version 9"),
        ({**d, "passes": [{"pass": "pixels"}]}, "pixels"),
        ({**d, "passes": [{"pass": "heads", "ratioo": 0.5}]}, "unknown fields.*ratioo"),
        ({**d, "passes": [{"pass": "heads", "ratio": 1.5}]}, "heads=1.5 would remove every"),
        ({**d, "mode": "jit"}, "mode='jit'"),
        ({**d, "extra": 1}, "unknown keys"),
    ]:
        (tmp_path / "bad.json").write_text(json.dumps(bad))
        with pytest.raises(ConfigError, match=match) as e:
            fxprune.Recipe.load(tmp_path / "bad.json")
        assert "bad.json" in str(e.value)
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ConfigError, match="broken.json: not JSON"):
        fxprune.Recipe.load(tmp_path / "broken.json")
    with pytest.raises(FileAccessError, match="nowhere.json"):
        fxprune.Recipe.load(tmp_path / "nowhere.json")
    with pytest.raises(ConfigError, match="not a pass config"):
        fxprune.Recipe([0.5])
    with pytest.raises(ConfigError, match="give their names"):
        fxprune.Recipe([Channels(0.5)], leaf_modules=(nn.Linear,)).to_dict()


def test_a_recipe_with_keywords_is_refused_by_name():
    m, x = _resnet()
    recipe = fxprune.Recipe([Channels(0.5, ignore=("fc",))])
    with pytest.raises(ConfigError, match="heads, ignore belong in the recipe"):
        fxprune.compile(m, x, recipe, heads=0.5, ignore=["fc"])
    per_layer = Channels(0.5, ignore=("fc",), layer_ratios=(("layer4", 0.25),))
    with pytest.raises(ConfigError, match="uniform=True keeps one count"):
        fxprune.compile(m, x, fxprune.Recipe([per_layer], uniform=True))
    with pytest.raises(ConfigError, match="no passes"):  # not a silent no-op
        fxprune.compile(m, x, fxprune.Recipe())
    with pytest.raises(ConfigError, match="ignore.*nothing"):  # names are checked on the model
        fxprune.compile(m, x, fxprune.Recipe([Channels(0.5, ignore=("nothing",))]))


def test_cli_print_recipe_then_recipe_reproduces_the_flags_plan(tmp_path):
    """`fxprune prune SRC --recipe r.json` makes the plan the flags make (the recipe printed by
    --print-recipe from those flags)."""
    flags = ["--channels", "0.3", "--ignore", "fc", "--sparsity", "2:4", "--round-to", "8"]
    src = "torchvision:resnet18"
    run = [sys.executable, "-m", "fxprune.cli", "prune", src, "--quiet"]
    printed = subprocess.run(run + flags + ["--print-recipe"], capture_output=True, text=True)
    assert printed.returncode == 0, printed.stderr
    (tmp_path / "r.json").write_text(printed.stdout)
    assert json.loads(printed.stdout)["passes"][0]["round_to"] == 8
    by_flags = subprocess.run(run + flags + ["--json"], capture_output=True, text=True)
    by_recipe = subprocess.run(
        run + ["--recipe", str(tmp_path / "r.json"), "--json"], capture_output=True, text=True
    )
    assert by_flags.returncode == 0 and by_recipe.returncode == 0, by_recipe.stderr
    a, b = json.loads(by_flags.stdout), json.loads(by_recipe.stdout)
    assert a["plan"]["passes"] == b["plan"]["passes"] and b["equivalence"]["ok"]
    both = subprocess.run(
        run + ["--recipe", str(tmp_path / "r.json"), "--heads", "0.5"],
        capture_output=True,
        text=True,
    )
    assert both.returncode == 2 and "drop --heads" in both.stderr


def _channels(**fields) -> dict:
    return {"version": 1, "passes": [{"pass": "channels", "ratio": 0.5, **fields}]}


@pytest.mark.parametrize(
    "d,match",
    [
        (
            {"version": 1, "allow_approximate": "false"},
            r"allow_approximate is a string \(\"false\"",
        ),
        ({"version": 1, "uniform": "no"}, r"recipe uniform is a string \(\"no\"\); it takes true"),
        ({"version": 1, "uniform": 1}, r"uniform is an integer \(1\); it takes true or false"),
        ({"version": 1, "leaf_modules": "fc1"}, "leaf_modules is a string.*a list of strings"),
        ({"version": 1, "leaf_modules": [1]}, r"leaf_modules\[0\] is an integer"),
        ({"version": 1, "mode": ["fx"]}, "mode is a list; it takes a string"),
        ({"version": True}, "version True"),
        ({"version": 1, "passes": {"pass": "nm"}}, "passes is an object; it takes a list"),
        ({"version": 1, "passes": [{"pass": ["nm"]}]}, "pass 0: a pass entry is an object"),
        (_channels(global_ranking="false"), r"pass 0 \(channels\): global_ranking is a string"),
        (
            _channels(layer_ratios={"layer4": 0.25}),
            r"layer_ratios is an object; it takes a list of \[a string, a number\] pairs",
        ),
        (_channels(layer_ratios=[["layer4", "0.25"]]), r"layer_ratios\[0\]\[1\] is a string"),
        (_channels(layer_ratios=[["layer4"]]), r"layer_ratios\[0\] is a list; it takes \[a str"),
        (_channels(ignore="fc"), "ignore is a string.*a list of strings"),
        (_channels(seed=1.5), r"seed is a number \(1.5\); it takes an integer"),
        (_channels(round_to=8.0), "round_to is a number.*an integer or a string"),
        (_channels(importance=3), "importance is an integer"),
        (_channels(ratio="0.5"), r"ratio is a string \(\"0.5\"\); it takes a number"),
        ({"version": 1, "passes": [{"pass": "blocks", "which": "2"}]}, "which is a string"),
        ({"version": 1, "passes": [{"pass": "nm", "n": True}]}, "n is a boolean"),
    ],
)
def test_a_field_of_the_wrong_json_type_is_refused_by_name(d, match):
    """Every field is read as its config's annotation says: bool("false") would be True, a
    string would become a list of its letters, an object would not unpack into pairs."""
    with pytest.raises(ConfigError, match=match):
        fxprune.Recipe.from_dict(d)


def test_every_json_field_round_trips_as_its_type():
    recipe = fxprune.Recipe(
        [
            fxprune.passes.Blocks((1, "layer3"), min_blocks=1),
            Heads(2, layer_ratios=(("attn", 0.5),), seed=3),
            FFN(0.25, global_ranking=True, round_to=8),
            Channels(0.5, ignore=("fc",), round_to="auto", kinds=("channels",)),
            NM(2, 4, exclude=("fc",), method="wanda"),
        ],
        mode="fx",
        leaf_modules=("layer1",),
        allow_approximate=True,
        uniform=False,
    )
    assert fxprune.Recipe.from_dict(json.loads(recipe.to_json())) == recipe


def test_a_deeply_nested_recipe_is_a_config_error(tmp_path):
    deep = '{"version": 1, "passes": [{"pass": "channels", "ignore": ' + "[" * 100_000
    (tmp_path / "deep.json").write_text(deep + "]" * 100_000 + "}]}")
    with pytest.raises(ConfigError, match="deep.json: nested too deeply"):
        fxprune.Recipe.load(tmp_path / "deep.json")
    nested: list = ["fc"]
    for _ in range(5000):  # parsed already: read only as deep as the field's type goes
        nested = [nested]
    with pytest.raises(ConfigError, match=r"ignore\[0\] is a list; it takes a string"):
        fxprune.Recipe.from_dict(_channels(ignore=nested))


def test_python_recipe_flags_are_booleans_and_leaf_modules_a_list():
    with pytest.raises(ConfigError, match="allow_approximate='false': give True or False"):
        fxprune.Recipe([Channels(0.5)], allow_approximate="false")
    with pytest.raises(ConfigError, match=r"leaf_modules='fc1': give a list .*\['fc1'\]"):
        fxprune.Recipe([Channels(0.5)], leaf_modules="fc1")
