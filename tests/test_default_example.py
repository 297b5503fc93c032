"""``fxprune.compile(model)`` without example inputs, as the one-line pitch writes it (issue #25):
made from what the model says it takes, said in the result; elsewhere the error names what to
give."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune.errors import ConfigError
from tests.transformer_models import tiny_llama_lm


def test_a_hugging_face_model_gets_ids_and_mask_from_its_config():
    llama = tiny_llama_lm(layers=2)
    res = fxprune.compile(llama, ffn=0.25)
    assert res.plan.inputs == [
        {"shape": [1, 16], "dtype": "int64"},
        {"shape": [1, 16], "dtype": "int64"},
    ]
    assert "input_ids + attention_mask [1, 16] made from its LlamaConfig" in res.example_note
    assert "calibration=" in res.example_note and res.example_note in res.table()
    ids = torch.randint(0, 100, (2, 8))
    assert fxprune.verify.equivalence(llama, res, (ids, torch.ones_like(ids))).ok


def test_torchvision_and_timm_classifiers_get_pixels():
    torchvision = pytest.importorskip("torchvision")
    res = fxprune.compile(torchvision.models.resnet18(), channels=0.25, ignore=["fc"])
    assert res.plan.inputs[0]["shape"] == [1, 3, 224, 224]
    assert "[1, 3, 224, 224] (torchvision)" in res.example_note
    timm = pytest.importorskip("timm")
    m = timm.create_model("resnet10t", pretrained=False).eval()
    res = fxprune.compile(m, channels=0.25, ignore=["fc"])
    assert res.plan.inputs[0]["shape"] == [1, *m.pretrained_cfg["input_size"]]
    assert "from pretrained_cfg" in res.example_note


def test_a_model_that_does_not_say_is_told_what_to_give():
    with pytest.raises(ConfigError, match=r"compile\(Sequential\) needs example_inputs: a tensor"):
        fxprune.compile(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), ffn=0.5)


def test_a_given_example_leaves_no_note():
    m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    assert fxprune.compile(m, torch.randn(2, 4), channels=0.5).example_note == ""
