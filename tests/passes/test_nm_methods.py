"""Wanda and SparseGPT 2:4: they keep the pattern on the right axis, the proof holds (with
SparseGPT's updated weights), Wanda keeps a small weight on a loud input, SparseGPT reconstructs
each layer better than magnitude on the calibration data, and checkpoints round-trip."""

import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune.errors import ConfigError
from fxprune.passes.nm import is_nm


def _data():
    torch.manual_seed(0)
    a, scale = torch.randn(64, 64), torch.logspace(-1, 1, 64)
    x = (torch.randn(512, 64) @ a) * scale  # correlated features of very different size
    return x, [x[i : i + 128] for i in range(0, 512, 128)]


def _layer_err(res, model, x, name):
    with torch.no_grad():
        ref = model.get_submodule(name)(x)
        return float((res.module.get_submodule(name)(x) - ref).pow(2).mean() / ref.pow(2).mean())


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_methods_keep_2_4_and_the_proof(method):
    x, cal = _data()
    m = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32)).eval()
    res = fxprune.compile(m, x[:8], sparsity="2:4", sparsity_method=method, calibration=cal)
    nm = res.passes[-1]
    assert nm.details["method"] == method and nm.details["layers"] == ["0.weight", "2.weight"]
    for k in nm.details["layers"]:
        assert is_nm(res.module.get_parameter(k), 2, 4, axis=1)
    assert fxprune.verify.equivalence(m, res, x[:8]).ok
    assert bool(nm.updated) == (method == "sparsegpt")


def test_sparsegpt_reconstructs_better_than_magnitude_and_wanda():
    x, cal = _data()
    m = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32)).eval()
    errs = {
        meth: _layer_err(
            fxprune.compile(m, x[:8], sparsity="2:4", sparsity_method=meth, calibration=cal),
            m,
            x,
            "0",
        )
        for meth in ("magnitude", "wanda", "sparsegpt")
    }
    assert errs["sparsegpt"] < 0.95 * errs["magnitude"]
    assert errs["sparsegpt"] < errs["wanda"]


def test_wanda_keeps_a_small_weight_on_a_loud_input():
    m = nn.Linear(4, 1, bias=False).eval()
    with torch.no_grad():
        m.weight.copy_(torch.tensor([[0.1, 1.0, 0.9, 0.8]]))
    x = torch.randn(32, 4) * torch.tensor([100.0, 1.0, 1.0, 1.0])
    mag = fxprune.compile(m, x, sparsity="2:4")
    wanda = fxprune.compile(m, x, sparsity="2:4", sparsity_method="wanda", calibration=[x])
    assert mag.nm_masks["weight"].tolist() == [[False, True, True, False]]
    assert wanda.nm_masks["weight"].tolist()[0][0] is True  # |0.1| x ||x_0|| wins


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(8, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 8, 3, stride=2, padding=1)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_sparsegpt_on_convs_groups_along_channels():
    torch.manual_seed(0)
    m = ConvNet().eval()
    x = torch.randn(4, 8, 12, 12)
    cal = [torch.randn(4, 8, 12, 12) for _ in range(3)]
    sg = fxprune.compile(m, x, sparsity="2:4", sparsity_method="sparsegpt", calibration=cal)
    mag = fxprune.compile(m, x, sparsity="2:4")
    for k in ("a.weight", "b.weight"):
        assert is_nm(sg.module.get_parameter(k), 2, 4, axis=1)  # along C at every position
    assert "wanda_fallback" not in sg.passes[-1].details
    assert fxprune.verify.equivalence(m, sg, x).ok
    assert _layer_err(sg, m, cal[0], "a") < _layer_err(mag, m, cal[0], "a")


def test_sparsegpt_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    m = ConvNet().eval()
    x = torch.randn(2, 8, 12, 12)
    res = fxprune.compile(
        m, x, channels=0.25, sparsity="2:4", sparsity_method="sparsegpt", calibration=[x]
    )
    res.save(tmp_path / "c.pt")
    again = fxprune.load(tmp_path / "c.pt", ConvNet().eval())  # other dense weights
    for k, mask in res.nm_masks.items():
        assert torch.equal(again.nm_masks[k], mask)
    fresh = ConvNet().eval()
    fresh.load_state_dict(m.state_dict())
    assert fxprune.verify.equivalence(fresh, fxprune.load(tmp_path / "c.pt", fresh), x).ok


def test_unknown_method_is_named():
    with pytest.raises(ConfigError, match="sparsity_method='obs'"):
        fxprune.compile(nn.Linear(4, 4), torch.randn(1, 4), sparsity="2:4", sparsity_method="obs")


def test_data_driven_plans_replay_only_with_their_weights(tmp_path):
    x, cal = _data()
    m = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32)).eval()
    res = fxprune.compile(m, x[:8], sparsity="2:4", sparsity_method="wanda", calibration=cal)
    with pytest.raises(fxprune.errors.PlanError, match="fxprune.load"):
        fxprune.apply_plan(m, res.plan)
    res.save(tmp_path / "w.pt")
    again = fxprune.load(tmp_path / "w.pt", m)
    assert all(torch.equal(again.nm_masks[k], v) for k, v in res.nm_masks.items())
    with pytest.raises(ConfigError, match="needs sparsity"):
        fxprune.compile(m, x[:8], sparsity_method="wanda")


def test_the_methods_are_one_registry_the_cli_offers():
    from fxprune.cli_args import parser
    from fxprune.passes.nm_methods import REGISTRY, NMMethod

    assert list(REGISTRY) == ["magnitude", "wanda", "sparsegpt"]
    assert all(isinstance(m, NMMethod) for m in REGISTRY.values())
    prune = parser()._subparsers._group_actions[0].choices["prune"]
    (action,) = [a for a in prune._actions if "--sparsity-method" in a.option_strings]
    assert tuple(action.choices) == tuple(REGISTRY)


@pytest.mark.parametrize("cols, blocksize", [(32, 8), (80, 40), (96, 128)])
def test_sparsegpt_sweep_matches_the_textbook_loop_and_stacking_changes_nothing(cols, blocksize):
    """The transposed, blocked sweep equals a plain column-by-column OBS loop (float64, as in the
    paper's pseudo-code) on the same factor, with blocks of 8 (the between-block product), of
    40 (sub-blocks of 16, 16 and 8 inside each block: the sub-block product) and one block of
    96; layers sharing a Hessian swept as one stack of rows give each layer what its own sweep
    gives."""
    from fxprune.passes.sparsegpt import hessian_factor, sparsegpt_rows

    torch.manual_seed(0)
    x = torch.randn(4 * cols, cols, dtype=torch.float64) @ torch.randn(cols, cols).double()
    U, _ = hessian_factor(x.T @ x, 4 * cols)
    U = U.double()
    w = torch.randn(12, cols, dtype=torch.float64)

    ref, pruned_ref = w.clone(), torch.zeros(12, cols, dtype=torch.bool)
    for i in range(cols):  # textbook: mask at each group start, then one column at a time
        if i % 4 == 0:
            score = ref[:, i : i + 4] ** 2 / torch.diag(U)[i : i + 4] ** 2
            pruned_ref[:, i : i + 4].scatter_(1, score.topk(2, dim=1, largest=False).indices, True)
        err = torch.where(pruned_ref[:, i], ref[:, i], 0.0) / U[i, i]
        ref[:, i:] -= err[:, None] * U[i, i:][None]
        ref[pruned_ref[:, i], i] = 0.0

    got = w.clone()
    pruned = sparsegpt_rows(got, U, 2, 4, blocksize=blocksize)
    assert torch.equal(pruned, pruned_ref)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)

    a, b = w[:5].clone(), w[5:].clone()
    pa, pb = sparsegpt_rows(a, U, 2, 4, blocksize), sparsegpt_rows(b, U, 2, 4, blocksize)
    assert torch.equal(torch.cat([pa, pb]), pruned)
    torch.testing.assert_close(torch.cat([a, b]), got, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n, m", [(1, 4), (2, 4), (3, 4), (2, 8), (4, 8)])
def test_the_nm_choice_keeps_the_n_largest_of_every_m_even_among_ties(n, m):
    """keep_nm (a sorting network for M = 4, topk otherwise) keeps the N largest scores of
    each column, exactly N where scores tie (all-zero columns: dead inputs; repeated values)."""
    from fxprune.passes.sparsegpt import keep_nm

    torch.manual_seed(0)
    score = torch.rand(m, 500)
    score[:, 7] = 0.0  # every score equal
    score[:, 9] = torch.tensor([0.5, 0.5, 0.25, 0.5, 0.1, 0.5, 0.5, 0.5][:m])  # ties at the cut
    keep = keep_nm(score, n, torch.empty(m, 500))
    assert set(keep.unique().tolist()) <= {0.0, 1.0}
    assert keep.sum(0).eq(n).all()
    top = torch.zeros(m, 500).scatter_(0, score.topk(n, dim=0).indices, 1.0)
    distinct = [j for j in range(500) if len(set(score[:, j].tolist())) == m]
    assert torch.equal(keep[:, distinct], top[:, distinct])
    kept_min = torch.where(keep > 0, score, torch.inf).amin(0)
    dropped_max = torch.where(keep > 0, -torch.inf, score).amax(0)
    assert (kept_min >= dropped_max).all()  # ties split any way, never a smaller score kept


@pytest.mark.parametrize("n", [1, 2, 3])
def test_the_four_way_network_decides_distinct_scores_without_topk(n, monkeypatch):
    """For M = 4 the min / max network alone picks the N largest where no scores tie (topk is
    only the tie fallback: a wrong threshold would hide behind it, right but slow)."""
    from fxprune.passes import sparsegpt as solver

    score = torch.rand(4, 300, generator=torch.Generator().manual_seed(n))
    want = torch.zeros(4, 300).scatter_(0, score.topk(n, dim=0).indices, 1.0)

    def no_topk(*a, **k):
        raise AssertionError("topk called on distinct scores")

    monkeypatch.setattr(solver.torch, "topk", no_topk)
    assert torch.equal(solver.keep_nm(score, n, torch.empty(4, 300)), want)


def test_the_triangular_inverse_by_halves_is_the_inverse():
    from fxprune.passes.sparsegpt import lower_inverse

    torch.manual_seed(0)
    a = torch.randn(1100, 1100, dtype=torch.float64)
    L = torch.linalg.cholesky(a @ a.T / 1100 + torch.eye(1100, dtype=torch.float64))
    got = lower_inverse(L)  # 1100 -> 576 + 524 -> 320 + 256 ...: three levels
    assert torch.equal(got, got.tril())
    eye = torch.eye(1100, dtype=torch.float64)
    torch.testing.assert_close(got @ L, eye, rtol=0, atol=1e-10)
    wrong = got.clone()
    wrong[700, 100] += 1e-6  # one off-diagonal block entry: the check sees it
    assert not torch.allclose(wrong @ L, eye, rtol=0, atol=1e-10)


def test_the_hessian_factor_is_the_references_upper_cholesky_of_the_inverse():
    """hessian_factor takes one Cholesky of the reversed H and one triangular solve; the
    reference inverts H and factors the inverse again. Same factor (float64 reference), dead
    columns set to 1 before damping, as the reference does."""
    from fxprune.passes.sparsegpt import hessian_factor

    torch.manual_seed(0)
    x = torch.randn(300, 64, dtype=torch.float64)
    x[:, 5] = 0.0  # a column never active
    hess = x.T @ x
    U, dead = hessian_factor(hess.float(), 300)
    H = hess * (2.0 / 300)
    H[5, 5] = 1.0
    H += 0.01 * torch.mean(torch.diag(H)) * torch.eye(64, dtype=H.dtype)
    ref = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    assert dead.tolist() == [i == 5 for i in range(64)]
    assert U.dtype == torch.float32 and torch.equal(U, U.triu()) and bool((U.diag() > 0).all())
    torch.testing.assert_close(U.double(), ref, rtol=1e-5, atol=1e-6)


def test_sequential_calibration_is_refused_where_nothing_is_calibrated():
    from fxprune.passes import NM

    with pytest.raises(ConfigError, match=r"sequential=True\) with method='magnitude'"):
        NM(2, 4, sequential=True)
    with pytest.raises(ConfigError, match="sparsity_method='obs'"):  # named either way
        NM(2, 4, method="obs")
    with pytest.raises(ConfigError, match="with layers= \\(a replay\\)"):
        NM(2, 4, method="wanda", sequential=True, layers=("0.weight",))


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_sequential_calibration_chooses_each_layer_on_the_pruned_layers_before_it(method):
    """NM(sequential=True): one forward of the calibration batches in lockstep; the first layer
    sees what a one-pass calibration sees, each later one what the layers before it give once
    pruned (checked against compiling each layer alone on those inputs), and the pruned graph's
    outputs on the batches come back."""
    from fxprune.passes import NM

    x, cal = _data()
    torch.manual_seed(1)
    m = nn.Sequential(
        nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 32)
    )
    m = m.eval()
    seq = fxprune.compile(
        m, x[:8], fxprune.Recipe((NM(2, 4, method=method, sequential=True),)), calibration=cal
    )
    one = fxprune.compile(m, x[:8], sparsity="2:4", sparsity_method=method, calibration=cal)
    nm = seq.passes[-1]
    assert nm.sequential and nm.details["sequential"] and "outputs" not in nm.details
    assert one.passes[-1].outputs is None
    with torch.no_grad():
        for got, b in zip(nm.outputs, cal, strict=True):
            torch.testing.assert_close(got, seq.module(b), rtol=0, atol=0)
    assert fxprune.verify.equivalence(m, seq, x[:8]).ok

    inputs = cal  # each layer alone, on what the pruned layers before it give
    for i in (0, 2, 4):
        layer = m[i]
        alone = fxprune.compile(
            layer, inputs[0], sparsity="2:4", sparsity_method=method, calibration=inputs
        )
        # the same choice; values to rounding (the lockstep forward sums every batch's
        # statistics in one product, a one-pass calibration batch by batch)
        assert torch.equal(seq.nm_masks[f"{i}.weight"], alone.nm_masks["weight"]), i
        w = alone.module.get_parameter("weight")
        torch.testing.assert_close(seq.module.get_parameter(f"{i}.weight"), w, rtol=1e-5, atol=1e-6)
        with torch.no_grad():
            inputs = [torch.relu(alone.module(b)) for b in inputs]
    same_first = torch.equal(seq.nm_masks["0.weight"], one.nm_masks["0.weight"])
    later = [torch.equal(seq.nm_masks[f"{i}.weight"], one.nm_masks[f"{i}.weight"]) for i in (2, 4)]
    assert same_first and not all(later)  # a one-pass calibration chose otherwise after layer 0


def test_calibration_uses_each_layer_input_as_it_is_made_and_keeps_none():
    """The N:M calibration hands every layer's input to its statistics as the forward makes it
    (Capture's on_value): nothing is kept for the end of the forward, so a deep model holds one
    layer's input at a time; the statistics are those of the inputs."""
    import torch.fx as fx

    from fxprune.calibration import Capture

    m = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    gm = fx.symbolic_trace(m.eval())
    x = torch.randn(5, 8)
    got, alive = {}, []

    def on_value(name, v):
        got[name] = v.clone()
        alive.append(len(cap.seen))

    cap = Capture(gm, {"input_1", "_1", "_3"}, on_value=on_value)
    cap.run(x)
    assert cap.seen == {} and alive == [0, 0, 0]
    with torch.no_grad():
        h1 = torch.relu(m[0](x))
        torch.testing.assert_close(got["_1"], h1)
        torch.testing.assert_close(got["_3"], torch.relu(m[2](h1)))


def test_sparsegpt_layer_copies_in_and_out_in_bands_like_one_transpose():
    """The layer entry point (float32 [columns, rows] copy in bands, the sweep, the copy back
    into the weight's dtype) gives what the sweep on ``W`` held as rows gives, for weights of
    more rows than one band, in float32 and bfloat16."""
    import torch.fx as fx

    from fxprune.passes.nm import candidates
    from fxprune.passes.nm_data import sparsegpt
    from fxprune.passes.sparsegpt import hessian_factor, sparsegpt_rows

    torch.manual_seed(0)
    x = torch.randn(512, 64)
    U, _ = hessian_factor(x.T @ x, 512)
    for dtype in (torch.float32, torch.bfloat16):
        lin = nn.Linear(64, 300, bias=False).to(dtype)
        (wl,) = candidates(fx.symbolic_trace(lin))
        new, keep = sparsegpt(
            lin.weight, wl, None, 0, 2, 4, factor=(U, torch.zeros(64, dtype=bool))
        )
        want = lin.weight.detach().float().clone()
        pruned = sparsegpt_rows(want, U, 2, 4)
        assert new.dtype == dtype and new.is_contiguous() and keep.dtype == torch.bool
        assert torch.equal(keep, ~pruned) and torch.equal(new, want.to(dtype))
