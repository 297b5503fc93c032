"""The equivalence proof fails what is wrong: non-finite values, one output off next to a large one,
a broken N:M pattern, a change the example never excites; and passes exact half-precision results."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune.verify import equivalence, zeroed_dense
from tests.conftest import randomize
from tests.transformer_models import build


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return randomize(
        nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    )


def pruned_mlp(x: torch.Tensor, **kw):
    model = mlp()
    kw.setdefault("channels", 0.5)
    return model, fxprune.compile(model, x, **kw)


def tamper(res, name: str, fn) -> None:
    with torch.no_grad():
        fn(res.module.get_parameter(name))


X = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))


def test_exact_result_passes_with_fresh_inputs_and_is_deterministic():
    model, res = pruned_mlp(X)
    rep = equivalence(model, res, X)
    assert rep.ok and rep.max_rel_err < 1e-6 and rep.pruning_effect > 1e-2
    assert rep.inputs_checked == 3 and rep.dtype == "float32" and rep.worst_output == "output"
    again = equivalence(model, res, X)
    assert (again.max_abs_err, again.pruning_effect) == (rep.max_abs_err, rep.pruning_effect)
    only_example = equivalence(model, res, X, fresh_inputs=0)
    assert only_example.ok and only_example.inputs_checked == 1


@pytest.mark.parametrize(
    "how",
    [
        lambda w: w.view(-1)[0].fill_(float("nan")),
        lambda w: w.fill_(float("nan")),
        lambda w: w.view(-1)[0].fill_(float("inf")),
    ],
    ids=["one-nan-weight", "nan-layer", "inf-weight"],
)
def test_non_finite_pruned_output_fails(how):
    model, res = pruned_mlp(X)
    tamper(res, "2.weight", how)
    rep = equivalence(model, res, X)
    assert not rep.ok and rep.max_rel_err == float("inf")
    assert "NaN/Inf" in rep.message and rep.worst_output == "output"


def test_non_finite_reference_fails_with_a_clear_message():
    model, res = pruned_mlp(X)
    bad = X.clone()
    bad[0, 0] = float("nan")
    rep = equivalence(model, res, bad)
    assert not rep.ok and "reference" in rep.message and "proves nothing" in rep.message


class TwoScales(nn.Module):
    """Two outputs 1000x apart in scale: the small one must be judged on its own scale."""

    def __init__(self, as_dict: bool = False):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU())
        self.big, self.small = nn.Linear(16, 4), nn.Linear(16, 4)
        self.as_dict = as_dict

    def forward(self, x):
        h = self.body(x)
        big, small = self.big(h) * 1000.0, self.small(h)
        return {"big": big, "small": small} if self.as_dict else (big, small)


@pytest.mark.parametrize("as_dict,name", [(False, "[1]"), (True, "small")])
def test_small_output_off_next_to_a_large_one_fails(as_dict, name):
    torch.manual_seed(0)
    model = randomize(TwoScales(as_dict))
    res = fxprune.compile(model, X, channels=0.5)
    assert equivalence(model, res, X).ok
    tamper(res, "small.weight", lambda w: w.mul_(1.11))
    tamper(res, "small.bias", lambda w: w.mul_(1.11))
    rep = equivalence(model, res, X)
    assert not rep.ok and rep.worst_output == name and 0.10 < rep.max_rel_err < 0.12
    assert name in rep.message


def conv_net() -> nn.Module:
    torch.manual_seed(0)
    return randomize(
        nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(16, 4),
        )
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_conv_net_pruned_exactly_passes_in_float32(dtype):
    model = conv_net().to(dtype)
    x = torch.randn(2, 3, 16, 16).to(dtype)
    res = fxprune.compile(model, x, channels=0.5)
    before = {k: v.clone() for k, v in res.module.state_dict().items()}
    rep = equivalence(model, res, x)
    assert rep.ok, rep.message
    assert rep.dtype == "float32" and "float32" in rep.message and rep.pruning_effect > 1e-2
    # the proof ran on cast copies: the user's model and the result keep their dtype and values
    assert next(model.parameters()).dtype == dtype and next(res.module.parameters()).dtype == dtype
    assert all(torch.equal(v, before[k]) for k, v in res.module.state_dict().items())
    # how far pruning moved the output (not the proof) is the model's own forward in its dtype,
    # no third copy: close to what float32 copies of both give
    assert f"the dense model run in its own {str(dtype)[6:]}" in rep.message
    one = equivalence(model, res, x, fresh_inputs=0)
    with torch.no_grad():
        d32, p32 = copy.deepcopy(model).float(), copy.deepcopy(res.module).float()
        out = p32(x.float())
        effect = float((d32(x.float()) - out).abs().max() / out.abs().max())
    assert one.pruning_effect == pytest.approx(effect, rel=0.05)


def test_half_precision_model_with_float32_buffers_runs_as_it_is_for_the_dense_output(monkeypatch):
    """A bf16 model holding a float32 buffer by design (rotary frequencies, say) is still run in
    its own dtype for the dense output: two float32 copies (reference, pruned), not three."""
    from fxprune.verify import proof

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
            self.register_buffer("freq", torch.linspace(0.5, 1.5, 16))  # float32

        def forward(self, x):
            return self.net(x * self.freq.to(x.dtype))

    torch.manual_seed(0)
    model = Scaled().bfloat16()
    model.freq = model.freq.float()
    x = torch.randn(4, 16).bfloat16()
    res = fxprune.compile(model, x, channels=0.5)
    copies = []
    real = proof.cast_copy  # the dense model's float32 copy, where one is made
    monkeypatch.setattr(proof, "cast_copy", lambda m, d=None: copies.append(m) or real(m, d))
    rep = equivalence(model, res, x)
    assert rep.ok and "the dense model run in its own bfloat16" in rep.message, rep.message
    assert not copies  # the dense model itself ran


def test_fp16_token_mlp_rounding_is_not_a_failure():
    """In fp16 the pruned and the zeroed matmuls may round one output a half-ulp apart (1e-4
    relative and more, depending on the CPU's kernels); compared in fp32 they agree."""
    for seed in range(6):
        torch.manual_seed(seed)
        model = randomize(
            nn.Sequential(
                nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 32), nn.ReLU(), nn.Linear(32, 8)
            )
        ).half()
        x = torch.randn(2, 256, 32).half()
        res = fxprune.compile(model, x, channels=0.5)
        rep = equivalence(model, res, x)
        assert rep.ok and rep.max_rel_err < 1e-5, (seed, rep.message)


def test_tampered_fp16_model_fails():
    model = conv_net().half()
    x = torch.randn(2, 3, 16, 16).half()
    res = fxprune.compile(model, x, channels=0.5)
    tamper(res, "3.weight", lambda w: w.mul_(1.01))
    rep = equivalence(model, res, x)
    assert not rep.ok and rep.dtype == "float32" and rep.max_rel_err > 1e-3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_bert_passes(dtype):
    model, x, _ = build("bert")
    model = model.to(dtype)
    res = fxprune.compile(model, x, channels=0.5, heads=0.5)
    rep = equivalence(model, res, x)
    assert rep.ok, rep.message
    assert rep.dtype == "float32" and rep.worst_output == "last_hidden_state"
    assert rep.pruning_effect > 1e-2 and next(res.module.parameters()).dtype == dtype


class Casts(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)).to(self.fc1.weight.dtype))


def test_dtype_read_into_an_exported_graph_follows_the_cast():
    """torch.export writes the model's float16 into the graph (a cast, a dtype assertion): the
    float32 copy of the pruned module must not keep it, or it fails where the model does not."""
    torch.manual_seed(0)
    model = randomize(Casts()).half()
    x = torch.randn(4, 8).half()
    res = fxprune.compile(model, x, channels=0.5, mode="export")
    assert any(torch.float16 in n.args for n in res.module.graph.nodes)
    rep = equivalence(model, res, x)
    assert rep.ok and rep.dtype == "float32", rep.message
    assert any(torch.float16 in n.args for n in res.module.graph.nodes)  # the result untouched


def nm_result():
    model = mlp()
    return model, fxprune.compile(model, X, sparsity="2:4")


def test_nm_weight_off_its_mask_fails_naming_it():
    model, res = nm_result()
    assert equivalence(model, res, X).ok
    mask = res.nm_masks["2.weight"]
    row, col = (~mask).nonzero()[0].tolist()  # a masked-out weight: 3 non-zeros in its block
    tamper(res, "2.weight", lambda w: w.__setitem__((row, col), 1e-3))
    rep = equivalence(model, res, X)
    assert not rep.ok and "2.weight" in rep.message and "mask" in rep.message


def test_nm_pattern_broken_with_its_mask_fails():
    model, res = nm_result()
    mask = res.nm_masks["0.weight"]
    row, col = (~mask).nonzero()[0].tolist()
    mask[row, col] = True  # mask and weight agree, but the block has 3 non-zeros of 4
    dense = model.get_parameter("0.weight")[row, col]  # numerically exact against the mask
    tamper(res, "0.weight", lambda w: w.__setitem__((row, col), dense))
    assert equivalence(model, res, X).max_rel_err < 1e-6
    rep = equivalence(model, res, X)
    assert not rep.ok and "0.weight" in rep.message and "2 non-zeros per 4" in rep.message


def test_all_zero_example_does_not_hide_a_tampered_weight():
    x = torch.zeros(4, 8)
    model, res = pruned_mlp(x)
    tamper(res, "0.weight", lambda w: w[0].add_(0.5))
    assert equivalence(model, res, x, fresh_inputs=0).ok  # the example alone sees nothing
    rep = equivalence(model, res, x)
    assert not rep.ok and rep.max_rel_err > 1e-2


def test_channel_the_example_never_excites_is_checked_on_fresh_inputs():
    x = X.clone()
    x[:, 3] = 0.0
    model, res = pruned_mlp(x)
    tamper(res, "0.weight", lambda w: w[:, 3].add_(1.0))
    assert equivalence(model, res, x, fresh_inputs=0).ok
    rep = equivalence(model, res, x)
    assert not rep.ok and rep.max_rel_err > 1e-2
    assert rep.ok == equivalence(model, res, x, seed=1).ok


def test_vacuous_check_is_said():
    model, res = pruned_mlp(X)
    already_zero = zeroed_dense(model, res)  # pruning removes only what is already zero here
    rep = equivalence(already_zero, res, X)
    assert rep.ok and rep.pruning_effect < 1e-6 and "vacuous" in rep.message
    assert "vacuous" not in equivalence(model, res, X).message


class Tokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 16)

    def forward(self, ids):
        return self.fc2(torch.relu(self.fc1(self.emb(ids)))).mean(1)


def pruned_tokens():
    torch.manual_seed(0)
    model = Tokens().eval()
    ids = torch.randint(0, 50, (2, 6))
    return model, fxprune.compile(model, (ids,), channels=0.5), ids


def refuse(res, dim: int, size: int) -> None:
    """Make the pruned module behave like a capture that fixed ``dim`` to ``size``."""

    def check(mod, args):
        if args[0].shape[dim] != size:
            raise RuntimeError(f"Guard failed: ids.size()[{dim}] == {size}")

    res.module.register_forward_pre_hook(check)


def test_text_model_checks_another_batch_and_length():
    model, res, ids = pruned_tokens()
    rep = equivalence(model, res, (ids,))
    assert rep.ok and rep.inputs_checked == 3 and rep.skipped == []
    tamper(res, "fc1.weight", lambda w: w.mul_(1.01))
    assert not equivalence(model, res, (ids,)).ok


def test_module_fixed_to_one_length_records_the_skipped_length_check():
    model, res, ids = pruned_tokens()
    refuse(res, 1, 6)
    rep = equivalence(model, res, (ids,))
    assert rep.ok and rep.inputs_checked == 2  # the example and a batch of 3
    assert len(rep.skipped) == 1 and "length 5" in rep.skipped[0] and "Guard" in rep.skipped[0]
    assert "skipped" in rep.message


def test_module_fixed_to_one_batch_fails():
    model, res, ids = pruned_tokens()
    refuse(res, 0, 2)
    rep = equivalence(model, res, (ids,))
    assert not rep.ok and "batch 3" in rep.message and "Guard" in rep.message


def test_bert_checks_another_batch_and_length():
    model, x, _ = build("bert")
    res = fxprune.compile(model, x, heads=0.5)
    rep = equivalence(model, res, x)
    assert rep.ok and rep.inputs_checked + len(rep.skipped) == 3 and rep.inputs_checked >= 2


def test_user_model_is_not_modified():
    model, res = pruned_mlp(X)
    before = copy.deepcopy(model.state_dict())
    model.train()
    equivalence(model, res, X)
    assert model.training and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_the_proofs_copies_share_no_storage_and_keep_ties():
    """cast_copy makes the proof's float32 copies in one step: every tensor a new one, also
    where the dtype already matches (zeroed_dense writes into its copy), values equal to
    ``.to(dtype)``'s, tied weights still tied."""
    from fxprune.verify.inputs import cast_copy

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 4))
    m[2].weight = m[0].weight  # tied
    for dtype, src in ((torch.float32, m), (torch.float32, copy.deepcopy(m).bfloat16())):
        c = cast_copy(src, dtype)
        theirs = {t.data_ptr() for t in (*src.parameters(), *src.buffers())}
        assert not {t.data_ptr() for t in (*c.parameters(), *c.buffers())} & theirs
        assert c[2].weight is c[0].weight
        ref = copy.deepcopy(src).to(dtype)
        for (k, a), (_, b) in zip(c.state_dict().items(), ref.state_dict().items(), strict=True):
            assert a.dtype == b.dtype and torch.equal(a, b), k


def test_reused_copies_fill_the_last_proofs_memory_and_still_catch_a_wrong_model():
    """Within reused_copies() a proof's float32 copies are written into the tensors the last
    proof gave back (a stream's blocks share shapes), never into the model's or the result's
    own tensors; a tampered result proved after a good one still fails (every reused tensor
    is overwritten); the pool ends with the context."""
    from fxprune.verify import inputs

    torch.manual_seed(0)
    model = conv_net().bfloat16()
    x = torch.randn(2, 3, 16, 16).bfloat16()
    res = fxprune.compile(model, x, channels=0.5)
    made: list[set[int]] = []
    real = inputs._cast

    def spy(t, dtype):
        out = real(t, dtype)
        made[-1].add(out.data_ptr())
        return out

    own = {t.data_ptr() for m in (model, res.module) for t in (*m.parameters(), *m.buffers())}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(inputs, "_cast", spy)
        with inputs.reused_copies():
            made.append(set())
            assert equivalence(model, res, x).ok
            made.append(set())
            assert equivalence(model, res, x).ok
            assert made[1] and made[1] <= made[0] and not made[1] & own
            bad = fxprune.compile(model, x, channels=0.5)
            with torch.no_grad():
                next(bad.module.parameters()).mul_(1.5)
            made.append(set())
            assert not equivalence(model, bad, x).ok
            made.append(set())
            assert equivalence(model, res, x).ok
        assert inputs._POOL.get() is None and equivalence(model, res, x).ok  # outside: no pool
        # float32: the model and the result run as they are; their own tensors never pooled
        m32, x32 = conv_net(), torch.randn(2, 3, 16, 16)
        r32 = fxprune.compile(m32, x32, channels=0.5)
        before = [copy.deepcopy(m.state_dict()) for m in (m32, r32.module)]
        own = {t.data_ptr() for m in (m32, r32.module) for t in (*m.parameters(), *m.buffers())}
        with inputs.reused_copies():
            made.append(set())
            assert equivalence(m32, r32, x32).ok
            made.append(set())
            assert equivalence(m32, r32, x32).ok and not made[-1] & own
        for m, sd in zip((m32, r32.module), before, strict=True):
            assert all(torch.equal(v, sd[k]) for k, v in m.state_dict().items())
