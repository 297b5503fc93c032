"""Sensitivity analysis ranks a fragile layer first and turns into per-layer ratios; the
iterative schedule lands exactly on the one-shot target; fine-tuning under keep_masks never
revives a pruned 2:4 weight."""

import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune.errors import ConfigError
from fxprune.iterative import schedule_ratio
from tests.transformer_models import encoder_config


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 32)
        self.fc3 = nn.Linear(32, 4)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


@pytest.fixture
def crippled():
    """fc1's second half is nearly dead (cheap to prune); fc2 is left dense: every one of its
    neurons carries signal, so it is the fragile layer."""
    torch.manual_seed(0)
    m = MLP().eval()
    with torch.no_grad():
        m.fc1.weight[16:] *= 0.01
        m.fc1.bias[16:] *= 0.01
        m.fc2.weight[:, 16:] *= 0.01
    x = torch.randn(64, 16)
    with torch.no_grad():
        ref = m(x)

    def cosine(mod):
        return float(nn.functional.cosine_similarity(mod(x), ref, dim=-1).mean())

    return m, x, cosine


def test_sensitivity_ranks_the_fragile_layer_first(crippled):
    m, x, cosine = crippled
    rep = fxprune.sensitivity(m, x, cosine, ratios=(0.25, 0.5), ignore=["fc3"])
    assert rep.baseline == pytest.approx(1.0)
    assert rep.most_sensitive() == ["fc2", "fc1"]
    fc1 = [r for r in rep.rows if r.group == "fc1"]
    assert all(r.drop < 1e-3 for r in fc1) and [r.removed for r in fc1] == [8, 16]
    assert "| fc2 | ffn | 32 |" in rep.table()
    assert rep.plot().startswith("<svg") and "fc2" in rep.plot()


def test_ratios_for_target_prefers_the_cheap_group_and_reaches_it(crippled):
    m, x, cosine = crippled
    rep = fxprune.sensitivity(m, x, cosine, ratios=(0.25, 0.5), ignore=["fc3"])
    plan = rep.ratios_for_target(0.3, by="macs")
    assert plan == {"ffn_ratios": {"fc1": 0.5}}
    res = fxprune.compile(m, x, **plan)
    assert 1 - res.summary.macs_ratio >= 0.3
    uniform = fxprune.compile(m, x, ffn=0.3, ignore=["fc3"])
    assert cosine(res.module) > cosine(uniform.module)
    with pytest.raises(ConfigError, match="out of reach"):
        rep.ratios_for_target(0.95)


def test_sensitivity_on_heads_of_a_transformer():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = encoder_config(hidden=32, ffn=64, positions=16)
    m, ids = transformers.BertModel(cfg).eval(), torch.randint(0, 100, (2, 8))
    with torch.no_grad():
        ref = m(ids).last_hidden_state

    def cos(mod):
        out = mod(ids)
        out = out["last_hidden_state"] if isinstance(out, dict) else out[0]
        return float(nn.functional.cosine_similarity(out, ref, dim=-1).mean())

    rep = fxprune.sensitivity(m, ids, cos, ratios=(0.5,), kinds=("heads",))
    assert len(rep.groups()) == 2 and all(r.kind == "heads" and r.removed == 2 for r in rep.rows)


def test_sensitivity_rejects_bad_arguments(crippled):
    m, x, cosine = crippled
    with pytest.raises(ConfigError, match="ratios"):
        fxprune.sensitivity(m, x, cosine, ratios=(1.0,))
    with pytest.raises(ConfigError, match="kinds"):
        fxprune.sensitivity(m, x, cosine, kinds=("blocks",))
    with pytest.raises(ConfigError, match="channels= is chosen"):
        fxprune.sensitivity(m, x, cosine, channels=0.5)


@pytest.mark.parametrize("schedule", ["linear", "cubic", "exponential"])
def test_schedules_are_monotone_and_end_on_target(schedule):
    vals = [schedule_ratio(schedule, k, 5, 0.6) for k in range(6)]
    assert vals[0] == 0 and vals[-1] == pytest.approx(0.6)
    assert all(a < b for a, b in zip(vals, vals[1:], strict=False))
    if schedule == "cubic":
        assert vals[1] > 0.6 / 5  # front-loaded


def test_iterative_reaches_the_one_shot_target_exactly_and_keeps_2_4_masks():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    m, x = torchvision.models.resnet18().eval(), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = m(x)
    seen = []

    def finetune(mod, step):
        opt = torch.optim.SGD(mod.parameters(), lr=0.05)
        hook = step.keep_masks(opt)
        mod.train()
        for _ in range(3):
            opt.zero_grad()
            (mod(x) - ref).pow(2).mean().backward()
            opt.step()
            for name, mask in step.masks.items():  # after every step: still 2:4
                seen.append(int((mod.get_parameter(name)[~mask] != 0).sum()))
        hook.remove()

    kw = dict(channels=0.6, ignore=["fc"], sparsity="2:4", round_to=4)
    r = fxprune.iterative_prune(m, x, steps=3, schedule="cubic", finetune=finetune, **kw)
    one = fxprune.compile(m, x, **kw)
    shapes = {k: v.shape for k, v in r.module.state_dict().items()}
    assert shapes == {k: v.shape for k, v in one.module.state_dict().items()}
    assert [s.equivalent for s in r.steps] == [True] * 3
    assert r.steps[0].params > r.steps[1].params > r.steps[2].params
    assert seen and max(seen) == 0 and all(s.revived == 0 for s in r.steps)
    assert "| 3 | channels 0.600 |" in r.table()


def test_fine_tuning_without_the_hook_is_caught_and_undone():
    torch.manual_seed(0)
    m, x = MLP().eval(), torch.randn(8, 16)

    def careless(mod, step):  # trains without keep_masks: pruned weights come back
        opt = torch.optim.SGD(mod.parameters(), lr=0.1)
        mod.train()
        opt.zero_grad()
        mod(x).pow(2).mean().backward()
        opt.step()

    r = fxprune.iterative_prune(
        m, x, steps=2, channels=0.5, ignore=["fc3"], sparsity="2:4", finetune=careless
    )
    assert r.steps[-1].revived > 0  # reported ...
    for name, mask in r.steps[-1].masks.items():  # ... and re-zeroed
        assert int((r.module.get_parameter(name)[~mask] != 0).sum()) == 0


def test_latency_targets_need_timings(crippled):
    m, x, cosine = crippled
    rep = fxprune.sensitivity(m, x, cosine, ratios=(0.5,), ignore=["fc3"])
    with pytest.raises(ConfigError, match="latency_backend"):
        rep.ratios_for_target(0.1, by="latency")
    timed = fxprune.sensitivity(
        m,
        x,
        cosine,
        ratios=(0.5,),
        ignore=["fc3"],
        latency_backend="torch",
        latency_batch=16,
        latency_repeats=4,
    )
    assert timed.latency_ms > 0 and all(r.ms_saved is not None for r in timed.rows)


def test_iterative_result_saves_and_loads_like_a_one_shot_result(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    m, x = torchvision.models.resnet18().eval(), torch.randn(2, 3, 32, 32)
    r = fxprune.iterative_prune(m, x, steps=3, schedule="linear", channels=0.5, ignore=["fc"])
    combined = r.combined()
    assert [e["name"] for e in combined.plan.passes] == ["channels"] * 3
    assert combined.summary.macs_before > combined.summary.macs_after  # dense -> final
    assert fxprune.verify.equivalence(m, combined, x).ok  # no fine-tuning: exact vs dense
    r.save(tmp_path / "it.pt")
    again = fxprune.load(tmp_path / "it.pt", torchvision.models.resnet18().eval())
    torch.testing.assert_close(again.module(x), r.module(x))


def test_pruned_copies_are_measured_in_eval_mode_like_the_baseline(crippled):
    m, x, cosine = crippled
    m.train()  # the user's model happens to be in train mode
    seen = []

    def metric(mod):
        seen.append(mod.training)
        return cosine(mod)

    fxprune.sensitivity(m, x, metric, ratios=(0.5,), ignore=["fc3"])
    r = fxprune.iterative_prune(m, x, steps=2, channels=0.5, ignore=["fc3"], evaluate=metric)
    assert not any(seen) and len(seen) == 3 + 3 and m.training  # baseline + 2 each
    assert r.steps[-1].metric is not None


def test_recalibration_batches_may_be_a_generator(crippled):
    torchvision = pytest.importorskip("torchvision")
    m, x = torchvision.models.resnet18().eval(), torch.randn(2, 3, 32, 32)
    gen = (torch.randn(4, 3, 32, 32) for _ in range(2))
    rep = fxprune.sensitivity(
        m,
        x,
        lambda mod: float(mod(x).std()),
        ratios=(0.5,),
        ignore=["fc"],
        groups=["layer1.0.conv1", "layer2.0.conv1"],
        recalibrate=gen,
    )
    assert len(rep.rows) == 2  # both measured with real statistics, not a run-dry generator
    from fxprune.calibration import recalibrate_bn

    before = m.bn1.running_mean.clone()
    with pytest.raises(ConfigError, match="gave nothing"):
        recalibrate_bn(m, iter(()))
    assert torch.equal(m.bn1.running_mean, before)  # statistics put back


def test_ratios_for_target_can_jump_past_a_step_that_saves_nothing():
    from fxprune.sensitivity import SensitivityReport, SensitivityRow

    rep = SensitivityReport(1.0, True, [0.25, 0.5], macs=100, params=100, latency_ms=0.4)
    for g, saves in (("a", (0.0, 0.1)), ("b", (0.1, 0.2))):
        for r, ms in zip((0.25, 0.5), saves, strict=True):
            rep.rows.append(SensitivityRow(g, g, "channels", 8, r, 2, 1.0, 0.0, 0, 0, ms))
    plan = rep.ratios_for_target(0.6, by="latency")  # needs a at 0.5 (its 0.25 saves 0)
    assert plan == {"layer_ratios": {"a": 0.5, "b": 0.5}}
    with pytest.raises(ConfigError, match=r"save 0\.750"):
        rep.ratios_for_target(0.9, by="latency")


def test_iterative_heads_behind_multihead_attention():
    class Blk(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
            self.fc = nn.Linear(32, 32)

        def forward(self, x):
            return self.fc(x + self.attn(x, x, x, need_weights=False)[0])

    torch.manual_seed(0)
    m, x = nn.Sequential(Blk(), Blk()).eval(), torch.randn(2, 5, 32)
    r = fxprune.iterative_prune(m, x, steps=2, heads=0.5)
    one = fxprune.compile(m, x, heads=0.5)
    assert r.steps[-1].params == sum(p.numel() for p in one.module.parameters())
    assert r.steps[0].params < sum(p.numel() for p in m.parameters())


def test_a_calibration_generator_serves_every_step_and_every_group():
    """iterative_prune and sensitivity compile many times: a generator is read once, not drained
    by the first compile."""
    torch.manual_seed(0)
    m, x = MLP().eval(), torch.randn(8, 16)

    def batches():
        for _ in range(3):
            yield torch.randn(8, 16)

    r = fxprune.iterative_prune(
        m, x, steps=2, channels=0.5, ignore=["fc3"], importance="activation", calibration=batches()
    )
    assert [s.equivalent for s in r.steps] == [True, True]
    rep = fxprune.sensitivity(
        m,
        x,
        lambda mod: float(mod(x).sum()),
        ratios=(0.5,),
        ignore=["fc3"],
        importance="activation",
        calibration=batches(),
    )
    assert len(rep.rows) >= 2  # every group was measured, not only the first
