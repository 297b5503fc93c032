"""Shared helpers: realistic random weights and the equivalence assertion every pass must meet."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fxprune


def nontrivial(model: nn.Module) -> nn.Module:
    """Random biases and norm gains (a transformer's 1-D parameters), so a leaked or dropped one
    changes the output; returns ``model`` in eval mode."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if "norm" in name else 0.0))
    return model.eval()


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give norms realistic statistics and near-zero weights (heads, layer scales) real values.

    With torchvision's default init, BatchNorm running stats are 0/1 and some heads are zero, so
    outputs can be ~0 and an equivalence check would prove nothing.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                    m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
        for p in model.parameters():
            # all-zero heads, and layer scales initialised to 1e-6 (ConvNeXt), would hide the
            # branch they scale from the output and make the check weak
            if p.numel() and p.abs().max() < 1e-4:
                p.copy_(torch.rand(p.shape, generator=g) * 0.5 + 0.1)
    return model.eval()


def assert_equivalent(
    model: nn.Module, x, rtol: float = 1e-4, tree: bool | None = None, **compile_kw
):
    """Prune with ``compile_kw`` and require pruned == zeroed dense, with a real effect, for the
    graph module and for ``result.model``, the user's class rebuilt smaller (``tree=True``: it
    must be; ``None``: proved when it is; a toy forward with its own attribute names is not)."""
    compile_kw.setdefault("channels", 0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = fxprune.compile(model, x, **compile_kw)
    for k, v in model.state_dict().items():  # the user's model is untouched
        assert torch.equal(v, before[k]), f"compile modified the input model at {k}"
    rep = fxprune.verify.equivalence(model, res, x, rtol=rtol)
    assert rep.ok, rep.message
    assert rep.max_rel_err <= rtol
    assert res.summary.params_after < res.summary.params_before, "nothing was pruned"
    assert rep.pruning_effect > 1e-3, (
        f"pruning barely changed the output ({rep.pruning_effect:.1e}): weak check"
    )
    if tree:
        assert res.materialized, res.model_note
    if res.materialized:
        assert type(res.model) is type(model)
        on_tree = fxprune.verify.equivalence(model, res, x, rtol=rtol, target="model")
        assert on_tree.ok, f"result.model: {on_tree.message}"
    return res, rep


@pytest.fixture
def seed():
    torch.manual_seed(0)
    return 0
