"""Bad files, bad plans, odd layers and bad calibration end in typed fxprune errors that name the
file, layer or batch; checkpoints are written atomically."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrizations

import fxprune
from fxprune.errors import CheckpointError, ConfigError, PlanError, UnsupportedModelError


class Net(nn.Module):
    def __init__(self, k: int = 3):
        super().__init__()
        self.a = nn.Conv2d(3, 8, k, padding=k // 2)
        self.b = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


X = torch.randn(2, 3, 8, 8)


@pytest.fixture
def saved(tmp_path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "ck.pt"
    fxprune.compile(Net().eval(), X, channels=0.5).save(path)
    return path


# ---- saving ---------------------------------------------------------------------------------


def test_save_failing_midway_keeps_the_old_checkpoint(saved, monkeypatch):
    before = saved.read_bytes()

    def half_written(obj, f, *args, **kwargs):
        f = open(f, "wb") if isinstance(f, (str, os.PathLike)) else f  # noqa: SIM115
        f.write(b"PK\x03\x04 half a checkpoint")
        f.flush()
        raise OSError(28, "No space left on device")

    res = fxprune.compile(Net().eval(), X, channels=0.25)
    monkeypatch.setattr(torch, "save", half_written)
    with pytest.raises(OSError, match="No space"):
        res.save(saved)
    monkeypatch.undo()
    assert saved.read_bytes() == before
    assert sorted(p.name for p in saved.parent.iterdir()) == ["ck.pt"]  # no temp file left
    assert fxprune.load(saved, Net().eval()).plan.passes


# ---- loading --------------------------------------------------------------------------------


def test_missing_checkpoint_says_missing(tmp_path):
    with pytest.raises(CheckpointError, match="nope.pt does not exist"):
        fxprune.load(tmp_path / "nope.pt", Net())


@pytest.mark.parametrize("damage", ["truncated", "random", "empty", "text", "plain pickle"])
def test_corrupt_checkpoint_is_named_and_not_a_trust_problem(saved, damage):
    import pickle
    import random

    data = saved.read_bytes()
    content = {
        "truncated": data[: len(data) // 2],
        "random": random.Random(0).randbytes(1000),
        "empty": b"",
        "text": b"hello world\n",
        "plain pickle": pickle.dumps({"x": 1}),
    }[damage]
    saved.write_bytes(content)
    with pytest.raises(CheckpointError) as e:
        fxprune.load(saved, Net())
    msg = str(e.value)
    assert f"cannot read checkpoint {saved}" in msg
    assert "corrupt" in msg or "empty" in msg
    assert "trust" not in msg and "weights_only" not in msg


def test_pickled_code_needs_trust(tmp_path):
    path = tmp_path / "code.pt"
    torch.save({"plan": {}, "state_dict": {}, "extra": Net()}, path)
    with pytest.raises(CheckpointError, match=r"pickled Python objects .*pass --trust"):
        fxprune.load(path, Net())


def test_torch_file_that_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(Net().state_dict(), path)
    with pytest.raises(CheckpointError, match="not an fxprune checkpoint"):
        fxprune.load(path, Net())


def test_checkpoint_of_another_architecture(saved):
    class Other(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 8, 3)

        def forward(self, x):
            return self.c(x)

    with pytest.raises(CheckpointError, match=rf"{saved}: .*plan names layers .*\['a'\]"):
        fxprune.load(saved, Other())
    with pytest.raises(CheckpointError, match=rf"{saved}: its weights do not fit this Net"):
        fxprune.load(saved, Net(k=5))  # same layers, other kernel size


# ---- plans ----------------------------------------------------------------------------------


def _plan(saved) -> dict:
    return torch.load(saved, weights_only=True)["plan"]


@pytest.mark.parametrize(
    ("plan", "words"),
    [
        ("{not json", "not valid JSON"),
        (42, "got int"),
        ({"version": 1}, "'mode'"),
        ({"version": 1, "mode": "fx", "inputs": [{"shape": [2, 3]}]}, "'inputs'"),
        ({"version": 1, "mode": "fx", "inputs": [], "passes": [{"kept": {}}]}, "'passes'"),
    ],
)
def test_malformed_plan(plan, words):
    with pytest.raises(PlanError, match=words):
        fxprune.apply_plan(Net(), plan)


def test_a_plan_declaring_a_huge_example_is_refused_before_allocating(saved, monkeypatch):
    """A few bytes of plan JSON declaring an input of [20e6, 16] (320M elements) are refused
    by name before any tensor is made (it drove a load to 4.5 GB; issue #25)."""
    plan = _plan(saved)
    plan["inputs"] = [{"shape": [20_000_000, 16], "dtype": "float32"}]
    made = []
    real = torch.zeros
    monkeypatch.setattr(torch, "zeros", lambda *a, **k: made.append(a) or real(*a, **k))
    with pytest.raises(PlanError, match=r"declare 320,000,000 elements .* corrupt or was edited"):
        fxprune.apply_plan(Net(), plan)
    assert not made


def test_plan_entry_missing_its_indices(saved):
    plan = _plan(saved)
    del plan["passes"][0]["kept"]
    with pytest.raises(PlanError, match=r"plan pass 0 \(channels\) has no 'kept'"):
        fxprune.apply_plan(Net(), plan)


@pytest.mark.parametrize(
    ("kept", "words"),
    [
        ([0, 1, -1, 3], r"'a' has 8 output channels .* \[-1\]"),
        ([0, 1, 1, 3], r"'a' repeat \[1\]"),
        ([0, 1, 2, 8], r"'a' has 8 output channels .* \[8\]"),
        ([0, 1.5], "'a' must be a list of ints"),
    ],
)
def test_bad_kept_indices_name_the_layer(saved, kept, words):
    plan = _plan(saved)
    plan["passes"][0]["kept"]["a"] = kept
    with pytest.raises(PlanError, match=words):
        fxprune.apply_plan(Net(), plan)


# ---- layers the graph meets in real models ---------------------------------------------------


class Blur(nn.Module):
    """Anti-aliasing: a fixed depthwise filter registered as a buffer."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.register_buffer("filt", torch.rand(8, 1, 3, 3))
        self.b = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        return self.b(F.conv2d(torch.relu(self.a(x)), self.filt, padding=1, groups=8))


def test_buffer_weight_conv_prunes_exactly_and_is_counted():
    torch.manual_seed(0)
    m = Blur().eval()
    res = fxprune.compile(m, X, channels=0.5)
    assert fxprune.verify.equivalence(m, res, X).ok
    rows = {r.layer: r for r in res.summary.layers}
    assert rows["filt"].params_before == 0  # a buffer is not a parameter
    assert rows["filt"].macs_before == 2 * 8 * 64 * 9 and rows["filt"].macs_after == 2 * 4 * 64 * 9


class FullBufferConv(nn.Module):
    """A full (not depthwise) conv whose weight is a fixed buffer: its input columns are zeroed
    by the proof like a parameter's."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.register_buffer("mix", torch.rand(4, 8, 1, 1))

    def forward(self, x):
        return F.conv2d(torch.relu(self.a(x)), self.mix)


def test_full_buffer_weight_conv_is_proved_and_estimated():
    torch.manual_seed(0)
    m = FullBufferConv().eval()
    res = fxprune.compile(m, X, channels=0.5)
    assert fxprune.verify.equivalence(m, res, X).ok
    rep = fxprune.estimate(m, X, structured=res, hardware=("cpu",))
    assert rep.scenario("structured").params < sum(p.numel() for p in m.parameters())


class Parametrized(nn.Module):
    def __init__(self, wrap):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.w = wrap(nn.Conv2d(8, 8, 3, padding=1))
        self.c = nn.Conv2d(8, 8, 3, padding=1)
        self.d = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        x = torch.relu(self.w(torch.relu(self.a(x))))
        return self.d(torch.relu(self.c(x)))


@pytest.mark.parametrize("wrap", [parametrizations.weight_norm, parametrizations.spectral_norm])
def test_parametrized_weights_under_export_keep_their_channels(wrap):
    torch.manual_seed(0)
    m = Parametrized(wrap).eval()
    res = fxprune.compile(m, X, channels=0.5, mode="export")
    assert fxprune.verify.equivalence(m, res, X).ok
    assert [p["kept"].keys() for p in res.plan.passes] == [{"c"}]  # a and w stay whole
    w = {r.layer: r for r in res.summary.layers}["w"]  # the parametrization counts for w
    assert w.params_before == sum(p.numel() for p in m.w.parameters())
    assert w.macs_before == 2 * 8 * 64 * 8 * 9


@pytest.mark.parametrize("wrap", [parametrizations.weight_norm, parametrizations.spectral_norm])
def test_parametrized_weights_under_fx_are_refused_by_name(wrap):
    with pytest.raises(UnsupportedModelError, match="'w'"):
        fxprune.compile(Parametrized(wrap).eval(), X, channels=0.5, mode="fx")


class ScalarGate(nn.Module):
    """A 0-d value (one softmax probability) scales a feature map."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.h = nn.Linear(8, 4)
        self.b = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        f = torch.relu(self.a(x))
        probs = torch.softmax(self.h(f.mean((2, 3))), -1)
        return self.b(f * probs[0, 0])


def test_zero_dim_value_in_arithmetic_prunes_exactly():
    torch.manual_seed(0)
    m = ScalarGate().eval()
    res = fxprune.compile(m, X, channels=0.5, mode="fx")
    assert fxprune.verify.equivalence(m, res, X).ok
    assert list(res.plan.passes[0]["kept"]) == ["a"]  # h's outputs are selected: they stay


# ---- calibration ----------------------------------------------------------------------------


def _endless(reads: list, limit: int = 1000):
    """Batches forever (up to ``limit``, so an eager reader fails instead of hanging)."""
    for i in itertools.count():
        if i >= limit:
            raise AssertionError(f"calibration read past {limit} batches")
        reads.append(i)
        yield torch.randn(2, 3, 8, 8)


def test_weight_only_criterion_never_reads_calibration():
    reads: list = []
    fxprune.compile(Net().eval(), X, channels=0.5, importance="l1", calibration=_endless(reads))
    assert reads == []


def test_data_driven_criterion_takes_a_bounded_number_of_batches():
    reads: list = []
    cal = _endless(reads)
    fxprune.compile(
        Net().eval(), X, channels=0.5, importance="activation", calibration=cal,
        calibration_batches=3,
    )  # fmt: skip
    assert reads == [0, 1, 2]
    reads.clear()
    fxprune.compile(Net().eval(), X, channels=0.5, importance="activation", calibration=cal)
    assert len(reads) == 128  # the default
    with pytest.raises(ConfigError, match="calibration_batches=0"):
        fxprune.compile(Net(), X, channels=0.5, importance="activation", calibration_batches=0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_calibration_batch_is_named(bad):
    x = X.clone()
    x[0, 0, 0, 0] = bad
    with pytest.raises(ConfigError, match="calibration batch 1 holds NaN or Inf"):
        fxprune.compile(Net().eval(), X, channels=0.5, importance="activation", calibration=[X, x])
