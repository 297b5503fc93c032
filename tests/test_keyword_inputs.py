"""Keyword example inputs (``{"input_ids": ids, "attention_mask": mask}``), as Hugging Face
models are called: bound to the forward's positional order, with a skipped parameter passed as
None only where None is its default."""

from __future__ import annotations

import pytest
import torch

import fxprune
from fxprune.errors import ConfigError
from fxprune.graph.trace import as_args, bind_keywords
from tests.transformer_models import build


def test_keyword_inputs_compile_prove_and_calibrate():
    model, (ids,), _ = build("gpt2")  # forward(input_ids, past_key_values, attention_mask, ...)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    kw = {"input_ids": ids, "attention_mask": mask}
    assert bind_keywords(model, kw) == (ids, None, mask)
    res = fxprune.compile(
        model, kw, heads=0.5, importance="activation", calibration=[kw, kw], calibration_batches=2
    )
    assert res.plan.inputs[1] == {"none": True}
    rep = fxprune.verify.equivalence(model, res, kw)
    assert rep.ok and rep.pruning_effect > 1e-3, rep.message
    with torch.no_grad():
        torch.testing.assert_close(
            res.model(**kw).last_hidden_state, res.module(ids, None, mask).last_hidden_state
        )


@pytest.mark.slow
def test_keyword_inputs_export(tmp_path):
    model, (ids,), _ = build("bert")
    kw = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    res = fxprune.compile(model, kw, heads=0.5)
    out = res.export(tmp_path / "bert.onnx", example_inputs=kw)
    assert out.path.exists() and out.ort_max_abs_err < 1e-3


def test_bad_keyword_inputs_are_named():
    model, (ids,), _ = build("bert")  # forward(input_ids, attention_mask, token_type_ids, ...)
    with pytest.raises(ConfigError, match="no parameter 'input'.*input_ids, attention_mask"):
        fxprune.compile(model, {"input": ids}, heads=0.5)
    with pytest.raises(ConfigError, match="empty"):
        bind_keywords(model, {})
    with pytest.raises(ConfigError, match="need the model"):
        as_args({"input_ids": ids})

    class Flag(torch.nn.Module):
        def forward(self, x, scale=2.0, y=None):
            return x * scale if y is None else x * scale + y

    with pytest.raises(ConfigError, match="takes 'scale' before 'y' and its default is 2.0"):
        bind_keywords(Flag(), {"x": ids, "y": ids})
