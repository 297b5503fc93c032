"""ONNX inputs and outputs carry the names the model's forward uses, not the exporter's node
names (``linear_28``, ``tanh``): serving code binds by them, and the hand-off metadata records
them. ONNX Runtime parity still holds (the export checks it) and a run by name gives the
output of that name."""

from __future__ import annotations

from collections import namedtuple

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
from torch.utils import _pytree as pytree

import fxprune
from fxprune.exporters import export
from fxprune.exporters.io_names import output_names
from fxprune.exporters.metadata import read_metadata

Pair = namedtuple("Pair", ["scores", "features"])


class Heads(nn.Module):
    """Returns a dict with a nested tuple, a tuple, or a named tuple (``kind``)."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x, mask):
        h = self.fc1(x) * mask
        out = self.fc2(torch.relu(h))
        if self.kind == "dict":
            return {"logits": out, "aux": (h.sum(-1), out.mean(-1))}
        if self.kind == "tuple":
            return out, h
        if self.kind == "clash":  # a key equal to an input's name, one equal to a node's
            return {"linear": out, "x": h.sum(-1)}
        return Pair(out, h)


def _names(path) -> tuple[list[str], list[str]]:
    g = onnx.load(str(path)).graph
    return [i.name for i in g.input], [o.name for o in g.output]


def _session_equals_torch(path, module, feeds: dict):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        ref = module(*[torch.from_numpy(v) for v in feeds.values()])
    leaves = [t for t in pytree.tree_leaves(ref) if isinstance(t, torch.Tensor)]
    names = [o.name for o in sess.get_outputs()]
    for name, want in zip(names, leaves, strict=True):
        (got,) = sess.run([name], feeds)  # bound by name, one at a time
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "kind, outputs",
    [
        ("dict", ["logits", "aux.0", "aux.1"]),
        ("tuple", ["output_0", "output_1"]),
        ("named", ["scores", "features"]),
        ("clash", ["linear", "x_output"]),
    ],
)
def test_outputs_named_as_the_forward_returns_them(tmp_path, kind, outputs):
    torch.manual_seed(0)
    model = Heads(kind).eval()
    x, mask = torch.randn(2, 4), torch.ones(2, 8)
    rep = export(model, (x, mask), tmp_path / "m.onnx")
    assert _names(rep.path) == (["x", "mask"], outputs)
    io = read_metadata(rep.path)["io"]
    assert [v["name"] for v in io["inputs"]] == ["x", "mask"]
    assert [v["name"] for v in io["outputs"]] == outputs
    assert io["inputs"][0] == {"name": "x", "dtype": "float32", "shape": ["batch", 4]}
    _session_equals_torch(rep.path, model, {"x": x.numpy(), "mask": mask.numpy()})
    onnx.checker.check_model(str(rep.path), full_check=True)  # names unique, graph valid


def test_hugging_face_fields_and_parameter_names(tmp_path):
    transformers = pytest.importorskip("transformers")
    from tests.transformer_models import encoder_config

    torch.manual_seed(0)
    bert = transformers.BertModel(encoder_config()).eval()
    ids = torch.randint(0, 100, (2, 8))
    mask = torch.ones_like(ids)
    res = fxprune.compile(bert, (ids, mask), ffn=0.25)
    rep = res.export(tmp_path / "bert.onnx")
    assert _names(rep.path) == (
        ["input_ids", "attention_mask"],
        ["last_hidden_state", "pooler_output"],
    )
    io = read_metadata(rep.path)["io"]
    assert io["outputs"][1] == {"name": "pooler_output", "dtype": "float32", "shape": ["batch", 64]}
    assert rep.ort_max_rel_err < 1e-4  # parity holds under the new names
    sess = ort.InferenceSession(str(rep.path), providers=["CPUExecutionProvider"])
    (pooled,) = sess.run(
        ["pooler_output"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    )
    with torch.no_grad():
        want = res.module(ids, mask)["pooler_output"].numpy()
    np.testing.assert_allclose(pooled, want, rtol=1e-4, atol=1e-5)


def test_a_causal_lm_exports_logits(tmp_path):
    pytest.importorskip("transformers")
    from tests.genai_models import llama

    ids = torch.randint(2, 512, (1, 16), generator=torch.Generator().manual_seed(0))
    res = fxprune.compile(llama(), (ids, torch.ones_like(ids)), ffn=0.25)
    rep = res.export(tmp_path / "llm.onnx")
    assert _names(rep.path) == (["input_ids", "attention_mask"], ["logits"])
    assert read_metadata(rep.path)["io"]["outputs"] == [
        {"name": "logits", "dtype": "float32", "shape": ["batch", "sequence", 512]}
    ]


def test_output_names_fall_back_to_numbers():
    spec = pytree.tree_flatten({"a": 1, "b": (2, 3)})[1]
    assert output_names(spec, 3) == ["a", "b.0", "b.1"]
    assert output_names(spec, 2) == ["output_0", "output_1"]  # not one to one: numbered
    assert output_names(None, 2) == ["output_0", "output_1"]
    assert output_names(pytree.tree_flatten((1, {"a": 2}))[1], 2) == ["output_0", "output_1"]
    clash = pytree.tree_flatten({"a.0": 1, "a": (2,)})[1]  # two leaves would both be "a.0"
    assert output_names(clash, 2) == ["output_0", "output_1"]
