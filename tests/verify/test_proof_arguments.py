"""The proof judges an all-zero output on its own (absolute error against its dtype's tolerance,
named), and refuses by name what does not belong to it: a dense model of another width or
another model, a wrongly shaped input, something that is not a compile result."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune.errors import ConfigError
from fxprune.verify import equivalence
from fxprune.verify.proof import agreement
from tests.conftest import randomize

X = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))


class ZeroHead(nn.Module):
    """A large output beside one that is all zero in the dense model (its layer's weights are
    zero, as a freshly initialised head's may be)."""

    def __init__(self, as_dict: bool = False):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU())
        self.big, self.zero = nn.Linear(16, 4), nn.Linear(16, 3)
        self.as_dict = as_dict

    def forward(self, x):
        h = self.body(x)
        big, zero = self.big(h) * 100.0, self.zero(h)
        return {"big": big, "zero": zero} if self.as_dict else (big, zero)


def zero_head(as_dict: bool = False, dtype=torch.float32):
    torch.manual_seed(0)
    model = randomize(ZeroHead(as_dict)).to(dtype)
    with torch.no_grad():
        model.zero.weight.zero_()
        model.zero.bias.zero_()
    x = X.to(dtype)
    return model, fxprune.compile(model, x, channels=0.5), x


def off_zero(res, by: float) -> None:
    with torch.no_grad():
        res.module.get_parameter("zero.bias").fill_(by)


@pytest.mark.parametrize("as_dict,name", [(False, "[1]"), (True, "zero")])
def test_an_all_zero_output_is_judged_on_its_own(as_dict, name):
    model, res, x = zero_head(as_dict)
    assert equivalence(model, res, x).ok
    off_zero(res, 1e-3)  # 1e-3 everywhere, where the reference is 0
    rep = equivalence(model, res, x)
    assert not rep.ok and rep.worst_output == name and rep.max_rel_err == float("inf")
    assert f"output {name} is all zero in the reference" in rep.message
    assert "1.00e-03" in rep.message and "tolerance 1e-05" in rep.message


def test_the_zero_output_tolerance_follows_the_dtype():
    model, res, x = zero_head()
    off_zero(res, 1e-6)  # within float32's 1e-5
    assert equivalence(model, res, x).ok
    model, res, x = zero_head(dtype=torch.float64)
    off_zero(res, 1e-6)  # beyond float64's 1e-7
    rep = equivalence(model, res, x)
    assert not rep.ok and rep.dtype == "float64" and "tolerance 1e-07" in rep.message
    assert equivalence(model, res, x, rtol=1e-2).ok  # scaled with rtol: 1e-5


def test_agreement_judges_an_all_zero_output_on_its_own_too():
    model, res, x = zero_head()
    reference = fxprune.verify.zeroed_dense(model, res)
    ok, _ = agreement(reference, res.module, x)
    assert ok
    off_zero(res, 1e-3)
    ok, msg = agreement(reference, res.module, x)
    assert not ok and "output [1] is all zero" in msg


def mlp(width: int = 16, out: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return randomize(
        nn.Sequential(
            nn.Linear(8, width), nn.ReLU(), nn.Linear(width, 16), nn.ReLU(), nn.Linear(16, out)
        )
    )


@pytest.fixture(scope="module")
def pruned():
    model = mlp()
    return model, fxprune.compile(model, X, channels=0.5)


@pytest.mark.parametrize(
    "other,match",
    [
        (lambda: mlp(width=32), r"0\.weight is \(32, 8\) in it, \(16, 8\) in the dense model"),
        (lambda: mlp(out=5), r"4\.weight is \(5, 16\) in it, \(4, 16\)"),
        (lambda: nn.Linear(8, 4), r"it has no \['0\.bias'"),
        (lambda: nn.Sequential(), "it has no"),
    ],
    ids=["wider", "more-outputs", "another-model", "empty"],
)
def test_a_dense_model_the_result_was_not_compiled_from_is_refused_by_name(pruned, other, match):
    _, res = pruned
    with pytest.raises(ConfigError, match=match):
        equivalence(other(), res, X)


def test_what_is_not_a_result_or_a_model_is_refused_by_name(pruned):
    model, res = pruned
    with pytest.raises(ConfigError, match="result is a Sequential .*CompileResult"):
        equivalence(model, model, X)
    with pytest.raises(ConfigError, match="result is a dict"):
        equivalence(model, res.plan.to_dict(), X)
    with pytest.raises(ConfigError, match="model is a CompileResult: give the dense nn.Module"):
        equivalence(res, model, X)  # the arguments swapped


def test_an_input_the_dense_model_cannot_run_is_refused_by_name(pruned):
    model, res = pruned
    with pytest.raises(ConfigError, match=r"example_inputs \(\(4, 9\)\).*mat1 and mat2"):
        equivalence(model, res, torch.randn(4, 9))
    with pytest.raises(ConfigError, match="example_inputs"):
        equivalence(model, res, (X, X))  # one input too many


def test_a_pruned_module_that_fails_on_the_example_is_not_equivalent(pruned):
    model, res = pruned

    def refuse(mod, args):
        raise RuntimeError("Guard failed: x.size()[0] == 99")

    hook = res.module.register_forward_pre_hook(refuse)
    try:
        rep = equivalence(model, res, X)
    finally:
        hook.remove()
    assert not rep.ok and "fails on the example" in rep.message and "Guard" in rep.message


class _Shifted(nn.Module):
    """Computes ``base``, except where ``when(x)`` holds, where it is off by one."""

    def __init__(self, base, when):
        super().__init__()
        self.base, self.when = base, when

    def forward(self, x):
        return self.base(x) + self.when(x).float()[:, None]


class _BatchOne(nn.Module):
    def __init__(self, base):
        super().__init__()
        self.base = base

    def forward(self, x):
        assert x.shape[0] == 1, "batch 1 only"
        return self.base(x)


def test_agreement_checks_the_examples_rows_and_another_batch_in_one_forward():
    base, x = mlp().eval(), X[:2]
    assert agreement(base, base, x) == (True, "max_rel_err=0.00e+00 on 1 inputs")
    # wrong on another batch size only: the joined batch (3 rows) shows it
    ok, msg = agreement(base, _Shifted(base, lambda t: torch.full((len(t),), len(t) != 2)), x)
    assert not ok and msg.startswith("max_rel_err=") and msg.endswith("on 1 inputs")
    # wrong on the example's values only: its rows are in the joined batch
    ok, msg = agreement(base, _Shifted(base, lambda t: (t == x[1]).all(1)), x)
    assert not ok and msg.startswith("max_rel_err=")
    # a candidate that cannot take another batch: named with the joined input
    ok, msg = agreement(base, _BatchOne(base), X[:1])
    assert not ok and msg.startswith("fails on the example with a fresh row (batch 2)")
    # a reference that takes only the example's batch: the example alone, and it must agree
    one = _BatchOne(base)
    assert agreement(one, one, X[:1]) == (True, "max_rel_err=0.00e+00 on 1 inputs")
    ok, msg = agreement(one, _Shifted(base, lambda t: (t == X[0]).all(1)), X[:1])
    assert not ok and msg.startswith("max_rel_err=")
